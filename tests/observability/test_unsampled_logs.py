"""A log line names its generation whether or not its trace is sampled.

With the SDK (an exporter configured) a span the sampler drops records nothing, attributes
included: the generation's id reaches the lines written under it all the same.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

from imagegen.models import GenerationRequest
from imagegen.observability import setup_logging
from imagegen.service import ImageGenService
from imagegen.settings import Settings
from imagegen.stages import Call
from imagegen.telemetry import stage_span
from tests.observability.conftest import InMemoryTelemetry

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
GENERATION_ID = "obs-unsampled-1"


@contextmanager
def as_a_function(flags: str) -> Iterator[None]:
    """Inside a delivered event's stage span, the event's traceparent carrying ``flags``."""
    carrier = {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-{flags}"}
    with stage_span("enhance", {"subject": GENERATION_ID}, carrier, event=True):
        yield


@contextmanager
def under_a_callers_span(flags: str) -> Iterator[None]:
    """The service called alone, under a caller's span carrying ``flags``."""
    context = SpanContext(
        int(TRACE_ID, 16), int(PARENT_ID, 16), is_remote=True, trace_flags=TraceFlags(flags)
    )
    with trace.use_span(NonRecordingSpan(context)):
        yield


@pytest.mark.parametrize("within", [as_a_function, under_a_callers_span])
@pytest.mark.parametrize("flags", ["01", "00"], ids=["sampled", "not-sampled"])
async def test_the_enhanced_line_names_the_generation_sampled_or_not(
    otel: InMemoryTelemetry,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    within: Any,
    flags: str,
) -> None:
    settings = Settings(storage_url=str(tmp_path / "out"), model="tiny", ollama_retries=0)
    setup_logging(settings, "cli")  # the process's stage: the command line runs each stage
    request = GenerationRequest(prompt="a fox", width=256, height=256)
    capsys.readouterr()
    otel.spans.clear()
    async with ImageGenService(settings) as service:
        with within(flags):
            job = await service.enhance(request, Call(generation_id=GENERATION_ID))
    assert job.generation_id == GENERATION_ID
    entries = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line]
    [enhanced] = [e for e in entries if e["message"].startswith(f"enhanced {GENERATION_ID}")]
    assert enhanced["generation_id"] == GENERATION_ID
    assert enhanced["stage"] == "enhance"
    assert enhanced["trace_id"] == TRACE_ID
    # The SDK recorded (and exported) the stage's spans only when sampled.
    exported = [s for s in otel.finished_spans() if s.name == "imagegen.enhance"]
    assert len(exported) == (1 if flags == "01" else 0)


def test_a_line_under_an_unsampled_stage_span_names_the_events_generation(
    otel: InMemoryTelemetry, capsys: pytest.CaptureFixture[str]
) -> None:
    """Written by the function around the stage (the event's subject), not by the stage."""
    setup_logging(Settings(), "enhance")
    capsys.readouterr()
    with as_a_function("00"):
        logging.getLogger("imagegen.test").info("received")
    logging.getLogger("imagegen.test").info("after")
    received, after = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert received["generation_id"] == GENERATION_ID
    assert received["trace_id"] == TRACE_ID
    assert "generation_id" not in after  # the stage's generation ends with it
