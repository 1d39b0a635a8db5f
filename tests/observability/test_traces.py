"""One generation through the three real functions, traced and measured in this process; and
the outcomes a generation's stages count when two deliveries of one event meet."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry import metrics
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.test.globals_test import reset_metrics_globals
from opentelemetry.trace import SpanKind, StatusCode

from imagegen import GenerationRequest, ImageGenService, Settings
from imagegen.errors import DependencyUnavailable, InvalidRequest
from imagegen.events import (
    GENERATION_FAILED,
    GENERATION_REQUESTED,
    IMAGE_DERIVED,
    IMAGE_PERSISTED,
    IMAGE_RENDERED,
    PROMPT_ENHANCED,
)
from imagegen.models import EnhancedPrompt
from imagegen.observability import JsonFormatter
from imagegen.plugins import PluginContext, PluginSet
from imagegen.render.base import ProgressCallback, RenderOutput
from imagegen.storage import LocalStorage
from imagegen.telemetry import METRIC_NAMES, METRICS, instruments, record_error
from tests.fakes.render_backend import ReadyBackend, enhanced_prompt
from tests.functions.conftest import base_env
from tests.functions.servers import cloudevent_headers
from tests.observability.conftest import InMemoryTelemetry
from tests.observability.servers import InProcessServer

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"
STAGES = ("enhance", "render", "persist", "derive")


@dataclass
class Chain:
    servers: dict[str, InProcessServer]
    startup_spans: list[ReadableSpan]


@pytest.fixture(scope="module")
def chain(otel: InMemoryTelemetry, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chain]:
    """enhance, render, persist and derive served in this process over one local store."""
    workdir = tmp_path_factory.mktemp("functions")
    env = {
        **base_env(workdir / "store"),
        "IMAGEGEN_LOG_PROMPTS": "false",
        # Ollama is down (port 9): each prompt tries it, so its failed call is traced. With
        # the breaker, enhance's warm-up would open the circuit first whenever it finished
        # before the first request, and the call would never be made.
        "IMAGEGEN_OLLAMA_BREAKER_THRESHOLD": "0",
    }
    otel.spans.clear()
    servers: dict[str, InProcessServer] = {}
    try:
        with starting_in(env, workdir):
            for stage in STAGES:
                servers[stage] = InProcessServer(stage).start()
                servers[stage].wait("/healthz")
            servers["render"].wait("/readyz", timeout=600)
        yield Chain(servers, otel.finished_spans())
    finally:
        for server in servers.values():
            server.stop()


@contextlib.contextmanager
def starting_in(env: dict[str, str], cwd: Path) -> Iterator[None]:
    """The environment and the directory (no .env file picked up) functions start in here;
    the process's own, and its logging, restored after. Each function reads its settings once,
    on its first request: they only have to hold until then."""
    saved_env, saved_cwd = dict(os.environ), Path.cwd()
    root = logging.getLogger()
    saved_logging = list(root.handlers), root.level
    os.environ.update(env)
    os.chdir(cwd)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        os.chdir(saved_cwd)
        root.handlers, root.level = saved_logging


@contextlib.contextmanager
def served_alone(stage: str, env: dict[str, str], cwd: Path) -> Iterator[InProcessServer]:
    """One function in this process, started in ``env`` and ``cwd``, stopped after."""
    server = InProcessServer(stage)
    try:
        with starting_in(env, cwd):
            server.start().wait("/healthz")
        yield server
    finally:
        server.stop()


def post(url: str, headers: dict[str, str], body: bytes) -> httpx.Response:
    return httpx.post(url, headers=headers, content=body, timeout=120)


def forward(server: InProcessServer, reply: httpx.Response, expected: str) -> httpx.Response:
    """Deliver a reply event to the next function as the broker would (binary mode)."""
    assert reply.status_code == 200, reply.text
    assert reply.headers["ce-type"] == expected
    headers = {k: v for k, v in reply.headers.items() if k.lower().startswith("ce-")}
    headers["content-type"] = "application/json"
    return post(server.url, headers, reply.content)


def parent_of(span: ReadableSpan, spans: list[ReadableSpan]) -> ReadableSpan | None:
    by_id = {s.context.span_id: s for s in spans}
    return by_id.get(span.parent.span_id) if span.parent is not None else None


def named(spans: list[ReadableSpan], name: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name == name]


def counted(otel: InMemoryTelemetry, metric: str, **labels: str) -> float:
    """The sum of ``metric``'s points (its key in METRIC_NAMES) that carry ``labels``."""
    return sum(
        p.point.value
        for p in otel.points(METRIC_NAMES[metric])
        if labels.items() <= (p.attributes or {}).items()
    )


