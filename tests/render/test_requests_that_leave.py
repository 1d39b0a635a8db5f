"""Requests that give up while queued: what still runs for them, what they still hold."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from pathlib import Path

import pytest

from imagegen.errors import InvalidRequest, Overloaded
from imagegen.models import EnhancedPrompt
from imagegen.render.base import ProgressCallback, RenderOutput
from imagegen.render.stage import RenderStage
from tests.render.test_batching import (
    BatchingBackend,
    _held_on_first,
    _until_queued,
    job,
    make_stage,
)


async def _until_waiting(stage: RenderStage, generation_id: str, requests: int) -> None:
    """Wait until ``requests`` deliveries of ``generation_id`` wait for its render: each first
    looks in storage (a thread of its own, as long as the machine makes it), then joins."""
    deadline = time.monotonic() + 10
    while (waiting := stage._waiters._requests[generation_id]) != requests:
        assert time.monotonic() < deadline, f"{waiting} requests wait, not {requests}"
        await asyncio.sleep(0.001)


async def test_a_stored_render_whose_request_left_while_queued_never_runs(tmp_path: Path) -> None:
    backend, stage, first = await _held_on_first(tmp_path, batch_size=1)
    dropped = asyncio.ensure_future(stage.render(job("dropped")))
    await _until_queued(stage, 2)
    dropped.cancel()  # its request timed out before its call started
    await asyncio.wait([dropped])
    assert stage._admitted == 1  # its slot is free at once: only the running job holds one
    backend.gate.set()
    await first
    await asyncio.sleep(0.05)  # anything still under way for it would run now
    assert backend.calls == [["first"]]
    assert not list(tmp_path.rglob("dropped*"))
    assert len(stage._waiters) == 0


async def test_a_queued_render_runs_while_another_delivery_of_it_waits(tmp_path: Path) -> None:
    backend, stage, first = await _held_on_first(tmp_path, batch_size=1)
    gone = asyncio.ensure_future(stage.render(job("dup")))
    await _until_queued(stage, 2)
    waiting = asyncio.ensure_future(stage.render(job("dup")))  # a redelivery, behind it
    await _until_waiting(stage, "dup", 2)
    gone.cancel()  # the first delivery's request timed out; the redelivery still waits
    await asyncio.wait([gone])
    backend.gate.set()
    await first
    image = await waiting
    assert backend.calls == [["first"], ["dup"]]
    assert (tmp_path / image.key).is_file()


async def test_a_queued_render_is_dropped_once_every_delivery_has_gone(tmp_path: Path) -> None:
    backend, stage, first = await _held_on_first(tmp_path, batch_size=1)
    deliveries = [asyncio.ensure_future(stage.render(job("dup"))) for _ in range(2)]
    await _until_queued(stage, 2)
    await _until_waiting(stage, "dup", 2)  # the second waits for the first's render
    for delivery in deliveries:
        delivery.cancel()
    await asyncio.wait(deliveries)
    assert stage._admitted == 1
    backend.gate.set()
    await first
    await asyncio.sleep(0.05)
    assert backend.calls == [["first"]]


async def test_a_started_stored_render_still_ends_and_is_stored(tmp_path: Path) -> None:
    backend, stage, first = await _held_on_first(tmp_path, batch_size=1)
    backend.gate.set()
    await first
    backend.gate.clear()
    backend.running.clear()
    attempt = asyncio.ensure_future(stage.render(job("started")))
    await asyncio.to_thread(backend.running.wait, 10)
    attempt.cancel()  # its call is running: it runs to the end and is stored for the retry
    backend.gate.set()
    retry = await stage.render(job("started"))
    assert backend.calls == [["first"], ["started"]]
    assert (tmp_path / retry.key).is_file()


async def test_a_started_render_that_fails_once_its_request_left_is_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    backend, stage, first = await _held_on_first(tmp_path, batch_size=1)
    backend.gate.set()
    await first
    backend.gate.clear()
    backend.running.clear()
    backend.refuse.add("orphan")
    attempt = asyncio.ensure_future(stage.render(job("orphan")))
    await asyncio.to_thread(backend.running.wait, 10)
    attempt.cancel()  # its call is running; nobody will hear how it ends
    await asyncio.wait([attempt])
    with caplog.at_level(logging.ERROR, logger="imagegen.render"):
        backend.gate.set()
        for _ in range(200):  # the render ends in its own task
            if len(stage._waiters) == 0:
                break
            await asyncio.sleep(0.01)
    assert len(stage._waiters) == 0
    [record] = [r for r in caplog.records if "after its requests had gone" in r.getMessage()]
    assert record.exc_info is not None and isinstance(record.exc_info[1], InvalidRequest)


async def test_a_redelivery_waits_for_the_render_under_way_without_taking_a_slot(
    tmp_path: Path,
) -> None:
    backend = BatchingBackend()
    backend.gate.clear()
    stage = make_stage(backend, tmp_path, render_queue_size=0)  # one job at a time, no queue
    gone = asyncio.ensure_future(stage.render(job("dup")))
    await asyncio.to_thread(backend.running.wait, 10)
    gone.cancel()  # its request timed out; its call runs on, to store the image
    await asyncio.wait([gone])
    retry = asyncio.ensure_future(stage.render(job("dup")))
    # Refused at once, or waiting behind the render for its generation's lock.
    while not retry.done() and stage._generation_lock._locks["dup"][1] < 2:
        await asyncio.sleep(0.001)
    assert not retry.done()
    assert stage._admitted == 1  # the render under way holds the one slot
    backend.gate.set()
    image = await retry
    assert (tmp_path / image.key).is_file()
    assert backend.calls == [["dup"]]
    assert stage._admitted == 0


async def test_a_failed_batch_renders_again_only_the_jobs_still_awaited(tmp_path: Path) -> None:
    backend = BatchingBackend()
    backend.gate.clear()
    backend.refuse = {"bad"}
    stage = make_stage(backend, tmp_path, render_batch_size=4, render_batch_window_ms=10_000)
    ok, bad, left = (
        asyncio.ensure_future(stage.render_png(job(gid))) for gid in ("ok", "bad", "left")
    )
    stored = asyncio.ensure_future(stage.render(job("stored")))
    await asyncio.to_thread(backend.running.wait, 10)  # the four share one call
    left.cancel()  # a PNG request gone: nobody needs its image
    stored.cancel()  # a stored render's request gone: its retry needs the image
    backend.gate.set()
    assert (await ok).png == b"\x89PNG ok"
    with pytest.raises(InvalidRequest):
        await bad
    for gone in (left, stored):
        with pytest.raises(asyncio.CancelledError):
            await gone
    retry = await stage.render(job("stored"))
    assert (tmp_path / retry.key).is_file()
    # In the order they arrived (a stored render looks in storage first), then each alone.
    assert sorted(backend.calls[0]) == ["bad", "left", "ok", "stored"]
    assert sorted(backend.calls[1:]) == [["bad"], ["ok"], ["stored"]]


async def test_a_window_ends_once_every_job_in_it_has_gone(tmp_path: Path) -> None:
    backend = BatchingBackend()
    stage = make_stage(backend, tmp_path, render_batch_size=4, render_batch_window_ms=10_000)
    lone = asyncio.ensure_future(stage.render_png(job("lone")))
    await _until_queued(stage, 1)
    await asyncio.sleep(0.05)  # the window is open, waiting for company
    lone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await lone
    worker = stage.batcher._worker
    assert worker is not None
    await asyncio.wait_for(worker, 2)  # not the rest of the 10 s window
    assert backend.calls == []


class SteppingBackend(BatchingBackend):
    """Renders ``steps`` steps, each once the test releases it, reporting each step's end."""

    def __init__(self, steps: int = 10) -> None:
        super().__init__()
        self.steps = steps
        self.step = threading.Semaphore(0)
        self.reported = 0

    def render_batch(
        self, jobs: list[EnhancedPrompt], *, progress: ProgressCallback | None = None
    ) -> list[RenderOutput]:
        self.calls.append([job.generation_id for job in jobs])
        self.running.set()
        for step in range(1, self.steps + 1):
            assert self.step.acquire(timeout=10)
            if progress is not None:
                progress(step, self.steps)
            self.reported = step
        return [
            RenderOutput(png=b"\x89PNG " + j.generation_id.encode(), width=8, height=8)
            for j in jobs
        ]


