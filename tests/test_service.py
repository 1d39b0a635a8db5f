"""``ImageGenService`` end to end with the real tiny FLUX pipeline and local storage."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import logging
import threading
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from PIL import Image

from imagegen import GenerationRequest, ImageGenService, InvalidRequest, Settings
from imagegen.errors import DependencyUnavailable
from imagegen.events import GENERATION_FAILED, GENERATION_REQUESTED
from imagegen.ledger import Ledger
from imagegen.ledger.models import IngestResult, LedgerEvent
from imagegen.models import EnhancedPrompt
from imagegen.plugins import PluginContext, PluginSet
from imagegen.render.base import ProgressCallback, RenderOutput
from imagegen.storage import LocalStorage
from imagegen.urls import verify
from tests.fakes.render_backend import CountingBackend, ReadyBackend

NOW = datetime(2026, 11, 24, 18, 30, tzinfo=UTC)
SIGNING_SECRET = "s3cret-of-16-bytes"


def small(**kwargs: object) -> GenerationRequest:
    """A tiny request at :data:`NOW` (its time names the storage keys)."""
    return GenerationRequest.model_validate(
        {"width": 256, "height": 256, "model": "tiny", "requested_at": NOW, **kwargs}
    )


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(storage_url=str(tmp_path / "out"), model="tiny", ollama_retries=0)


@pytest.fixture
def signed(settings: Settings) -> Settings:
    """``settings`` with public URLs, signed with :data:`SIGNING_SECRET`."""
    return Settings(
        **settings.model_dump(include={"storage_url", "model", "ollama_retries"}),
        public_base_url="https://img.example.com/",
        url_signing_secret=SIGNING_SECRET,
    )


async def test_generate_end_to_end(settings: Settings, tmp_path: Path) -> None:
    async with ImageGenService(settings) as service:
        enhanced, persisted = await service.generate(small(prompt="a lighthouse", seed=1))
    root = tmp_path / "out"
    png = root / persisted.key
    assert persisted.key == f"2026/11/24/{persisted.generation_id}.png"
    assert hashlib.sha256(png.read_bytes()).hexdigest() == persisted.sha256
    assert (root / persisted.keys["thumbnail"]).is_file()
    # The derivatives are made before generate returns. A 256 px image: one per format at
    # its own width, none upscaled.
    derived = json.loads((root / persisted.key.replace(".png", ".derivatives.json")).read_text())
    keys = derived["derived"]["keys"]
    assert {keys["avif:256"], keys["webp:256"]} == {
        persisted.key.replace(".png", ".w256.avif"),
        persisted.key.replace(".png", ".w256.webp"),
    }
    assert not any(name.endswith((":512", ":1024")) for name in keys)
    with Image.open(root / keys["avif:256"]) as avif:
        assert (avif.format, avif.size) == ("AVIF", (256, 256))
    record = json.loads((root / persisted.keys["metadata"]).read_text())
    assert record["request"]["prompt"] == enhanced.prompt
    assert persisted.prompt == enhanced.prompt and persisted.seed == 1
    assert enhanced.fallback  # no Ollama
    assert "lighthouse" in enhanced.prompt


async def test_same_seed_same_pixels_different_seed_different(settings: Settings) -> None:
    async with ImageGenService(settings) as service:
        a = await service.enhance(small(prompt="a cat", seed=3, enhance=False, plugins=[]))
        b = await service.enhance(small(prompt="a cat", seed=3, enhance=False, plugins=[]))
        c = await service.enhance(small(prompt="a cat", seed=4, enhance=False, plugins=[]))
        png_a, png_b, png_c = [(await service.render_png(job)).png for job in (a, b, c)]
    assert a.generation_id != b.generation_id  # only the seed ties them
    assert pixels(png_a) == pixels(png_b)
    assert pixels(png_a) != pixels(png_c)


def pixels(png: bytes) -> bytes:
    with Image.open(io.BytesIO(png)) as image:
        return image.convert("RGB").tobytes()


async def test_render_persist_and_derive_are_idempotent(settings: Settings, tmp_path: Path) -> None:
    out = tmp_path / "out"
    async with ImageGenService(settings) as service:
        job = await service.enhance(small(prompt="a bridge", generation_id="idem-1"))
        first = await service.render(job)
        second = await service.render(job)
        assert first == second
        p1 = await service.persist(first)
        p2 = await service.persist(second)
        assert p1 == p2
        # The image is final without its thumbnail and derivatives: persist makes none.
        files = sorted(str(p.relative_to(out)) for p in out.rglob("idem-1*"))
        assert files == [
            "2026/11/24/idem-1.json",
            "2026/11/24/idem-1.png",
            "prompts/idem-1.json",
            "renders/idem-1.json",
        ]
        d1 = await service.derive(p1)
        d2 = await service.derive(p2)
        assert d1 == d2
    files = sorted(str(p.relative_to(out)) for p in out.rglob("idem-1*"))
    assert files == [
        "2026/11/24/idem-1.derivatives.json",
        "2026/11/24/idem-1.json",
        "2026/11/24/idem-1.png",
        "2026/11/24/idem-1.thumb.webp",
        "2026/11/24/idem-1.w256.avif",
        "2026/11/24/idem-1.w256.webp",
        "prompts/idem-1.json",
        "renders/idem-1.json",
    ]


async def test_every_reply_of_a_replay_names_the_generation_it_replays(
    settings: Settings,
) -> None:
    # A replay from the request runs enhance again: the link must survive it, and every
    # stage after it, so each event of the new generation says what it replays.
    async with ImageGenService(settings) as service:
        request = small(prompt="a harbour", generation_id="replay-2", replay_of="original-1")
        job = await service.enhance(request)
        rendered = await service.render(job)
        persisted = await service.persist(rendered)
        derived = await service.derive(persisted)
        # A redelivery is answered from the stored records: they keep the link too.
        again = await service.derive(await service.persist(await service.render(job)))
    assert job.replay_of == rendered.prompt.replay_of == "original-1"
    assert persisted.replay_of == derived.replay_of == again.replay_of == "original-1"
    assert again == derived


async def test_persist_refuses_a_tampered_claim_check(settings: Settings) -> None:
    async with ImageGenService(settings) as service:
        job = await service.enhance(small(prompt="a boat", generation_id="tamper-1"))
        rendered = await service.render(job)
        with pytest.raises(InvalidRequest) as caught:
            await service.persist(rendered.model_copy(update={"sha256": "0" * 64}))
        assert caught.value.fields == ["sha256"]
        with pytest.raises(InvalidRequest):
            await service.persist(rendered.model_copy(update={"key": "2026/11/24/other.png"}))
        missing = await service.enhance(small(prompt="a boat", generation_id="never-rendered"))
        with pytest.raises(InvalidRequest) as missing_image:
            await service.persist(
                rendered.model_copy(
                    update={
                        "generation_id": "never-rendered",
                        "key": "2026/11/24/never-rendered.png",
                        "prompt": missing,
                    }
                )
            )
        assert missing_image.value.fields == ["key"]


async def test_signed_public_urls(signed: Settings) -> None:
    async with ImageGenService(signed) as service:
        _, persisted = await service.generate(small(prompt="a key", enhance=False))
    assert persisted.url is not None
    base, query = persisted.url.split("?")
    assert base == f"https://img.example.com/{persisted.key}"
    params = dict(part.split("=") for part in query.split("&"))
    assert verify(persisted.key, int(params["expires"]), params["signature"], SIGNING_SECRET)
    assert set(persisted.urls) == {"image", "thumbnail"}


async def test_two_services_run_different_plugin_sets(settings: Settings) -> None:
    only_time = ImageGenService(
        settings, plugins=PluginSet.from_settings(settings, names=["time_of_day"])
    )
    only_style = ImageGenService(
        settings, plugins=PluginSet.from_settings(settings, names=["art_style"])
    )
    a = await only_time.enhance(small(prompt="a fox", enhance=False))
    b = await only_style.enhance(small(prompt="a fox", enhance=False))
    assert [c.plugin for c in a.contributions] == ["time_of_day"]
    assert [c.plugin for c in b.contributions] == ["art_style"]


async def test_an_empty_plugin_set_given_runs_no_plugin(settings: Settings) -> None:
    # Not IMAGEGEN_PLUGINS' set in its stead, though an empty set is falsy (it has a length).
    assert settings.plugins, "the configured set must not be empty for this to tell"
    service = ImageGenService(settings, plugins=PluginSet([], settings=settings))
    enhanced = await service.enhance(small(prompt="a fox", enhance=False))
    assert enhanced.contributions == [] and enhanced.prompt == "a fox"


async def test_model_must_be_served(settings: Settings) -> None:
    service = ImageGenService(settings.model_copy(update={"served_models": ["tiny"]}))
    with pytest.raises(InvalidRequest) as caught:
        await service.enhance(small(model="black-forest-labs/FLUX.1-dev"))
    assert caught.value.fields == ["model"]


async def test_injected_storage_is_used(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "injected")
    async with ImageGenService(Settings(), storage=storage) as service:
        _, persisted = await service.generate(small(prompt="a tree", enhance=False))
    assert (tmp_path / "injected" / persisted.key).is_file()


async def test_a_redelivered_request_gets_the_first_prompt_even_if_ollama_changed(
    tmp_path: Path,
) -> None:
    from tests.fakes.ollama_server import FakeOllama

    # Each service closed at the end (its Ollama client's connections with it), never left
    # for the collector to find open during a later test.
    async with contextlib.AsyncExitStack() as services:
        with FakeOllama() as ollama:
            ollama.reply_with('{"prompt": "a heron in morning fog, ink wash"}')
            settings = Settings(
                storage_url=str(tmp_path / "out"),
                model="tiny",
                ollama_host=ollama.url,
                ollama_retries=0,
            )
            service = await services.enter_async_context(ImageGenService(settings))
            request = small(prompt="a heron", generation_id="memo-1")
            first = await service.enhance(request)
            assert first.enhancer.startswith("ollama:") and "heron in morning fog" in first.prompt

        # Ollama is gone: the redelivery still gets the prompt the first delivery wrote.
        other = await services.enter_async_context(ImageGenService(settings))
        again = await other.enhance(request)
        assert again == first
        assert (tmp_path / "out" / "prompts/memo-1.json").is_file()

        with pytest.raises(InvalidRequest) as caught:
            await service.enhance(small(prompt="a crane", generation_id="memo-1"))
        assert caught.value.fields == ["generation_id"]


async def test_simultaneous_persists_of_one_image_answer_alike(settings: Settings) -> None:
    import asyncio

    async with ImageGenService(settings) as service:
        job = await service.enhance(small(prompt="a lamp", generation_id="twice-1"))
        rendered = await service.render(job)
        first, second = await asyncio.gather(service.persist(rendered), service.persist(rendered))
    assert first == second
    assert len(service.persist_stage._generation_lock) == 0  # no lock left behind


async def test_persist_shows_a_record_only_to_the_event_that_made_it(signed: Settings) -> None:
    async with ImageGenService(signed) as service:
        job = await service.enhance(small(prompt="a secret garden", generation_id="victim-1"))
        rendered = await service.render(job)
        await service.persist(rendered)

        # Someone who knows only the generation id (and its day) forges the claim check.
        forged = rendered.model_copy(update={"sha256": "1" * 64})
        with pytest.raises(InvalidRequest) as wrong_image:
            await service.persist(forged)
        other_job = job.model_copy(update={"prompt": "anything"})
        with pytest.raises(InvalidRequest) as wrong_job:
            await service.persist(rendered.model_copy(update={"prompt": other_job}))

    assert wrong_image.value.fields == ["sha256"]
    assert wrong_job.value.fields == ["prompt"]
    for caught in (wrong_image, wrong_job):
        text = json.dumps(caught.value.to_dict())
        assert "secret garden" not in text and "signature" not in text
        assert "does not describe the image stored" in caught.value.message


async def test_replicas_persist_and_enhance_alike_on_one_store(
    signed: Settings, tmp_path: Path
) -> None:
    """Two services share a store but no lock (two pods): one record, the same answers."""
    import asyncio

    async with ImageGenService(signed) as one, ImageGenService(signed) as two:
        request = small(prompt="a kite", generation_id="pods-1")
        jobs = await asyncio.gather(one.enhance(request), two.enhance(request))
        assert jobs[0] == jobs[1]
        rendered = await one.render(jobs[0])
        first, second = await asyncio.gather(one.persist(rendered), two.persist(rendered))
    assert first == second
    assert first.created_at == rendered.rendered_at
    assert first.url is not None and "expires=" in first.url
    files = {str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("pods-1*")}
    assert {"2026/11/24/pods-1.json", "2026/11/24/pods-1.png", "prompts/pods-1.json"} <= files


class _Meeting:
    """A backend's load and a plugin that each wait, up to 30 s, for the other to have begun:
    both see the other only if the model loads while the prompt is written."""

    def __init__(self) -> None:
        self.loading, self.writing = threading.Event(), threading.Event()
        self.load_saw_writing = self.writing_saw_load = False


class _MeetingBackend(ReadyBackend):
    def __init__(self, meeting: _Meeting, *, fails: bool = False) -> None:
        self.meeting, self.fails = meeting, fails
        self.loads: list[str] = []

    def load(self, model: str) -> float:
        self.loads.append(model)
        if self.fails:
            raise DependencyUnavailable(f"model {model!r} could not be downloaded")
        self.meeting.loading.set()
        self.meeting.load_saw_writing = self.meeting.writing.wait(30)
        return 0.0

    def is_loaded(self, model: str) -> bool:
        return not self.fails and model in self.loads

    def render(
        self, job: EnhancedPrompt, *, progress: ProgressCallback | None = None
    ) -> RenderOutput:
        buffer = io.BytesIO()
        Image.new("RGB", (job.width, job.height), "teal").save(buffer, format="PNG")
        return RenderOutput(png=buffer.getvalue(), width=job.width, height=job.height)


class _MeetingPlugin:
    name = "meeting"
    description = "waits for the model to start loading"

    def __init__(self, meeting: _Meeting) -> None:
        self.meeting = meeting

    def contribute(self, context: PluginContext) -> None:
        self.meeting.writing.set()
        self.meeting.writing_saw_load = self.meeting.loading.wait(30)


def _meeting_service(settings: Settings, backend: _MeetingBackend) -> ImageGenService:
    plugins = PluginSet([_MeetingPlugin(backend.meeting)], settings=settings, timeout=60)
    return ImageGenService(settings, plugins=plugins, backend=backend)


async def test_the_model_loads_while_the_prompt_is_written(settings: Settings) -> None:
    backend = _MeetingBackend(_Meeting())
    async with _meeting_service(settings, backend) as service:
        enhanced, persisted = await service.generate(small(prompt="a kite", enhance=False))
        assert backend.meeting.writing_saw_load and backend.meeting.load_saw_writing
        assert backend.loads == ["tiny"], "loaded once: render found it loaded"
        assert persisted.model == enhanced.model == "tiny"

        # The next image's model is loaded already: nothing loads ahead of it.
        await service.generate(small(prompt="a second kite", enhance=False))
        assert backend.loads == ["tiny"]


async def test_a_request_enhance_refuses_loads_nothing(settings: Settings) -> None:
    backend = _MeetingBackend(_Meeting())
    served = settings.model_copy(update={"served_models": ["tiny"]})
    async with _meeting_service(served, backend) as service:
        with pytest.raises(InvalidRequest) as caught:
            await service.generate(small(model="black-forest-labs/FLUX.1-dev"))
    assert caught.value.fields == ["model"]
    with pytest.raises(InvalidRequest) as caught:
        async with _meeting_service(settings, backend) as service:
            await service.generate(small(prompt="a kite", plugins=["no_such_plugin"]))
    assert caught.value.fields == ["plugins"]
    assert backend.loads == []


async def test_a_load_that_fails_ahead_is_reported_by_render(settings: Settings) -> None:
    backend = _MeetingBackend(_Meeting(), fails=True)
    plugins = PluginSet([], settings=settings)  # nothing to meet: the load fails
    async with ImageGenService(settings, plugins=plugins, backend=backend) as service:
        request = small(prompt="a kite", enhance=False)
        with pytest.raises(DependencyUnavailable, match="could not be downloaded"):
            await service.generate(request)
        # enhance finished (its prompt is remembered); the load's failure is render's, said
        # once: render does not load all over again (offline, after the Hub's retries).
        assert backend.loads == ["tiny"]


class _HeldBackend(ReadyBackend):
    """Its load, or its render, waits until released: where a Ctrl-C finds the generation."""

    def __init__(self, *, hold: str) -> None:
        self.hold, self.held, self.release = hold, threading.Event(), threading.Event()
        self.loaded = False

    def _wait(self, phase: str) -> None:
        if phase == self.hold:
            self.held.set()
            self.release.wait(30)

    def load(self, model: str) -> float:
        self._wait("load")
        self.loaded = True
        return 0.0

    def is_loaded(self, model: str) -> bool:
        return self.loaded

    def render(
        self, job: EnhancedPrompt, *, progress: ProgressCallback | None = None
    ) -> RenderOutput:
        self._wait("render")
        buffer = io.BytesIO()
        Image.new("RGB", (job.width, job.height), "teal").save(buffer, format="PNG")
        return RenderOutput(png=buffer.getvalue(), width=job.width, height=job.height)


@pytest.mark.parametrize("hold", ["load", "render"])
async def test_a_cancelled_generation_is_recorded_where_it_stopped(
    settings: Settings, tmp_path: Path, hold: str
) -> None:
    """Ctrl-C in the CLI cancels the generation: the ledger says it stopped at render (the
    model loading for it, or the render itself), retryable, instead of showing it enhanced
    for ever."""
    from imagegen.ledger import open_ledger
    from imagegen.ledger.recorder import Recorder

    ledger = open_ledger(str(tmp_path / "ledger.db"))
    found_nothing = SimpleNamespace(status=None)
    backend = _HeldBackend(hold=hold)
    plugins = PluginSet([], settings=settings)
    try:
        async with ImageGenService(
            settings, plugins=plugins, backend=backend, recorder=Recorder(ledger)
        ) as service:
            request = small(prompt="a kite", enhance=False, generation_id="stopped-1")
            running = asyncio.ensure_future(service.generate(request))
            assert await asyncio.to_thread(backend.held.wait, 30)
            for _ in range(3000):  # until enhance has answered: what is left is render's
                if (ledger.get("stopped-1") or found_nothing).status == "enhanced":
                    break
                await asyncio.sleep(0.01)
            else:
                raise AssertionError("enhance never answered")
            running.cancel()
            backend.release.set()  # what is under way in a thread ends on its own
            with pytest.raises(asyncio.CancelledError):
                await running
            found = ledger.get("stopped-1")
        assert found is not None and found.status == "failed"
        assert found.failed_stage == "render"
        assert found.error is not None and found.error.code == "cancelled"
        assert found.error.retryable
    finally:
        backend.release.set()
        ledger.close()


class _HeldLedger:
    """A real ledger whose write of a ``generation.requested`` waits until released: where a
    Ctrl-C finds a generation that has only just begun."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self.held, self.release, self.written = (threading.Event() for _ in range(3))
        self.overtaken = threading.Event()
        """Set when another event is written while the request's write waits."""

    def __getattr__(self, name: str) -> Any:
        return getattr(self.ledger, name)

    def ingest(self, event: LedgerEvent) -> IngestResult:
        if event.type != GENERATION_REQUESTED:
            if self.held.is_set() and not self.written.is_set():
                self.overtaken.set()
            return self.ledger.ingest(event)
        self.held.set()
        self.release.wait(30)
        try:
            return self.ledger.ingest(event)
        finally:
            self.written.set()