def only(spans: list[ReadableSpan], name: str) -> ReadableSpan:
    found = named(spans, name)
    assert len(found) == 1, f"{name}: {len(found)} spans in {[s.name for s in spans]}"
    return found[0]


def test_model_load_is_traced_and_measured_at_start_up(
    chain: Chain, otel: InMemoryTelemetry
) -> None:
    load = only(chain.startup_spans, "imagegen.model.load")
    assert load.attributes is not None
    assert load.attributes["imagegen.model"] == "tiny"
    points = otel.points(METRIC_NAMES["model_load_duration"])
    assert any(p.attributes == {"imagegen.model": "tiny"} and p.point.count >= 1 for p in points)


def test_one_trace_from_the_requester_through_every_stage(
    chain: Chain, otel: InMemoryTelemetry
) -> None:
    otel.spans.clear()
    gid = "obs-chain-1"
    request = {"prompt": "a lighthouse at dusk", "width": 256, "height": 256, "seed": 7}
    headers = cloudevent_headers(
        GENERATION_REQUESTED,
        source="/tests/requester",
        event_id="obs-request-1",
        subject=gid,
        traceparent=TRACEPARENT,
    )
    enhanced = post(chain.servers["enhance"].url, headers, json.dumps(request).encode())
    rendered = forward(chain.servers["render"], enhanced, PROMPT_ENHANCED)
    persisted = forward(chain.servers["persist"], rendered, IMAGE_RENDERED)
    assert persisted.status_code == 200, persisted.text
    assert persisted.headers["ce-type"] == IMAGE_PERSISTED
    derived = forward(chain.servers["derive"], persisted, IMAGE_PERSISTED)
    assert derived.status_code == 200, derived.text
    assert derived.headers["ce-type"] == IMAGE_DERIVED, derived.text
    for reply in (enhanced, rendered, persisted, derived):
        assert reply.headers["ce-traceparent"].split("-")[1] == TRACE_ID

    spans = otel.finished_spans()
    # 1. One trace: the requester's.
    assert {f"{s.context.trace_id:032x}" for s in spans} == {TRACE_ID}

    # 2. The span tree.
    enhance = only(spans, "enhance process")
    assert enhance.parent is not None and f"{enhance.parent.span_id:016x}" == PARENT_ID
    assert enhance.parent.is_remote
    expected_parents = {
        "imagegen.enhance": "enhance process",
        "imagegen.plugins": "imagegen.enhance",
        "imagegen.plugin": "imagegen.plugins",
        "imagegen.ollama.chat": "imagegen.enhance",
        "render process": "enhance process",
        "imagegen.render": "render process",
        "imagegen.render.denoise": "imagegen.render",
        "imagegen.render.denoise_loop": "imagegen.render.denoise",
        "imagegen.render.vae_decode": "imagegen.render.denoise",
        # Encoded once the pipeline is free for the next call: beside the call, not in it.
        "imagegen.render.png_encode": "imagegen.render",
        "persist process": "render process",
        "imagegen.persist": "persist process",
        "derive process": "persist process",
        "imagegen.derive": "derive process",
    }
    for child, parent in expected_parents.items():
        found = named(spans, child)
        assert found, f"no {child} span in {sorted({s.name for s in spans})}"
        for span in found:
            actual = parent_of(span, spans)
            assert actual is not None and actual.name == parent, (child, actual)
    # Every storage call is a span under the stage that made it: the prompt memo's included.
    puts = {
        (s.attributes or {})["imagegen.storage.key"]: parent_of(s, spans)
        for s in named(spans, "imagegen.storage.put")
    }

    def kind(key: str) -> str:
        if key.startswith(("prompts/", "renders/")):
            return {"prompts": "memo", "renders": "claim"}[key.split("/", 1)[0]]
        return key.split(".", 1)[-1]

    assert sorted(kind(k) for k in puts) == [
        "claim",
        "derivatives.json",
        "json",
        "memo",
        "png",
        "thumb.webp",
        "w256.avif",
        "w256.webp",
    ]
    for key, parent in puts.items():
        assert parent is not None
        owners = {"png": "render", "claim": "render", "memo": "enhance", "json": "persist"}
        owner = owners.get(kind(key), "derive")  # the thumbnail, derivatives and their record
        assert parent.name == f"imagegen.{owner}", (key, parent.name)
    stages = {"imagegen.enhance", "imagegen.render", "imagegen.persist", "imagegen.derive"}
    for span in named(spans, "imagegen.storage.get") + named(spans, "imagegen.storage.head"):
        parent = parent_of(span, spans)
        assert parent is not None and parent.name in stages, span.name
        # A miss (derive's first look for its record, say) is an answer: no error, no trace.
        assert span.status.status_code is not StatusCode.ERROR, span.attributes
        assert not span.events, (span.attributes, span.events)
    missed = [s for s in spans if (s.attributes or {}).get("imagegen.storage.found") is False]
    assert missed, "a first delivery looks for what is not there yet"
    assert len(named(spans, "imagegen.plugin")) >= 1
    storage_spans = {f"imagegen.storage.{op}" for op in ("put", "get", "head")}
    assert {s.name for s in spans} <= {*expected_parents, "enhance process", *storage_spans}

    # 3. CloudEvents attributes on the stage spans.
    for stage, event_type, source in (
        ("enhance", GENERATION_REQUESTED, "/tests/requester"),
        ("render", PROMPT_ENHANCED, "/imagegen/enhance"),
        ("persist", IMAGE_RENDERED, "/imagegen/render"),
        ("derive", IMAGE_PERSISTED, "/imagegen/persist"),
    ):
        span = only(spans, f"{stage} process")
        assert span.kind is SpanKind.CONSUMER
        attributes = dict(span.attributes or {})
        assert attributes["cloudevents.event_type"] == event_type
        assert attributes["cloudevents.event_source"] == source
        assert attributes["cloudevents.event_subject"] == gid
        assert attributes["cloudevents.event_spec_version"] == "1.0"
        assert attributes["cloudevents.event_id"]
    assert only(spans, "enhance process").attributes["cloudevents.event_id"] == "obs-request-1"  # type: ignore[index]

    # 4. imagegen.* attributes: the generation on every span, the job on the render spans.
    assert all((s.attributes or {}).get("imagegen.generation_id") == gid for s in spans)
    render = dict(only(spans, "imagegen.render").attributes or {})
    assert render["imagegen.model"] == "tiny"
    assert render["imagegen.seed"] == 7
    assert render["imagegen.width"] == 256
    assert render["imagegen.height"] == 256
    assert render["imagegen.steps"] >= 1
    assert (only(spans, "imagegen.enhance").attributes or {})["imagegen.enhance.fallback"] is True

    # 5. Ollama is down: the call failed (recorded), the stage fell back.
    chat = only(spans, "imagegen.ollama.chat")
    assert chat.kind is SpanKind.CLIENT
    assert chat.status.status_code is StatusCode.ERROR
    assert any(e.name == "exception" for e in chat.events)
    assert (chat.attributes or {})["gen_ai.request.model"]
    assert (chat.attributes or {})["server.port"] == 9
    assert only(spans, "imagegen.enhance").status.status_code is not StatusCode.ERROR

    # 6. Metrics, with the attributes the dashboards group by.
    def has(key: str, **attributes: str) -> bool:
        points = otel.points(METRIC_NAMES[key])
        return any(attributes.items() <= p.attributes.items() for p in points)

    for stage in STAGES:
        assert has("stage_duration", stage=stage)
    assert has("generations", stage="enhance", outcome="fallback")
    assert has("generations", stage="render", outcome="success")
    assert has("generations", stage="persist", outcome="success")
    assert has("enhance_fallbacks", reason="unreachable")
    assert has("ollama_duration", outcome="error")
    assert has("denoise_step_duration", **{"imagegen.model": "tiny"})
    assert has("storage_bytes_written", stage="render")
    assert has("storage_bytes_written", stage="persist")
    assert has("storage_bytes_written", stage="derive")
    assert has("storage_duration", stage="render", operation="put")
    assert has("storage_duration", stage="persist", operation="get")
    assert has("storage_bytes_written", stage="enhance")  # the prompt memo, measured too
    assert has("renders_in_flight")
    in_flight = otel.points(METRIC_NAMES["renders_in_flight"])
    assert sum(p.point.value for p in in_flight) == 0


