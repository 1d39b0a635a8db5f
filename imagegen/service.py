"""``ImageGenService``: the stages as one async API."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import threading
import time
from collections.abc import Callable, Coroutine, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar, copy_context
from datetime import datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self, TypeVar

from opentelemetry import context as otel_context
from opentelemetry import trace
from pydantic import BaseModel

from imagegen.errors import DependencyUnavailable, ImageGenError, InvalidRequest
from imagegen.identity import (
    GENERATION_ID_PATTERN,
    identify,
    key_time,
    started_times,
    valid_generation_id,
)
from imagegen.models import (
    DerivedImage,
    EnhancedPrompt,
    GenerationRequest,
    PersistedImage,
    RenderedImage,
)
from imagegen.modelspec import served_errors
from imagegen.settings import Settings
from imagegen.stages import Call
from imagegen.storage import LocalStorage, open_storage
from imagegen.storage.base import Storage
from imagegen.storage.instrumented import instrumented
from imagegen.telemetry import (
    REDELIVERED,
    current_generation,
    current_stage,
    instruments,
    on_redelivery,
    record_error,
    redelivery_done,
    tracer,
)

if TYPE_CHECKING:
    from imagegen.derive import DeriveStage
    from imagegen.enhance import EnhanceStage
    from imagegen.enhance.memo import EnhanceMemo
    from imagegen.ledger.recorder import Recorder
    from imagegen.persist import PersistStage
    from imagegen.plugins import PluginSet
    from imagegen.render.base import ProgressCallback, RenderBackend, RenderOutput
    from imagegen.render.stage import RenderStage

__all__ = ["Generated", "ImageGenService", "ServiceClosed", "one_trace"]

log = logging.getLogger("imagegen")

CLOSE_GRACE_SECONDS = 2.0
"""Seconds :meth:`ImageGenService.aclose` lets the calls under way end on their own (a render
past its denoising, encoding and storing its image; a persist) before it stops them."""
R = TypeVar("R", bound=BaseModel)
T = TypeVar("T")


class Generated(tuple[EnhancedPrompt, PersistedImage]):
    """What :meth:`ImageGenService.generate` returns: the enhanced prompt and the persisted
    image, unpacked as ever (``enhanced, persisted = await service.generate(request)``), and
    ``underived``: why the image's thumbnail and AVIF/WebP derivatives were not made, or None
    when they were: a tuple of two, with one more attribute.
    """

    underived: str | None

    def __new__(
        cls, enhanced: EnhancedPrompt, persisted: PersistedImage, underived: str | None = None
    ) -> Self:
        made = super().__new__(cls, (enhanced, persisted))
        made.underived = underived
        return made

    def __getnewargs__(self) -> tuple[EnhancedPrompt, PersistedImage, str | None]:
        return self[0], self[1], self.underived

    @property
    def enhanced(self) -> EnhancedPrompt:
        return self[0]

    @property
    def persisted(self) -> PersistedImage:
        return self[1]

    def __repr__(self) -> str:
        return f"Generated({self[0]!r}, {self[1]!r}, underived={self.underived!r})"


def _diffusers_backend(settings: Settings) -> RenderBackend:
    # Imported here: torch and diffusers load only in processes that render.
    from imagegen.render.diffusers_backend import DiffusersBackend

    return DiffusersBackend(settings)


class ImageGenService:
    """Enhance, render, persist and derive images; everything injected, nothing global.

    Use it as an async context manager: entering loads the models named in ``preload``
    (the render function preloads its model at start-up), leaving releases them. Each stage's
    machinery is built on first use, so a process imports only what its stage needs.

    Args:
        settings: Configuration; read from the environment when omitted.
        plugins: The prompt plugins of this instance; default: ``settings.plugins``.
        storage: Where images go; default: ``open_storage(settings)``.
        backend: The render backend; default: diffusers, created on first render.
        preload: Models to load on enter, each one of ``settings.served_models``.
        load_on_demand: Whether a render may load a model it has not preloaded.
        recorder: Records each stage's event in a ledger (the CLI's local history).

    Raises:
        TypeError: a part of the wrong kind, named; ``preload`` a string.
        InvalidRequest: ``preload`` names a model the settings do not serve.
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        plugins: PluginSet | None = None,
        storage: Storage | None = None,
        backend: RenderBackend | None = None,
        preload: Sequence[str] = (),
        load_on_demand: bool = True,
        recorder: Recorder | None = None,
    ) -> None:
        if settings is not None and not isinstance(settings, Settings):
            raise TypeError(f"settings must be a Settings or None, not {type(settings).__name__}")
        self.settings = settings if settings is not None else Settings()
        preload = _check_inputs(self.settings, plugins, storage, backend, preload, recorder)
        self.recorder = recorder
        store = storage or open_storage(self.settings)
        self._local_storage = isinstance(store, LocalStorage)
        self.storage = instrumented(store)
        self._plugins = plugins
        self._backend = backend
        self._load_on_demand = load_on_demand
        self._enhance_stage: EnhanceStage | None = None
        self._render_stage: RenderStage | None = None
        self._persist_stage: PersistStage | None = None
        self._derive_stage: DeriveStage | None = None
        self._memo: EnhanceMemo | None = None
        self._preload = preload
        # Loads begun ahead of a render (:meth:`enhance_while_loading`), held until they end:
        # one whose enhance failed goes on unawaited, and the loop keeps only weak references.
        self._loading: set[asyncio.Future[ImageGenError | None]] = set()
        # The calls under way, each a task of its own: closing stops them and waits for their
        # ends (each records where it stopped) before it closes the ledger under them.
        self._calls: set[asyncio.Task[Any]] = set()
        self._closed = False
        self._closing: asyncio.Future[None] | None = None  # the close, once begun
        # The event loop the service's stages, locks and queues belong to: its first caller's.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._binding = threading.Lock()

    @property
    def enhance_stage(self) -> EnhanceStage:
        if self._enhance_stage is None:
            from imagegen.enhance import EnhanceStage
            from imagegen.enhance.memo import EnhanceMemo

            # Given, it is used as it is, empty too (an empty set is falsy: it has a length).
            plugins = self._plugins if self._plugins is not None else _plugins_of(self.settings)
            self._enhance_stage = EnhanceStage(self.settings, plugins)
            self._memo = EnhanceMemo(self.storage)
        return self._enhance_stage

    @property
    def render_stage(self) -> RenderStage:
        if self._render_stage is None:
            from imagegen.render.stage import RenderStage

            settings, backend = self.settings, self._backend
            self._render_stage = RenderStage(
                settings,
                self.storage,
                (lambda: backend)
                if backend is not None
                else (lambda: _diffusers_backend(settings)),
                load_on_demand=self._load_on_demand,
            )
        return self._render_stage

    @property
    def persist_stage(self) -> PersistStage:
        if self._persist_stage is None:
            from imagegen.persist import PersistStage

            self._persist_stage = PersistStage(self.settings, self.storage)
        return self._persist_stage

    @property
    def derive_stage(self) -> DeriveStage:
        if self._derive_stage is None:
            from imagegen.derive import DeriveStage

            self._derive_stage = DeriveStage(self.settings, self.storage)
        return self._derive_stage

    async def __aenter__(self) -> Self:
        self._usable()
        await self._call(self._enter())
        return self

    async def _enter(self) -> None:
        # A local directory this process cannot write (an image's root-owned default, a
        # read-only mount) would fail each request only after its work, or lose enhance's
        # memo: refuse to start, so readiness says so. Object storage is not probed here: an
        # outage at start-up would otherwise keep the process unready after it ends.
        if self._local_storage:
            await self.storage.check()
        for model in self._preload:
            await self.render_stage.load(model)
            if self.settings.render_warmup:
                await self.render_stage.warm_up(model)

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop the calls under way and release the models and clients held by this service.

        A render under way stops at its next denoising step, and nothing of it is stored; one
        past it is encoded and answered. The calls under way get :data:`CLOSE_GRACE_SECONDS`
        to end; those that have not are stopped (an image whose PNG is stored is persisted
        first). The plugins' ``aclose()`` then get
        :data:`~imagegen.plugins._running.CLOSE_SECONDS` each, all at once, and are given up
        on past it. Each call is recorded where it stopped, before the ledger is closed, and
        whoever awaits one gets a retryable :class:`~imagegen.errors.DependencyUnavailable`. The
        service is closed for good: any later call raises :class:`ServiceClosed` (a
        ``RuntimeError``); closing again waits for the close under way, if any. Raises
        ``RuntimeError`` when called from within one of the service's own calls.
        """
        loop = asyncio.get_running_loop()
        closing = self._closing
        if closing is not None:
            # Closed, or closing: a second caller waits for the same close to end (one on a
            # loop gone or another's cannot be awaited here: it ended with that loop).
            if not closing.done() and closing.get_loop() is loop:
                await asyncio.shield(closing)
            return
        own = self._loop
        if own is not None and own is not loop and not own.is_closed():
            raise _other_loop()
        if self in _calls_within.get():
            raise RuntimeError(
                "ImageGenService.aclose() from within one of its own calls: close it where"
                " it was opened"
            )
        self._closed = True
        # A task of its own: a caller that stops waiting (its own deadline) leaves it to end,
        # the ledger closed only after the calls it stopped are recorded.
        self._closing = asyncio.ensure_future(self._close(own is loop))
        await asyncio.shield(self._closing)

    async def _close(self, same_loop: bool) -> None:
        # The render first, and at once: nothing a cancellation (a second Ctrl-C) interrupts
        # comes before it, so the process never waits for a whole render as it exits. A
        # render past its denoising is encoded and answered (its image is made); the calls
        # that have not ended within CLOSE_GRACE_SECONDS (an LLM still writing) are stopped.
        # A closed loop's calls went with it.
        if self._render_stage is not None:
            self._render_stage.close()
        calls = list(self._calls) if same_loop else []
        try:
            if calls:
                _, running = await asyncio.wait(calls, timeout=CLOSE_GRACE_SECONDS)
                for call in running:
                    call.cancel()
                if running:
                    # A call that ignores its cancellation (a plugin's ``except
                    # CancelledError``) holds no close for ever: given up on, and said.
                    _, stuck = await asyncio.wait(running, timeout=CLOSE_GRACE_SECONDS)
                    if stuck:
                        log.warning(
                            "closing: %d call(s) did not stop when cancelled; closed under them",
                            len(stuck),
                        )
            if self._enhance_stage is not None:
                await self._enhance_stage.aclose()
        finally:
            if self.recorder is not None:
                self.recorder.ledger.close()

    def _usable(self) -> None:
        """Refuse a call before it does anything: this service is closed, or another event
        loop than its own calls it (each loop its service: its stages' locks, queues and
        futures belong to the loop that first used them)."""
        if self._closed:
            raise ServiceClosed("ImageGenService is closed")
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            with self._binding:  # two threads' loops, each calling first
                if self._loop is None:
                    self._loop = loop
            if self._loop is not loop:
                raise _other_loop()

    async def _call(self, work: Coroutine[Any, Any, T]) -> T:
        """Run ``work``, one call of this service, as a task that closing stops and waits for.

        The caller's own cancellation goes on to it as ever (awaiting a task cancels it); one
        stopped by :meth:`aclose` is answered as the render stage answers a job its closing
        stopped: a retryable :class:`DependencyUnavailable`, the job itself being fine.
        """
        # Its own context, which the tasks it makes copy (a plugin's call runs in one of its
        # own): a close from any of them is one from within the call.
        context = copy_context()
        context.run(_calls_within.set, (*_calls_within.get(), self))
        task = asyncio.get_running_loop().create_task(work, context=context)
        self._calls.add(task)
        task.add_done_callback(self._calls.discard)
        try:
            return await task
        except asyncio.CancelledError:
            caller = asyncio.current_task()
            if not self._closed or (caller is not None and caller.cancelling()):
                raise
            raise DependencyUnavailable(
                "ImageGenService was closed while this call was under way; it was stopped"
            ) from None

    async def enhance(
        self, request: GenerationRequest | Mapping[str, Any], call: Call | None = None
    ) -> EnhancedPrompt:
        """Run the plugins and the LLM; fix every render parameter, the seed included.

        Args:
            request: What to draw (a mapping of its fields is validated into one).
            call: The generation id and request time, decided by the caller (a function
                takes them from the event); what it leaves out (None) is decided as for a
                call without one: :func:`imagegen.identity.identify`.
        """
        self._usable()
        request = _as_model(GenerationRequest, request, "request")
        return await self._call(self._enhance(request, _starting(request, call)))

    async def _enhance(self, request: GenerationRequest, call: Call) -> EnhancedPrompt:
        gid, when = call.generation_id, call.requested_at
        assert gid is not None and when is not None, "a starting call has an id and a time"
        async with _stage("enhance", gid) as stage:
            enhance_stage = self.enhance_stage
            if self.recorder is not None:
                # Inputs checked first: a request refused as bad input (a model not served, a
                # plugin not installed) is no generation, and the history records none of it.
                enhance_stage.check_inputs(request, gid)
                # From here on a failure is recorded, a cancellation during this very write
                # included: it is said as enhance's once the write is done, never before it.
                stage.recorder = self.recorder
                await _to_its_end(self.recorder.requested(gid, request, when))
            assert self._memo is not None
            remembered = await self._memo.recall(gid, request)
            if remembered is not None:
                stage.outcome = REDELIVERED  # counted when its first delivery wrote it
                return await stage.emitted(remembered)
            # Another delivery at once (this process or another replica) may keep its prompt
            # first: this one then answers with it, counted redelivered (answered_again), as
            # the delivery that kept it was counted with its own outcome.
            keep = functools.partial(self._memo.remember, gid, request)
            result = await enhance_stage.run(request, generation_id=gid, now=when, keep=keep)
            stage.span.set_attribute("imagegen.model", result.model)
            stage.span.set_attribute("imagegen.seed", result.seed)
            stage.span.set_attribute("imagegen.enhance.fallback", result.fallback)
            if result.fallback and stage.outcome != REDELIVERED:
                stage.outcome = "fallback"
            return await stage.emitted(result)

    async def render(
        self,
        job: EnhancedPrompt | Mapping[str, Any],
        *,
        progress: ProgressCallback | None = None,
    ) -> RenderedImage:
        """Render ``job`` and store the PNG (idempotent per generation id)."""
        self._usable()
        _check_callback(progress, "progress")
        return await self._call(self._render(_as_model(EnhancedPrompt, job, "job"), progress))

    async def _render(
        self,
        job: EnhancedPrompt,
        progress: ProgressCallback | None,
        stored: Callable[[], None] | None = None,
        storing: Callable[[], bool] | None = None,
    ) -> RenderedImage:
        async with _stage("render", job.generation_id, self.recorder) as stage:
            _job_attributes(stage.span, job)
            rendered = await self.render_stage.render(job, progress=progress, storing=storing)
            if stored is not None:
                stored()
            return await stage.emitted(rendered)

    async def render_and_persist(
        self,
        job: EnhancedPrompt | Mapping[str, Any],
        *,
        progress: ProgressCallback | None = None,
        stored: Callable[[], None] | None = None,
        persisted: Callable[[PersistedImage], None] | None = None,
    ) -> PersistedImage:
        """:meth:`render`, then :meth:`persist`: the in-process chain's middle.

        Once the PNG is stored (then ``stored()`` is called), what is left is short: the
        render's record in the history, the metadata record and its own. It is carried to its
        end even when this task is cancelled meanwhile (Ctrl-C), and the cancellation goes on
        after it: the image is complete and its history says so, rather than a PNG left behind
        a history that says it failed. The PNG counts as stored from the moment its write
        begins (a write, once begun, ends in its thread whatever happens to this task): a
        cancellation during it waits for the write, then the records; a write that fails
        raises its error. Cancelled before, nothing of it is stored, unlike :meth:`render`,
        whose started render is stored for its retry: a render whose pipeline call has
        started runs on to its end, but writes no PNG (its claim on the generation id may be
        written; it holds the id for this job, which a retry renders again), unless another
        call of this generation in this service waits for that render: it stores the PNG
        then, and the call that waits answers with it and persists it (one render for both).
        Another cancellation while it ends gives up waiting.

        ``persisted(image)`` is called with the persisted image as soon as it is, before this
        returns or its cancellation goes on: a caller that was cancelled learns what it stored.
        """
        self._usable()
        job = _as_model(EnhancedPrompt, job, "job")
        _check_callback(progress, "progress")
        _check_callback(stored, "stored")
        _check_callback(persisted, "persisted")
        return await self._call(self._render_and_persist(job, progress, stored, persisted))

    async def _render_and_persist(
        self,
        job: EnhancedPrompt,
        progress: ProgressCallback | None,
        stored: Callable[[], None] | None,
        persisted: Callable[[PersistedImage], None] | None,
    ) -> PersistedImage:
        png_stored = False
        abandoned = False  # cancelled before the PNG's write began: the render stores nothing

        def on_storing() -> bool:
            # Asked by the render, on this event loop, just before its PNG's write begins:
            # this task's cancellation and the write are ordered here, whichever comes first
            # deciding. Cancelled first, the render writes nothing (it runs on in a task of
            # its own, which would otherwise store a PNG nobody records), unless another call
            # of this generation waits for it and records it (RenderStage.render). Else the
            # PNG counts as stored from here on: a write cancelled under way still ends in
            # its thread, so cancelling the chain then would leave the PNG without its
            # record. A write that fails raises its error as ever.
            nonlocal png_stored
            if abandoned:
                return False
            png_stored = True
            return True

        def on_stored() -> None:
            nonlocal png_stored
            png_stored = True  # its own write done, or an image found stored (written before)
            if stored is not None:
                stored()

        async def chain() -> PersistedImage:
            rendered = await self._render(job, progress, on_stored, on_storing)
            image = await self._persist(rendered)
            if persisted is not None:
                persisted(image)
            return image

        task = asyncio.ensure_future(chain())
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            if not png_stored:
                abandoned = True
                task.cancel()
            await task  # its end: stopped and recorded so, or the image complete
            raise

    async def render_png(
        self,
        job: EnhancedPrompt | Mapping[str, Any],
        *,
        progress: ProgressCallback | None = None,
    ) -> RenderOutput:
        """Render ``job`` and return the PNG bytes without storing them."""
        self._usable()
        job = _as_model(EnhancedPrompt, job, "job")
        _check_callback(progress, "progress")
        return await self._call(self._render_png(job, progress))

    async def _render_png(
        self, job: EnhancedPrompt, progress: ProgressCallback | None
    ) -> RenderOutput:
        async with _stage("render", job.generation_id) as stage:
            _job_attributes(stage.span, job)
            return await self.render_stage.render_png(job, progress=progress)

    async def persist(self, image: RenderedImage | Mapping[str, Any]) -> PersistedImage:
        """Write the metadata record; build public URLs."""
        self._usable()
        return await self._call(self._persist(_as_model(RenderedImage, image, "image")))

    async def _persist(self, image: RenderedImage) -> PersistedImage:
        async with _stage("persist", image.generation_id, self.recorder) as stage:
            return await stage.emitted(await self.persist_stage.run(image))

    async def derive(self, image: PersistedImage | Mapping[str, Any]) -> DerivedImage:
        """Encode the thumbnail and AVIF/WebP derivatives of a persisted image; record them."""
        self._usable()
        return await self._call(self._derive(_as_model(PersistedImage, image, "image")))

    async def _derive(self, image: PersistedImage) -> DerivedImage:
        async with _stage("derive", image.generation_id, self.recorder) as stage:
            return await stage.emitted(await self.derive_stage.run(image))

    async def try_derive(self, image: PersistedImage | Mapping[str, Any]) -> str | None:
        """:meth:`derive`, for a caller that has the image whatever becomes of its derivatives:
        None once they are made; else why not (a full disk, storage unreachable), logged and
        (with a recorder) recorded as derive's failure rather than raised. The PNG and its
        record are stored, so the image is served without them (the PNG in their stead) until
        a later :meth:`derive` makes them. A cancellation is raised, as ever."""
        self._usable()
        return await self._call(self._try_derive(_as_model(PersistedImage, image, "image")))

    async def _try_derive(self, image: PersistedImage) -> str | None:
        try:
            await self._derive(image)
        except (ImageGenError, OSError) as exc:  # the history records it as derive's failure
            why = str(exc) or type(exc).__name__
            log.warning(
                "derivatives not made; the image is stored: %s",
                why,
                extra={"generation_id": image.generation_id},
            )
            return why
        return None

    async def generate(
        self,
        request: GenerationRequest | Mapping[str, Any],
        *,
        call: Call | None = None,
        progress: ProgressCallback | None = None,
        persisted: Callable[[PersistedImage], None] | None = None,
    ) -> Generated:
        """Every stage in-process; returns the enhanced prompt and the persisted image.

        The model loads while the prompt is written (:meth:`enhance_while_loading`). Rendered
        and persisted as :meth:`render_and_persist`: a cancellation once the PNG is stored
        lets the image be persisted first. Derivatives that cannot be made do not fail it: the
        image is returned, with why in ``underived`` (:meth:`try_derive`).

        Args:
            request: What to draw (a mapping of its fields is validated into one).
            call: As :meth:`enhance` takes it.
            progress: Called with (step, steps) as the render goes, from its thread.
            persisted: Called with the persisted image as soon as it is, as
                :meth:`render_and_persist` calls it: a cancellation after that (while the
                image is persisted, or its derivatives made) still tells the caller of it.
        """
        self._usable()
        request = _as_model(GenerationRequest, request, "request")
        _check_callback(progress, "progress")
        _check_callback(persisted, "persisted")
        call = _starting(request, call)
        return await self._call(self._generate(request, call, progress, persisted))

    async def _generate(
        self,
        request: GenerationRequest,
        call: Call,
        progress: ProgressCallback | None,
        persisted: Callable[[PersistedImage], None] | None,
    ) -> Generated:
        with one_trace():
            enhanced = await self._enhance_while_loading(request, call)
            image = await self._render_and_persist(enhanced, progress, None, persisted)
            return Generated(enhanced, image, await self._try_derive(image))

    async def enhance_while_loading(
        self, request: GenerationRequest | Mapping[str, Any], call: Call | None = None
    ) -> EnhancedPrompt:
        """:meth:`enhance`, with the model the request renders with loading meanwhile.

        A first image then waits for the slower of the two, not for both: torch, diffusers and
        the weights load while plugins and the LLM write the prompt. Nothing loads for a
        request enhance will refuse, or where models are not loaded on demand. A load that
        fails as imagegen says (the model not cached and the Hub unreachable: after the Hub's
        retries) is raised once the prompt is written, as render's failure, rather than tried
        all over again by render; anything else is left to render, which loads again. Returns
        once both are done. An enhance that fails, or is cancelled, is raised at once, not
        after the load (minutes for a large model, or its download): the load goes on by
        itself, for the next render in this process, which finds the model loaded or waits
        for the same load.
        """
        self._usable()
        request = _as_model(GenerationRequest, request, "request")
        return await self._call(self._enhance_while_loading(request, _starting(request, call)))

    async def _enhance_while_loading(
        self, request: GenerationRequest, call: Call
    ) -> EnhancedPrompt:
        loading = self._load_ahead(request, call)
        enhanced = await self._enhance(request, call)
        if loading is None:
            return enhanced
        try:
            # Shielded: a cancelled wait (Ctrl-C) ends at once; the load, in a thread, cannot
            # be stopped and ends by itself.
            failed = await asyncio.shield(loading)
        except asyncio.CancelledError as exc:
            # Cancelled while the model loads for render: said as render's, as it would be
            # once render had begun; enhance's own is said by it.
            if self.recorder is not None and call.generation_id is not None:
                await self.recorder.failed("render", call.generation_id, exc)
            raise
        if failed is not None:
            async with _stage("render", enhanced.generation_id, self.recorder):
                raise failed
        return enhanced

    def _load_ahead(
        self, request: GenerationRequest, call: Call
    ) -> asyncio.Task[ImageGenError | None] | None:
        if not self._load_on_demand:
            return None
        assert call.generation_id is not None, "a starting call has an id"
        try:  # enhance's own check: a request it refuses loads nothing
            model = self.enhance_stage.check_inputs(request, call.generation_id)
        except InvalidRequest:
            return None
        stage = self.render_stage
        if stage.is_loaded(model):
            return None

        async def load() -> ImageGenError | None:
            try:
                await stage.load(model)
            except ImageGenError as exc:  # render's failure: raised once the prompt is written
                return exc
            except Exception as exc:  # render loads again and reports it in its own stage
                log.debug("loading ahead failed; render loads again", extra={"error": str(exc)})
            return None

        task = asyncio.ensure_future(load())
        self._loading.add(task)
        task.add_done_callback(self._loading.discard)
        return task

    async def finalise(self, image: RenderedImage | Mapping[str, Any]) -> PersistedImage:
        """Persist ``image``, then make its derivatives: the chain's end, in this process.

        On Knative the derive function makes them from persist's reply; here they are made
        before this returns, so a local image is served with them from the start.
        Derivatives that cannot be made do not fail it, as in :meth:`generate`: they are
        logged and recorded (:meth:`try_derive`), and the persisted image is returned.
        """
        self._usable()
        return await self._call(self._finalise(_as_model(RenderedImage, image, "image")))

    async def _finalise(self, image: RenderedImage) -> PersistedImage:
        with one_trace():
            persisted = await self._persist(image)
            await self._try_derive(persisted)
            return persisted


_calls_within: ContextVar[tuple[ImageGenService, ...]] = ContextVar(
    "imagegen_calls_within", default=()
)
"""The services whose call the running code is part of (its task, or one the call made)."""


class ServiceClosed(DependencyUnavailable, RuntimeError):
    """A call to a closed :class:`ImageGenService`: a ``RuntimeError`` to a library's caller,
    and a retryable error (503 with ``Retry-After``) to a function's, whose request raced the
    process's close as it exits (another replica answers the retry)."""


