"""The ``startup`` row: a process's start to ``/readyz``, to its first reply, and the warm-up.

Each start of enhance or persist (and of a bare functions-framework hello, the baseline) gives
two figures: the seconds to ``/readyz`` answering 200, and to the reply of a request sent at
that moment, as Knative's activator sends the request that woke a scaled-to-zero service.
Whatever a function builds on its first request (imports, clients, tables) is part of the
second, never of the first. Then, from starts of their own, the first reply's latency when the
request comes 1 s after ``/readyz`` (a pod that turned ready before its traffic: a minimum
scale, a scale-up ahead of load) against the same process's next reply; each reply on a new
connection, so the two differ only in what the process does. First, the floor: a hello that
reads one setting with pydantic-settings, as every stage must before it is ready.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
from _harness import Comparison, Served, interleave
from _rate import _stored_images
from _workload import served_env

PAUSE = 1.0
"""Seconds between ``/readyz`` and the first request, for the warm-up figure."""


def _replies(
    stage: str, env: dict[str, str], tmp: Path, bodies: Iterator[dict[str, Any]], pause: float
) -> tuple[float, float, float]:
    """(process start to ``/readyz``, the first reply's latency, the next reply's latency)."""
    server = Served(stage, env, log_dir=tmp, threads=4)
    try:
        ready = server.ready_after()
        time.sleep(pause)
        latencies = []
        for body in (next(bodies), next(bodies)):
            # A client (made before the clock starts) and a connection of its own for each:
            # both replies pay the connect, and differ only in what the process does.
            with httpx.Client(timeout=60, headers={"Connection": "close"}) as client:
                started = time.perf_counter()
                client.post(server.url, json=body).raise_for_status()
                latencies.append(time.perf_counter() - started)
        return ready, latencies[0], latencies[1]
    finally:
        server.stop()


def startup(rounds: int, tmp: Path) -> list[Comparison]:
    from tests.fakes.ollama_server import FakeOllama

    fake = FakeOllama().start()
    try:
        env = {**os.environ, **served_env(tmp / "startup", IMAGEGEN_OLLAMA_HOST=fake.url)}
        # Every request a new generation: a redelivery would be answered from storage. Two a
        # start: the untimed one, then each round's, and as many starts again for the warm-up.
        images = iter(_stored_images(tmp / "startup", 4 * rounds + 2))
        bodies: dict[str, Callable[[], dict[str, Any]]] = {
            "hello": lambda: {"n": 1},
            "hello_settings": lambda: {"n": 1},
            "enhance": lambda: {"prompt": f"a fox {uuid.uuid4().hex[:8]}", "model": "tiny"},
            "persist": lambda: next(images),
        }

        def start(stage: str, pause: float = 0.0) -> tuple[float, float, float]:
            return _replies(stage, env, tmp, iter(bodies[stage], None), pause)

        rows = []
        # The floor under the stages' rows: their settings alone, as pydantic-settings reads them.
        # One start of each first, untimed: the run's first process meets cold file caches.
        start("hello"), start("hello_settings")
        hello, floor = interleave(rounds, lambda: start("hello"), lambda: start("hello_settings"))
        rows.append(
            Comparison(
                "start-up: a hello with pydantic-settings -> /readyz vs a bare hello",
                "s",
                "lower",
                None,
                [ready for ready, _, _ in hello],
                [ready for ready, _, _ in floor],
            )
        )
        for stage in ("enhance", "persist"):
            # One start of the stage first, untimed, as the hellos had: its own files (the
            # modules only it imports) are cold in the page cache until it has started once.
            start(stage)
            hello, project = interleave(rounds, lambda: start("hello"), lambda s=stage: start(s))
            rows.append(
                Comparison(
                    f"start-up: {stage} process start -> /readyz vs a bare hello",
                    "s",
                    "lower",
                    1.3,
                    [ready for ready, _, _ in hello],
                    [ready for ready, _, _ in project],
                )
            )
            rows.append(
                Comparison(
                    f"cold start: {stage} process start -> first reply vs a bare hello's",
                    "s",
                    "lower",
                    None,
                    [ready + first for ready, first, _ in hello],
                    [ready + first for ready, first, _ in project],
                )
            )
            paused = [start(stage, PAUSE) for _ in range(rounds)]
            rows.append(
                Comparison(
                    f"warm-up: {stage}'s first reply {PAUSE:g} s after /readyz vs its next reply",
                    "s",
                    "lower",
                    None,
                    [next_ for _, _, next_ in paused],
                    [first for _, first, _ in paused],
                )
            )
        return rows
    finally:
        fake.stop()
