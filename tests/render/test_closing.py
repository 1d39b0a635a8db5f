"""A render stage that closes (its service ending): what still runs, what is answered, what is
written, and what its queue still costs."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import pytest

from imagegen.errors import DependencyUnavailable
from imagegen.models import EnhancedPrompt
from imagegen.render import stored_png
from imagegen.render.base import ProgressCallback, RenderOutput
from imagegen.render.batching import Batch, Batcher
from imagegen.render.stage import RenderStage
from imagegen.settings import Settings
from imagegen.storage import LocalStorage
from tests.render.test_batching import BatchingBackend, _until_queued, job, make_stage
from tests.render.test_requests_that_leave import _until_waiting


class LoadingBackend(BatchingBackend):
    """Holds its models as a real backend does: loaded by ``load``, all released by ``close``."""

    def __init__(self) -> None:
        super().__init__()
        self.loaded: set[str] = set()
        self.loads: list[str] = []

    def load(self, model: str) -> float:
        self.loads.append(model)
        self.loaded.add(model)
        return 0.0

    def is_loaded(self, model: str) -> bool:
        return model in self.loaded

    def close(self) -> None:
        self.loaded.clear()


class DecodingBackend(BatchingBackend):
    """Reports its last step, then holds at ``decode_gate`` before it returns (the VAE)."""

    def __init__(self) -> None:
        super().__init__()
        self.decoding = threading.Event()
        self.decode_gate = threading.Event()

    def render_batch(
        self, jobs: list[EnhancedPrompt], *, progress: ProgressCallback | None = None
    ) -> list[RenderOutput]:
        outputs = super().render_batch(jobs, progress=progress)  # reports its one step
        self.decoding.set()
        self.decode_gate.wait(10)
        return outputs


async def _settled() -> None:
    """Wait for every other task on the loop to end (the claims a render began writing)."""
    others = asyncio.all_tasks() - {asyncio.current_task()}
    if others:
        await asyncio.wait(others, timeout=10)


@pytest.mark.parametrize("load_on_demand", [True, False])
async def test_a_closed_stage_never_loads_its_model_again(
    tmp_path: Path, load_on_demand: bool
) -> None:
    """A second delivery of a generation waits for the first; the stage closes under the first,
    releasing the model. The second then finds the model unloaded: it is refused as the
    closing is, never loaded again (memory the close gave back) nor called a routing
    disagreement."""
    backend = LoadingBackend()
    backend.gate.clear()
    settings = Settings(render_batch_size=4, model="tiny")
    stage = RenderStage(
        settings, LocalStorage(tmp_path), lambda: backend, load_on_demand=load_on_demand
    )
    await stage.load("tiny")  # as a server preloads it
    first = asyncio.ensure_future(stage.render(job("twice")))
    await asyncio.to_thread(backend.running.wait, 10)
    again = asyncio.ensure_future(stage.render(job("twice")))  # a redelivery, behind it
    await _until_waiting(stage, "twice", 2)
    stage.close()
    backend.gate.set()
    for refused in await asyncio.gather(first, again, return_exceptions=True):
        assert isinstance(refused, DependencyUnavailable), refused
        assert "render is shutting down" in refused.message
        assert refused.retry_after == 10
    assert backend.loads == ["tiny"]
    assert not stage.is_loaded("tiny")
    with pytest.raises(DependencyUnavailable, match="shutting down"):
        await stage.load("tiny")
    assert backend.loads == ["tiny"]


async def test_a_load_under_way_when_the_stage_closes_is_let_go(tmp_path: Path) -> None:
    """The stage closes while its model loads (a process told to exit during its start): the
    load cannot be stopped, but what it loaded is released once it ends, and its caller is
    refused as the closing is."""
    backend = LoadingBackend()
    loading, go_on = threading.Event(), threading.Event()
    load = backend.load

    def slow_load(model: str) -> float:
        loading.set()
        go_on.wait(10)
        return load(model)

    backend.load = slow_load  # type: ignore[method-assign]
    stage = make_stage(backend, tmp_path)
    loaded = asyncio.ensure_future(stage.load("tiny"))
    assert await asyncio.to_thread(loading.wait, 10), "never loaded"
    stage.close()
    go_on.set()
    with pytest.raises(DependencyUnavailable, match="shutting down"):
        await asyncio.wait_for(loaded, 10)
    assert backend.loads == ["tiny"] and not stage.is_loaded("tiny")


@pytest.mark.parametrize("kind", ["render", "render_png"])
async def test_a_call_past_its_last_step_is_answered_when_the_stage_closes(
    tmp_path: Path, kind: str
) -> None:
    """Closed after its last step (decoding): no step is left to stop it at and its image is
    made, so it is encoded, stored and answered, not thrown away; the job queued behind it
    never runs."""
    backend = DecodingBackend()
    stage = make_stage(backend, tmp_path, render_batch_size=1)
    decoding = asyncio.ensure_future(getattr(stage, kind)(job("decoded")))
    assert await asyncio.to_thread(backend.decoding.wait, 10), "never decoded"
    queued = asyncio.ensure_future(stage.render(job("queued")))
    await _until_queued(stage, 2)
    stage.close()
    backend.decode_gate.set()
    answered = await asyncio.wait_for(decoding, 10)
    if kind == "render":
        assert (tmp_path / answered.key).read_bytes() == b"\x89PNG decoded"
    else:
        assert answered.png == b"\x89PNG decoded"
    with pytest.raises(DependencyUnavailable, match="shutting down"):
        await asyncio.wait_for(queued, 10)
    assert backend.calls == [["decoded"]]


async def test_jobs_queued_behind_a_closing_stage_claim_nothing(tmp_path: Path) -> None:
    """The claim is written as a job's call starts: the jobs still queued when the stage
    closes never start, so none of them claims its generation."""
    backend = BatchingBackend()
    backend.gate.clear()
    stage = make_stage(backend, tmp_path, render_batch_size=1)
    running = asyncio.ensure_future(stage.render(job("running")))
    await asyncio.to_thread(backend.running.wait, 10)
    queued = [asyncio.ensure_future(stage.render(job(f"queued-{i}"))) for i in range(2)]
    await _until_queued(stage, 3)
    stage.close()
    backend.gate.set()
    for refused in await asyncio.gather(running, *queued, return_exceptions=True):
        assert isinstance(refused, DependencyUnavailable), refused
    await _settled()  # a claim begun is written by now
    claims = [p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.json")]
    assert claims == [stored_png.claim_key("running")]
    assert backend.calls == [["running"]]


async def test_a_closed_batcher_tells_no_queued_job_its_call_starts() -> None:
    gate = threading.Event()
    running = threading.Event()

    def run(batch: Batch) -> list[RenderOutput]:
        running.set()
        gate.wait(10)
        assert batch.progress is not None
        batch.progress(1, 1)
        return [RenderOutput(png=b"", width=8, height=8) for _ in batch.jobs]

    batcher = Batcher(run, asyncio.Lock())
    started: list[str] = []

    def submit(gid: str) -> asyncio.Future[RenderOutput]:
        return asyncio.ensure_future(batcher.submit(job(gid), on_start=lambda: started.append(gid)))

    first = submit("first")
    await asyncio.to_thread(running.wait, 10)
    queued = [submit("second"), submit("third")]
    while batcher.depth != 3:
        await asyncio.sleep(0.001)
    batcher.close()
    gate.set()
    for cancelled in await asyncio.gather(first, *queued, return_exceptions=True):
        assert isinstance(cancelled, asyncio.CancelledError), cancelled
    assert started == ["first"]


async def test_a_stopping_call_costs_one_step_in_the_backlog() -> None:
    """Once nobody waits for the running call (its requests timed out), it ends at its next
    step's end: what the pipeline still needs for it, and so ``Retry-After``, is one step of
    its estimate, not the whole of it."""
    gate = threading.Event()
    running = threading.Event()

    def run(batch: Batch) -> Any:
        running.set()
        gate.wait(10)
        assert batch.progress is not None
        batch.progress(1, 20)  # raises: nobody waits for this call any more
        return [RenderOutput(png=b"", width=8, height=8) for _ in batch.jobs]

    batcher = Batcher(run, asyncio.Lock())
    long = job("long", steps=20)
    batcher.observe(10.0, [long])  # a call of it takes 10 s: 0.5 s a step
    request = asyncio.ensure_future(batcher.submit(long))
    await asyncio.to_thread(running.wait, 10)
    backlog = batcher.backlog([long])
    assert backlog is not None and 9.0 < backlog <= 10.0  # someone waits: the whole call
    request.cancel()  # its request timed out: the call stops at its next step's end
    await asyncio.sleep(0.01)
    backlog = batcher.backlog([long])
    assert backlog is not None and backlog == pytest.approx(0.5)
    gate.set()
    with pytest.raises(asyncio.CancelledError):
        await request
    assert batcher.backlog([]) == 0.0
    # The next call is costed in full again.
    gate.clear()
    running.clear()
    again = asyncio.ensure_future(batcher.submit(job("again", steps=20)))
    await asyncio.to_thread(running.wait, 10)
    backlog = batcher.backlog([])
    assert backlog is not None and backlog > 9.0
    again.cancel()
    gate.set()
    with pytest.raises(asyncio.CancelledError):
        await again


async def test_a_stopping_call_frees_retry_after_for_a_full_pod(tmp_path: Path) -> None:
    """A pod whose slots are all held by requests that timed out (their call stopping) tells
    the next client to come back in about a step, not after the whole call."""
    backend = BatchingBackend()
    backend.gate.clear()
    stage = make_stage(backend, tmp_path, render_queue_size=0, render_timeout=120)
    stage.batcher.observe(30.0, [job("timed", steps=20)])
    gone = asyncio.ensure_future(stage.render_png(job("gone", steps=20)))
    await asyncio.to_thread(backend.running.wait, 10)
    assert stage.retry_after() >= 29
    gone.cancel()  # a PNG request that timed out: the call stops, its slot is held till then
    await asyncio.sleep(0.01)
    assert stage._admitted == 1
    assert stage.retry_after() == 2  # 30 s / 20 steps, rounded up
    backend.gate.set()
    with pytest.raises(asyncio.CancelledError):
        await gone