def test_metric_points_carry_only_declared_attributes(
    chain: Chain, otel: InMemoryTelemetry
) -> None:
    by_name = {spec.name: spec for spec in METRICS.values()}
    points = [p for p in otel.points() if p.name.startswith("imagegen.")]
    assert points
    for point in points:
        assert set(point.attributes) <= set(by_name[point.name].attributes), point


def test_a_failed_request_records_an_error_span_and_the_failure(
    chain: Chain, otel: InMemoryTelemetry
) -> None:
    otel.spans.clear()
    headers = cloudevent_headers(
        GENERATION_REQUESTED, subject="obs-failed-1", traceparent=TRACEPARENT
    )
    body = json.dumps({"prompt": "a fox", "model": "not-allowed"}).encode()
    reply = post(chain.servers["enhance"].url, headers, body)
    assert reply.status_code == 200  # a permanent failure: the broker publishes the reply
    assert reply.headers["ce-type"] == GENERATION_FAILED

    spans = otel.finished_spans()
    for name in ("enhance process", "imagegen.enhance"):
        span = only(spans, name)
        assert span.status.status_code is StatusCode.ERROR
        exceptions = [e for e in span.events if e.name == "exception"]
        assert exceptions and (exceptions[0].attributes or {})["exception.type"].endswith(
            "InvalidRequest"
        )
        # The caller's mistake: its message says what was wrong; no traceback is formatted.
        assert "model" in (exceptions[0].attributes or {})["exception.message"]
        assert "exception.stacktrace" not in (exceptions[0].attributes or {})
    failed = [
        p
        for p in otel.points(METRIC_NAMES["generations"])
        if p.attributes == {"stage": "enhance", "outcome": "failed", "reason": "invalid_request"}
    ]
    assert failed and failed[0].point.value >= 1