async def test_a_generation_cancelled_as_its_request_is_recorded_is_recorded_at_enhance(
    settings: Settings, tmp_path: Path
) -> None:
    """A Ctrl-C while the request is written to the ledger (in a thread, which commits all the
    same): the generation is recorded as cancelled at enhance, after its request, rather than
    left requested for ever."""
    from imagegen.ledger import open_ledger
    from imagegen.ledger.recorder import Recorder

    ledger = open_ledger(str(tmp_path / "ledger.db"))
    held = _HeldLedger(ledger)
    plugins = PluginSet([], settings=settings)
    try:
        async with ImageGenService(
            settings, plugins=plugins, backend=CountingBackend(), recorder=Recorder(held)
        ) as service:
            request = small(prompt="a kite", enhance=False, generation_id="stopped-2")
            running = asyncio.ensure_future(service.generate(request))
            assert await asyncio.to_thread(held.held.wait, 30)
            running.cancel()
            # Time for the cancellation to be recorded ahead of the request, were it not
            # held back until the request is written.
            overtaken = await asyncio.to_thread(held.overtaken.wait, 1)
            held.release.set()
            with pytest.raises(asyncio.CancelledError):
                await running
            assert await asyncio.to_thread(held.written.wait, 30)
            assert not overtaken, "the failure was recorded before the request"
            found = ledger.get("stopped-2")
            recorded = [e.type for e in ledger.generation_events("stopped-2", order="recorded")]
        assert found is not None and found.status == "failed"
        assert found.failed_stage == "enhance"
        assert found.error is not None and found.error.code == "cancelled"
        assert recorded == [GENERATION_REQUESTED, GENERATION_FAILED]
    finally:
        held.release.set()
        ledger.close()


