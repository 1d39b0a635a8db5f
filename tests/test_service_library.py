"""``ImageGenService`` as a library caller uses it: its chain's end, closing, its event loop,
and the inputs it takes; with the real tiny FLUX pipeline and local storage."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from imagegen import GenerationRequest, ImageGenService, InvalidRequest, Settings
from imagegen.errors import DependencyUnavailable
from imagegen.events import (
    GENERATION_FAILED,
    GENERATION_REQUESTED,
    IMAGE_DERIVED,
    IMAGE_PERSISTED,
    IMAGE_RENDERED,
    PROMPT_ENHANCED,
)
from imagegen.ledger import Ledger, open_ledger
from imagegen.ledger.recorder import Recorder
from imagegen.models import PersistedImage, RenderedImage
from imagegen.plugins import PluginSet
from imagegen.stages import Call
from tests.test_service import _held_at_step, small


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(storage_url=str(tmp_path / "out"), model="tiny", ollama_retries=0)


@pytest.fixture
def ledger_path(tmp_path: Path) -> Path:
    return tmp_path / "ledger.db"


@pytest.fixture
def ledger(ledger_path: Path) -> Iterator[Ledger]:
    """The ledger a service records into; closing the service closes it."""
    opened = open_ledger(str(ledger_path))
    try:
        yield opened
    finally:
        opened.close()


def recorded(ledger_path: Path, generation_id: str) -> tuple[Any, list[str]]:
    """The generation as the history shows it, read anew, and its events' types in order."""
    reader = open_ledger(str(ledger_path))
    try:
        found = reader.get(generation_id)
        events = reader.generation_events(generation_id, order="recorded")
        return found, [e.type for e in events]
    finally:
        reader.close()


def no_plugins(settings: Settings) -> PluginSet:
    return PluginSet([], settings=settings)


async def test_a_generate_cancelled_once_its_png_is_stored_persists_it_first(
    settings: Settings, tmp_path: Path, ledger: Ledger, ledger_path: Path
) -> None:
    """A caller's timeout (or Ctrl-C) that comes as the PNG has just been stored: the image is
    persisted and recorded so before the cancellation goes on, as in ``imagegen generate``,
    rather than a PNG left without its record behind a history that says it failed; the
    caller hears of the image it stored (``persisted=``), its call cancelled all the same."""
    service = ImageGenService(settings, plugins=no_plugins(settings), recorder=Recorder(ledger))
    async with service:
        persist_stage = service.persist_stage
        real_run = persist_stage.run
        persisting, go_on = asyncio.Event(), asyncio.Event()

        async def held_run(image: RenderedImage) -> Any:  # a slow metadata write
            persisting.set()
            await go_on.wait()
            return await real_run(image)

        persist_stage.run = held_run  # type: ignore[method-assign]
        request = small(prompt="a kite", enhance=False, generation_id="stored-1")
        told: list[PersistedImage] = []
        running = asyncio.ensure_future(service.generate(request, persisted=told.append))
        await asyncio.wait_for(persisting.wait(), 120)
        assert (tmp_path / "out/2026/11/24/stored-1.png").is_file()
        running.cancel()
        await asyncio.sleep(0.05)  # the cancellation is delivered before persist goes on
        go_on.set()
        with pytest.raises(asyncio.CancelledError):
            await running
    found, _ = recorded(ledger_path, "stored-1")
    assert found is not None and found.status == "persisted"
    assert (tmp_path / "out/2026/11/24/stored-1.json").is_file()
    [image] = told
    assert (image.generation_id, image.key) == ("stored-1", "2026/11/24/stored-1.png")


def _held_writes(
    monkeypatch: pytest.MonkeyPatch, held: Callable[[str], bool]
) -> tuple[threading.Event, threading.Event, list[str]]:
    """Local storage whose writes of the keys ``held`` names wait, in their thread, until told
    to go on (a slow PutObject): what says one is reached, what tells them to go on, and the
    image keys written."""
    from imagegen.storage import local

    real_create = local.LocalStorage._create
    reached, go_on = threading.Event(), threading.Event()
    written: list[str] = []

    def held_create(self: Any, key: str, *args: Any) -> bool:
        if held(key) and not go_on.is_set():
            reached.set()
            go_on.wait(60)
        if key.endswith(".png") and not key.startswith("renders/"):
            written.append(key)
        return real_create(self, key, *args)

    monkeypatch.setattr(local.LocalStorage, "_create", held_create)
    return reached, go_on, written