class _FailureLines(logging.Handler):
    """The JSON of each "request failed" line, formatted as it is written (the trace context
    a formatter reads is the one current then)."""

    def __init__(self) -> None:
        super().__init__()
        self.formatter = JsonFormatter()
        self.entries: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("request failed"):
            self.entries.append(json.loads(self.format(record)))


@pytest.fixture
def failure_lines() -> Iterator[_FailureLines]:
    lines = _FailureLines()
    logger = logging.getLogger("imagegen.functions")
    # Its own level: the root's is whatever the first function started in this process set up
    # (logging is set up once per process; another module's may have asked for ERROR only).
    level = logger.level
    logger.setLevel(logging.WARNING)
    logger.addHandler(lines)
    yield lines
    logger.removeHandler(lines)
    logger.setLevel(level)


def test_a_failure_is_logged_and_answered_under_the_span_that_failed(
    chain: Chain, otel: InMemoryTelemetry, failure_lines: _FailureLines
) -> None:
    otel.spans.clear()
    headers = cloudevent_headers(
        GENERATION_REQUESTED, subject="obs-failed-2", traceparent=TRACEPARENT
    )
    body = json.dumps({"prompt": "a fox", "model": "not-allowed"}).encode()
    reply = post(chain.servers["enhance"].url, headers, body)
    assert reply.headers["ce-type"] == GENERATION_FAILED
    process = only(otel.finished_spans(), "enhance process").context
    # The failure event goes on from the span that failed, not from the caller's.
    _, trace_id, span_id, _ = reply.headers["ce-traceparent"].split("-")
    assert (trace_id, span_id) == (TRACE_ID, f"{process.span_id:016x}")
    # The line an operator starts from names the trace and the span it failed in.
    [entry] = failure_lines.entries
    assert entry["generation_id"] == "obs-failed-2"
    assert (entry["trace_id"], entry["span_id"]) == (TRACE_ID, f"{process.span_id:016x}")


def test_a_request_refused_before_its_span_is_logged_in_the_callers_trace(
    chain: Chain, failure_lines: _FailureLines
) -> None:
    headers = cloudevent_headers(
        GENERATION_REQUESTED, subject="obs-refused-1", traceparent=TRACEPARENT
    )
    reply = post(chain.servers["enhance"].url, headers, b'{"prompt": "a fox", "width": "wide"}')
    assert reply.headers["ce-type"] == GENERATION_FAILED
    assert reply.headers["ce-traceparent"] == TRACEPARENT
    [entry] = failure_lines.entries
    assert (entry["trace_id"], entry["span_id"]) == (TRACE_ID, PARENT_ID)


@pytest.mark.parametrize(
    ("body", "event_type"),
    [(b"{not json", GENERATION_REQUESTED), (b"{}", IMAGE_PERSISTED)],
    ids=["no-json", "another-type"],
)
def test_a_request_refused_before_it_is_read_as_an_event_is_logged_in_the_callers_trace(
    chain: Chain, failure_lines: _FailureLines, body: bytes, event_type: str
) -> None:
    headers = cloudevent_headers(event_type, subject="obs-unread-1", traceparent=TRACEPARENT)
    reply = post(chain.servers["enhance"].url, headers, body)
    assert reply.status_code == 400, reply.text
    [entry] = failure_lines.entries
    assert (entry["trace_id"], entry["span_id"]) == (TRACE_ID, PARENT_ID)