class _FailingBackend(ReadyBackend):
    def render(
        self, job: EnhancedPrompt, *, progress: ProgressCallback | None = None
    ) -> RenderOutput:
        raise RuntimeError("the GPU fell over")


class _RefusesFailures:
    """A real ledger that cannot be reached as a ``generation.failed`` is written."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger

    def __getattr__(self, name: str) -> Any:
        return getattr(self.ledger, name)

    def ingest(self, event: LedgerEvent) -> IngestResult:
        if event.type == GENERATION_FAILED:
            raise DependencyUnavailable("the ledger database is unavailable: it cannot be reached")
        return self.ledger.ingest(event)


async def test_a_failure_the_ledger_cannot_record_is_logged_in_its_generation_and_trace(
    settings: Settings,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A stage's failure is recorded once its span has ended: the line saying the ledger could
    not take it is still written in that span's context, naming the generation and the trace
    it failed in."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from imagegen._logging import JsonFormatter
    from imagegen.errors import InternalError
    from imagegen.ledger import open_ledger
    from imagegen.ledger.recorder import Recorder

    spans = InMemorySpanExporter()
    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(SimpleSpanProcessor(spans))
    monkeypatch.setattr("imagegen.service.tracer", lambda: provider.get_tracer("tests"))
    caplog.handler.setFormatter(JsonFormatter())  # formatted as written: in its context
    ledger = open_ledger(str(tmp_path / "ledger.db"))
    plugins = PluginSet([], settings=settings)
    recorder = Recorder(_RefusesFailures(ledger))  # type: ignore[arg-type]
    try:
        async with ImageGenService(
            settings, plugins=plugins, backend=_FailingBackend(), recorder=recorder
        ) as service:
            request = small(prompt="a kite", enhance=False, generation_id="unrecorded-1")
            with (
                caplog.at_level(logging.INFO, logger="imagegen.ledger"),
                pytest.raises(InternalError),
            ):
                await service.generate(request)
    finally:
        ledger.close()
    [render] = [s for s in spans.get_finished_spans() if s.name == "imagegen.render"]
    lines = [json.loads(line) for line in caplog.text.splitlines()]
    [line] = [
        each
        for each in lines
        if each["message"].startswith(f"could not record {GENERATION_FAILED}")
    ]
    assert line["level"] == "WARNING"
    assert line["generation_id"] == "unrecorded-1"
    assert line["trace_id"] == f"{render.context.trace_id:032x}"
    assert line["span_id"] == f"{render.context.span_id:016x}"
    assert line["stage"] == "render"


async def test_a_request_refused_as_bad_input_is_not_recorded(
    settings: Settings, tmp_path: Path
) -> None:
    """A model not served, a plugin not installed: refused before anything is recorded, so
    the history lists no generation that never was one (the CLI's exit 2)."""
    from imagegen.ledger import open_ledger
    from imagegen.ledger.recorder import Recorder

    ledger = open_ledger(str(tmp_path / "ledger.db"))
    served = settings.model_copy(update={"served_models": ["tiny"]})
    refused = [
        small(model="black-forest-labs/FLUX.1-dev", generation_id="refused-1"),
        small(prompt="a kite", plugins=["no_such_plugin"], generation_id="refused-2"),
    ]
    try:
        async with ImageGenService(
            served, backend=_HeldBackend(hold="nothing"), recorder=Recorder(ledger)
        ) as service:
            for request in refused:
                with pytest.raises(InvalidRequest):
                    await service.generate(request)
            assert ledger.history(limit=10).items == []
            # A request it takes is recorded, as ever.
            _, persisted = await service.generate(small(prompt="a kite", enhance=False))
            [recorded] = ledger.history(limit=10).items
        assert recorded.generation_id == persisted.generation_id
        assert recorded.status == "persisted"
    finally:
        ledger.close()


async def test_an_enhance_that_fails_is_raised_without_waiting_for_the_load_ahead(
    settings: Settings,
) -> None:
    """Enhance's failure, known in moments, is not held back until the model loading ahead
    for render has loaded (minutes for FLUX, or its download); the load goes on by itself,
    and the process's next generation (``imagegen loop``) renders with the model it loaded."""
    from imagegen.storage.base import prompt_memo_key

    backend = _HeldBackend(hold="load")
    loads: list[str] = []
    held_load = backend.load

    def load(model: str) -> float:
        loads.append(model)
        return held_load(model)

    backend.load = load  # type: ignore[method-assign]
    plugins = PluginSet([], settings=settings)
    try:
        async with ImageGenService(settings, plugins=plugins, backend=backend) as service:
            # Storage holds no memo under the memo's key: enhance refuses, after its checks.
            await service.storage.put(prompt_memo_key("memo-1"), b"[1, 2]", content_type="x")
            request = small(prompt="a kite", enhance=False, generation_id="memo-1")
            with pytest.raises(DependencyUnavailable, match="memo"):
                await asyncio.wait_for(service.generate(request), 60)
            assert await asyncio.to_thread(backend.held.wait, 30), "the load had begun"
            assert not backend.loaded, "raised while the model was still loading"

            backend.release.set()
            again = small(prompt="a kite", enhance=False, generation_id="next-1")
            _, persisted = await asyncio.wait_for(service.generate(again), 60)
        assert persisted.generation_id == "next-1"
        assert loads == ["tiny"], "the load left behind was the one the next render used"
    finally:
        backend.release.set()


_Held = tuple[ProgressCallback, list[int], threading.Event, threading.Event]


def _held_at_step(held: int) -> _Held:
    """A progress report that waits, at the end of step ``held``, until told to go on; the
    steps it reported; set once it waits; what tells it to go on."""
    steps: list[int] = []
    reached, go_on = threading.Event(), threading.Event()

    def progress(step: int, total: int) -> None:
        steps.append(step)
        if step == held:
            reached.set()
            go_on.wait(60)

    return progress, steps, reached, go_on


@pytest.mark.parametrize("held", [1, 50])
async def test_closing_the_service_stops_its_render_at_the_next_step(
    settings: Settings, tmp_path: Path, held: int
) -> None:
    """Leaving the service (the CLI's Ctrl-C) interrupts the real pipeline's call at its next
    step's end: the process exits without rendering the rest, and nothing is stored; a call
    held at its last step for longer than the close waits for its calls is given up on all the
    same. Whoever awaited it is told so, retryably: the job itself is fine."""
    progress, steps, reached, go_on = _held_at_step(held)
    plugins = PluginSet([], settings=settings)
    try:
        async with ImageGenService(settings, plugins=plugins) as service:
            job = await service.enhance(small(prompt="a kite", enhance=False, steps=50))
            rendering = asyncio.ensure_future(service.render(job, progress=progress))
            assert await asyncio.to_thread(reached.wait, 120), "the render never reached it"
        go_on.set()
        with pytest.raises(DependencyUnavailable, match="closed") as caught:
            await asyncio.wait_for(rendering, 60)
        assert caught.value.retryable
    finally:
        go_on.set()
    assert steps == list(range(1, held + 1))
    assert not list((tmp_path / "out").rglob("*.png"))


async def test_a_render_whose_request_is_cancelled_still_ends_and_is_stored(
    settings: Settings, tmp_path: Path
) -> None:
    """Only closing interrupts: a started render whose request goes (a server's timeout)
    runs to the end and is stored, so the retry finds it."""
    progress, steps, reached, go_on = _held_at_step(1)
    plugins = PluginSet([], settings=settings)
    try:
        async with ImageGenService(settings, plugins=plugins) as service:
            job = await service.enhance(small(prompt="a kite", enhance=False, steps=4))
            rendering = asyncio.ensure_future(service.render(job, progress=progress))
            assert await asyncio.to_thread(reached.wait, 120), "the render never began"
            rendering.cancel()
            go_on.set()
            with pytest.raises(asyncio.CancelledError):
                await rendering
            retried = await asyncio.wait_for(service.render(job), 120)
        assert steps == [1, 2, 3, 4]
        assert [png.name for png in (tmp_path / "out").rglob("*.png")] == [
            f"{job.generation_id}.png"
        ]
        assert retried.generation_id == job.generation_id
    finally:
        go_on.set()


@pytest.mark.parametrize("stored", [b'{"request": "abc", "prompt": {', b"[1, 2]", b'{"x": 1}'])
async def test_a_prompt_memo_that_cannot_be_read_is_retryable(
    settings: Settings, tmp_path: Path, stored: bytes
) -> None:
    """Storage holds something under the memo's key that is no memo: enhance cannot say what
    it answered before, and answers 503 (retried), as when storage cannot answer at all."""
    from imagegen.storage.base import prompt_memo_key

    plugins = PluginSet([], settings=settings)
    async with ImageGenService(settings, plugins=plugins) as service:
        await service.storage.put(
            prompt_memo_key("memo-1"), stored, content_type="application/json"
        )
        with pytest.raises(DependencyUnavailable) as caught:
            await service.enhance(small(prompt="a kite", generation_id="memo-1"))
    assert caught.value.retryable and "memo" in caught.value.message


async def test_a_prompt_memo_is_recognised_across_releases_and_spellings(
    settings: Settings,
) -> None:
    """The request a memo was kept for is recognised whether a default was written out or
    left to the model, and under the digest memos were kept under before defaults were left
    out: a redelivery in flight across an upgrade is still the same request, not a 400."""
    from imagegen.enhance.memo import _digest_with_defaults, request_digest
    from imagegen.storage.base import prompt_memo_key

    plugins = PluginSet([], settings=settings)
    async with ImageGenService(settings, plugins=plugins) as service:
        first = await service.enhance(small(prompt="a kite", generation_id="memo-2"))
        spelled = small(prompt="a kite", generation_id="memo-2", enhance=True, plugins=None)
        assert await service.enhance(spelled) == first
        # A memo as an earlier release kept it: the digest of every field, defaults included.
        earlier = small(prompt="a kite", generation_id="memo-3")
        kept = first.model_copy(update={"generation_id": "memo-3"})
        memo = {"request": _digest_with_defaults(earlier), "prompt": kept.model_dump(mode="json")}
        await service.storage.put(
            prompt_memo_key("memo-3"), json.dumps(memo).encode(), content_type="application/json"
        )
        assert await service.enhance(earlier) == kept
        with pytest.raises(InvalidRequest, match="other parameters"):
            await service.enhance(small(prompt="a kite", generation_id="memo-3", seed=9))

    class Later(GenerationRequest):  # a release with one more field, at its default
        added: int = 0

    assert request_digest(Later.model_validate(earlier.model_dump())) == request_digest(earlier)


async def test_a_prompt_memo_removed_as_it_is_read_is_written_again(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Gone between its HEAD and its GET (a lifecycle rule, an operator): none is kept, and the
    prompt is written again, not answered with a 404 that fails the generation for good."""
    from imagegen.errors import NotFound

    plugins = PluginSet([], settings=settings)
    async with ImageGenService(settings, plugins=plugins) as service:
        first = await service.enhance(small(prompt="a kite", generation_id="memo-4"))
        real_get = service.storage.get
        removed = []

        async def get(key: str) -> bytes:
            if key.startswith("prompts/") and not removed:
                removed.append(key)
                raise NotFound(f"no object at {key!r}")
            return await real_get(key)

        monkeypatch.setattr(service.storage, "get", get)
        again = await service.enhance(small(prompt="a kite", generation_id="memo-4"))
    assert removed and again.prompt == first.prompt