async def test_a_generate_cancelled_while_its_png_is_written_persists_it_first(
    settings: Settings,
    tmp_path: Path,
    ledger: Ledger,
    ledger_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A cancellation (Ctrl-C) during the PNG's own write: the write, in its thread, ends all
    the same, so the image is persisted and recorded so before the cancellation goes on,
    never a PNG stored behind a history that says the render failed."""
    writing, go_on, _ = _held_writes(monkeypatch, lambda key: key.endswith(".png"))
    service = ImageGenService(settings, plugins=no_plugins(settings), recorder=Recorder(ledger))
    async with service:
        request = small(prompt="a kite", enhance=False, generation_id="writing-1")
        told: list[PersistedImage] = []
        running = asyncio.ensure_future(service.generate(request, persisted=told.append))
        assert await asyncio.to_thread(writing.wait, 120), "the PNG was never written"
        running.cancel()
        await asyncio.sleep(0.05)  # the cancellation is delivered while the write is held
        go_on.set()
        with pytest.raises(asyncio.CancelledError):
            await running
    found, events = recorded(ledger_path, "writing-1")
    assert found is not None and found.status == "persisted", (found, events)
    assert (tmp_path / "out/2026/11/24/writing-1.png").is_file()
    assert (tmp_path / "out/2026/11/24/writing-1.json").is_file()
    [image] = told
    assert (image.generation_id, image.key) == ("writing-1", "2026/11/24/writing-1.png")


async def test_a_generate_cancelled_before_its_png_is_written_stores_nothing(
    settings: Settings,
    tmp_path: Path,
    ledger: Ledger,
    ledger_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A cancellation (Ctrl-C) once the render's pipeline call has begun, while its claim on
    the generation id (a round trip before the PNG's write) is written: the render, which
    runs on in a task of its own, writes no PNG, so none is left behind a history that says
    the generation stopped; the same request then renders and persists as ever."""
    from imagegen.render.stage import RenderStage

    claiming, go_on, _ = _held_writes(monkeypatch, lambda key: key.startswith("renders/"))
    real_render = RenderStage._render_and_store
    renders_ended: list[asyncio.Event] = []
    asked: list[tuple[bool, bool]] = []  # (the answer, asked on the event loop's thread)

    async def watched(self: RenderStage, *args: Any) -> RenderedImage:
        *rest, storing, request = args
        loop_thread = threading.current_thread()

        def asking() -> bool:
            answer = storing()
            asked.append((answer, threading.current_thread() is loop_thread))
            return answer

        ended = asyncio.Event()
        renders_ended.append(ended)
        try:
            return await real_render(self, *rest, asking, request)
        finally:
            ended.set()

    monkeypatch.setattr(RenderStage, "_render_and_store", watched)
    png = tmp_path / "out/2026/11/24/claimed-1.png"
    service = ImageGenService(settings, plugins=no_plugins(settings), recorder=Recorder(ledger))
    async with service:
        request = small(prompt="a kite", enhance=False, generation_id="claimed-1")
        told: list[PersistedImage] = []
        running = asyncio.ensure_future(service.generate(request, persisted=told.append))
        try:
            assert await asyncio.to_thread(claiming.wait, 120), "no claim was written"
            running.cancel()
            with pytest.raises(asyncio.CancelledError):
                await running
        finally:
            go_on.set()
        [abandoned] = renders_ended
        await asyncio.wait_for(abandoned.wait(), 120)  # its call, its claim and its end
        assert asked == [(False, True)], "the render was told, on the loop, to store nothing"
        assert not png.exists(), "a PNG stored behind a generation that stopped"
        assert not png.with_suffix(".json").exists()
        assert told == []
        found, events = recorded(ledger_path, "claimed-1")
        assert found is not None and found.status == "failed", (found, events)
        assert found.failed_stage == "render"
        assert IMAGE_RENDERED not in events

        # The claim it wrote is this job's: the same request renders and persists.
        _, persisted = await asyncio.wait_for(service.generate(request), 120)
    assert asked == [(False, True), (True, True)]
    assert persisted.key == "2026/11/24/claimed-1.png" and png.is_file()
    assert png.with_suffix(".json").is_file()
    found, _ = recorded(ledger_path, "claimed-1")
    assert found is not None and found.status == "persisted"


async def test_a_generate_cancelled_before_its_png_is_written_stores_it_for_one_that_waits(
    settings: Settings,
    tmp_path: Path,
    ledger: Ledger,
    ledger_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two deliveries of one generation in one process: the first is cancelled while its
    claim is written, the second waiting for its render. The render's PNG is stored for the
    one that waits, which answers with it and persists it: one pipeline call, one write."""
    from imagegen.render.stage import RenderStage

    claiming, go_on, written = _held_writes(monkeypatch, lambda key: key.startswith("renders/"))
    real_run_batch = RenderStage._run_batch
    calls: list[object] = []

    def counted(self: RenderStage, batch: Any) -> Any:
        calls.append(batch)
        return real_run_batch(self, batch)

    real_render_once = RenderStage._render_once
    deliveries: list[object] = []
    second = asyncio.Event()

    async def entered(self: RenderStage, *args: Any, **kwargs: Any) -> RenderedImage:
        deliveries.append(args)
        if len(deliveries) == 2:
            second.set()  # counted as waiting for the generation: it waits for the lock
        return await real_render_once(self, *args, **kwargs)

    monkeypatch.setattr(RenderStage, "_run_batch", counted)
    monkeypatch.setattr(RenderStage, "_render_once", entered)
    png = tmp_path / "out/2026/11/24/shared-1.png"
    service = ImageGenService(settings, plugins=no_plugins(settings), recorder=Recorder(ledger))
    async with service:
        request = small(prompt="a kite", enhance=False, generation_id="shared-1")
        first = asyncio.ensure_future(service.generate(request))
        try:
            assert await asyncio.to_thread(claiming.wait, 120), "no claim was written"
            waiting = asyncio.ensure_future(service.generate(request))
            await asyncio.wait_for(second.wait(), 120)
            first.cancel()
            with pytest.raises(asyncio.CancelledError):
                await first
        finally:
            go_on.set()
        _, persisted = await asyncio.wait_for(waiting, 120)
    assert len(calls) == 1, "the waiting delivery rendered the generation again"
    assert written == ["2026/11/24/shared-1.png"]
    assert persisted.key == "2026/11/24/shared-1.png" and png.is_file()
    assert png.with_suffix(".json").is_file()
    found, events = recorded(ledger_path, "shared-1")
    assert found is not None and found.status == "persisted", (found, events)


async def test_derivatives_that_cannot_be_made_leave_the_image_to_its_caller(
    settings: Settings, tmp_path: Path, ledger: Ledger, ledger_path: Path
) -> None:
    """The PNG and its record are stored when derive fails (its thumbnail cannot be written):
    generate returns the image and says why its derivatives are missing, as the CLI does,
    and the history records derive's failure."""
    blocker = tmp_path / "out/2026/11/24/underived-1.thumb.webp"
    blocker.mkdir(parents=True)  # where the thumbnail goes: its write fails
    service = ImageGenService(settings, plugins=no_plugins(settings), recorder=Recorder(ledger))
    async with service:
        request = small(prompt="a kite", enhance=False, generation_id="underived-1")
        generated = await service.generate(request)
        enhanced, persisted = generated
        assert generated.enhanced == enhanced and generated.persisted == persisted
        assert persisted.generation_id == "underived-1"
        assert (tmp_path / "out" / persisted.key).is_file()
        assert generated.underived is not None and "cannot write" in generated.underived
        # The same for finalise, the chain's end alone, and try_derive, its last step.
        rendered = await service.render(enhanced)
        assert await service.finalise(rendered) == persisted
        assert await service.try_derive(persisted) == generated.underived

        blocker.rmdir()  # the disk is fixed: the derivatives are made
        assert await service.try_derive(persisted) is None
        again = await service.generate(request)
        assert again == (enhanced, persisted) and again.underived is None
    assert (tmp_path / "out/2026/11/24/underived-1.thumb.webp").is_file()
    _, events = recorded(ledger_path, "underived-1")
    assert events[:5] == [
        GENERATION_REQUESTED,
        PROMPT_ENHANCED,
        IMAGE_RENDERED,
        IMAGE_PERSISTED,
        GENERATION_FAILED,
    ]
    assert events[-1] == IMAGE_DERIVED


async def test_closing_the_service_records_the_generation_it_stops(
    settings: Settings,
    ledger: Ledger,
    ledger_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Leaving the ``async with`` while a generation renders: it stops, its failure is
    recorded before the ledger is closed (not left ``enhanced`` for ever), and its caller is
    told, retryably, that the service closed under it."""
    progress, _, reached, go_on = _held_at_step(1)
    service = ImageGenService(settings, plugins=no_plugins(settings), recorder=Recorder(ledger))
    try:
        with caplog.at_level(logging.WARNING, logger="imagegen"):
            async with service:
                request = small(prompt="a kite", enhance=False, steps=4, generation_id="closed-1")
                running = asyncio.ensure_future(service.generate(request, progress=progress))
                assert await asyncio.to_thread(reached.wait, 120), "the render never began"
            go_on.set()
            with pytest.raises(DependencyUnavailable, match="closed") as caught:
                await asyncio.wait_for(running, 60)
    finally:
        go_on.set()
    assert caught.value.retryable
    found, events = recorded(ledger_path, "closed-1")
    assert found is not None and found.status == "failed"
    assert found.failed_stage == "render"
    assert events[-1] == GENERATION_FAILED
    assert not [r for r in caplog.records if "could not record" in r.getMessage()]


async def test_a_closed_service_refuses_every_call_before_doing_anything(
    settings: Settings, tmp_path: Path, ledger: Ledger, ledger_path: Path
) -> None:
    plugins = no_plugins(settings)
    service = ImageGenService(settings, plugins=plugins, recorder=Recorder(ledger))
    async with service:
        request = small(prompt="a kite", enhance=False, generation_id="open-1")
        enhanced = await service.enhance(request)
        rendered = await service.render(enhanced)
        persisted = await service.persist(rendered)
    await service.aclose()  # again: nothing to do
    later = small(prompt="a kite", enhance=False, generation_id="after-1")
    calls = {
        "enhance": lambda: service.enhance(later),
        "enhance_while_loading": lambda: service.enhance_while_loading(later),
        "generate": lambda: service.generate(later),
        "render": lambda: service.render(enhanced),
        "render_png": lambda: service.render_png(enhanced),
        "render_and_persist": lambda: service.render_and_persist(enhanced),
        "persist": lambda: service.persist(rendered),
        "derive": lambda: service.derive(persisted),
        "try_derive": lambda: service.try_derive(persisted),
        "finalise": lambda: service.finalise(rendered),
        "__aenter__": service.__aenter__,
    }
    for name, call in calls.items():
        with pytest.raises(RuntimeError) as caught:
            await call()
        assert str(caught.value) == "ImageGenService is closed", name
    found, _ = recorded(ledger_path, "after-1")
    assert found is None, "nothing of a refused call is recorded"
    assert not (tmp_path / "out/prompts/after-1.json").exists(), "nor enhanced"
    assert not list((tmp_path / "out").rglob("open-1.thumb.webp")), "nor derived"


async def test_a_service_serves_the_event_loop_it_first_ran_in_only(settings: Settings) -> None:
    """A second loop (another thread's ``asyncio.run``) is refused at once, rather than
    waiting for ever on the first loop's locks and queues."""
    service = ImageGenService(settings, plugins=no_plugins(settings))
    async with service:
        _, persisted = await service.generate(small(prompt="a kite", enhance=False))
        outcome: list[BaseException | object] = []

        def elsewhere() -> None:
            try:
                outcome.append(asyncio.run(service.enhance(small(prompt="a kite"))))
            except BaseException as exc:
                outcome.append(exc)

        thread = threading.Thread(target=elsewhere, daemon=True)
        thread.start()
        await asyncio.to_thread(thread.join, 60)
        assert not thread.is_alive(), "the other loop's call never ended"
        [refused] = outcome
        assert isinstance(refused, RuntimeError) and "event loop" in str(refused)
        # Its own loop is served as before.
        _, again = await service.generate(
            small(prompt="a kite", enhance=False, seed=persisted.seed)
        )
        assert again.seed == persisted.seed


async def test_a_call_may_leave_its_time_out_and_its_id_is_checked_by_name(
    settings: Settings,
) -> None:
    service = ImageGenService(settings, plugins=no_plugins(settings))
    request = GenerationRequest(prompt="a kite", width=256, height=256, enhance=False)
    before = datetime.now(UTC)
    enhanced = await service.enhance(request, call=Call(generation_id="call-1"))
    assert enhanced.generation_id == "call-1"
    assert before - timedelta(seconds=1) <= enhanced.requested_at <= datetime.now(UTC)

    dated = small(prompt="a kite", enhance=False)  # the request's own time is its time
    enhanced = await service.enhance(dated, call=Call(generation_id="call-2"))
    assert enhanced.requested_at == dated.requested_at

    for bad in ("bad id!", "", "../x"):
        with pytest.raises(InvalidRequest) as caught:
            await service.enhance(request, call=Call(generation_id=bad, requested_at=before))
        assert caught.value.fields == ["generation_id"]


async def test_a_request_may_be_given_as_a_mapping_of_its_fields(
    settings: Settings, tmp_path: Path
) -> None:
    async with ImageGenService(settings, plugins=no_plugins(settings)) as service:
        fields = {"prompt": "a kite", "width": 256, "height": 256, "model": "tiny"}
        enhanced, persisted = await service.generate({**fields, "enhance": False})
        assert enhanced.prompt == "a kite" and (tmp_path / "out" / persisted.key).is_file()
        with pytest.raises(InvalidRequest) as caught:
            await service.generate({**fields, "width": 100, "seed": -1})
        assert set(caught.value.fields) == {"width", "seed"}
        with pytest.raises(TypeError, match="GenerationRequest"):
            await service.generate("a kite")  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="EnhancedPrompt"):
            await service.render(persisted)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("part", "given"),
    [
        ("plugins", ["a plugin"]),
        ("plugins", "weather"),
        ("storage", "./out"),
        ("backend", "diffusers"),
        ("recorder", "ledger.db"),
        ("preload", "tiny"),
        ("preload", [5]),
        ("preload", 5),
    ],
)
def test_a_part_of_the_wrong_kind_is_refused_as_the_service_is_made(
    settings: Settings, part: str, given: object
) -> None:
    """Accepted, each failed later as an ``AttributeError`` (on leaving ``async with``, one
    that hid the error that ended the block); a string to preload was read letter by letter."""
    with pytest.raises(TypeError, match=f"^{part} must "):
        ImageGenService(settings, **{part: given})  # type: ignore[arg-type]


def test_settings_of_the_wrong_kind_are_refused_as_the_service_is_made() -> None:
    with pytest.raises(TypeError, match=r"^settings must be a Settings or None, not str$"):
        ImageGenService("settings")  # type: ignore[arg-type]


def test_a_model_to_preload_is_one_the_settings_serve(settings: Settings, tmp_path: Path) -> None:
    """As render holds each job to: a model directory outside ``served_models`` is not
    loaded for being named at start-up."""
    elsewhere = str(tmp_path / "model")
    with pytest.raises(InvalidRequest) as caught:
        ImageGenService(settings, preload=["tiny", elsewhere])
    assert caught.value.fields == ["preload"]
    assert "is not served here" in caught.value.message and elsewhere in caught.value.message
    ImageGenService(settings, preload=("tiny",))  # a served one


@pytest.mark.parametrize(
    ("call", "callback"),
    [
        ("generate", "progress"),
        ("generate", "persisted"),
        ("render_and_persist", "progress"),
        ("render_and_persist", "stored"),
        ("render_and_persist", "persisted"),
        ("render", "progress"),
        ("render_png", "progress"),
    ],
)
async def test_a_callback_that_cannot_be_called_is_refused_before_the_call_does_anything(
    settings: Settings, tmp_path: Path, call: str, callback: str
) -> None:
    """Found out once the render had run (an ``InternalError``) or once the PNG was stored (a
    bare ``TypeError``): refused at the call, nothing rendered or stored."""
    from tests.fakes.render_backend import CountingBackend

    backend = CountingBackend()
    async with ImageGenService(settings, plugins=no_plugins(settings), backend=backend) as service:
        request = small(prompt="a kite", enhance=False, generation_id="uncalled")
        given = request if call == "generate" else await service.enhance(request)
        with pytest.raises(TypeError, match=f"^{callback} must be callable or None, not int"):
            await getattr(service, call)(given, **{callback: 5})
    assert backend.renders == 0
    assert not list((tmp_path / "out").rglob("*.png"))


@pytest.mark.parametrize("kind", ["render", "render_png"])
async def test_a_render_past_its_denoising_is_answered_as_the_service_closes(
    kind: str, tmp_path: Path
) -> None:
    """Closing stops a render at its next denoising step; one already past it (encoding) is
    encoded and answered, never thrown away (a function closes its service as it exits)."""
    from tests.render.test_batching import TwoPhaseBackend, job

    backend = TwoPhaseBackend()
    backend.encode_gate.clear()
    service = ImageGenService(
        Settings(storage_url=str(tmp_path)), backend=backend, load_on_demand=True
    )
    await service.__aenter__()
    call = asyncio.ensure_future(getattr(service, kind)(job("encoding-1")))
    assert await asyncio.to_thread(backend.encoding.wait, 30), "never encoded"
    closing = asyncio.ensure_future(service.aclose())
    await asyncio.sleep(0.05)  # the close has begun: the render stage is closed
    backend.encode_gate.set()
    answered = await asyncio.wait_for(call, 30)
    await asyncio.wait_for(closing, 30)
    assert answered.png if kind == "render_png" else answered.generation_id == "encoding-1"


async def test_a_render_closed_after_its_last_step_is_stored_and_answered(tmp_path: Path) -> None:
    """The service closes once a render has reported its last step, while its pipeline
    decodes: no step is left to stop it at, so its image is encoded, stored and answered."""
    from tests.render.test_batching import job
    from tests.render.test_closing import DecodingBackend

    backend = DecodingBackend()
    service = ImageGenService(
        Settings(storage_url=str(tmp_path)), backend=backend, load_on_demand=True
    )
    await service.__aenter__()
    call = asyncio.ensure_future(service.render(job("decoding-1")))
    assert await asyncio.to_thread(backend.decoding.wait, 30), "never decoded"
    closing = asyncio.ensure_future(service.aclose())
    await asyncio.sleep(0.05)  # the close has begun: the render stage is closed
    backend.decode_gate.set()
    answered = await asyncio.wait_for(call, 30)
    await asyncio.wait_for(closing, 30)
    assert (tmp_path / answered.key).read_bytes() == b"\x89PNG decoding-1"


async def test_a_call_that_closes_its_own_service_is_refused(settings: Settings) -> None:
    """``aclose`` from within one of the service's calls (a plugin's) would leave that call
    running on what it closed: refused, and the service stays usable."""

    class Closer:
        name = "closer"
        description = "closes the service it runs in"

        def __init__(self) -> None:
            self.service: ImageGenService | None = None
            self.refused: BaseException | None = None

        async def contribute(self, context: Any) -> None:
            assert self.service is not None
            try:
                await self.service.aclose()
            except RuntimeError as exc:
                self.refused = exc

    closer = Closer()
    plugins = PluginSet([closer], settings=settings)
    async with ImageGenService(settings, plugins=plugins) as service:
        closer.service = service
        await service.enhance(small(prompt="a kite", enhance=False, generation_id="closer-1"))
        assert isinstance(closer.refused, RuntimeError)
        assert "within one of its own calls" in str(closer.refused)
        enhanced = await service.enhance(small(prompt="a kite", generation_id="closer-2"))
    assert enhanced.generation_id == "closer-2"


async def test_closing_ends_although_a_call_ignores_its_cancellation(
    settings: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A call that swallows every cancellation (here a storage's, as enhance reads its memo)
    holds its call for ever: closing gives up on it after its grace twice over, and says so,
    rather than hang."""
    from imagegen import service as service_module
    from imagegen.storage.base import StoredObject
    from imagegen.storage.local import LocalStorage

    class Stubborn(LocalStorage):
        released = False  # by the test, once it has seen the close end
        reading = asyncio.Event()

        async def head(self, key: str) -> StoredObject | None:
            self.reading.set()
            while not self.released:
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.sleep(0.05)
            return await super().head(key)

    stubborn = Stubborn(tmp_path / "stubborn")
    service = ImageGenService(settings, plugins=no_plugins(settings), storage=stubborn)
    await service.__aenter__()
    call = asyncio.ensure_future(service.enhance(small(prompt="a kite", enhance=False)))
    await asyncio.wait_for(stubborn.reading.wait(), 30)
    began = time.monotonic()
    try:
        with caplog.at_level(logging.WARNING, logger="imagegen"):
            await asyncio.wait_for(service.aclose(), 30)
        took = time.monotonic() - began
        assert not call.done()
    finally:
        stubborn.released = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(call, 30)
    assert took < 2 * service_module.CLOSE_GRACE_SECONDS + 2
    assert any("did not stop when cancelled" in r.getMessage() for r in caplog.records)


async def test_closing_stops_a_call_whose_plugin_ignores_its_cancellation(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """A plugin that swallows every cancellation is given up on within its grace, its call
    stopped with the others: the close waits for no plugin."""
    from imagegen.plugins import _running

    class Stubborn:
        name = "stubborn"
        description = "ignores its cancellation"
        released = False  # by the test, once it has seen the close end

        async def contribute(self, context: Any) -> None:
            while not self.released:
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.sleep(0.05)

    stubborn = Stubborn()
    service = ImageGenService(settings, plugins=PluginSet([stubborn], settings=settings))
    await service.__aenter__()
    call = asyncio.ensure_future(service.enhance(small(prompt="a kite", enhance=False)))
    await asyncio.sleep(0.3)  # the plugin runs
    try:
        with caplog.at_level(logging.WARNING, logger="imagegen"):
            await asyncio.wait_for(service.aclose(), 30)
        assert call.done()
        with pytest.raises(DependencyUnavailable):
            call.result()
    finally:
        stubborn.released = True
        for _ in range(100):  # the call left running ends once released
            if not _running._ABANDONED:
                break
            await asyncio.sleep(0.05)
    said = [r.getMessage() for r in caplog.records]
    assert (
        "plugin stubborn did not stop when cancelled; left running (1 of its calls running)" in said
    )
    assert not any("did not stop when cancelled; closed under them" in m for m in said)
    assert _running._RUNNING.of("stubborn") == 0


async def test_leaving_the_service_ends_although_a_plugins_close_never_does(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A plugin whose ``aclose`` waits for ever (a connection that never says goodbye) held
    ``async with``'s exit, and ``imagegen generate`` with it, for ever: it is given up on
    after its bound, naming it."""
    from imagegen.plugins import _running

    monkeypatch.setattr(_running, "CLOSE_SECONDS", 0.3)

    class Holding:
        name = "holding"
        description = "holds a connection"
        closing = False

        def contribute(self, context: Any) -> None:
            return None

        async def aclose(self) -> None:
            self.closing = True
            await asyncio.sleep(3600)

    holding = Holding()
    service = ImageGenService(settings, plugins=PluginSet([holding], settings=settings))
    began = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="imagegen"):
        async with service:
            await service.enhance(small(prompt="a kite", enhance=False))
            began = time.monotonic()
        took = time.monotonic() - began
    assert holding.closing
    assert took < 0.3 + 2
    said = [r.getMessage() for r in caplog.records]
    assert "plugin holding did not close: timed out after 0.3s" in said


async def test_a_second_close_waits_for_the_first(
    settings: Settings, ledger: Ledger, ledger_path: Path
) -> None:
    """Two callers close the service at once (a function's exit and its caller's ``async
    with``): the second returns only once the close has ended, the generation it stopped
    recorded."""
    progress, _, reached, go_on = _held_at_step(1)
    service = ImageGenService(settings, plugins=no_plugins(settings), recorder=Recorder(ledger))
    await service.__aenter__()
    request = small(prompt="a kite", enhance=False, steps=4, generation_id="twice-closed")
    running = asyncio.ensure_future(service.generate(request, progress=progress))
    try:
        assert await asyncio.to_thread(reached.wait, 120), "the render never began"
        first = asyncio.ensure_future(service.aclose())
        await asyncio.sleep(0.05)  # the first close has begun, and waits for the render
        go_on.set()
        await asyncio.wait_for(service.aclose(), 60)
        found, _ = recorded(ledger_path, "twice-closed")
        assert found is not None and found.status == "failed"
        await first
    finally:
        go_on.set()
        with contextlib.suppress(DependencyUnavailable):
            await asyncio.wait_for(running, 60)