def _other_loop() -> RuntimeError:
    return RuntimeError(
        "ImageGenService is used from another event loop than the one it first ran in:"
        " use one service per event loop (each thread's asyncio.run its own)"
    )


def _check_inputs(
    settings: Settings,
    plugins: object,
    storage: object,
    backend: object,
    preload: object,
    recorder: object,
) -> tuple[str, ...]:
    """The service's parts checked as it is made, each named, rather than an
    ``AttributeError`` at their first use (on leaving ``async with``, one that hides the error
    that ended the block); the models to preload, as a tuple.

    Raises:
        TypeError: a part of the wrong kind (``storage`` and ``backend`` are held to their
            protocols, :class:`~imagegen.storage.base.Storage` and
            :class:`~imagegen.render.base.RenderBackend`); ``preload`` a string, or holding
            what is no string.
        InvalidRequest: ``preload`` names a model ``settings.served_models`` does not: the
            rule render holds each job to.
    """
    if plugins is not None:
        from imagegen.plugins import PluginSet

        _check_kind(plugins, PluginSet, "plugins")
    if storage is not None:
        _check_kind(storage, Storage, "storage")
    if backend is not None:
        from imagegen.render.base import RenderBackend

        _check_kind(backend, RenderBackend, "backend")
    if recorder is not None:
        from imagegen.ledger.recorder import Recorder

        _check_kind(recorder, Recorder, "recorder")
    # A string is a sequence of its letters: "tiny" would load the models "t", "i", ...
    if isinstance(preload, str | bytes) or not isinstance(preload, Iterable):
        raise TypeError(f"preload must be a sequence of model names, not {type(preload).__name__}")
    models = tuple(preload)
    for model in models:
        if not isinstance(model, str):
            raise TypeError(f"preload must hold model names, not {type(model).__name__}")
    errors = [
        {"field": "preload", "message": error["message"]}
        for model in models
        for error in served_errors(model, settings.served_models)
    ]
    if errors:
        raise InvalidRequest("preload: " + "; ".join(e["message"] for e in errors), errors=errors)
    return models


