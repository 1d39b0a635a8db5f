"""The render stage around any backend: serialization, capacity, cancellation."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path

import pytest

from imagegen.errors import DependencyUnavailable, InvalidRequest, Overloaded
from imagegen.models import EnhancedPrompt
from imagegen.render import stored_png
from imagegen.render.base import ProgressCallback, RenderOutput
from imagegen.render.stage import RenderStage
from imagegen.settings import Settings
from imagegen.storage import LocalStorage
from imagegen.storage.base import StoredObject
from tests.fakes.render_backend import ReadyBackend, enhanced_prompt
from tests.fakes.storage import CountingStorage


class SlowBackend(ReadyBackend):
    """Records how many renders overlap; each takes ``seconds``."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.active = 0
        self.most_active = 0
        self.finished = 0
        self.started = threading.Event()  # set once a render is running in its thread
        self._lock = threading.Lock()

    def render(
        self, job: EnhancedPrompt, *, progress: ProgressCallback | None = None
    ) -> RenderOutput:
        with self._lock:
            self.active += 1
            self.most_active = max(self.most_active, self.active)
        self.started.set()
        time.sleep(self.seconds)
        with self._lock:
            self.active -= 1
            self.finished += 1
        return RenderOutput(
            png=b"\x89PNG fake " + job.generation_id.encode(), width=job.width, height=job.height
        )


def job(gid: str) -> EnhancedPrompt:
    return enhanced_prompt(generation_id=gid, prompt="p")


def stage(backend: SlowBackend, tmp_path: Path, queue: int) -> RenderStage:
    settings = Settings(render_queue_size=queue)
    return RenderStage(settings, LocalStorage(tmp_path), lambda: backend)


async def test_renders_never_overlap_on_one_pipeline(tmp_path: Path) -> None:
    backend = SlowBackend(0.05)
    render = stage(backend, tmp_path, queue=4)
    await asyncio.gather(*(render.render(job(f"g{i}")) for i in range(5)))
    assert backend.finished == 5 and backend.most_active == 1


async def test_beyond_the_queue_is_overloaded(tmp_path: Path) -> None:
    backend = SlowBackend(0.2)
    render = stage(backend, tmp_path, queue=1)
    results = await asyncio.gather(
        *(render.render(job(f"q{i}")) for i in range(3)), return_exceptions=True
    )
    refused = [r for r in results if isinstance(r, Overloaded)]
    assert len(refused) == 1 and refused[0].retry_after
    assert backend.finished == 2


async def test_a_cancelled_render_holds_the_pipeline_until_its_thread_ends(tmp_path: Path) -> None:
    backend = SlowBackend(0.3)
    render = stage(backend, tmp_path, queue=4)
    first = asyncio.ensure_future(render.render_png(job("cancelled")))
    assert await asyncio.to_thread(backend.started.wait, 30)
    first.cancel()  # a request timeout: the thread keeps running
    second = await render.render_png(job("next"))
    assert second.png.endswith(b"next")
    assert backend.most_active == 1
    with pytest.raises(asyncio.CancelledError):
        await first


async def test_concurrent_deliveries_of_one_job_render_once(tmp_path: Path) -> None:
    backend = SlowBackend(0.1)
    render = stage(backend, tmp_path, queue=4)
    first, second = await asyncio.gather(render.render(job("dup")), render.render(job("dup")))
    assert backend.finished == 1
    assert first == second


async def test_storage_is_asked_again_only_when_another_delivery_was_at_work(
    tmp_path: Path,
) -> None:
    storage = CountingStorage(tmp_path)
    render = RenderStage(Settings(render_queue_size=4), storage, lambda: SlowBackend(0.05))
    await render.render(job("alone"))
    assert storage.heads == 1  # before rendering; nobody else could have stored it since
    storage.heads = 0
    await asyncio.gather(render.render(job("twice")), render.render(job("twice")))
    assert storage.heads == 3  # both looked; the second looked again once the first was done


