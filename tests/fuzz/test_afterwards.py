"""After hostile input: every function still alive and ready, and its memory not growing."""

from __future__ import annotations

import gc
import json
import tracemalloc

import pytest

from tests.functions.clients import InProcessFunction
from tests.fuzz.conftest import STAGES, check
from tests.fuzz.inputs import POISON, VALID, binary, plain, structured

# Hostile and valid requests alike; a pass is repeated and must not leave memory behind.
GROWTH_BOUND = 256 * 1024  # bytes per pass of 30 requests: a leak of 9 KiB a request trips it
MEASURED_PASSES = 3


def _one_pass(function: InProcessFunction, stage: str) -> None:
    valid = json.dumps(VALID[stage]).encode()
    for i in range(3):
        for request in (
            binary(stage, POISON[i % len(POISON)]),
            structured(stage, POISON[(i + 1) % len(POISON)]),
            plain(POISON[(i + 2) % len(POISON)]),
            binary(stage, valid, **{"ce-id": f"again-{i}"}),
            binary(stage, valid, **{"ce-time": "0001-01-01T00:00:00Z"}),
            binary(stage, b'{"metadata": ' + b"[" * 40 + b"]" * 40 + b"}"),
            binary(stage, valid, **{"ce-specversion": "2.0"}),
            binary(stage, valid, **{f"ce-x{n}": "v" * 50 for n in range(60)}),
            plain(valid),
            binary(stage, valid, **{"content-type": "text/plain"}),
        ):
            response = function.client.request(
                request.method, request.path, headers=request.headers, content=request.body
            )
            check(stage, response)


@pytest.mark.parametrize("stage", STAGES)
def test_still_alive_and_not_growing(functions: dict[str, InProcessFunction], stage: str) -> None:
    """A leak grows every pass; a cache filling or another thread's work shows in one at most."""
    function = functions[stage]
    _one_pass(function, stage)  # caches, first-use imports and the like settle here
    gc.collect()
    growths = []
    tracemalloc.start()
    try:
        for _ in range(MEASURED_PASSES):
            before = tracemalloc.get_traced_memory()[0]
            _one_pass(function, stage)
            gc.collect()
            growths.append(tracemalloc.get_traced_memory()[0] - before)
    finally:
        tracemalloc.stop()
    assert min(growths) < GROWTH_BOUND, f"{stage} kept {growths} bytes in passes of 30 requests"
    assert function.get("/healthz").status_code == 200
    assert function.get("/readyz").json()["ready"] is True