async def _step(backend: SteppingBackend, reported: int) -> None:
    """Release one step of the running call and wait until its end has been reported."""
    backend.step.release()
    while backend.reported < reported:
        await asyncio.sleep(0.001)


async def test_a_png_call_whose_requests_have_all_gone_stops_at_its_next_step(
    tmp_path: Path,
) -> None:
    backend = SteppingBackend(steps=10)
    stage = make_stage(backend, tmp_path, render_queue_size=0)
    gone = asyncio.ensure_future(stage.render_png(job("gone")))
    await asyncio.to_thread(backend.running.wait, 10)
    await _step(backend, 1)
    gone.cancel()  # its request timed out: nothing of its call is stored, nobody wants it
    await asyncio.sleep(0)  # the cancellation reaches its task
    with pytest.raises(Overloaded):  # until the step under way ends, the pipeline is busy
        await stage.render_png(job("refused"))
    backend.step.release()  # the second step's end: the call stops there
    with pytest.raises(asyncio.CancelledError):
        await gone
    assert backend.reported == 1 and stage._admitted == 0
    for _ in range(backend.steps):
        backend.step.release()
    assert (await stage.render_png(job("next"))).png.endswith(b"next")
    assert backend.calls == [["gone"], ["next"]]


async def test_a_call_runs_on_while_one_of_its_requests_still_waits(tmp_path: Path) -> None:
    backend = SteppingBackend(steps=3)
    stage = make_stage(backend, tmp_path, render_batch_size=2, render_batch_window_ms=2000)
    gone = asyncio.ensure_future(stage.render_png(job("gone")))
    kept = asyncio.ensure_future(stage.render_png(job("kept")))
    await asyncio.to_thread(backend.running.wait, 10)
    gone.cancel()
    for _ in range(backend.steps):
        backend.step.release()
    assert (await kept).png.endswith(b"kept")
    assert backend.calls == [["gone", "kept"]] and backend.reported == 3
    with pytest.raises(asyncio.CancelledError):
        await gone


async def test_a_started_stored_render_runs_every_step_once_its_request_left(
    tmp_path: Path,
) -> None:
    backend = SteppingBackend(steps=3)
    stage = make_stage(backend, tmp_path)
    attempt = asyncio.ensure_future(stage.render(job("stored")))
    await asyncio.to_thread(backend.running.wait, 10)
    attempt.cancel()  # its retry is answered from storage: the call runs to the end
    for _ in range(backend.steps):
        backend.step.release()
    retry = await stage.render(job("stored"))
    assert backend.reported == 3 and backend.calls == [["stored"]]
    assert (tmp_path / retry.key).is_file()