def test_the_process_span_names_the_generation_a_request_does_not(
    chain: Chain, otel: InMemoryTelemetry
) -> None:
    # A requester seldom names the generation (no subject, no id in the data): enhance derives
    # its id, and the root span of the stage, which carries the request's status, names it too.
    otel.spans.clear()
    headers = cloudevent_headers(GENERATION_REQUESTED, event_id="obs-unnamed-1")
    body = json.dumps({"prompt": "a fox", "width": 256, "height": 256}).encode()
    reply = post(chain.servers["enhance"].url, headers, body)
    assert reply.status_code == 200 and reply.headers["ce-type"] == PROMPT_ENHANCED, reply.text
    span = only(otel.finished_spans(), "enhance process")
    assert (span.attributes or {})["imagegen.generation_id"] == reply.headers["ce-subject"]


# The series alerts and panels read, each exported at 0 from a function's start (docs/
# observability.md): a pod is an ``instance`` of its own and functions scale to zero, so a
# series first exported at 1 has no earlier sample, increase() and rate() never see that count,
# and a failure of a pod scaled away since goes unalerted (ImagegenGenerationFailures).
GENERATIONS_FROM_ZERO = [
    {"outcome": "success"},
    {"outcome": "failed", "reason": "internal"},
    {"outcome": "failed", "reason": "dependency_unavailable"},
    {"outcome": "failed", "reason": "not_configured"},
    {"outcome": "failed", "reason": "not_found"},
    {"outcome": "failed", "reason": "cancelled"},
]
# The sinks' deliveries recorded, which a panel rates, and the failures their alerts page on:
# ImagegenDeadLetterCannotRecord at a sink's first failed delivery, which rate() sees only
# after a sample at 0.
DELIVERIES_FROM_ZERO = [
    {"outcome": "recorded"},
    {"outcome": "failed", "reason": "dependency_unavailable"},
    {"outcome": "failed", "reason": "internal"},
    {"outcome": "failed", "reason": "not_configured"},
]


@contextlib.contextmanager
def measured_afresh(otel: InMemoryTelemetry) -> Iterator[InMemoryTelemetry]:
    """Metrics to a provider of their own, nothing counted yet, while the block runs: what a
    function exports from its start, apart from what this process's other tests counted."""
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader], shutdown_on_exit=False)

    def install(meter_provider: MeterProvider) -> None:
        reset_metrics_globals()
        metrics.set_meter_provider(meter_provider)
        instruments.cache_clear()

    install(provider)
    try:
        yield InMemoryTelemetry(otel.tracer_provider, provider, otel.spans, reader)
    finally:
        install(otel.meter_provider)
        provider.shutdown()


def started_alone(stage: str, otel: InMemoryTelemetry, workdir: Path) -> InMemoryTelemetry:
    """What ``stage``'s function exported once started, asked nothing but its health."""
    env = {**base_env(workdir / "store"), "IMAGEGEN_LEDGER_URL": str(workdir / "ledger.db")}
    with measured_afresh(otel) as fresh, served_alone(stage, env, workdir):
        pass
    return fresh


def exported(otel: InMemoryTelemetry, metric: str, stage: str) -> list[tuple[dict[str, Any], Any]]:
    """``stage``'s series of ``metric`` (its key in METRIC_NAMES): labels but the stage, value."""
    return sorted(
        (
            ({k: v for k, v in p.attributes.items() if k != "stage"}, p.point.value)
            for p in otel.points(METRIC_NAMES[metric])
            if p.attributes.get("stage") == stage
        ),
        key=repr,
    )


@pytest.mark.parametrize("stage", STAGES)
def test_each_stage_counts_its_generations_from_zero(
    otel: InMemoryTelemetry, tmp_path: Path, stage: str
) -> None:
    fresh = started_alone(stage, otel, tmp_path)
    expected = GENERATIONS_FROM_ZERO + ([{"outcome": "fallback"}] if stage == "enhance" else [])
    assert exported(fresh, "generations", stage) == sorted(
        ((labels, 0) for labels in expected), key=repr
    )
    assert exported(fresh, "sink_deliveries", stage) == []