def _check_kind(value: object, kind: type, name: str) -> None:
    if not isinstance(value, kind):
        raise TypeError(f"{name} must be a {kind.__name__} or None, not {type(value).__name__}")


def _check_callback(value: object, name: str) -> None:
    """A callback given to a call checked before the call does anything: at its first use, a
    render later (or once the image is stored), it failed the whole call.

    Raises:
        TypeError: ``value`` is neither callable nor None.
    """
    if value is not None and not callable(value):
        raise TypeError(f"{name} must be callable or None, not {type(value).__name__}")


def _as_model(model: type[R], value: object, name: str) -> R:
    """``value`` as ``model``: itself, or a mapping of its fields validated into one.

    Raises:
        InvalidRequest: the mapping's offending fields, each named.
        TypeError: ``value`` is neither.
    """
    if isinstance(value, model):
        return value
    if isinstance(value, Mapping):
        from imagegen.validation import parse_model

        return parse_model(model, value)
    raise TypeError(
        f"{name} must be a {model.__name__} or a mapping of its fields, not {type(value).__name__}"
    )


def _starting(request: GenerationRequest, call: object) -> Call:
    """The call a generation starts with: ``call`` whole, what it leaves out (its id, its
    time) decided as for a call without one (:func:`imagegen.identity.identify`), and what it
    gives checked as ``identify`` checks a request's.

    Raises:
        InvalidRequest: the id is no string or malformed (naming ``generation_id``: it names
            storage keys), the time is no datetime, out of range or ahead of this clock
            (naming ``requested_at``), or what ``identify`` refuses.
        TypeError: ``call`` is not a :class:`Call`.
    """
    if call is None:
        return identify(request, starts=True)
    if not isinstance(call, Call):
        raise TypeError(f"call must be a Call or None, not {type(call).__name__}")
    gid, when = call.generation_id, call.requested_at
    if when is not None:
        when = _starting_time(when)
    if gid is None or when is None:
        decided = identify(request, call.attributes, starts=True)
        gid = gid if gid is not None else decided.generation_id
        when = when if when is not None else decided.requested_at
    if not isinstance(gid, str) or not valid_generation_id(gid):
        raise InvalidRequest(
            f"invalid generation id {gid!r}",
            errors=[{"field": "generation_id", "message": f"must match {GENERATION_ID_PATTERN}"}],
        )
    assert when is not None, "identify decides a starting call's time"
    return dataclasses.replace(call, generation_id=gid, requested_at=when)


