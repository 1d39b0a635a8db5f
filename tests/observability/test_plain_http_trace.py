"""A plain HTTP/JSON chain is one trace where its caller sends one ``traceparent`` to every
stage (docs/observability.md, Traces): a JSON reply carries no trace context to pass on."""

from __future__ import annotations

from pathlib import Path

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanKind

from tests.functions.clients import InProcessFunction
from tests.functions.conftest import base_env
from tests.observability.conftest import InMemoryTelemetry

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_ID = "00f067aa0ba902b7"


def stage_of(span: ReadableSpan) -> object:
    return (span.attributes or {}).get("imagegen.stage")


def test_one_traceparent_sent_to_every_stage_makes_one_trace(
    otel: InMemoryTelemetry, tmp_path: Path
) -> None:
    env = base_env(tmp_path / "store")
    caller = {"traceparent": f"00-{TRACE_ID}-{CALLER_ID}-01"}
    with InProcessFunction("enhance", env) as enhance, InProcessFunction("render", env) as render:
        otel.spans.clear()
        asked = {"prompt": "a lighthouse", "model": "tiny", "width": 256, "height": 256}
        enhanced = enhance.post(json=asked, headers=caller)
        assert enhanced.status_code == 200, enhanced.text
        rendered = render.post(json=enhanced.json(), headers=caller)
        assert rendered.status_code == 200, rendered.text
        spans = [s for s in otel.finished_spans() if s.kind is SpanKind.SERVER]
        # Nothing to pass on from a reply: the caller's own traceparent is what joins them.
        for reply in (enhanced, rendered):
            assert "traceparent" not in reply.headers and "traceresponse" not in reply.headers
        otel.spans.clear()
        alone = render.post(json=enhanced.json())  # no traceparent: a trace of its own
        assert alone.status_code == 200, alone.text
        [own] = [s for s in otel.finished_spans() if s.kind is SpanKind.SERVER]
    # Named as the HTTP semantic conventions name a server span: its method and route.
    assert [s.name for s in spans] == ["POST /", "POST /"]
    assert sorted(stage_of(s) for s in spans) == ["enhance", "render"]
    assert own.name == "POST /" and stage_of(own) == "render"
    for span in spans:  # side by side under the caller's span, in its trace
        assert span.context is not None and span.context.trace_id == int(TRACE_ID, 16)
        assert span.parent is not None and span.parent.span_id == int(CALLER_ID, 16)
    assert own.parent is None and own.context is not None
    assert own.context.trace_id != int(TRACE_ID, 16)
