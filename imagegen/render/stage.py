"""The render stage: admission, (micro-batched) rendering, idempotent storage of the PNG."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

from opentelemetry import trace

from imagegen._locks import KeyedLocks
from imagegen._threads import DaemonPool
from imagegen.errors import (
    DependencyUnavailable,
    ImageGenError,
    InternalError,
    InvalidRequest,
    Overloaded,
)
from imagegen.identity import stage_time
from imagegen.models import EnhancedPrompt, RenderedImage
from imagegen.modelspec import family_for, request_errors
from imagegen.render import stored_png
from imagegen.render._lora import check_loras
from imagegen.render._waiters import Waiters
from imagegen.render.base import (
    BatchRenderBackend,
    ProgressCallback,
    RenderBackend,
    RenderOutput,
    TwoPhaseRenderBackend,
)
from imagegen.render.batching import Batch, Batcher
from imagegen.render.cost import work_of
from imagegen.settings import Settings
from imagegen.storage.base import GenerationKeys, Storage
from imagegen.telemetry import answered_again, instruments, tracer

__all__ = ["RenderStage"]

log = logging.getLogger("imagegen.render")

PNG = "image/png"

# Renders that may wait before any render has been timed (then the queue follows the timings).
UNMEASURED_QUEUE = 4

# The share of render_timeout a timed pod fills with estimated work. The estimate is the mean
# of past calls, so about half of all calls take longer than it, and a queue filled to the
# timeout times out its last jobs whenever its calls run slow on the whole: a burst of
# requests brings PNG encoding and storing onto the cores the pipeline uses (on CPU, and the
# host thread that drives a GPU), which the calls timed before it never competed with, and
# storing the PNG and the reply are not estimated at all. The margin is a share, not a
# number of seconds, as such a slowdown is: the longer the queue, the more it adds up to.
ADMITTED_SHARE_OF_TIMEOUT = 0.85

# Retry-After before any call has been timed: the running call's time so far for each call the
# held jobs need, never less than the floor (a client is not sent back at once, again and
# again) nor more than the cap (a guess, not a measure: the first call to end times the pod,
# and the next answer follows the timings).
UNTIMED_RETRY_AFTER_FLOOR = 2.0
UNTIMED_RETRY_AFTER_CAP = 30.0

# Seconds a job for a model this Service does not load waits before its retry: about what a
# GPU revision of the model's own needs to start.
_UNLOADED_RETRY_AFTER = 60.0


class RenderStage:
    """Renders :class:`EnhancedPrompt` jobs on one backend and stores them under their keys.

    A diffusers pipeline keeps per-call state, so pipeline calls are serialized; with
    ``settings.render_batch_size`` above 1, compatible jobs share a call (:mod:`batching`).
    Jobs it cannot finish well within ``render_timeout`` are refused with :class:`Overloaded`
    (:meth:`admits`), whose ``retry_after`` is the time the pipeline needs for the jobs already
    held (:meth:`retry_after`). A job whose image is
    already stored is answered from storage without rendering again, which makes redelivered
    events idempotent.

    Args:
        settings: Settings (queue size, model, whether to load on demand).
        storage: Where PNGs are written.
        backend_factory: Builds the backend on first use (keeps torch out of processes that
            never render).
        load_on_demand: Load a model the first time a job asks for it. Servers preload instead
            and answer a job for another model with a retryable 503 (a routing disagreement).
    """

    def __init__(
        self,
        settings: Settings,
        storage: Storage,
        backend_factory: Callable[[], RenderBackend],
        *,
        load_on_demand: bool = True,
    ) -> None:
        self.settings = settings
        self.storage = storage
        self._backend_factory = backend_factory
        self._backend: RenderBackend | None = None
        self._backend_built = threading.Lock()  # built once, on or off the loop
        self._building: asyncio.Future[RenderBackend] | None = None
        self._load_on_demand = load_on_demand
        self._lock = asyncio.Lock()
        self._held: list[EnhancedPrompt] = []  # the jobs admitted and not yet done
        self._generation_lock = KeyedLocks()  # one render per generation at a time
        self._stores = 0  # images this process stored (or found stored by another replica)
        self._waiters = Waiters()  # stored renders, dropped unstarted once nobody waits
        self._batcher: Batcher | None = None
        self._closed = False  # set by close(): no model is loaded, no job rendered, from then on

    @property
    def backend(self) -> RenderBackend:
        if self._backend is None:
            with self._backend_built:
                if self._backend is None:
                    self._backend = self._backend_factory()
        return self._backend

    @property
    def batcher(self) -> Batcher:
        """The queue in front of the pipeline (batches only on a backend that can batch)."""
        if self._batcher is None:
            size = self.settings.render_batch_size
            two_phase = isinstance(self.backend, TwoPhaseRenderBackend)
            self._batcher = Batcher(
                self._run_batch,
                self._lock,
                max_size=size if isinstance(self.backend, BatchRenderBackend) else 1,
                window=self.settings.render_batch_window_ms / 1000,
                finish=self._encode_batch if two_phase else None,
            )
        return self._batcher

    @property
    def capacity(self) -> int:
        """Jobs one process holds at once where they are counted: one call's worth (what the
        backend batches) plus the queue, ``render_queue_size`` or, until the jobs' sizes have
        been timed, ``UNMEASURED_QUEUE``. Once timed, with no fixed queue,
        :meth:`admits` sizes the queue by the time the jobs need instead.
        """
        queue = self.settings.render_queue_size
        return self.batcher.max_size + (UNMEASURED_QUEUE if queue is None else queue)

    @property
    def _admitted(self) -> int:
        return len(self._held)

    def admits(self, job: EnhancedPrompt) -> bool:
        """Whether ``job`` may join the jobs held now.

        Counted against :attr:`capacity` with a fixed queue, or until a call is timed. Timed,
        the pipeline's time for the held jobs and ``job`` (:meth:`Batcher.backlog`: the
        running call, then a call per batch key and batch of waiting jobs, each at the fitted
        cost of a call of its work), and then ``job``'s encoding after its call
        (:attr:`Batcher.finish_seconds`), must end within ``ADMITTED_SHARE_OF_TIMEOUT`` of
        ``render_timeout``, the rest a margin for calls slower than their estimate: a 1024²
        job admitted on the time of 256² ones, or jobs of other sizes on the time of a batch's
        share, would be ones the pod must time out. An idle pod takes any job, and one that
        joins a batch still waiting for company is taken while the held jobs are fewer than
        a call (:attr:`Batcher.max_size`) holds.

        A job the calls timed do not price (:meth:`_priced`: far larger than all of them, while
        they are all of one size) is not priced by scaling their time up, overhead and all: it
        is counted against :attr:`capacity` among the held jobs so unpriced, while the priced
        ones leave time. So it is taken, and timed, however many priced jobs are held.
        """
        batcher = self.batcher
        if self.settings.render_queue_size is not None or not batcher.timed:
            return self._admitted < self.capacity
        if self._admitted == 0:
            return True
        held = self._held
        priced = [j for j in held if self._priced(j)]
        if not self._priced(job):
            return len(held) - len(priced) < self.capacity and self._in_time(priced)
        if self._admitted < batcher.max_size and batcher.joins(job, held):
            return True
        return self._in_time([*priced, job])

    def _in_time(self, jobs: list[EnhancedPrompt]) -> bool:
        """Whether the pipeline is done with ``jobs``, and one job's encoding after, within
        ``ADMITTED_SHARE_OF_TIMEOUT`` of ``render_timeout``: the jobs the timings price, and
        the running call at its time so far where they do not price it."""
        backlog = self.batcher.backlog(jobs, priced=self._priced) or 0.0
        finish = self.batcher.finish_seconds or 0.0
        return backlog + finish <= ADMITTED_SHARE_OF_TIMEOUT * self.settings.render_timeout

    def retry_after(self) -> int:
        """Whole seconds until the pipeline is done with the jobs held now
        (:meth:`Batcher.backlog`, the running call at no less than its time so far), at
        least 1.

        What the timings do not price (none timed yet, or jobs far larger than every call
        timed: :meth:`_priced`) nothing says the cost of: each call those jobs need is taken to
        cost the running call's time so far, between ``UNTIMED_RETRY_AFTER_FLOOR`` and
        ``UNTIMED_RETRY_AFTER_CAP`` in all, on top of what the priced jobs take. A client that
        honours it comes back soon after such a call has ended, and is then answered from the
        timings.
        """
        batcher = self.batcher
        held = self._held
        priced = [j for j in held if self._priced(j)]
        unpriced = [j for j in held if not self._priced(j)]
        seconds = batcher.backlog(priced, priced=self._priced) if batcher.timed else None
        # The calls the unpriced jobs need (the running one too, where nothing is timed: the
        # backlog above has it otherwise).
        calls = batcher.calls(unpriced) - (batcher.calls([]) if seconds is not None else 0)
        if seconds is None or calls:
            guess = calls * batcher.running_for
            guess = min(max(guess, UNTIMED_RETRY_AFTER_FLOOR), UNTIMED_RETRY_AFTER_CAP)
            seconds = (seconds or 0.0) + guess
        return max(1, math.ceil(seconds))

    def _priced(self, job: EnhancedPrompt) -> bool:
        """Whether the calls timed tell what ``job`` costs (:meth:`CallCost.measures`).

        While the calls timed are all of one size, a job far larger would be estimated by
        scaling their time up, its fixed part too, by as much as the sizes differ: a burst of
        1024² jobs after one 256² render was put at minutes and refused for seconds of work.
        """
        cost = self.batcher.cost
        return cost.timed and cost.measures(work_of(job))

    def close(self) -> None:
        """Release the backend's models, if it was ever created, and the batcher's threads.

        A render under way stops at its next denoising step, nothing of it stored (one past
        its last step is encoded and answered), and the jobs queued behind it never run, nor
        claim their generation (:meth:`Batcher.close`): the service is ending. A
        request that still waits for one of them (a served process told to exit at once, its
        requests not drained) is refused with a retryable :class:`DependencyUnavailable`, as
        is every job that reaches the pipeline after it (another delivery of a generation that
        waited for the one stopped): a closed stage never loads a model again, so the memory
        it gave back stays free.
        """
        self._closed = True
        if self._batcher is not None:
            self._batcher.close()
        if self._backend is not None:
            self._backend.close()

    def _refuse_if_closed(self) -> None:
        """Refuse, retryably, what would load or render once the stage is closed."""
        if self._closed:
            raise _shutting_down()

    def is_loaded(self, model: str) -> bool:
        return self._backend is not None and self._backend.is_loaded(model)

    async def load(self, model: str) -> float:
        """Load ``model`` off the event loop; return the seconds it took."""
        with tracer().start_as_current_span("imagegen.model.load") as span:
            span.set_attribute("imagegen.model", model)
            async with self._lock:
                self._refuse_if_closed()  # closed while this waited: nothing loads after it
                if self.is_loaded(model):
                    return 0.0
                await self._build_backend()
                try:
                    seconds = await _START_UP.run_to_end(self.backend.load, model)
                finally:
                    if self._closed:  # closed during the load: what it loaded is let go too
                        self.backend.close()
                self._refuse_if_closed()
            instruments().model_load_duration.record(seconds, {"imagegen.model": model})
            log.info("model loaded", extra={"model": model, "seconds": round(seconds, 3)})
            return seconds

    async def warm_up(self, model: str) -> float:
        """Render one image of the default request shape, then with batching a full batch of
        it; return the seconds they took.

        Compiled or lazily initialised kernels are built here rather than in the first
        request, and the renders are timed, so admission is sized from the first request on.
        A batch is a new shape to ``torch.compile`` (10-15 s to compile on an H200,
        docs/benchmarks.md; after the first few new shapes, torch compiles for variable sizes
        and recompiles no more): warmed, the first full batch of requests does not wait for
        it.
        """
        spec = family_for(model)
        job = EnhancedPrompt(
            generation_id="warm-up",
            prompt="warm-up",
            enhancer="passthrough",
            model=model,
            width=1024,
            height=1024,
            steps=spec.default_steps,
            guidance=spec.default_guidance,
            seed=0,
            requested_at=datetime.now(UTC),
        )
        started = time.perf_counter()
        await self._render(job, None, held=False)
        batch = self.batcher.max_size
        if batch > 1:
            # Queued together before the batcher's worker first runs: one call of ``batch``.
            await asyncio.gather(
                *(
                    self._render(
                        job.model_copy(update={"generation_id": f"warm-up-{i}"}),
                        None,
                        held=False,
                    )
                    for i in range(batch)
                )
            )
        seconds = time.perf_counter() - started
        log.info(
            "warm-up render done",
            extra={"model": model, "seconds": round(seconds, 3), "batch_size": batch},
        )
        return seconds

    async def render_png(
        self, job: EnhancedPrompt, *, progress: ProgressCallback | None = None
    ) -> RenderOutput:
        """Render ``job`` and return the PNG without storing it.

        A cancelled request (a timeout) leaves the queue if its call has not started; once it
        has, the request keeps its admission slot until the call ends, which is at its next
        denoising step's end once every request in it has gone, since nothing of it is stored
        (:meth:`Batcher.submit`). A job that can never be rendered here is refused before it
        is admitted (:meth:`_check`).
        """
        self._check(job)
        with _refused_if_closed():
            async with self._admission(job):
                return await self._render(job, progress)

    async def render(
        self,
        job: EnhancedPrompt,
        *,
        progress: ProgressCallback | None = None,
        storing: Callable[[], bool] | None = None,
    ) -> RenderedImage:
        """Render ``job`` and store the PNG, or return the image already stored for it.

        ``storing()`` is asked, on the event loop, as this request's own render is about to
        store its PNG, just before the write: True, and from then on the PNG is stored
        whatever becomes of the request (a write in a thread runs to its end, cancelled or
        not), so a caller that would record the image once it is stored learns it before its
        own cancellation can say otherwise; False (its caller has gone, and would record
        nothing), and nothing is written: the render ends cancelled, its PNG dropped, unless
        another request for the generation waits for this render here, which then answers
        with the PNG stored for it rather than render it again. Not called for an image
        found stored (its request returns it) nor for a render that fails before its write.

        Idempotent per generation id: a redelivered job is answered from storage, and two
        deliveries in flight at once in one process render once (the second waits for the
        first, holding no admission slot: it takes one only if it must render after all).
        Replicas that render the same job at the same moment both spend the GPU time,
        but only the first to store the PNG writes it (a conditional write); the others answer
        with what it stored, so every reply is the same. Once its pipeline call has started, a
        render finishes and is stored even if its request is cancelled (a timeout), so the
        retry finds the image instead of rendering it again, unless the stage is closed
        meanwhile (:meth:`close`) or ``storing()`` says no; before that, it is dropped once
        every request waiting for its generation has gone (:class:`Waiters`). A different job
        under a generation id already rendered is refused: a direct call dated by the day
        before it is rendered (:meth:`_as_claimed`), any other when it claims the id.
        """
        keys = GenerationKeys(job.generation_id, job.requested_at)
        fingerprint = stored_png.fingerprint(job)
        busy = job.generation_id in self._generation_lock  # another delivery is at work
        stores = self._stores  # one that starts and stores while this one looks moves it
        done = await self._stored(job, keys, fingerprint)
        if done is None and job.dated_by_day:  # a round trip more: only where the day may move
            job, done = await self._as_claimed(job, keys)
            keys = GenerationKeys(job.generation_id, job.requested_at)
            fingerprint = stored_png.fingerprint(job)
        if done is not None:
            log.info("image already stored; not rendering again", extra={"key": keys.image})
            answered_again()
            return done
        request = _Request()
        try:
            with _refused_if_closed():
                return await self._waiters.wait(
                    job.generation_id,
                    lambda started: self._render_once(
                        job,
                        keys,
                        fingerprint,
                        progress,
                        started,
                        busy=busy,
                        stores=stores,
                        storing=storing,
                        request=request,
                    ),
                )
        finally:
            request.waiting = False

    def _others_wait(self, generation_id: str, request: _Request) -> bool:
        """Whether a request other than ``request`` waits in :meth:`render` for this generation."""
        return self._waiters.waiting(generation_id) - request.waiting > 0

    async def _as_claimed(
        self, job: EnhancedPrompt, keys: GenerationKeys
    ) -> tuple[EnhancedPrompt, RenderedImage | None]:
        """``job``, whose image is not stored under ``keys``, as its generation's claim dates it,
        and the image stored for it then, if any.

        A job dated only by the day of a direct call (:attr:`EnhancedPrompt.dated_by_day`) is
        the job of the day its generation was rendered: a retry after midnight gets the same
        reply; one claimed for another key is refused here, before it is rendered.

        Raises:
            InvalidRequest: The generation id was rendered from a different job.
        """
        image = await stored_png.claimed(self.storage, job.generation_id)
        day = stored_png.claimed_day(job.generation_id, image) if job.dated_by_day else None
        if day is None or day == job.requested_at:
            stored_png.check_claim(job, keys, image)
            return job, None
        job = job.model_copy(update={"requested_at": day})
        keys = GenerationKeys(job.generation_id, day)
        return job, await self._stored(job, keys, stored_png.fingerprint(job))

    async def _render_once(
        self,
        job: EnhancedPrompt,
        keys: GenerationKeys,
        fingerprint: str,
        progress: ProgressCallback | None,
        started: Callable[[], None],
        *,
        busy: bool,
        stores: int,
        storing: Callable[[], bool] | None,
        request: _Request,
    ) -> RenderedImage:
        # The lock first: a delivery that waits for another's image needs no pipeline time,
        # so it holds no admission slot (with a queue of 0 it would be refused otherwise).
        async with self._generation_lock(job.generation_id) as waited:
            # Another delivery of the same job may have finished while this one looked or
            # waited (one that started after the look, too: a slow look, and this process
            # stored an image meanwhile); with none at work and none stored since before the
            # look, storage is not asked again.
            again = busy or waited or self._stores != stores
            done = await self._stored(job, keys, fingerprint) if again else None
            if done is not None:  # what the other delivery stored: its image, counted by it
                answered_again()
                return done
            self._check(job)  # a 400 whatever the pod holds: never a 429, no slot taken
            async with self._admission(job):
                done = await self._render_and_store(
                    job, keys, fingerprint, progress, started, storing, request
                )
            self._stores += 1  # before the lock is let go: the next holder sees it
            return done

    async def _render_and_store(
        self,
        job: EnhancedPrompt,
        keys: GenerationKeys,
        fingerprint: str,
        progress: ProgressCallback | None,
        started: Callable[[], None],
        storing: Callable[[], bool] | None,
        request: _Request,
    ) -> RenderedImage:
        # The claim (no image of another day's job) is written while the pipeline runs: a
        # round trip to the store, off the render's time. Begun once the job joins a call, so
        # a job refused before (a model not served, a LoRA not configured: _check) claims
        # nothing. A job with LoRAs claims once its call has made its image: its adapters are
        # loaded in the call, which may still refuse it for good (weights that cannot be
        # loaded, a Hub repository not found), and a claim cannot be taken back safely (a
        # job of its key in another process may rely on it), so it would refuse the id to
        # every job of another day although no image of it exists.
        claiming: list[asyncio.Future[None]] = []

        def on_start() -> None:
            started()
            if not job.loras:
                claiming.append(asyncio.ensure_future(stored_png.claim(self.storage, job, keys)))

        try:
            output = await self._render(job, progress, on_start=on_start, stored=True)
        except BaseException:
            for claim in claiming:  # its outcome no longer decides anything
                claim.add_done_callback(_retrieved)
            raise
        sha256 = hashlib.sha256(output.png).hexdigest()
        # Timings describe the render only, so a redelivered job gets the very same reply.
        timings = {k: round(v, 4) for k, v in output.timings.items()}
        rendered_at = stage_time()
        meta = stored_png.metadata(job, sha256, fingerprint, timings, rendered_at)
        if claiming:
            await claiming[0]
        else:  # a job with LoRAs, or a backend that never said its call began
            await stored_png.claim(self.storage, job, keys)
        location = self.storage.location(keys.image)
        if (
            storing is not None
            and not storing()
            and not self._others_wait(job.generation_id, request)
        ):
            # Its caller was cancelled before this write began and records nothing of it: a
            # PNG stored now would be left without its record. Asked here, on the loop, with
            # nothing awaited between the answer and the write, so the caller's cancellation
            # comes either before it (nothing written) or after (the write awaited). Stored
            # all the same while another delivery of the generation in this process waits for
            # this render: that one answers with the PNG and records it, rather than render
            # it again once this render is dropped.
            log.info(
                "render dropped before its PNG was stored: its caller has gone",
                extra={"generation_id": job.generation_id},
            )
            raise asyncio.CancelledError
        # Asked before the write, not after it: a request cancelled during the write (a whole
        # PutObject round trip on S3) would otherwise leave its PNG stored behind a caller
        # that believes nothing was, the thread writing it running to its end.
        if not await self.storage.create(keys.image, output.png, content_type=PNG, metadata=meta):
            # Another replica stored this generation first: its image and timings are the
            # answer, so both replies are the same event.
            stored = await self.storage.head(keys.image)
            done = stored_png.answer(job, stored, fingerprint, location)
            if done is not None:
                log.info("another replica stored this image first", extra={"key": keys.image})
                answered_again()  # the image is the other replica's, counted by it
                return done
            # Never replaced here. create() refuses only a complete object: S3 stores an
            # object and its metadata in one PutObject, and LocalStorage.create puts the
            # sidecar in place before the object (an object there is a finished write), while
            # a sidecar it cannot read fails the head above, retried. So what is there was not
            # written by render (a copy by hand, another tool), and a put over it would race:
            # two replicas that both found it would each store their own image and announce it.
            raise stored_png.not_rendered(job, keys.image, gone=stored is None)
        return stored_png.rendered_image(
            job,
            keys.image,
            location,
            size=len(output.png),
            sha256=sha256,
            stage_timings=timings,
            at=rendered_at,
        )

    async def _stored(
        self, job: EnhancedPrompt, keys: GenerationKeys, fingerprint: str
    ) -> RenderedImage | None:
        """The image stored for this generation, if any; refuses one made from another job."""
        stored = await self.storage.head(keys.image)
        return stored_png.answer(job, stored, fingerprint, self.storage.location(keys.image))

    def _check(self, job: EnhancedPrompt) -> None:
        """Refuse ``job`` for what the settings alone decide, before it is admitted or queued,
        so it is a 400 whether or not the pod is busy: the deployment's served models (the
        setting enhance checks too), the family's rules, and the LoRAs configured here (the
        backend checks them again in the call, where it loads them).

        Raises:
            InvalidRequest: naming each field refused.
        """
        errors = request_errors(job.model, job.width, job.height, self.settings.served_models)
        if errors:
            fields = ", ".join(dict.fromkeys(e["field"] for e in errors))
            raise InvalidRequest(f"invalid EnhancedPrompt: {fields}", errors=errors)
        check_loras(self.settings, job.model, job.loras)

    async def _render(
        self,
        job: EnhancedPrompt,
        progress: ProgressCallback | None,
        *,
        on_start: Callable[[], None] | None = None,
        stored: bool = False,
        held: bool = True,
    ) -> RenderOutput:
        # A ``stored`` render's call runs to the end even once its request has gone: its
        # retry finds the image in storage. Any other call is wanted only while someone waits.
        # ``held``: ``job`` is admitted (:class:`_Admission`, which lets the batcher know when
        # it is let go), as every job but the warm-up's.
        if not held:  # an admitted job was checked before its admission; the warm-up's was not
            self._check(job)
        # Closed while this job waited (another delivery of its generation, stopped by the
        # close, held it): its model is unloaded because the service is ending, neither loaded
        # again nor a disagreement of the routing.
        self._refuse_if_closed()
        if not self.is_loaded(job.model):
            if not self._load_on_demand:
                # The deployment serves the model and its Trigger sent the job here: the
                # routing and this Service's IMAGEGEN_MODEL disagree, as while a model is
                # rolled out. The job is fine, so it is retried, and dead-lettered (kept for
                # re-sending) if the disagreement outlasts the retries: never failed for good.
                raise DependencyUnavailable(
                    f"model {job.model!r} is served by this deployment but not loaded by this "
                    f"render service ({self.settings.model!r}): its Trigger and its "
                    "IMAGEGEN_MODEL disagree",
                    retry_after=_UNLOADED_RETRY_AFTER,
                )
            await self.load(job.model)
        output = await self.batcher.submit(job, progress, on_start=on_start, keep=stored, held=held)
        denoise = output.timings.get("denoise")
        if denoise is not None:
            instruments().denoise_step_duration.record(
                denoise / job.steps, {"imagegen.model": job.model}
            )
        return output

    def _run_batch(self, batch: Batch) -> Any:
        """One pipeline call for ``batch`` (blocking: runs in a worker thread).

        Returns the outputs, or on a two-phase backend the pixels :meth:`_encode_batch` takes.
        """
        job = batch.jobs[0]
        links = [trace.Link(context) for context in batch.links[1:] if context.is_valid]
        with tracer().start_as_current_span("imagegen.render.denoise", links=links) as span:
            span.set_attribute("imagegen.model", job.model)
            span.set_attribute("imagegen.steps", job.steps)
            span.set_attribute("imagegen.batch_size", len(batch.jobs))
            ids = [each.generation_id for each in batch.jobs]
            log.info("rendering", extra={"generation_ids": ids, "model": job.model})
            try:
                backend = self.backend
                if isinstance(backend, TwoPhaseRenderBackend):  # encoded by _encode_batch
                    return backend.denoise_batch(batch.jobs, progress=batch.progress)
                if len(batch.jobs) > 1 and isinstance(backend, BatchRenderBackend):
                    return backend.render_batch(batch.jobs, progress=batch.progress)
                return [backend.render(job, progress=batch.progress)]
            except ImageGenError:
                raise
            except Exception as exc:
                log.exception("render failed", extra={"generation_ids": ids})
                raise InternalError(f"render failed: {type(exc).__name__}") from exc

    def _encode_batch(self, batch: Batch, pixels: Any) -> list[RenderOutput]:
        """PNGs of what :meth:`_run_batch` made, once the pipeline serves the next call."""
        backend = self.backend
        assert isinstance(backend, TwoPhaseRenderBackend)
        try:
            return backend.encode_batch(batch.jobs, pixels)
        except ImageGenError:
            raise
        except Exception as exc:
            ids = [each.generation_id for each in batch.jobs]
            log.exception("PNG encoding failed", extra={"generation_ids": ids})
            raise InternalError(f"render failed: {type(exc).__name__}") from exc

    def _admission(self, job: EnhancedPrompt) -> _Admission:
        return _Admission(self, job)

    async def _build_backend(self) -> None:
        """Build the backend off the event loop the first time: it imports torch and diffusers.

        Jobs that arrive meanwhile wait for the one build and go on in the order they came.
        """
        if self._backend is not None:
            return
        if self._building is None:
            self._building = asyncio.ensure_future(_START_UP.run(lambda: self.backend))
        building = self._building
        try:
            await asyncio.shield(building)
        except Exception:
            if self._building is building:
                self._building = None  # the next job tries again
            raise


_START_UP = DaemonPool("imagegen-start-up")
"""Render's blocking start-up calls (the imports, the model load): on daemon threads, unlike the
event loop's default executor, which the interpreter joins at exit. A process told to stop
while its model loads (a pod scaled down or replaced during its start) exits then, rather than
after a load that may take minutes, or hang on the model hub until the grace period ends in a
SIGKILL."""


class _Request:
    """A call of :meth:`RenderStage.render`: ``waiting`` until it returns or is cancelled."""

    __slots__ = ("waiting",)

    def __init__(self) -> None:
        self.waiting = True


class _Admission:
    """Holds a job in; refuses it when the process cannot take it (:meth:`RenderStage.admits`)."""

    def __init__(self, stage: RenderStage, job: EnhancedPrompt) -> None:
        self.stage, self.job = stage, job

    async def __aenter__(self) -> None:
        await self.stage._build_backend()  # capacity depends on what the backend can batch
        if not self.stage.admits(self.job):
            instruments().render_rejections.add(1)
            raise Overloaded(
                f"render is at capacity ({self.stage._admitted} jobs held); retry later",
                retry_after=self.stage.retry_after(),
            )
        self.stage._held.append(self.job)
        instruments().renders_in_flight.add(1)

    async def __aexit__(self, *exc: object) -> None:
        self.stage.batcher.release(self.job)  # its call, if any, no longer counted as done
        self.stage._held.remove(self.job)
        instruments().renders_in_flight.add(-1)


@contextlib.contextmanager
def _refused_if_closed() -> Iterator[None]:
    """A request's render cancelled under it, not the request itself, as a retryable refusal.

    Only the stage's closing cancels the work of a request that still waits (a render it
    stops, the jobs queued behind: :meth:`Batcher.close`): the job is fine, and is sent
    again, rather than answered as a failure. The request's own cancellation (a timeout,
    Ctrl-C) stays one: its task is being cancelled (``Task.cancelling``).
    """
    try:
        yield
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is None or task.cancelling():
            raise
        raise _shutting_down() from None


def _shutting_down() -> DependencyUnavailable:
    """The refusal of a job the stage's closing keeps from rendering: retryable, the job is
    fine and a process that is not ending renders it."""
    return DependencyUnavailable("render is shutting down; the job was not rendered")


def _retrieved(claim: asyncio.Future[None]) -> None:
    """Takes a claim's outcome that nobody awaits (its render failed): never a warning that
    an exception was never retrieved."""
    if not claim.cancelled():
        claim.exception()