def _starting_time(value: object) -> datetime:
    """A caller's :attr:`Call.requested_at`, checked as a request's ``requested_at`` is: a
    datetime (a naive one taken as UTC), in the years storage keys hold
    (:func:`~imagegen.identity.key_time`), not ahead of this clock
    (:func:`~imagegen.identity.started_times`).

    Raises:
        InvalidRequest: naming ``requested_at``.
    """
    if not isinstance(value, datetime):
        raise InvalidRequest(
            f"requested_at must be a datetime, not {type(value).__name__}",
            errors=[{"field": "requested_at", "message": "must be a datetime"}],
        )
    try:
        when = key_time(value)
    except ValueError as exc:
        raise InvalidRequest(
            f"requested_at {value.isoformat()!r}: {exc}",
            errors=[{"field": "requested_at", "message": str(exc)}],
        ) from None
    started_times({"requested_at": when})
    return when


def _plugins_of(settings: Settings) -> PluginSet:
    """The plugins the settings enable; settings no request could get past (a name no plugin
    has, options or settings a plugin refuses) are the deployment's fault, a
    :class:`~imagegen.errors.ConfigurationError` (503, retried), raised by
    :meth:`PluginSet.from_settings` itself."""
    from imagegen.plugins import PluginSet

    return PluginSet.from_settings(settings)


