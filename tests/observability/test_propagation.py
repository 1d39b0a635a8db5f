"""Trace context in and out of a function: what a reply, a replay and a refusal pass on.

W3C Trace Context (Level 1) decides what a ``traceparent`` and a ``tracestate`` are; the
CloudEvents Distributed Tracing extension carries the two across the broker; the OpenTelemetry
HTTP semantic conventions decide what the ``SERVER`` span of a plain request or a ledger route
says.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from opentelemetry import context as otel_context
from opentelemetry import propagate
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.propagators.textmap import (
    Getter,
    Setter,
    TextMapPropagator,
    default_getter,
    default_setter,
)
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanKind, StatusCode, get_current_span
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from imagegen.events import GENERATION_FAILED, GENERATION_REQUESTED, PROMPT_ENHANCED
from imagegen.telemetry import trace_extension, tracer
from tests.conftest import ROOT
from tests.fakes.loopback import broker_ingress
from tests.functions.clients import InProcessFunction
from tests.functions.conftest import base_env
from tests.functions.servers import cloudevent_headers
from tests.ledger.chain import binary, chain
from tests.observability.conftest import InMemoryTelemetry

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"
LONG_TRACESTATE = ",".join(f"k{i}=v" for i in range(33))  # one list-member past W3C's 32


@pytest.fixture
def binding(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(ROOT / "functions"))
    return importlib.import_module("_binding")


def only(spans: list[ReadableSpan], name: str) -> ReadableSpan:
    [span] = [s for s in spans if s.name == name]
    return span


# -- what a message's trace context is ------------------------------------------------------


@pytest.mark.parametrize(
    ("attributes", "headers", "expected"),
    [
        ({}, {"traceparent": TRACEPARENT, "tracestate": "a=1"}, {"tracestate": "a=1"}),
        ({"traceparent": TRACEPARENT, "tracestate": "a=1"}, {}, {"tracestate": "a=1"}),
        # Refused, and its tracestate with it: a vendor that failed to parse traceparent MUST
        # NOT parse tracestate (W3C Trace Context, "Tracestate Header").
        ({}, {"traceparent": "garbage", "tracestate": "x=1"}, None),
        ({}, {"traceparent": f"ff-{TRACE_ID}-{PARENT_ID}-01", "tracestate": "x=1"}, None),
        ({}, {"traceparent": f"00-{'0' * 32}-{PARENT_ID}-01"}, None),
        ({}, {"traceparent": f"00-{TRACE_ID}-{'0' * 16}-01"}, None),
        ({}, {"traceparent": f"{TRACEPARENT}-extra"}, None),  # version 00 has four fields
        # At most 32 list-members ("tracestate Header Field Values"): the traceparent stays.
        ({"traceparent": TRACEPARENT, "tracestate": LONG_TRACESTATE}, {}, {}),
        ({}, {"traceparent": TRACEPARENT, "tracestate": "not a member"}, {}),
        # The extension's, where it is a traceparent; else the HTTP hop's.
        ({"traceparent": "garbage", "tracestate": "x=1"}, {"traceparent": TRACEPARENT}, {}),
    ],
    ids=[
        "header",
        "extension",
        "garbage",
        "version-ff",
        "zero-trace-id",
        "zero-parent-id",
        "extra-field",
        "33-members",
        "bad-member",
        "bad-extension",
    ],
)
def test_a_carrier_holds_only_what_the_w3c_propagator_accepts(
    binding: ModuleType,
    attributes: dict[str, str],
    headers: dict[str, str],
    expected: dict[str, str] | None,
) -> None:
    message = binding.Message({}, attributes, headers)
    wanted = {} if expected is None else {"traceparent": TRACEPARENT, **expected}
    assert message.carrier() == wanted


@pytest.fixture
def enhance(otel: InMemoryTelemetry, tmp_path: Path) -> Iterator[InProcessFunction]:
    env = {**base_env(tmp_path / "store"), "IMAGEGEN_OLLAMA_BREAKER_THRESHOLD": "0"}
    with InProcessFunction("enhance", env) as function:
        yield function


@pytest.mark.parametrize(
    ("extension", "header"),
    [
        ({}, {"traceparent": "garbage", "tracestate": "x=1"}),
        ({}, {"traceparent": f"ff-{TRACE_ID}-{PARENT_ID}-01", "tracestate": "x=1"}),
        ({"traceparent": TRACEPARENT, "tracestate": LONG_TRACESTATE}, {}),
    ],
    ids=["garbage", "version-ff", "33-members"],
)
def test_a_request_refused_before_its_span_passes_on_no_invalid_trace_context(
    enhance: InProcessFunction, extension: dict[str, str], header: dict[str, str]
) -> None:
    headers = {**cloudevent_headers(GENERATION_REQUESTED, **extension), **header}
    reply = enhance.post(headers=headers, content=b'{"prompt": 1}')  # refused: no span
    assert reply.headers["ce-type"] == GENERATION_FAILED
    assert "ce-tracestate" not in reply.headers
    if "traceparent" in extension:
        assert reply.headers["ce-traceparent"] == TRACEPARENT  # the caller's, as it came
    else:
        assert "ce-traceparent" not in reply.headers


# -- what goes out with a reply event ---------------------------------------------------------


class _XRayLike(TextMapPropagator):
    """Writes AWS X-Ray's header, as opentelemetry-propagator-aws-xray does (its
    ``TRACE_HEADER_KEY``, ``X-Amzn-Trace-Id``): a field that is no CloudEvents attribute."""

    def extract(
        self,
        carrier: Any,
        context: otel_context.Context | None = None,
        getter: Getter[Any] = default_getter,
    ) -> otel_context.Context:
        return context if context is not None else otel_context.get_current()

    def inject(
        self,
        carrier: Any,
        context: otel_context.Context | None = None,
        setter: Setter[Any] = default_setter,
    ) -> None:
        span = get_current_span(context).get_span_context()
        carrier["X-Amzn-Trace-Id"] = f"Root=1-{span.trace_id:032x};Parent={span.span_id:016x}"

    @property
    def fields(self) -> set[str]:
        return {"X-Amzn-Trace-Id"}


@contextmanager
def propagators(*chosen: TextMapPropagator) -> Iterator[None]:
    """The process's propagators (what ``OTEL_PROPAGATORS`` picks), restored after."""
    saved = propagate.get_global_textmap()
    propagate.set_global_textmap(CompositePropagator(list(chosen)))
    try:
        yield
    finally:
        propagate.set_global_textmap(saved)


