"""The ``rate`` row: requests/s of enhance and persist at concurrency 8 against a hello's."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from _harness import Comparison, interleave, served
from _workload import NOW, render_job, served_env


def _rate(url: str, bodies: list[dict[str, Any]], concurrency: int) -> float:
    async def run() -> float:
        queue = list(bodies)
        async with httpx.AsyncClient(timeout=60) as client:

            async def worker() -> None:
                while queue:
                    body = queue.pop()
                    (await client.post(url, json=body)).raise_for_status()

            started = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            return len(bodies) / (time.perf_counter() - started)

    return asyncio.run(run())


MIN_TICKS = 100
"""The fewest clock ticks a round's CPU figure rests on, each side: one tick is then 1% or less."""
MAX_BATCHES = 200
"""A round's batches at most, however few ticks they read (a stuck clock must not hang it)."""


def _ticks(pid: int) -> int:
    """CPU clock ticks of process ``pid`` and its children (gunicorn's worker), every thread's.

    ``utime`` and ``stime`` of each process's ``/proc/PID/stat`` (proc(5)): the whole thread
    group's, threads that have ended included, in clock ticks (10 ms where ``CLK_TCK`` is 100:
    about ten of a hello's requests, one of a stage's).
    """
    pids = [pid]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError):  # gone meanwhile
                stat = Path(f"/proc/{entry.name}/stat").read_text().rsplit(")", 1)[1].split()
                if int(stat[1]) == pid:  # the parent's id: proc(5)
                    pids.append(int(entry.name))
    ticks = 0
    for each in pids:
        with contextlib.suppress(OSError, IndexError):  # a child that ended meanwhile
            # After the name: state, ppid, ... utime and stime are fields 14 and 15 of proc(5).
            stat = Path(f"/proc/{each}/stat").read_text().rsplit(")", 1)[1].split()
            ticks += int(stat[11]) + int(stat[12])
    return ticks


def _cpu_seconds(pid: int) -> float:
    """CPU seconds of process ``pid`` and its children, every thread's (see :func:`_ticks`)."""
    return _ticks(pid) / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class _Round:
    """One side's round: its rate, and the server's clock ticks over the requests they cover."""

    per_second: float
    ticks: int
    requests: int

    @property
    def cpu_ms(self) -> float:
        """The server's CPU milliseconds per request, to within one tick over ``requests``."""
        return self.ticks * 1000 / os.sysconf("SC_CLK_TCK") / self.requests


def _measured(
    url: str, pid: int, batch: Callable[[], list[dict[str, Any]]], concurrency: int
) -> _Round:
    """Requests/s over one ``batch()``; the server's CPU over it and as many more as it takes.

    A hello's batch reads a few ticks: its CPU figure would move by a sixth with one tick. So
    after the timed batch, further batches go untimed until the round has read
    :data:`MIN_TICKS` (or ``batch()`` runs dry, or :data:`MAX_BATCHES` have gone).
    """
    before = _ticks(pid)
    bodies = batch()
    per_second = _rate(url, bodies, concurrency)
    sent, batches = len(bodies), 1
    while _ticks(pid) - before < MIN_TICKS and batches < MAX_BATCHES:
        bodies = batch()
        if not bodies:
            break
        _rate(url, bodies, concurrency)
        sent, batches = sent + len(bodies), batches + 1
    return _Round(per_second, _ticks(pid) - before, sent)


def _cpu_row(stage: str, concurrency: int, hello: list[_Round], ours: list[_Round]) -> Comparison:
    """The CPU-per-request row, its resolution in the note: the fewest ticks a round read.

    Raises:
        ValueError: a round read no tick at all, so it has no figure to compare.
    """
    fewest = {"hello": min(r.ticks for r in hello), stage: min(r.ticks for r in ours)}
    if min(fewest.values()) == 0:
        raise ValueError(f"CPU per request: {stage}: a round read no clock tick")
    tick_ms = 1000 / os.sysconf("SC_CLK_TCK")
    return Comparison(
        f"CPU per request: {stage} vs a hello, both at concurrency {concurrency}",
        "ms",
        "lower",
        None,
        [r.cpu_ms for r in hello],
        [r.cpu_ms for r in ours],
        note=(
            f"(clock ticks of {tick_ms:g} ms, the fewest in a round: hello {fewest['hello']},"
            f" {stage} {fewest[stage]}; a round's figure within"
            f" {100 / min(fewest.values()):.1f}%)"
        ),
    )