class _Chain:
    """The trace context the next stage of a generation run in this process starts in."""

    def __init__(self) -> None:
        self.context: otel_context.Context | None = None  # None: the current one


_chain: ContextVar[_Chain | None] = ContextVar("imagegen_chain", default=None)


@contextmanager
def one_trace() -> Iterator[None]:
    """Run the stages of one generation, in this process, as one trace.

    On Knative each stage's span is the child of the span that sent its event (the event's
    ``traceparent``, :func:`imagegen.telemetry.trace_extension`): within this, each stage's
    ``imagegen.<stage>`` span is the child of the one before it, the same chain. The first
    starts in the current trace context: a caller's span, or none, and it starts the trace. A
    parent-based sampler then decides once, for the first, and the later stages follow it.
    Within another, the outer one goes on. One generation at a time: the stages awaited in
    turn, as :meth:`ImageGenService.generate` awaits them.
    """
    if _chain.get() is not None:
        yield
        return
    token = _chain.set(_Chain())
    try:
        yield
    finally:
        _chain.reset(token)


class _stage:
    """A span and the duration/outcome metrics around one stage of one generation."""

    def __init__(self, stage: str, generation_id: str, recorder: Recorder | None = None) -> None:
        self.stage = stage
        self.generation_id = generation_id
        self.recorder = recorder
        self.outcome = "success"
        self._cm: Any = None
        self.span: Any = None

    async def __aenter__(self) -> _stage:
        self._token = current_stage.set(self.stage)
        self._generation = current_generation.set(self.generation_id)
        self._started = time.perf_counter()
        chain = _chain.get()
        self._cm = tracer().start_as_current_span(
            f"imagegen.{self.stage}",
            context=chain.context if chain is not None else None,
            record_exception=False,
            set_status_on_exception=False,
        )
        self.span = self._cm.__enter__()
        if chain is not None:  # the next stage's parent: this one, as its event would say
            chain.context = otel_context.get_current()
        self.span.set_attribute("imagegen.stage", self.stage)
        self.span.set_attribute("imagegen.generation_id", self.generation_id)
        self._hook = on_redelivery(self._redelivered)
        return self

    def _redelivered(self) -> None:
        self.outcome = REDELIVERED

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        seconds = time.perf_counter() - self._started
        if exc is None:
            outcome, reason = self.outcome, ""
        else:
            outcome = "failed"
            reason = _reason(exc)
        labels = {"stage": self.stage, "outcome": outcome}
        instruments().stage_duration.record(seconds, labels)
        instruments().generations.add(1, {**labels, "reason": reason} if reason else labels)
        if exc is not None:
            record_error(self.span, exc)
        self._cm.__exit__(exc_type, exc, tb)
        redelivery_done(self._hook)
        current_stage.reset(self._token)
        try:
            if isinstance(exc, Exception | asyncio.CancelledError) and self.recorder is not None:
                # Cancelled (Ctrl-C in the CLI): the ledger says where it stopped, rather than
                # showing the generation at its last stage for ever. Under the stage's span,
                # ended as the stage did: a line the write logs names its generation and trace.
                with trace.use_span(
                    self.span, record_exception=False, set_status_on_exception=False
                ):
                    await self.recorder.failed(self.stage, self.generation_id, exc)
        finally:
            current_generation.reset(self._generation)

    async def emitted(self, result: R) -> R:
        """``result`` is this stage's reply: recorded (when recording) and returned."""
        if self.recorder is not None:
            await self.recorder.emitted(self.stage, result)
        return result


async def _to_its_end(write: Coroutine[Any, Any, None]) -> None:
    """Await ``write`` to its end even when this task is cancelled meanwhile, then go on
    with the cancellation.

    A ledger write runs in a thread, and commits whatever its awaiting task does: what is
    recorded after it (the stage's failure) comes after it, and the ledger is not closed
    under it as the service ends.
    """
    task = asyncio.ensure_future(write)
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        await task  # the thread's time, a moment; cancelled again, it is given up at once
        raise


def _reason(error: BaseException) -> str:
    """The ``reason`` a failed stage is counted with: its error's code; ``cancelled`` for a
    stage stopped from outside (past its function's timeout, Ctrl-C), which is no bug."""
    if isinstance(error, ImageGenError):
        return error.code
    return "cancelled" if isinstance(error, asyncio.CancelledError) else "internal"


def _job_attributes(span: Any, job: EnhancedPrompt) -> None:
    span.set_attribute("imagegen.model", job.model)
    span.set_attribute("imagegen.seed", job.seed)
    span.set_attribute("imagegen.steps", job.steps)
    span.set_attribute("imagegen.width", job.width)
    span.set_attribute("imagegen.height", job.height)