def test_only_the_w3c_trace_context_becomes_event_attributes(otel: InMemoryTelemetry) -> None:
    chosen = (TraceContextTextMapPropagator(), W3CBaggagePropagator(), _XRayLike())
    with propagators(*chosen), tracer().start_as_current_span("producer") as span:
        ids = span.get_span_context()
        assert trace_extension() == {
            "traceparent": f"00-{ids.trace_id:032x}-{ids.span_id:016x}-{ids.trace_flags:02x}"
        }


def test_a_reply_event_carries_no_other_propagators_fields_and_no_baggage(
    enhance: InProcessFunction,
) -> None:
    headers = cloudevent_headers(GENERATION_REQUESTED, traceparent=TRACEPARENT)
    headers["baggage"] = "tenant=acme"  # not read: docs/observability.md, "Propagation"
    chosen = (TraceContextTextMapPropagator(), W3CBaggagePropagator(), _XRayLike())
    with propagators(*chosen):
        reply = enhance.post(headers=headers, content=b'{"prompt": "a cat"}')
    assert reply.status_code == 200, reply.text
    assert reply.headers["ce-type"] == PROMPT_ENHANCED
    assert reply.headers["ce-traceparent"].split("-")[1] == TRACE_ID
    # CloudEvents 1.0, section 3.1.1: attribute names are lower-case letters and digits.
    names = [name.removeprefix("ce-") for name in reply.headers if name.startswith("ce-")]
    assert all(name.isalnum() and name == name.lower() for name in names), names
    assert "baggage" not in names


# -- the ledger's routes: a SERVER span, and a replay in its caller's trace -----------------


def ledger(tmp_path: Path, **env: str) -> InProcessFunction:
    return InProcessFunction(
        "ledger",
        {**base_env(tmp_path / "store"), "IMAGEGEN_LEDGER_URL": str(tmp_path / "l.db"), **env},
    )


def attributes_of(span: ReadableSpan) -> Mapping[str, Any]:
    return span.attributes or {}