class _SlowFirstLook(LocalStorage):
    """The first look for a stored image answers only once :attr:`answer` is set, with what it
    saw before (S3 under load)."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.looking = asyncio.Event()
        self.answer = asyncio.Event()

    async def head(self, key: str) -> StoredObject | None:
        found = await super().head(key)
        if not self.looking.is_set():
            self.looking.set()
            await self.answer.wait()
        return found


async def test_a_delivery_whose_look_is_slow_does_not_render_what_another_stored_meanwhile(
    tmp_path: Path,
) -> None:
    # The second delivery starts, renders and stores while the first still waits for its look:
    # no delivery was at work when the first looked, and the first never waits for the lock.
    backend = SlowBackend(0.0)
    storage = _SlowFirstLook(tmp_path)
    render = RenderStage(Settings(render_queue_size=4), storage, lambda: backend)
    slow = asyncio.ensure_future(render.render(job("slow-look")))
    await storage.looking.wait()
    fast = await render.render(job("slow-look"))
    storage.answer.set()

    assert await slow == fast
    assert backend.finished == 1


async def test_a_cancelled_render_is_still_stored_for_the_retry(tmp_path: Path) -> None:
    backend = SlowBackend(0.2)
    render = stage(backend, tmp_path, queue=4)
    attempt = asyncio.ensure_future(render.render(job("timeout-1")))
    assert await asyncio.to_thread(backend.started.wait, 30)
    attempt.cancel()  # the request timed out
    retry = await render.render(job("timeout-1"))
    assert backend.finished == 1
    assert (tmp_path / retry.key).is_file()


async def test_another_job_under_a_rendered_generation_is_refused(tmp_path: Path) -> None:
    from imagegen.errors import InvalidRequest

    render = stage(SlowBackend(0.0), tmp_path, queue=4)
    await render.render(job("taken"))
    other = job("taken").model_copy(update={"prompt": "something else"})
    with pytest.raises(InvalidRequest) as caught:
        await render.render(other)
    assert caught.value.fields == ["generation_id"]


async def test_another_job_under_a_rendered_generation_is_refused_on_any_day(
    tmp_path: Path,
) -> None:
    """The image key carries the request's day: a job of the same id dated another day (an
    event dated otherwise) finds no PNG under its own key, and once stored a second image. The
    id's claim refuses it (once rendered: a look at the claim before each render would cost
    every render a round trip, for a caller's mistake); the same job again is still answered
    from storage."""
    from datetime import timedelta

    backend = SlowBackend(0.0)
    render = stage(backend, tmp_path, queue=4)
    first = await render.render(job("dated"))
    later = job("dated")
    later = later.model_copy(update={"requested_at": later.requested_at + timedelta(days=1)})
    with pytest.raises(InvalidRequest) as caught:
        await render.render(later)
    assert caught.value.fields == ["generation_id"] and first.key in caught.value.message
    assert [p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("dated.png")] == [first.key]
    assert await render.render(job("dated")) == first


class _ClaimWatcher(SlowBackend):
    """Looks for the generation's claim while its pipeline call runs."""

    def __init__(self, root: Path) -> None:
        super().__init__(0.0)
        self.root = root
        self.claimed_during: list[bool] = []

    def render(
        self, job: EnhancedPrompt, *, progress: ProgressCallback | None = None
    ) -> RenderOutput:
        claim = self.root / stored_png.claim_key(job.generation_id)
        deadline = time.monotonic() + 10  # a loaded machine's loop may be slow to write it
        while not claim.exists() and time.monotonic() < deadline:
            time.sleep(0.005)
        self.claimed_during.append(claim.exists())
        return super().render(job, progress=progress)


async def test_the_claim_is_written_while_the_pipeline_runs(tmp_path: Path) -> None:
    backend = _ClaimWatcher(tmp_path)
    render = RenderStage(Settings(), LocalStorage(tmp_path), lambda: backend)
    rendered = await render.render(job("claimed-early"))
    assert backend.claimed_during == [True]
    claim = json.loads((tmp_path / stored_png.claim_key("claimed-early")).read_text())
    assert claim == {"image": rendered.key}


async def test_a_job_refused_before_its_call_claims_nothing(tmp_path: Path) -> None:
    backend = SlowBackend(0.0)
    settings = Settings(model="tiny", served_models=["tiny"])
    render = RenderStage(settings, LocalStorage(tmp_path), lambda: backend)
    other = job("never-claimed").model_copy(update={"model": "tiny-klein"})
    with pytest.raises(InvalidRequest):
        await render.render(other)
    assert not (tmp_path / stored_png.claim_key("never-claimed")).exists()
    # The same id, as a job this deployment serves, is then rendered.
    assert (await render.render(job("never-claimed"))).key.endswith("never-claimed.png")


