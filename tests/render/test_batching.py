"""Micro-batching and admission: which jobs share a call, and what a full pod answers."""

from __future__ import annotations

import asyncio
import math
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from imagegen.errors import InternalError, InvalidRequest, Overloaded
from imagegen.models import EnhancedPrompt, LoraHint
from imagegen.render.base import (
    BatchRenderBackend,
    ProgressCallback,
    RenderOutput,
    TwoPhaseRenderBackend,
)
from imagegen.render.batching import Batcher, batch_key
from imagegen.render.stage import UNMEASURED_QUEUE, RenderStage
from imagegen.settings import Settings
from imagegen.storage import LocalStorage
from tests.fakes.render_backend import ReadyBackend, enhanced_prompt


class BatchingBackend(ReadyBackend):
    """Records every call; each takes ``seconds``; can be held at a barrier while running."""

    def __init__(self, seconds: float = 0.0) -> None:
        self.seconds = seconds
        self.calls: list[list[str]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.running = threading.Event()
        self.refuse: set[str] = set()

    def render(
        self, job: EnhancedPrompt, *, progress: ProgressCallback | None = None
    ) -> RenderOutput:
        return self.render_batch([job], progress=progress)[0]

    def render_batch(
        self, jobs: list[EnhancedPrompt], *, progress: ProgressCallback | None = None
    ) -> list[RenderOutput]:
        self.calls.append([job.generation_id for job in jobs])
        self.running.set()
        self.gate.wait(10)
        time.sleep(self.seconds)
        bad = [job.generation_id for job in jobs if job.generation_id in self.refuse]
        if bad:
            raise InvalidRequest(f"cannot render {bad}", errors=[{"field": "prompt"}])
        if progress is not None:
            progress(1, 1)
        return [
            RenderOutput(png=b"\x89PNG " + job.generation_id.encode(), width=8, height=8)
            for job in jobs
        ]


class TwoPhaseBackend(BatchingBackend):
    """Splits each call: ``denoise_batch`` (the pipeline) and ``encode_batch``, held at a gate;
    each encoding takes ``encode_seconds``."""

    def __init__(self) -> None:
        super().__init__()
        self.encoding = threading.Event()
        self.encode_gate = threading.Event()
        self.encode_gate.set()
        self.encode_fails = False
        self.encode_seconds = 0.0

    def denoise_batch(
        self, jobs: list[EnhancedPrompt], *, progress: ProgressCallback | None = None
    ) -> list[RenderOutput]:
        return self.render_batch(jobs, progress=progress)

    def encode_batch(
        self, jobs: list[EnhancedPrompt], pixels: list[RenderOutput]
    ) -> list[RenderOutput]:
        self.encoding.set()
        self.encode_gate.wait(10)
        time.sleep(self.encode_seconds)
        if self.encode_fails:
            raise OSError("disk full")
        return pixels


class Fatal(BaseException):
    """Not an :class:`Exception`: what no ``except Exception`` on its way catches."""


class FatalBackend(BatchingBackend):
    """Raises :class:`Fatal` from a call with the job ``fatal`` in it."""

    def render_batch(
        self, jobs: list[EnhancedPrompt], *, progress: ProgressCallback | None = None
    ) -> list[RenderOutput]:
        outputs = super().render_batch(jobs, progress=progress)
        if any(job.generation_id == "fatal" for job in jobs):
            raise Fatal
        return outputs


class Clock:
    """Monotonic seconds that move only when a test moves them."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def job(gid: str, **overrides: Any) -> EnhancedPrompt:
    return enhanced_prompt(**{"generation_id": gid, "prompt": f"prompt {gid}", **overrides})


def make_stage(backend: BatchingBackend, tmp_path: Path, **settings: Any) -> RenderStage:
    return RenderStage(Settings(**settings), LocalStorage(tmp_path), lambda: backend)


async def _held_on_first(
    tmp_path: Path, *, batch_size: int
) -> tuple[BatchingBackend, RenderStage, asyncio.Future[RenderOutput]]:
    """A stage batching without a window, its pipeline held on the job ``first``: what is sent
    next waits behind that call."""
    backend = BatchingBackend()
    backend.gate.clear()
    stage = make_stage(backend, tmp_path, render_batch_size=batch_size)
    first = asyncio.ensure_future(stage.render_png(job("first")))
    await asyncio.to_thread(backend.running.wait, 10)
    return backend, stage, first


async def _until_queued(stage: RenderStage, depth: int) -> None:
    """Wait until ``depth`` jobs are running or waiting in the stage's batcher."""
    deadline = time.monotonic() + 10
    while stage.batcher.depth != depth:
        assert time.monotonic() < deadline, f"{stage.batcher.depth} jobs queued, not {depth}"
        await asyncio.sleep(0.001)


def test_the_backend_double_batches() -> None:
    assert isinstance(BatchingBackend(), BatchRenderBackend)


def test_batch_key_separates_what_changes_the_call() -> None:
    base = job("a")
    assert batch_key(base) == batch_key(job("b", prompt="other", seed=9))
    for change in (
        {"model": "other"},
        {"width": 512},
        {"height": 512},
        {"steps": 3},
        {"guidance": 1.0},
        {"loras": [LoraHint(name="ink", path="ink.safetensors", weight=0.5)]},
    ):
        assert batch_key(job("b", **change)) != batch_key(base), change


async def test_unbatched_every_job_runs_alone(tmp_path: Path) -> None:
    backend = BatchingBackend()
    stage = make_stage(backend, tmp_path)  # batch size 1, the default
    await asyncio.gather(*(stage.render(job(f"g{i}")) for i in range(4)))
    assert sorted(backend.calls) == [["g0"], ["g1"], ["g2"], ["g3"]]


async def test_compatible_jobs_within_the_window_share_one_call(tmp_path: Path) -> None:
    backend = BatchingBackend()
    stage = make_stage(backend, tmp_path, render_batch_size=4, render_batch_window_ms=2000)
    outputs = await asyncio.gather(*(stage.render_png(job(f"g{i}")) for i in range(4)))
    # Four arrived within the window: the batch filled and ran without waiting out the window.
    assert backend.calls == [["g0", "g1", "g2", "g3"]]
    assert [o.png for o in outputs] == [b"\x89PNG g" + str(i).encode() for i in range(4)]


async def test_jobs_queued_behind_a_call_form_the_next_batch(tmp_path: Path) -> None:
    backend, stage, first = await _held_on_first(tmp_path, batch_size=3)
    rest = [asyncio.ensure_future(stage.render_png(job(f"q{i}"))) for i in range(5)]
    await _until_queued(stage, 1 + 5)
    backend.gate.set()
    await asyncio.gather(first, *rest)
    assert backend.calls == [["first"], ["q0", "q1", "q2"], ["q3", "q4"]]


async def test_a_window_counts_from_its_jobs_arrival_not_from_the_last_call() -> None:
    clock = Clock()
    backend = BatchingBackend()
    backend.gate.clear()
    batcher = Batcher(
        lambda batch: backend.render_batch(batch.jobs),
        asyncio.Lock(),
        max_size=2,
        window=10.0,
        clock=clock,
    )
    first = [asyncio.ensure_future(batcher.submit(job(f"first-{i}"))) for i in range(2)]
    await asyncio.to_thread(backend.running.wait, 10)  # a full batch: no window
    # One job each of three keys queues behind that call: no company comes for any of them.
    rest = [asyncio.ensure_future(batcher.submit(job(f"steps-{n}", steps=n))) for n in (3, 4, 5)]
    while batcher.depth != 2 + 3:
        await asyncio.sleep(0.001)
    clock.now += 10.0  # each has waited out its window behind the running call
    backend.gate.set()
    # One call after another, at once: not a fresh 10 s window before each.
    await asyncio.wait_for(asyncio.gather(*first, *rest), 5)
    assert backend.calls == [["first-0", "first-1"], ["steps-3"], ["steps-4"], ["steps-5"]]
    batcher.close()


async def test_the_next_call_runs_while_the_last_one_is_encoded(tmp_path: Path) -> None:
    backend = TwoPhaseBackend()
    assert isinstance(backend, TwoPhaseRenderBackend)
    backend.encode_gate.clear()
    stage = make_stage(backend, tmp_path)
    first = asyncio.ensure_future(stage.render_png(job("first")))
    await asyncio.to_thread(backend.encoding.wait, 10)  # first's PNG is being encoded...
    second = asyncio.ensure_future(stage.render_png(job("second")))
    while backend.calls != [["first"], ["second"]]:  # ...and the pipeline renders the next
        await asyncio.sleep(0.001)
    assert not first.done()
    backend.encode_gate.set()
    outputs = await asyncio.gather(first, second)
    assert [o.png for o in outputs] == [b"\x89PNG first", b"\x89PNG second"]


async def test_a_failed_encoding_fails_its_jobs_with_an_internal_error(tmp_path: Path) -> None:
    backend = TwoPhaseBackend()
    backend.encode_fails = True
    stage = make_stage(backend, tmp_path, render_batch_size=2, render_batch_window_ms=2000)
    results = await asyncio.gather(
        stage.render_png(job("a")), stage.render_png(job("b")), return_exceptions=True
    )
    assert [type(r) for r in results] == [InternalError, InternalError]
    backend.encode_fails = False
    # The pipeline is free: a full batch (no waiting out the window) renders.
    c, d = await asyncio.gather(stage.render_png(job("c")), stage.render_png(job("d")))
    assert (c.png, d.png) == (b"\x89PNG c", b"\x89PNG d")


async def test_incompatible_jobs_never_share_a_call(tmp_path: Path) -> None:
    backend, stage, first = await _held_on_first(tmp_path, batch_size=4)
    rest = [
        asyncio.ensure_future(stage.render_png(job(gid, width=w)))
        for gid, w in (("a256", 256), ("b512", 512), ("c256", 256), ("d512", 512))
    ]
    await _until_queued(stage, 1 + 4)
    backend.gate.set()
    await asyncio.gather(first, *rest)
    # Oldest first: the 256 batch (its two jobs), then the 512 one.
    assert backend.calls == [["first"], ["a256", "c256"], ["b512", "d512"]]


async def test_a_cancelled_job_leaves_its_batch_before_it_runs(tmp_path: Path) -> None:
    backend, stage, first = await _held_on_first(tmp_path, batch_size=4)
    kept = asyncio.ensure_future(stage.render_png(job("kept")))
    dropped = asyncio.ensure_future(stage.render_png(job("dropped")))
    await _until_queued(stage, 1 + 2)
    dropped.cancel()  # its request timed out while it waited
    backend.gate.set()
    await asyncio.gather(first, kept)
    with pytest.raises(asyncio.CancelledError):
        await dropped
    assert backend.calls == [["first"], ["kept"]]


async def test_a_cancelled_png_request_keeps_its_slot_until_its_call_ends(tmp_path: Path) -> None:
    backend = BatchingBackend()
    backend.gate.clear()
    stage = make_stage(backend, tmp_path, render_queue_size=0)  # one job at a time, no queue
    first = asyncio.ensure_future(stage.render_png(job("first")))
    await asyncio.to_thread(backend.running.wait, 10)
    first.cancel()  # its request timed out: the pipeline's thread runs on
    second = asyncio.ensure_future(stage.render_png(job("second")))
    await asyncio.wait([first, second], return_when=asyncio.FIRST_COMPLETED)
    # The pod still does the first job's work: a second job is refused, not queued behind it.
    assert not first.done()
    assert isinstance(second.exception(), Overloaded)
    backend.gate.set()
    with pytest.raises(asyncio.CancelledError):
        await first
    # Its call has ended: the slot is free again.
    assert (await stage.render_png(job("third"))).png.endswith(b"third")
    assert backend.calls == [["first"], ["third"]]


async def test_a_png_request_cancelled_while_waiting_frees_its_slot_at_once(
    tmp_path: Path,
) -> None:
    backend = BatchingBackend()
    backend.gate.clear()
    stage = make_stage(backend, tmp_path, render_queue_size=1)  # one running, one waiting
    first = asyncio.ensure_future(stage.render_png(job("first")))
    await asyncio.to_thread(backend.running.wait, 10)
    dropped = asyncio.ensure_future(stage.render_png(job("dropped")))
    await _until_queued(stage, 2)
    dropped.cancel()  # its request timed out before its call started: nothing runs for it
    await asyncio.wait([dropped])
    kept = asyncio.ensure_future(stage.render_png(job("kept")))
    await _until_queued(stage, 2)  # admitted, behind the running job
    backend.gate.set()
    await asyncio.gather(first, kept)
    assert backend.calls == [["first"], ["kept"]]


async def test_one_failing_job_fails_alone(tmp_path: Path) -> None:
    backend = BatchingBackend()
    backend.refuse = {"bad"}
    stage = make_stage(backend, tmp_path, render_batch_size=3, render_batch_window_ms=2000)
    results = await asyncio.gather(
        *(stage.render_png(job(gid)) for gid in ("ok1", "bad", "ok2")), return_exceptions=True
    )
    assert isinstance(results[1], InvalidRequest)
    assert [r.png for r in (results[0], results[2]) if isinstance(r, RenderOutput)] == [
        b"\x89PNG ok1",
        b"\x89PNG ok2",
    ]
    assert backend.calls[0] == ["ok1", "bad", "ok2"]  # then each alone
    assert sorted(backend.calls[1:]) == [["bad"], ["ok1"], ["ok2"]]


async def test_an_error_that_is_no_exception_reaches_its_job_and_the_queue_goes_on(
    tmp_path: Path,
) -> None:
    backend = FatalBackend()
    backend.gate.clear()
    stage = make_stage(backend, tmp_path)
    fatal = asyncio.ensure_future(stage.render_png(job("fatal")))
    await asyncio.to_thread(backend.running.wait, 10)
    after = asyncio.ensure_future(stage.render_png(job("after")))
    await _until_queued(stage, 2)
    backend.gate.set()
    with pytest.raises(Fatal):
        await asyncio.wait_for(fatal, 5)
    # Nothing new arrives to restart the queue: the job behind it runs all the same.
    assert (await asyncio.wait_for(after, 5)).png == b"\x89PNG after"
    assert stage._admitted == 0


async def test_redeliveries_in_one_batch_render_and_store_once(tmp_path: Path) -> None:
    backend = BatchingBackend()
    stage = make_stage(backend, tmp_path, render_batch_size=4, render_batch_window_ms=200)
    replies = await asyncio.gather(
        stage.render(job("dup")), stage.render(job("dup")), stage.render(job("other"))
    )
    assert replies[0] == replies[1]
    assert sum(call.count("dup") for call in backend.calls) == 1


async def test_progress_reaches_every_job_of_a_batch(tmp_path: Path) -> None:
    backend = BatchingBackend()
    stage = make_stage(backend, tmp_path, render_batch_size=2, render_batch_window_ms=2000)
    seen: dict[str, list[tuple[int, int]]] = {"a": [], "b": []}
    await asyncio.gather(
        *(
            stage.render_png(job(gid), progress=lambda s, t, gid=gid: seen[gid].append((s, t)))
            for gid in seen
        )
    )
    assert backend.calls == [["a", "b"]]
    assert seen == {"a": [(1, 1)], "b": [(1, 1)]}


async def test_retry_after_is_the_queue_at_the_measured_render_time(tmp_path: Path) -> None:
    backend = BatchingBackend(seconds=0.05)
    stage = make_stage(backend, tmp_path, render_queue_size=2)
    await stage.render_png(job("timed"))
    per_job = stage.batcher.estimate([job("timed")])
    assert per_job is not None and per_job >= 0.05
    backend.gate.clear()
    held = [asyncio.ensure_future(stage.render_png(job(f"h{i}"))) for i in range(3)]
    await asyncio.to_thread(backend.running.wait, 10)
    with pytest.raises(Overloaded) as refused:
        await stage.render_png(job("one-too-many"))
    assert refused.value.retry_after == max(1, math.ceil(3 * per_job))
    backend.gate.set()
    await asyncio.gather(*held)


async def test_retry_after_grows_with_the_render_time(tmp_path: Path) -> None:
    stage = make_stage(BatchingBackend(), tmp_path, render_queue_size=0)
    stage.batcher.observe(7.2, [job("timed")])  # as if a render had taken 7.2 s
    stage._held = [job("held-0")]
    assert stage.retry_after() == 8  # 1 job x 7.2 s, rounded up
    stage._held = [job(f"held-{i}") for i in range(5)]
    assert stage.retry_after() == 36


async def test_the_queue_holds_what_finishes_within_the_timeout(tmp_path: Path) -> None:
    stage = make_stage(BatchingBackend(), tmp_path, render_timeout=60)
    assert stage.capacity == 1 + UNMEASURED_QUEUE  # nothing timed yet
    stage.batcher.observe(0.4, [job("timed")])
    stage._held = [job(f"held-{i}") for i in range(126)]
    assert stage.admits(job("last"))  # 127 x 0.4 s: 50.8 s, within 51 s (a margin of 9 s)
    stage._held.append(job("last"))
    assert not stage.admits(job("late"))
    stage = make_stage(BatchingBackend(), tmp_path, render_timeout=60)
    stage.batcher.observe(90.0, [job("timed")])
    assert stage.admits(job("alone"))  # even one is late: an idle pod still takes it
    stage._held = [job("alone")]
    assert not stage.admits(job("second"))


async def test_admission_scales_the_measured_time_by_each_jobs_pixels_and_steps(
    tmp_path: Path,
) -> None:
    # Timed on 256² jobs of 2 steps (0.5 s each): a 1024² job of 2 steps is 16 times the work.
    stage = make_stage(BatchingBackend(), tmp_path, render_timeout=70)  # 59.5 s admitted
    small = job("small", width=256, height=256, steps=2)
    stage.batcher.observe(0.5, [small])
    stage.batcher.observe(1.0, [small, small])
    large = [job(f"large-{i}", width=1024, height=1024, steps=2) for i in range(8)]
    assert stage.batcher.estimate(large[:1]) == pytest.approx(8.0)
    for each in large:
        if not stage.admits(each):
            break
        stage._held.append(each)
    assert len(stage._held) == 7  # 7 x 8 s end within 59.5 s; an eighth would not
    assert stage.retry_after() == 56
    assert stage.admits(small)  # 56 + 0.5 s still does
    stage._held = [small] * 110
    assert stage.admits(small) and not stage.admits(large[0])  # 55 s held: 0.5 s fits, 8 s not


async def test_a_fixed_queue_size_wins(tmp_path: Path) -> None:
    stage = make_stage(
        BatchingBackend(), tmp_path, render_queue_size=3, render_batch_size=2, render_timeout=60
    )
    stage.batcher.observe(0.01, [job("timed")])
    assert stage.capacity == 2 + 3


async def test_a_queue_of_zero_holds_one_call_and_no_more(tmp_path: Path) -> None:
    # Knative's setting: the pod takes what one pipeline call runs; the activator queues.
    for batch in (1, 4):
        stage = make_stage(
            BatchingBackend(), tmp_path, render_queue_size=0, render_batch_size=batch
        )
        assert stage.capacity == batch
        stage.batcher.observe(0.01, [job("timed")])
        assert stage.capacity == batch  # measured render times change nothing


@pytest.mark.parametrize("batch_size", [1, 4])
async def test_the_warm_up_renders_one_image_then_a_full_batch(
    tmp_path: Path, batch_size: int
) -> None:
    backend = BatchingBackend(seconds=0.01)
    stage = make_stage(backend, tmp_path, render_batch_size=batch_size)
    assert not stage.batcher.timed
    await stage.warm_up("tiny")
    batches = [[f"warm-up-{i}" for i in range(batch_size)]] if batch_size > 1 else []
    assert backend.calls == [["warm-up"], *batches]
    assert stage.batcher.timed  # admission is sized from here on


async def test_sixty_four_at_once_are_all_admitted_once_timed(tmp_path: Path) -> None:
    backend = BatchingBackend(seconds=0.002)
    stage = make_stage(backend, tmp_path, render_batch_size=8)
    await stage.warm_up("tiny")
    results = await asyncio.gather(
        *(stage.render_png(job(f"g{i}")) for i in range(64)), return_exceptions=True
    )
    assert all(isinstance(r, RenderOutput) for r in results)
    assert max(len(call) for call in backend.calls) == 8