def test_a_replay_goes_on_in_its_callers_trace_from_a_server_span(
    otel: InMemoryTelemetry, tmp_path: Path
) -> None:
    route = "/generations/{generation_id}/replay"
    with broker_ingress() as (sink, received), ledger(tmp_path, IMAGEGEN_SINK_URL=sink) as function:
        for event in chain("gen-trace").values():
            function.post(**binary(event))
        otel.spans.clear()
        caller = {"traceparent": TRACEPARENT, "tracestate": "vendor=1"}
        reply = function.post("/generations/gen-trace/replay", headers=caller)
        assert reply.status_code == 202, reply.text

    span = only(otel.finished_spans(), f"POST {route}")
    assert span.kind is SpanKind.SERVER
    assert span.parent is not None and span.parent.is_remote
    assert (span.context.trace_id, span.parent.span_id) == (int(TRACE_ID, 16), int(PARENT_ID, 16))
    assert attributes_of(span) == {
        "http.request.method": "POST",
        "url.path": "/generations/gen-trace/replay",
        "url.scheme": "http",
        "http.route": route,
        "http.response.status_code": 202,
    }
    assert span.status.status_code is StatusCode.UNSET
    # The replayed event hangs off the route's span (the CloudEvents tracing extension).
    [(sent, _)] = received
    assert sent["ce-traceparent"] == f"00-{TRACE_ID}-{span.context.span_id:016x}-01"
    assert sent["ce-tracestate"] == "vendor=1"


def test_a_route_answered_4xx_leaves_its_span_unset_and_5xx_marks_it_failed(
    otel: InMemoryTelemetry, tmp_path: Path
) -> None:
    # HTTP semantic conventions, "Status": a SERVER span's status stays unset for a 4xx.
    with ledger(tmp_path) as function:  # no broker to replay to: a 503
        otel.spans.clear()
        assert function.get("/generations/absent").status_code == 404
        for event in chain("gen-nosink").values():
            function.post(**binary(event))
        assert function.post("/generations/gen-nosink/replay").status_code == 503
    spans = otel.finished_spans()
    missing = only(spans, "GET /generations/{generation_id}")
    assert missing.status.status_code is StatusCode.UNSET
    assert attributes_of(missing)["http.response.status_code"] == 404
    assert "error.type" not in attributes_of(missing)
    failed = only(spans, "POST /generations/{generation_id}/replay")
    assert failed.status.status_code is StatusCode.ERROR
    assert attributes_of(failed)["http.response.status_code"] == 503
    assert attributes_of(failed)["error.type"] == "503"
    assert [e.name for e in failed.events] == ["exception"]


# -- a plain call's SERVER span ---------------------------------------------------------------


def test_a_plain_calls_span_says_its_request_and_status_unset_for_a_4xx(
    otel: InMemoryTelemetry, tmp_path: Path
) -> None:
    with ledger(tmp_path) as function:
        otel.spans.clear()
        reply = function.post(json={"generation_id": "x"})  # no CloudEvent: the caller's fault
        assert reply.status_code == 400
    span = only(otel.finished_spans(), "POST /")  # the HTTP semantic conventions' name
    assert span.kind is SpanKind.SERVER
    assert attributes_of(span)["imagegen.stage"] == "ledger"
    assert span.status.status_code is StatusCode.UNSET
    assert {k: v for k, v in attributes_of(span).items() if not k.startswith("imagegen.")} == {
        "http.request.method": "POST",
        "url.path": "/",
        "url.scheme": "http",
        "http.route": "/",
        "http.response.status_code": 400,
    }
    assert [e.name for e in span.events] == ["exception"]  # the failure is still recorded


def test_a_plain_calls_span_is_failed_by_a_5xx_and_says_a_success(
    otel: InMemoryTelemetry, tmp_path: Path
) -> None:
    import shutil

    store = tmp_path / "store"
    with InProcessFunction("deadletter", base_env(store)) as sink:
        otel.spans.clear()
        assert sink.post(json={"lost": 1}).status_code == 202
        shutil.rmtree(store / "failures")
        (store / "failures").write_text("a file where the records go: storage fails")
        assert sink.post(json={"lost": 2}).status_code == 503
    recorded, failed = [s for s in otel.finished_spans() if s.name == "POST /"]
    assert recorded.kind is failed.kind is SpanKind.SERVER
    assert recorded.status.status_code is StatusCode.UNSET
    assert attributes_of(recorded)["http.response.status_code"] == 202
    assert failed.status.status_code is StatusCode.ERROR
    assert attributes_of(failed)["http.response.status_code"] == 503
    assert attributes_of(failed)["error.type"] == "503"
