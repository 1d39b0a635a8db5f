"""Admission once renders are timed: what a call is taken to cost, and what follows it."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from imagegen.models import EnhancedPrompt
from imagegen.render.base import ProgressCallback, RenderOutput
from imagegen.render.cost import SCALED_AT_MOST, CallCost
from imagegen.render.stage import (
    ADMITTED_SHARE_OF_TIMEOUT,
    UNMEASURED_QUEUE,
    UNTIMED_RETRY_AFTER_CAP,
    UNTIMED_RETRY_AFTER_FLOOR,
    RenderStage,
)
from imagegen.settings import Settings
from imagegen.storage import LocalStorage
from tests.fakes.render_backend import ReadyBackend
from tests.render.test_batching import BatchingBackend, TwoPhaseBackend, job, make_stage


class UnbatchedBackend(ReadyBackend):
    """Renders one job a call: no ``render_batch``."""

    def render(
        self, job: EnhancedPrompt, *, progress: ProgressCallback | None = None
    ) -> RenderOutput:
        return RenderOutput(png=b"\x89PNG", width=8, height=8)


async def test_admission_leaves_room_for_what_follows_the_last_call(tmp_path: Path) -> None:
    stage = make_stage(BatchingBackend(), tmp_path, render_timeout=12)  # 10.2 s admitted
    stage.batcher.observe(1.0, [job("timed")])
    stage.batcher.observe_finish(2.0)  # its PNG is encoded once the pipeline is done with it
    stage._held = [job(f"held-{i}") for i in range(7)]
    assert stage.admits(job("eighth"))  # 8 x 1 s, then 2 s of encoding: 10 s
    stage._held.append(job("eighth"))
    assert not stage.admits(job("ninth"))  # its image would be encoded after 10.2 s


async def test_admission_keeps_a_margin_below_the_timeout(tmp_path: Path) -> None:
    # Calls are taken at their mean time, which about half of them overrun (more so under a
    # burst of requests): the queue is filled to a share of the timeout, not to all of it.
    assert 0 < ADMITTED_SHARE_OF_TIMEOUT < 1
    stage = make_stage(BatchingBackend(), tmp_path, render_timeout=10)
    stage.batcher.observe(1.0, [job("timed")])
    stage._held = [job(f"held-{i}") for i in range(7)]
    assert stage.admits(job("eighth"))  # 8 s: within 8.5 s
    stage._held.append(job("eighth"))
    assert not stage.admits(job("ninth"))  # 9 s: within the timeout, not within its margin
    assert stage.retry_after() == 8  # what the held jobs need, not the margin


async def test_the_time_from_a_call_to_its_outputs_is_measured(tmp_path: Path) -> None:
    backend = TwoPhaseBackend()
    backend.encode_seconds = 0.2
    stage = make_stage(backend, tmp_path)
    assert stage.batcher.finish_seconds is None
    await stage.render_png(job("a"))
    finish = stage.batcher.finish_seconds
    # The encode's 0.2 s sleep, read on another clock than the one that slept: a few
    # microseconds either way (0.19998 s was seen), never the near-zero of a call left out.
    assert finish is not None and finish >= 0.19


async def test_a_small_job_after_a_large_one_is_estimated_at_its_own_size_once_timed(
    tmp_path: Path,
) -> None:
    # One 1024² job of 8 steps took 1.6 s, the only call timed: a 256² job of 2 steps, 1/64
    # of its work, may cost as much (all of it overhead) until a call of its size is timed.
    stage = make_stage(BatchingBackend(), tmp_path, render_timeout=10)
    stage.batcher.observe(1.6, [job("large", width=1024, height=1024, steps=8)])
    small = job("small", width=256, height=256, steps=2)
    assert stage.batcher.estimate([small]) == pytest.approx(1.6)
    stage._held = [small] * 4  # 8 s with a fifth; 9.6 s with a sixth, beyond 8.5 s
    assert stage.admits(small)
    stage._held.append(small)
    assert not stage.admits(small)
    stage.batcher.observe(0.025, [small])  # its own size timed: the line has both parts
    assert stage.batcher.estimate([small]) == pytest.approx(0.025)
    stage._held = [small] * 20  # 0.5 s of work: a nearly idle pod takes more
    assert stage.admits(small)
    assert stage.retry_after() == 1


async def test_a_call_costs_its_overhead_and_a_rate_per_work() -> None:
    cost = CallCost()
    assert not cost.timed
    for work, seconds in ((1.0, 0.3), (4.0, 0.6), (16.0, 1.8)):  # 0.2 s + 0.1 s per unit
        cost.observe(work, seconds)
    assert (cost.overhead, cost.rate) == (pytest.approx(0.2), pytest.approx(0.1))
    assert cost(2.0) == pytest.approx(0.4)  # down as well as up
    assert cost(64.0) == pytest.approx(6.6)


async def test_one_work_timed_bounds_calls_of_every_work() -> None:
    # Only full batches of 4 timed, 0.5 s each: a call of one image may cost what they did (a
    # GPU's call costs about the same whatever its batch), never a quarter of it; a larger
    # call costs at most in proportion. Both are bounds on any line of non-negative parts.
    cost = CallCost()
    cost.observe(4.0, 0.5)
    cost.observe(4.0, 0.5)
    assert cost(1.0) == pytest.approx(0.5)
    assert cost(4.0) == pytest.approx(0.5)
    assert cost(8.0) == pytest.approx(1.0)
    cost.observe(1.0, 0.2)  # another size: the line's two parts are fitted
    assert cost.floor == 0.0
    assert (cost.overhead, cost.rate) == (pytest.approx(0.1), pytest.approx(0.1))
    assert cost(2.0) == pytest.approx(0.3)


async def test_a_job_far_larger_than_any_call_timed_is_counted_not_scaled_up(
    tmp_path: Path,
) -> None:
    # One 256² call of 1 step took 1.5 s, nearly all of it a call's fixed part. Scaled up by
    # the 128 times the work, a 1024² job of 8 steps was put at 192 s (it takes about 4 s):
    # two were admitted of a burst and the rest told to come back in 384 s.
    stage = make_stage(BatchingBackend(), tmp_path, render_timeout=600)
    stage.batcher.observe(1.5, [job("small", width=256, height=256, steps=1)])
    burst = [job(f"large-{i}", width=1024, height=1024, steps=8) for i in range(8)]
    for each in burst:
        if not stage.admits(each):
            break
        stage._held.append(each)
    assert len(stage._held) == stage.capacity == 1 + UNMEASURED_QUEUE
    assert stage.retry_after() <= UNTIMED_RETRY_AFTER_CAP
    stage.batcher.observe(4.0, burst[:1])  # its own size timed: admitted by the timings again
    assert stage.admits(burst[5])
    stage._held = burst * 12  # 96 x 4 s = 384 s, 4 s more within 510 s
    assert stage.admits(burst[0])
    assert stage.retry_after() == 384


async def test_a_job_the_timings_do_not_price_is_taken_however_many_priced_jobs_are_held(
    tmp_path: Path,
) -> None:
    # Counted with the jobs the timings priced, a job far larger than every call timed was
    # refused while more than a queue's worth of those were held, so never rendered, never
    # timed, and refused again at every retry.
    stage = make_stage(BatchingBackend(), tmp_path, render_timeout=120)
    stage.batcher.observe(1.0, [job("small-0", width=512, height=512, steps=4)])
    stage._held = [job(f"small-{i}", width=512, height=512, steps=4) for i in range(8)]
    large = job("large", width=512, height=512, steps=18)  # 4.5 times the work timed
    assert stage.admits(large)
    stage._held.append(large)
    assert stage.retry_after() == 8 + UNTIMED_RETRY_AFTER_FLOOR  # the priced 8 s, and a guess
    # Still counted among the jobs so held, and only while the priced ones leave time.
    stage._held += [job(f"large-{i}", width=512, height=512, steps=18) for i in range(4)]
    assert not stage.admits(large)
    stage._held = [job(f"small-{i}", width=512, height=512, steps=4) for i in range(110)]
    assert not stage.admits(large)  # 110 s of them, past 85 % of 120 s


async def test_a_running_call_the_timings_do_not_price_costs_its_time_so_far(
    tmp_path: Path,
) -> None:
    # Priced by scaling one 256² call's 1.5 s up, a 1024² call of 8 steps running on an idle
    # pod was put at 192 s: every job was refused while it ran, told to come back in minutes.
    backend = BatchingBackend()
    backend.gate.clear()
    stage = make_stage(backend, tmp_path, render_timeout=120)
    await stage._build_backend()
    stage.batcher.observe(1.5, [job("timed", width=256, height=256, steps=1)])
    running = asyncio.ensure_future(
        stage.render_png(job("large-0", width=1024, height=1024, steps=8))
    )
    waiting: asyncio.Future[Any] | None = None
    try:
        await asyncio.to_thread(backend.running.wait, 10)
        small = job("small", width=256, height=256, steps=1)
        assert stage.admits(job("large-1", width=1024, height=1024, steps=8))
        assert stage.admits(small)
        assert stage.retry_after() <= UNTIMED_RETRY_AFTER_FLOOR
        # Waiting behind it, an unpriced job is counted, not priced: a small job still fits.
        waiting = asyncio.ensure_future(
            stage.render_png(job("large-1", width=1024, height=1024, steps=8))
        )
        await asyncio.sleep(0.05)
        assert len(stage._held) == 2
        assert stage.admits(small)
        assert stage.retry_after() <= 2 * UNTIMED_RETRY_AFTER_FLOOR
    finally:
        backend.gate.set()
        await asyncio.gather(running, *([waiting] if waiting else []))
        stage.close()


async def test_one_work_timed_tells_the_cost_of_jobs_up_to_a_small_factor_larger() -> None:
    cost = CallCost()
    assert not cost.measures(1.0)
    cost.observe(4.0, 0.5)
    cost.observe(4.0, 0.5)
    assert cost.measures(0.01)  # smaller: at most what the calls timed took
    assert cost.measures(SCALED_AT_MOST * 4.0)
    assert cost(SCALED_AT_MOST * 4.0) == pytest.approx(SCALED_AT_MOST * 0.5)
    assert not cost.measures(SCALED_AT_MOST * 4.0 + 1)
    cost.observe(1.0, 0.2)  # another work: the overhead is told from the rate
    assert cost.measures(1000.0)
    assert cost(1000.0) == pytest.approx(0.1 + 0.1 * 1000)


async def test_a_partial_batch_after_full_ones_costs_a_whole_call(tmp_path: Path) -> None:
    # Every call takes 0.5 s whatever its batch, and only full batches were timed: the job
    # that makes a third call of one image waits 1.5 s, beyond 1.2 s; taken at a quarter of
    # a full call (1.125 s) it was admitted and timed out.
    stage = make_stage(BatchingBackend(), tmp_path, render_batch_size=4, render_timeout=1.5)
    stage.batcher.observe(0.5, [job(f"warm-up-{i}") for i in range(4)])
    stage._held = [job(f"held-{i}") for i in range(8)]  # two full calls: 1 s
    ninth = job("ninth")
    assert stage.batcher.backlog([*stage._held, ninth]) == pytest.approx(1.5)
    assert not stage.admits(ninth)
    assert stage.retry_after() == 1


async def test_a_batch_that_costs_what_one_image_costs_is_all_overhead() -> None:
    cost = CallCost()
    cost.observe(1.0, 0.4)  # the warm-up: one image...
    cost.observe(8.0, 0.4)  # ...then a full batch, in the same time
    assert (cost.overhead, cost.rate) == (pytest.approx(0.4), 0.0)


async def test_a_fit_with_a_negative_part_keeps_the_other() -> None:
    shrinking = CallCost()
    shrinking.observe(1.0, 0.5)
    shrinking.observe(2.0, 0.3)  # noise: larger and faster
    assert (shrinking.overhead, shrinking.rate) == (pytest.approx(0.4), 0.0)
    proportional = CallCost()
    proportional.observe(1.0, 0.1)
    proportional.observe(2.0, 0.5)  # a line through these starts below zero
    assert proportional.overhead == 0.0
    assert proportional(3.0) == pytest.approx(3 * (0.1 + 2 * 0.5) / 5)


async def test_a_call_of_a_work_timed_costs_what_those_calls_took() -> None:
    # A call's time grows faster than its work at larger sizes: one call four times the
    # pixels takes thirteen times as long. A line through it would put the next small call
    # at over 3x its time; the calls of that work say what it takes.
    cost = CallCost()
    for _ in range(3):
        cost.observe(4.0, 4.6)  # 1024², 20 steps, say
    cost.observe(12.8, 61.5)  # one 2048², 16 steps
    assert cost(4.0) == pytest.approx(4.6)
    assert cost(8.0) > cost(4.0)  # another work still goes by the line


async def test_the_cost_follows_the_last_calls() -> None:
    cost = CallCost(window=4)
    for _ in range(4):
        cost.observe(1.0, 10.0)  # a cold start: compiling
    for _ in range(4):
        cost.observe(1.0, 0.5)
    assert cost(1.0) == pytest.approx(0.5)


async def test_jobs_of_other_sizes_each_cost_a_whole_call(tmp_path: Path) -> None:
    # A call takes 0.4 s whatever its batch (the warm-up's one image and its full batch):
    # twelve jobs of twelve sizes are twelve calls, 4.8 s, not twelve shares of a batch.
    stage = make_stage(BatchingBackend(), tmp_path, render_batch_size=8, render_timeout=3.5)
    stage.batcher.observe(0.4, [job("warm-up")])
    stage.batcher.observe(0.4, [job(f"warm-up-{i}") for i in range(8)])
    sizes = [job(f"w{i}", width=256 + 16 * i) for i in range(12)]
    for each in sizes:
        if not stage.admits(each):
            break
        stage._held.append(each)
    assert len(stage._held) == 7  # 7 x 0.4 s end within 2.975 s; an eighth would not
    assert stage.retry_after() == 3  # 2.8 s
    assert stage.admits(job("joins", width=256))  # shares a call with w0: no call more


async def test_a_batch_of_one_key_costs_its_calls(tmp_path: Path) -> None:
    stage = make_stage(BatchingBackend(), tmp_path, render_batch_size=4, render_timeout=60)
    stage.batcher.observe(1.0, [job("warm-up")])
    stage.batcher.observe(4.0, [job(f"warm-up-{i}") for i in range(4)])  # 1 s per image
    stage._held = [job(f"held-{i}") for i in range(9)]  # calls of 4, 4 and 1
    assert stage.retry_after() == 9
    assert stage.batcher.calls(stage._held) == 3


async def test_a_held_batch_is_counted_by_what_the_backend_batches(tmp_path: Path) -> None:
    # A backend that cannot batch runs one job a call, whatever the batch size set.
    stage = make_stage(UnbatchedBackend(), tmp_path, render_batch_size=4, render_timeout=10)
    assert stage.batcher.max_size == 1
    stage.batcher.observe(6.0, [job("timed")])
    stage._held = [job("running")]
    assert not stage.admits(job("same"))  # 12 s: not a second image of one call
    assert stage.capacity == 1 + UNMEASURED_QUEUE


async def test_a_held_job_lets_in_only_what_shares_its_call(tmp_path: Path) -> None:
    stage = make_stage(BatchingBackend(), tmp_path, render_batch_size=4, render_timeout=10)
    stage.batcher.observe(6.0, [job("timed")])
    stage.batcher.observe(6.0, [job(f"timed-{i}") for i in range(4)])
    stage._held = [job("waiting", width=256)]
    assert stage.admits(job("joins", width=256))  # the same call: 6 s
    assert not stage.admits(job("other", width=512))  # a call of its own: 12 s


class _SlowUpload(LocalStorage):
    """Holds each PNG's create until ``release`` is set: a slow PutObject."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.storing = asyncio.Event()
        self.release = asyncio.Event()

    async def create(self, key: str, data: bytes, **options: Any) -> bool:
        if key.endswith(".png"):
            self.storing.set()
            await self.release.wait()
        return await super().create(key, data, **options)


async def test_a_job_whose_png_is_being_stored_is_no_call_still_to_run(tmp_path: Path) -> None:
    """Its call has ended: it is held until its PNG is stored, but the pipeline owes it
    nothing, so neither admission nor Retry-After counts a call for it."""
    storage = _SlowUpload(tmp_path)
    backend = BatchingBackend()
    stage = RenderStage(Settings(render_timeout=30), storage, lambda: backend)
    for _ in range(8):
        stage.batcher.observe(20.0, [job("timed")])  # a call takes 20 s
    storing = asyncio.ensure_future(stage.render(job("storing")))
    try:
        await asyncio.wait_for(storage.storing.wait(), 10)
        assert [held.generation_id for held in stage._held] == ["storing"]
        assert stage.batcher.backlog(stage._held) == 0.0
        assert stage.retry_after() == 1
        next_job = job("next")
        assert stage.admits(next_job)  # its own call only: 20 s of 30
        rendered = await stage.render_png(next_job)
        assert rendered.png.endswith(b"next")
    finally:
        storage.release.set()
        await storing
        stage.close()
    assert stage._held == []
    assert stage.batcher._past_call == []