async def test_a_model_the_deployment_does_not_serve_is_refused(tmp_path: Path) -> None:
    # Render reads the setting enhance checks: a job for another model never reaches the
    # backend, even from a caller that skipped enhance.
    backend = SlowBackend(0.0)
    settings = Settings(model="tiny", served_models=["tiny"])
    render = RenderStage(settings, LocalStorage(tmp_path), lambda: backend)
    other = job("g-other").model_copy(update={"model": "tiny-klein"})

    with pytest.raises(InvalidRequest) as caught:
        await render.render(other)

    assert caught.value.fields == ["model"]
    assert caught.value.errors[0]["message"] == (
        "'tiny-klein' is not served here; served (IMAGEGEN_SERVED_MODELS): tiny"
    )
    assert backend.finished == 0
    assert (await render.render(job("g-tiny"))).model == "tiny"


async def test_loading_builds_the_backend_off_the_event_loop(tmp_path: Path) -> None:
    # Building the backend imports torch and diffusers: seconds the loop must not be stuck in.
    built_in: list[int] = []

    def factory() -> ReadyBackend:
        built_in.append(threading.get_ident())
        return ReadyBackend()

    render = RenderStage(Settings(), LocalStorage(tmp_path), factory)
    await render.load("tiny")
    await render.load("tiny")
    assert len(built_in) == 1, "built once"
    assert built_in[0] != threading.get_ident(), "built on the event loop's thread"


async def test_a_first_render_builds_the_backend_off_the_event_loop(tmp_path: Path) -> None:
    built_in: list[int] = []
    backend = SlowBackend(0.0)

    def factory() -> SlowBackend:
        built_in.append(threading.get_ident())
        return backend

    render = RenderStage(Settings(), LocalStorage(tmp_path), factory)
    await render.render(job("first"))
    await render.render(job("second"))
    assert len(built_in) == 1 and built_in[0] != threading.get_ident()
    assert backend.finished == 2


async def test_a_backend_that_fails_to_build_is_built_again_by_the_next_job(
    tmp_path: Path,
) -> None:
    attempts: list[int] = []
    backend = SlowBackend(0.0)

    def factory() -> SlowBackend:
        attempts.append(len(attempts))
        if len(attempts) == 1:
            raise RuntimeError("torch is not installed")
        return backend

    render = RenderStage(Settings(), LocalStorage(tmp_path), factory)
    with pytest.raises(RuntimeError, match="torch is not installed"):
        await render.render(job("first"))
    await render.render(job("second"))
    assert len(attempts) == 2 and backend.finished == 1


async def test_a_served_model_this_service_does_not_load_is_retried_not_failed(
    tmp_path: Path,
) -> None:
    # Two render Services, one model each, routed by Trigger: a job reaching the one that
    # does not load its model (a rollout under way) is fine, and must come back, not fail.
    class OneModel(SlowBackend):
        def is_loaded(self, model: str) -> bool:
            return model == "tiny"

    backend = OneModel(0.0)
    settings = Settings(model="tiny", served_models=["tiny", "tiny-klein"])
    render = RenderStage(settings, LocalStorage(tmp_path), lambda: backend, load_on_demand=False)
    await render.load("tiny")
    other = job("g-elsewhere").model_copy(update={"model": "tiny-klein"})

    with pytest.raises(DependencyUnavailable) as caught:
        await render.render(other)

    assert caught.value.retryable and caught.value.status == 503
    assert caught.value.retry_after is not None and caught.value.retry_after >= 30
    assert "'tiny-klein'" in str(caught.value) and "IMAGEGEN_MODEL" in str(caught.value)
    assert backend.finished == 0
    assert not (tmp_path / stored_png.claim_key("g-elsewhere")).exists()


async def test_a_claim_whose_image_is_not_stored_is_not_called_rendered(tmp_path: Path) -> None:
    """A job claimed its id and stored no image (its render failed, or a pod died): a job of
    another day under that id is still refused (the claim cannot tell a failed render from one
    under way elsewhere), but not as "already rendered"."""
    from datetime import timedelta

    from imagegen.storage.base import GenerationKeys

    storage = LocalStorage(tmp_path)
    first = job("unstored")
    first_key = GenerationKeys(first.generation_id, first.requested_at).image
    await stored_png.claim(storage, first, GenerationKeys(first.generation_id, first.requested_at))
    later = first.model_copy(update={"requested_at": first.requested_at + timedelta(days=1)})
    render = stage(SlowBackend(0.0), tmp_path, queue=4)

    with pytest.raises(InvalidRequest) as caught:
        await render.render(later)

    assert caught.value.fields == ["generation_id"]
    assert "already rendered" not in caught.value.message
    assert first_key in caught.value.message and "not stored" in caught.value.message
    assert not list(tmp_path.rglob("*.png"))


