"""``Retry-After`` of a full pod: the running call at no less than its time so far."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from imagegen.errors import Overloaded
from imagegen.render.base import RenderOutput
from imagegen.render.stage import (
    UNTIMED_RETRY_AFTER_CAP,
    UNTIMED_RETRY_AFTER_FLOOR,
    RenderStage,
)
from tests.render.test_batching import BatchingBackend, job, make_stage


async def _running(
    backend: BatchingBackend, stage: RenderStage, gid: str
) -> asyncio.Future[RenderOutput]:
    """``gid``'s call, held running at the backend's gate."""
    backend.gate.clear()
    backend.running.clear()
    running = asyncio.ensure_future(stage.render_png(job(gid)))
    await asyncio.to_thread(backend.running.wait, 10)
    return running


async def test_a_running_call_that_overruns_its_estimate_counts_its_time_so_far(
    tmp_path: Path,
) -> None:
    backend = BatchingBackend()
    stage = make_stage(backend, tmp_path, render_queue_size=0, render_timeout=120)
    stage.batcher.observe(0.05, [job("timed")])
    running = await _running(backend, stage, "slow")
    stage.batcher.running_since = time.perf_counter() - 50  # compiling a new shape, say
    with pytest.raises(Overloaded) as refused:
        await stage.render_png(job("next"))
    assert refused.value.retry_after >= 50  # not the 0.05 s it was taken to need
    backend.gate.set()
    await running


async def test_a_running_call_counts_what_is_left_of_its_estimate(tmp_path: Path) -> None:
    backend = BatchingBackend()
    stage = make_stage(backend, tmp_path, render_queue_size=0, render_timeout=120)
    stage.batcher.observe(10.0, [job("timed")])
    running = await _running(backend, stage, "nearly-done")
    stage.batcher.running_since = time.perf_counter() - 9  # 1 s of its 10 left
    with pytest.raises(Overloaded) as refused:
        await stage.render_png(job("next"))
    assert refused.value.retry_after <= 2  # not the 10 s of a call just begun
    backend.gate.set()
    await running


async def test_what_waits_behind_an_overrunning_call_is_added(tmp_path: Path) -> None:
    backend = BatchingBackend()
    stage = make_stage(backend, tmp_path, render_timeout=120)
    stage.batcher.observe(4.0, [job("timed")])
    running = await _running(backend, stage, "slow")
    stage.batcher.running_since = time.perf_counter() - 50
    waiting = job("waiting", width=512)
    stage._held.append(waiting)  # admitted, not yet in the queue
    assert 58 <= stage.retry_after() <= 64  # 50 s so far, then 8 s of its own (twice the work)
    stage._held.remove(waiting)
    backend.gate.set()
    await running


async def test_before_any_call_is_timed_retry_after_is_the_floor_when_nothing_ran(
    tmp_path: Path,
) -> None:
    stage = make_stage(BatchingBackend(), tmp_path, render_queue_size=0, render_timeout=600)
    stage._held = [job("loading")]  # its model loads: no call has run yet
    assert stage.retry_after() == UNTIMED_RETRY_AFTER_FLOOR  # not the whole 600 s timeout


async def test_before_any_call_is_timed_each_held_call_costs_the_running_ones_time(
    tmp_path: Path,
) -> None:
    backend = BatchingBackend()
    stage = make_stage(backend, tmp_path, render_queue_size=1, render_timeout=600)
    running = await _running(backend, stage, "first")
    stage.batcher.running_since = time.perf_counter() - 7.5
    stage._held.append(job("other", width=512))  # a call of its own after it
    assert stage.retry_after() == 16  # 2 calls x 7.5 s so far, rounded up
    stage.batcher.running_since = time.perf_counter() - 1000
    assert stage.retry_after() == UNTIMED_RETRY_AFTER_CAP  # a guess is never the timeout
    stage._held.pop()
    backend.gate.set()
    await running
    stage._held = [job("held")]  # timed now: the measured time again
    assert stage.retry_after() == 1


async def test_an_untimed_pod_still_holds_only_its_unmeasured_queue(tmp_path: Path) -> None:
    backend = BatchingBackend()
    stage = make_stage(backend, tmp_path)
    running = await _running(backend, stage, "first")
    queued = [asyncio.ensure_future(stage.render_png(job(f"q{i}"))) for i in range(4)]
    await asyncio.sleep(0)
    assert stage._admitted == stage.capacity
    with pytest.raises(Overloaded) as refused:
        await stage.render_png(job("one-too-many"))
    assert UNTIMED_RETRY_AFTER_FLOOR <= refused.value.retry_after <= UNTIMED_RETRY_AFTER_CAP
    backend.gate.set()
    await asyncio.gather(running, *queued)