@pytest.mark.parametrize("stage", ["deadletter", "ledger"])
def test_each_sink_counts_its_deliveries_from_zero(
    otel: InMemoryTelemetry, tmp_path: Path, stage: str
) -> None:
    fresh = started_alone(stage, otel, tmp_path)
    assert exported(fresh, "sink_deliveries", stage) == sorted(
        ((labels, 0) for labels in DELIVERIES_FROM_ZERO), key=repr
    )
    assert exported(fresh, "generations", stage) == []  # the sinks count no generation


def test_a_request_refused_before_its_stage_runs_is_counted(
    chain: Chain, otel: InMemoryTelemetry
) -> None:
    def refused() -> float:
        return sum(
            p.point.value
            for p in otel.points(METRIC_NAMES["generations"])
            if p.attributes == {"stage": "render", "outcome": "failed", "reason": "invalid_request"}
        )

    before = refused()
    headers = cloudevent_headers(PROMPT_ENHANCED, subject="obs-refused-1")
    reply = post(chain.servers["render"].url, headers, b'{"prompt": "no job here"}')
    assert reply.status_code == 200 and reply.headers["ce-type"] == GENERATION_FAILED
    assert refused() == before + 1


def test_a_path_or_method_no_stage_takes_is_no_generation(
    chain: Chain, otel: InMemoryTelemetry
) -> None:
    def failed() -> float:
        return counted(otel, "generations", outcome="failed")

    before = failed()
    url = chain.servers["render"].url
    assert httpx.get(url + "/wp-login.php", timeout=10).status_code == 404
    assert httpx.delete(url + "/", timeout=10).status_code == 405
    refused = post(url, {"content-type": "text/plain"}, b"hello")
    assert refused.status_code == 415
    assert failed() == before + 1  # the body render cannot read, not the path or the method


@pytest.mark.parametrize(
    ("error", "traceback"),
    [
        (InvalidRequest("width must be a multiple of 16"), False),  # the caller's doing
        (DependencyUnavailable("storage is down"), True),  # 503: ours to look into
        (RuntimeError("a bug"), True),
    ],
    ids=["400", "503", "internal"],
)
def test_a_failed_span_has_a_traceback_unless_the_caller_caused_it(
    error: BaseException, traceback: bool
) -> None:
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    try:
        raise error
    except BaseException as raised:
        with provider.get_tracer("tests").start_as_current_span("failed") as span:
            record_error(span, raised)
    (failed,) = spans.get_finished_spans()
    assert failed.status.status_code is StatusCode.ERROR
    assert failed.status.description == f"{type(error).__name__}: {error}"
    (event,) = [e for e in failed.events if e.name == "exception"]
    attributes = event.attributes or {}
    kind = type(error)  # fully qualified, whether the SDK formats the event or not
    assert attributes["exception.type"] == (
        kind.__name__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__name__}"
    )
    assert attributes["exception.message"] == str(error)
    assert ("exception.stacktrace" in attributes) is traceback
    if traceback:
        assert "raise error" in str(attributes["exception.stacktrace"])


def test_a_stage_stopped_from_outside_is_counted_cancelled_not_a_bug(
    otel: InMemoryTelemetry,
) -> None:
    # The function cancels a stage past its timeout (and answers 503): no "internal" failure,
    # which the critical alert reads as a bug.
    import asyncio

    from imagegen.service import _stage

    def failed(reason: str) -> float:
        return counted(otel, "generations", stage="render", outcome="failed", reason=reason)

    before = {reason: failed(reason) for reason in ("cancelled", "internal")}

    async def stopped() -> None:
        async def stage() -> None:
            async with _stage("render", "obs-cancelled-1"):
                await asyncio.sleep(60)

        task = asyncio.ensure_future(stage())
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(stopped())
    assert failed("cancelled") == before["cancelled"] + 1
    assert failed("internal") == before["internal"]


def test_the_dead_letter_sinks_deliveries_are_counted(
    otel: InMemoryTelemetry, tmp_path: Path
) -> None:
    # What the sink could not record, the broker drops once its retries are spent: counted
    # (and alerted on), where the sinks count no generation.
    import shutil

    def sunk(**labels: str) -> float:
        return counted(otel, "sink_deliveries", stage="deadletter", **labels)

    store = tmp_path / "store"
    with served_alone("deadletter", base_env(store), tmp_path) as sink:
        recorded = sunk(outcome="recorded")
        failed = sunk(outcome="failed", reason="dependency_unavailable")
        headers = cloudevent_headers(GENERATION_REQUESTED, event_id="sink-1")
        assert post(sink.url, headers, b"{}").status_code == 202
        assert sunk(outcome="recorded") == recorded + 1
        shutil.rmtree(store / "failures")
        (store / "failures").write_text("a file where the records go: storage fails")
        headers = cloudevent_headers(GENERATION_REQUESTED, event_id="sink-2")
        assert post(sink.url, headers, b"{}").status_code == 503
        assert sunk(outcome="failed", reason="dependency_unavailable") == failed + 1
        assert not [
            p
            for p in otel.points(METRIC_NAMES["generations"])
            if (p.attributes or {}).get("stage") == "deadletter"
        ]