@pytest.mark.parametrize("cut", [1, 10, -2])
async def test_a_claim_read_cut_short_is_a_retryable_503_not_no_claim(
    tmp_path: Path, cut: int
) -> None:
    """A claim that could not be read (a download cut short) counted as no claim: a job of
    another day under a claimed id stored a second image. An existing claim that cannot be
    read is a storage fault: a 503, retried, and no image stored."""
    from datetime import timedelta

    from imagegen.storage.base import GenerationKeys

    storage = LocalStorage(tmp_path)
    first = job("cut-claim")
    keys = GenerationKeys(first.generation_id, first.requested_at)
    await stored_png.claim(storage, first, keys)
    claim = tmp_path / stored_png.claim_key(first.generation_id)
    claim.write_bytes(claim.read_bytes()[:cut])
    later = first.model_copy(update={"requested_at": first.requested_at + timedelta(days=1)})
    backend = SlowBackend(0.0)
    render = stage(backend, tmp_path, queue=4)

    for each in (later, first):
        with pytest.raises(DependencyUnavailable) as caught:
            await render.render(each)
        assert caught.value.status == 503
        assert stored_png.claim_key(first.generation_id) in caught.value.message
    assert not list(tmp_path.rglob("*.png"))


def _reordered(job: EnhancedPrompt) -> EnhancedPrompt:
    """``job`` as a retry may write it: its metadata's keys in another order, its time at +02:00."""
    from datetime import timedelta, timezone

    later = job.requested_at.astimezone(timezone(timedelta(hours=2)))
    metadata = dict(reversed(list(job.metadata.items())))
    return job.model_copy(update={"metadata": metadata, "requested_at": later})


async def test_the_same_job_written_otherwise_is_answered_from_storage(tmp_path: Path) -> None:
    backend = SlowBackend(0.0)
    render = stage(backend, tmp_path, queue=4)
    first = job("written").model_copy(update={"metadata": {"a": "1", "b": {"y": 2, "x": 1}}})
    rendered = await render.render(first)
    again = _reordered(first)
    assert again.model_dump_json() != first.model_dump_json()

    answered = await render.render(again)

    assert backend.finished == 1
    assert (answered.key, answered.sha256) == (rendered.key, rendered.sha256)
    # Another job is still another: a value changed, not only where it is written.
    other = first.model_copy(update={"metadata": {"a": "1", "b": {"y": 2, "x": 3}}})
    with pytest.raises(InvalidRequest) as caught:
        await render.render(other)
    assert caught.value.fields == ["generation_id"]


async def test_a_png_stored_with_the_digest_of_before_answers_its_redelivery(
    tmp_path: Path,
) -> None:
    """A PNG stored by the release before carries only the digest of the job's JSON as it was
    written: a redelivered event (its first delivery's bytes) is answered from it."""
    import hashlib

    from imagegen.storage.base import GenerationKeys

    storage = LocalStorage(tmp_path)
    first = job("before").model_copy(update={"metadata": {"b": "2", "a": "1"}})
    key = GenerationKeys(first.generation_id, first.requested_at).image
    png = b"\x89PNG stored before"
    digest = hashlib.sha256(first.model_dump_json(exclude={"enhanced_at"}).encode()).hexdigest()
    sha256 = hashlib.sha256(png).hexdigest()
    meta = stored_png.metadata(first, sha256, digest, {}, first.requested_at)
    for later in ("job-canonical", "job-stable"):  # what that release wrote: job alone
        meta.pop(later)
    await storage.create(key, png, content_type="image/png", metadata=meta)
    backend = SlowBackend(0.0)
    render = stage(backend, tmp_path, queue=4)

    answered = await render.render(EnhancedPrompt.model_validate_json(first.model_dump_json()))

    assert backend.finished == 0 and answered.sha256 == sha256
    # persist, of either release, checks an event against the digest of its job as written.
    assert stored_png.fingerprint(first) == digest
