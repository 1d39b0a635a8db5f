"""The ``ollama-down`` rows: enhance's latency while Ollama cannot write prompts, against an
Ollama that answers at once.

Three ways down, each with the default settings (retries, circuit breaker, template fallback):

- refusing connections (nothing listens), requests one at a time: the target row;
- accepting connections and never answering, one at a time, with ``ollama_timeout`` of
  :data:`HANG_TIMEOUT` (the default, 30 s, would hold each of the first requests 30 s);
- answering its health check and model load but never a prompt, 8 requests at once over HTTP
  to the served enhance function, the same timeout: a model runner that hangs.

Each gives the median, the mean and the 95th percentile of a round's latencies; only the
median of the first has a target. Requests one at a time see the circuit open after
``ollama_breaker_threshold`` failures, so the median falls after them; the mean and the 95th
percentile show what those first requests paid (their latencies are in the note). At once,
every request sent before the circuit opens waits for its own timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import statistics
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
from _harness import Comparison, interleave, served
from _workload import NOW, served_env

HANG_TIMEOUT = 1.0
"""``ollama_timeout`` (seconds) of the rows where Ollama never answers."""
CONCURRENCY = 8


@contextlib.contextmanager
def hanging_server() -> Iterator[str]:
    """A loopback port that accepts connections and never answers: yields its base URL."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=128)
    held: list[socket.socket] = []

    def accept() -> None:
        with contextlib.suppress(OSError):  # closed: the server is done
            while True:
                held.append(listener.accept()[0])

    thread = threading.Thread(target=accept, name="hanging-ollama", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        with contextlib.suppress(OSError):
            listener.shutdown(socket.SHUT_RDWR)  # wakes the accept
        listener.close()
        thread.join(timeout=5)
        for connection in held:
            connection.close()


def _one_at_a_time(host: str, requests: int, **settings: Any) -> list[float]:
    """Each request's seconds through a fresh enhance stage, in order."""
    from imagegen.enhance import EnhanceStage
    from imagegen.models import GenerationRequest
    from imagegen.plugins import PluginSet
    from imagegen.settings import Settings

    async def run() -> list[float]:
        config = Settings(ollama_host=host, plugins=["time_of_day", "art_style"], **settings)
        stage = EnhanceStage(config, PluginSet.from_settings(config))
        times = []
        for i in range(requests):
            request = GenerationRequest(prompt=f"a fox {i}", model="tiny")
            started = time.perf_counter()
            await stage.run(request, generation_id=f"e-{uuid.uuid4().hex[:8]}", now=NOW)
            times.append(time.perf_counter() - started)
        await stage.aclose()
        return times

    return asyncio.run(run())


def _at_once(tmp: Path, fake: Any, requests: int) -> list[float]:
    """Each request's seconds, ``CONCURRENCY`` at a time, to a freshly started enhance function
    (its circuit closed) once its warm-up has loaded the model on ``fake``."""
    timeout = f"{HANG_TIMEOUT:g}"
    env = served_env(
        tmp / "ollama-down", IMAGEGEN_OLLAMA_HOST=fake.url, IMAGEGEN_OLLAMA_TIMEOUT=timeout
    )
    loads = len(fake.load_requests)
    with served("enhance", env, log_dir=tmp, threads=CONCURRENCY + 4) as enhance:
        deadline = time.perf_counter() + 30
        while len(fake.load_requests) == loads:  # the warm-up, after /readyz: done
            if time.perf_counter() > deadline:
                raise TimeoutError(f"enhance's warm-up did not load the model:\n{enhance.logs()}")
            time.sleep(0.01)

        async def run() -> list[float]:
            sent = iter(range(requests))
            times = [0.0] * requests  # in the order sent
            async with httpx.AsyncClient(timeout=60) as client:

                async def worker() -> None:
                    for index in sent:
                        body = {"prompt": f"a fox {uuid.uuid4().hex[:8]}", "model": "tiny"}
                        started = time.perf_counter()
                        (await client.post(enhance.url, json=body)).raise_for_status()
                        times[index] = time.perf_counter() - started

                await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
            return times

        return asyncio.run(run())


def _p95(times: list[float]) -> float:
    return statistics.quantiles(times, n=20, method="inclusive")[-1]


STATISTICS: dict[str, Callable[[list[float]], float]] = {
    "p50": statistics.median,
    "mean": statistics.fmean,
    "p95": _p95,
}
"""A round's figure, per row: the median (the target row's), the mean, the 95th percentile."""


def _rows(
    label: str,
    baseline: list[list[float]],
    project: list[list[float]],
    *,
    target: float | None,
    first: int,
) -> list[Comparison]:
    """The p50, mean and p95 rows of one way down; the first ``first`` requests' latencies
    (the median of each over the rounds) in the p50 row's note."""
    paid = ", ".join(
        f"{statistics.median(times[i] for times in project):.2f}"
        for i in range(min(first, len(project[0])))
    )
    rows = []
    for name, figure in STATISTICS.items():
        rows.append(
            Comparison(
                label.format(statistic=name),
                "s",
                "lower",
                target if name == "p50" else None,
                [figure(times) for times in baseline],
                [figure(times) for times in project],
                statistic="median",
                note=f"(the first {first}: {paid} s; then the circuit is open)"
                if name == "p50"
                else "",
            )
        )
    return rows


def ollama_down(rounds: int, tmp: Path, requests: int, at_once: int) -> list[Comparison]:
    from imagegen.settings import Settings
    from tests.fakes.ollama_server import FakeOllama, slow
    from tests.functions.servers import free_port

    threshold = Settings().ollama_breaker_threshold
    fake = FakeOllama().start()
    hung = FakeOllama().start()
    hung.answer(slow(3600.0))  # every prompt; its health check and the model's load answer
    rows = []
    try:
        down = f"http://127.0.0.1:{free_port()}"  # nothing listens: connection refused
        baseline, project = interleave(
            rounds,
            lambda: _one_at_a_time(fake.url, requests),
            lambda: _one_at_a_time(down, requests),
        )
        rows += _rows(
            f"ollama down: enhance {{statistic}} over {requests} requests vs an instant Ollama",
            baseline,
            project,
            target=1.2,
            first=threshold,
        )
        with hanging_server() as hanging:
            baseline, project = interleave(
                rounds,
                lambda: _one_at_a_time(fake.url, requests, ollama_timeout=HANG_TIMEOUT),
                lambda: _one_at_a_time(hanging, requests, ollama_timeout=HANG_TIMEOUT),
            )
        rows += _rows(
            f"ollama hanging, timeout {HANG_TIMEOUT:g} s: enhance {{statistic}} over {requests}"
            " requests vs an instant Ollama",
            baseline,
            project,
            target=None,
            first=threshold,
        )
        baseline, project = interleave(
            rounds, lambda: _at_once(tmp, fake, at_once), lambda: _at_once(tmp, hung, at_once)
        )
        rows += _rows(
            f"ollama hanging on prompts, timeout {HANG_TIMEOUT:g} s: served enhance {{statistic}}"
            f" over {at_once} requests, {CONCURRENCY} at once, vs an instant Ollama",
            baseline,
            project,
            target=None,
            first=CONCURRENCY,
        )
    finally:
        fake.stop()
        hung.stop()
    return rows