def test_a_dead_letter_sink_not_configured_counts_its_first_failure_from_zero(
    otel: InMemoryTelemetry, tmp_path: Path
) -> None:
    # Its storage's settings incomplete (the minio preset without its endpoint): every delivery
    # fails not_configured, and the first one must show in increase(), which needs a 0 before.
    env = {
        **base_env(tmp_path / "unused"),
        "IMAGEGEN_STORAGE_URL": "s3://failures/records",
        "IMAGEGEN_S3_PRESET": "minio",
    }
    labels = {"outcome": "failed", "reason": "not_configured"}
    with measured_afresh(otel) as fresh, served_alone("deadletter", env, tmp_path) as sink:
        assert (labels, 0) in exported(fresh, "sink_deliveries", "deadletter")
        headers = cloudevent_headers(GENERATION_REQUESTED, event_id="unconfigured-1")
        reply = post(sink.url, headers, b"{}")
        assert reply.status_code == 503, reply.text
        assert reply.json()["error"] == "not_configured"
        assert (labels, 1) in exported(fresh, "sink_deliveries", "deadletter")


def test_a_ledger_query_that_fails_is_no_delivery_it_could_not_record(
    otel: InMemoryTelemetry, tmp_path: Path
) -> None:
    def failed() -> float:
        return counted(otel, "sink_deliveries", stage="ledger", outcome="failed")

    env = {**base_env(tmp_path / "store"), "IMAGEGEN_LEDGER_URL": str(tmp_path / "ledger.db")}
    with served_alone("ledger", env, tmp_path) as ledger:
        before = failed()
        assert httpx.get(ledger.url + "/generations/" + "0" * 32, timeout=30).status_code == 404
        assert failed() == before  # a query's 404 pages no one


def test_a_redelivered_event_is_counted_redelivered_not_another_success(
    chain: Chain, otel: InMemoryTelemetry
) -> None:
    """At least once: every stage answers a second delivery with what the first made (the
    remembered prompt, the stored image, the record, the derivatives), and counts it apart, so
    a count of images persisted or of prompts written is one per generation."""

    def by_stage() -> dict[str, dict[str, float]]:
        return {
            stage: {
                outcome: counted(otel, "generations", stage=stage, outcome=outcome)
                for outcome in ("success", "fallback", "redelivered")
            }
            for stage in ("enhance", "render", "persist", "derive")
        }

    before = by_stage()
    request = {"prompt": "a lighthouse twice", "width": 256, "height": 256, "seed": 3}
    headers = cloudevent_headers(
        GENERATION_REQUESTED, event_id="obs-twice-1", subject="obs-twice-1"
    )
    body = json.dumps(request).encode()
    replies = {}
    for _ in range(2):  # each event delivered twice, as a broker's retry would
        replies["enhance"] = post(chain.servers["enhance"].url, headers, body)
        replies["render"] = forward(chain.servers["render"], replies["enhance"], PROMPT_ENHANCED)
        replies["persist"] = forward(chain.servers["persist"], replies["render"], IMAGE_RENDERED)
        replies["derive"] = forward(chain.servers["derive"], replies["persist"], IMAGE_PERSISTED)
        assert all(r.status_code == 200 for r in replies.values()), replies
    after = by_stage()

    for stage in ("enhance", "render", "persist", "derive"):
        made = {o: after[stage][o] - before[stage][o] for o in after[stage]}
        first = "fallback" if stage == "enhance" else "success"  # Ollama is down here
        assert made == {**{"success": 0, "fallback": 0}, first: 1, "redelivered": 1}, stage


OUTCOMES = ("success", "fallback", "redelivered", "failed")


def outcomes(otel: InMemoryTelemetry, stage: str) -> dict[str, float]:
    return {o: counted(otel, "generations", stage=stage, outcome=o) for o in OUTCOMES}