def _stored_images(storage: Path, count: int) -> list[dict[str, Any]]:
    """``count`` rendered images for persist: one tiny render, stored under ``count`` ids."""
    from imagegen import ImageGenService, Settings
    from imagegen.models import EnhancedPrompt
    from imagegen.render import stored_png
    from imagegen.storage.base import GenerationKeys

    async def run() -> list[dict[str, Any]]:
        settings = Settings(model="tiny", device="cpu", storage_url=str(storage))
        images = []
        async with ImageGenService(settings, preload=["tiny"]) as service:
            source = await service.render(EnhancedPrompt(**render_job("source")))
            png = await service.storage.get(source.key)
            assert source.rendered_at is not None
            for i in range(count):
                gid = f"p-{i:05d}-{uuid.uuid4().hex[:6]}"
                key = GenerationKeys(gid, NOW).image
                job = source.prompt.model_copy(update={"generation_id": gid})
                # Stored as render stores it: persist checks the event against this metadata.
                meta = stored_png.metadata(
                    job,
                    source.sha256,
                    stored_png.fingerprint(job),
                    source.timings,
                    source.rendered_at,
                )
                stored = await service.storage.put(
                    key, png, content_type="image/png", metadata=meta
                )
                image = source.model_copy(
                    update={
                        "generation_id": gid,
                        "key": key,
                        "location": stored.location,
                        "prompt": job,
                    }
                )
                images.append(image.model_dump(mode="json"))
        return images

    return asyncio.run(run())


def rate(rounds: int, tmp: Path, requests: int, concurrency: int = 8) -> list[Comparison]:
    from tests.fakes.ollama_server import FakeOllama

    fake = FakeOllama().start()
    rows = []
    targets = {"enhance": 3 * 89 / 1160, "persist": 3 * 59 / 1160}
    try:
        env = served_env(tmp / "rate", IMAGEGEN_OLLAMA_HOST=fake.url)
        # Persist takes each image once: enough for the rounds and their CPU top-ups (a few
        # ms of CPU a request, so a hundred ticks are a few hundred requests).
        images = iter(_stored_images(tmp / "rate", rounds * max(3 * requests, 300)))
        with (
            served("hello", env, log_dir=tmp, threads=concurrency + 4) as hello,
            served("enhance", env, log_dir=tmp, threads=concurrency + 4) as enhance,
            served("persist", env, log_dir=tmp, threads=concurrency + 4) as persist,
        ):
            hello_bodies = [{"n": i} for i in range(requests)]
            _rate(hello.url, hello_bodies, concurrency)  # warm
            batches: dict[str, Callable[[], list[dict[str, Any]]]] = {
                # One new prompt a batch, sent ``requests`` times, as before the top-ups.
                "enhance": lambda: (
                    [{"prompt": f"a fox {uuid.uuid4().hex[:8]}", "model": "tiny"}] * requests
                ),
                "persist": lambda: list(itertools.islice(images, requests)),
            }
            for stage, server in (("enhance", enhance), ("persist", persist)):
                baseline, project = interleave(
                    rounds,
                    lambda: _measured(hello.url, hello.pid, lambda: hello_bodies, concurrency),
                    lambda s=server, b=batches[stage]: _measured(s.url, s.pid, b, concurrency),
                )
                rows.append(
                    Comparison(
                        f"rate: {stage} at concurrency {concurrency} vs a hello at {concurrency}",
                        "req/s",
                        "higher",
                        targets[stage],
                        [r.per_second for r in baseline],
                        [r.per_second for r in project],
                        note="(target: 3x the rate before, as a share of the hello's)",
                    )
                )
                # The server's own CPU time per request: steadier than a rate on a shared
                # machine, where the client and other processes take the cores by turns.
                try:
                    rows.append(_cpu_row(stage, concurrency, baseline, project))
                except ValueError as error:
                    print(f"{error}: no CPU figure", flush=True)
    finally:
        fake.stop()
    return rows