def made_since(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {o: after[o] - before[o] for o in OUTCOMES}


class _Replica(ReadyBackend):
    """Renders bytes of its own (two replicas' images of one job differ, as real renders may);
    with ``together``, each render waits until as many renders have begun, on any replica."""

    def __init__(self, name: str, together: threading.Barrier | None = None) -> None:
        self.name, self.together = name, together
        self.renders = 0

    def render(
        self, job: EnhancedPrompt, *, progress: ProgressCallback | None = None
    ) -> RenderOutput:
        self.renders += 1
        if self.together is not None:
            self.together.wait()
        png = b"\x89PNG " + self.name.encode() + job.generation_id.encode()
        return RenderOutput(png=png, width=job.width, height=job.height)


async def test_two_deliveries_of_one_job_at_once_render_once_and_count_one_success(
    otel: InMemoryTelemetry, tmp_path: Path
) -> None:
    """The second waits for the first's render in this process and answers with its image."""
    job = enhanced_prompt(generation_id="outcome-render-1", prompt="p")
    backend = _Replica("a")
    before = outcomes(otel, "render")
    async with ImageGenService(Settings(), storage=LocalStorage(tmp_path), backend=backend) as one:
        first, second = await asyncio.gather(one.render(job), one.render(job))
    assert first == second and backend.renders == 1
    made = made_since(before, outcomes(otel, "render"))
    assert made == {"success": 1, "fallback": 0, "redelivered": 1, "failed": 0}


async def test_a_replica_that_stores_its_image_second_counts_redelivered(
    otel: InMemoryTelemetry, tmp_path: Path
) -> None:
    """Two replicas render one job at the same moment: both spend the GPU time, one image is
    stored, and the replica whose store is refused answers with it, as one redelivered."""
    job = enhanced_prompt(generation_id="outcome-render-2", prompt="p")
    together = threading.Barrier(2, timeout=30)  # both looked, found nothing, and render
    a, b = _Replica("a", together), _Replica("b", together)
    before = outcomes(otel, "render")
    async with (
        ImageGenService(Settings(), storage=LocalStorage(tmp_path), backend=a) as one,
        ImageGenService(Settings(), storage=LocalStorage(tmp_path), backend=b) as two,
    ):
        first, second = await asyncio.gather(one.render(job), two.render(job))
    assert a.renders == b.renders == 1
    assert first == second  # the image stored first answers both
    made = made_since(before, outcomes(otel, "render"))
    assert made == {"success": 1, "fallback": 0, "redelivered": 1, "failed": 0}


class _Together:
    """A plugin that waits, up to 30 s, until as many deliveries run it: each has looked for
    its generation's prompt memo, found none, and goes on to write a prompt of its own."""

    name = "together"
    description = "waits for the other deliveries"

    def __init__(self, deliveries: int) -> None:
        self.barrier = threading.Barrier(deliveries, timeout=30)

    def contribute(self, context: PluginContext) -> None:
        self.barrier.wait()


async def test_two_deliveries_of_one_request_at_once_count_one_prompt(
    otel: InMemoryTelemetry, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Both write a template prompt (Ollama is down); the one kept first is the answer to
    both, and the other is counted redelivered, its fallback not counted: a prompt thrown
    away is none of the generation's."""
    settings = Settings(
        storage_url=str(tmp_path / "out"),
        model="tiny",
        ollama_host="http://127.0.0.1:49151",  # nothing listens: a refused connection
        ollama_retries=0,
    )
    plugins = PluginSet([_Together(2)], settings=settings, timeout=60)
    request = GenerationRequest.model_validate(
        {
            "prompt": "a kite",
            "generation_id": "outcome-enhance-1",
            "width": 256,
            "height": 256,
            "model": "tiny",
            "requested_at": datetime(2026, 11, 24, 18, 30, tzinfo=UTC),
        }
    )
    before = outcomes(otel, "enhance")
    fallbacks = counted(otel, "enhance_fallbacks")
    caplog.set_level(logging.INFO, logger="imagegen.enhance")
    async with ImageGenService(settings, plugins=plugins) as one:
        first, second = await asyncio.gather(one.enhance(request), one.enhance(request))
    assert first == second and first.fallback
    made = made_since(before, outcomes(otel, "enhance"))
    assert made == {"success": 0, "fallback": 1, "redelivered": 1, "failed": 0}
    assert counted(otel, "enhance_fallbacks") == fallbacks + 1
    said = [r.getMessage() for r in caplog.records if r.name == "imagegen.enhance"]
    assert len([m for m in said if m.startswith("enhanced outcome-enhance-1: enhancer=")]) == 1
    assert "enhanced outcome-enhance-1: answered from the kept prompt" in said
