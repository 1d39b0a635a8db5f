"""UnexportedTracerProvider: span contexts exactly as the SDK's tracer makes them."""

from __future__ import annotations

import json
import logging
import os
import random
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, TraceState

from imagegen._otel_unexported import UnexportedTracerProvider
from imagegen.events import GENERATION_REQUESTED, PROMPT_ENHANCED
from imagegen.observability import setup_logging
from imagegen.settings import Settings
from tests.functions.conftest import base_env
from tests.functions.servers import FunctionServer, post_event

SAMPLERS = [
    {},
    {"OTEL_TRACES_SAMPLER": "parentbased_always_on"},
    {"OTEL_TRACES_SAMPLER": "always_on"},
    {"OTEL_TRACES_SAMPLER": "always_off"},
    {"OTEL_TRACES_SAMPLER": "parentbased_always_off"},
    {"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.5"},
    {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.5"},
]

parents = st.one_of(
    st.none(),
    st.builds(
        SpanContext,
        trace_id=st.integers(1, 2**128 - 1),
        span_id=st.integers(1, 2**64 - 1),
        is_remote=st.booleans(),
        trace_flags=st.sampled_from([0, 1, 2, 3]).map(TraceFlags),
        trace_state=st.sampled_from([None, TraceState([("vendor", "v1")])]),
    ),
)


@settings(max_examples=300, deadline=None)
@given(
    sampler=st.sampled_from(SAMPLERS),
    parent=parents,
    seed=st.integers(0, 2**32),
    name=st.sampled_from(["enhance process", "imagegen.plugin"]),
)
def test_span_contexts_are_the_sdks(
    sampler: dict[str, str], parent: SpanContext | None, seed: int, name: str
) -> None:
    """The same ids (both draw them from ``random`` in the same order), flags and trace state
    as the SDK's recording span, for every sampler the environment can name and any parent."""
    with mock.patch.dict(os.environ, sampler, clear=False):
        for variable in ("OTEL_TRACES_SAMPLER", "OTEL_TRACES_SAMPLER_ARG"):
            if variable not in sampler:
                os.environ.pop(variable, None)
        sdk = TracerProvider(shutdown_on_exit=False).get_tracer("tests")
        ours = UnexportedTracerProvider().get_tracer("tests")
    context = None if parent is None else trace.set_span_in_context(NonRecordingSpan(parent))
    random.seed(seed)
    expected = sdk.start_span(name, context=context)
    random.seed(seed)
    made = ours.start_span(name, context=context)
    assert not made.is_recording()
    assert made.get_span_context() == expected.get_span_context()
    assert made.get_span_context().trace_state == expected.get_span_context().trace_state


def test_the_current_span_is_the_parent_and_ends_on_exit() -> None:
    tracer = UnexportedTracerProvider().get_tracer("tests")
    with tracer.start_as_current_span("outer") as outer:
        assert trace.get_current_span() is outer
        with tracer.start_as_current_span("inner") as inner:
            assert inner.get_span_context().trace_id == outer.get_span_context().trace_id
        assert trace.get_current_span() is outer
    assert trace.get_current_span() is trace.INVALID_SPAN


def test_the_generation_id_and_stage_pass_to_children_for_the_logs() -> None:
    """What GenerationSpanProcessor does with the SDK, and all a span keeps here."""
    tracer = UnexportedTracerProvider().get_tracer("tests")
    stage = {"imagegen.stage": "render", "imagegen.generation_id": "gen-1", "other": "x"}
    with tracer.start_as_current_span("render process", attributes=stage) as outer:
        assert dict(outer.attributes) == {
            "imagegen.stage": "render",
            "imagegen.generation_id": "gen-1",
        }
        with tracer.start_as_current_span("child") as child:
            child.set_attribute("imagegen.generation_id", "gen-2")  # its own wins
            child.set_attribute("imagegen.png.size", 3)  # nobody would read it
            with tracer.start_as_current_span("grandchild") as grandchild:
                pass
    assert dict(child.attributes) == {
        "imagegen.stage": "render",
        "imagegen.generation_id": "gen-2",
    }
    assert dict(grandchild.attributes)["imagegen.generation_id"] == "gen-2"
    # A remote parent (a traceparent header) has no attributes to pass on.
    remote = NonRecordingSpan(SpanContext(1, 2, is_remote=True, trace_flags=TraceFlags(1)))
    orphan = tracer.start_span("x", context=trace.set_span_in_context(remote))
    assert dict(orphan.attributes) == {}


def test_a_log_line_names_the_generation_and_the_trace(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging(Settings(), "render")
    tracer = UnexportedTracerProvider().get_tracer("tests")
    with tracer.start_as_current_span("imagegen.render") as stage:
        stage.set_attribute("imagegen.generation_id", "gen-42")
        with tracer.start_as_current_span("imagegen.storage.put") as child:
            logging.getLogger("imagegen.test").info("stored")
            context = child.get_span_context()
    [entry] = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert entry["generation_id"] == "gen-42"
    assert entry["stage"] == "render"
    assert entry["trace_id"] == f"{context.trace_id:032x}"
    assert entry["span_id"] == f"{context.span_id:016x}"


@pytest.mark.slow
def test_a_served_function_with_no_exporter_continues_the_trace_and_logs_it(
    tmp_path: Path,
) -> None:
    """Enhance as it runs on Knative, no OTEL_* variable set: the reply's ``traceparent`` is
    a child of the event's, with its sampled flag, and the log lines name both ids."""
    env = {k: v for k, v in base_env(tmp_path / "store").items() if not k.startswith("OTEL_")}
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    with FunctionServer("enhance", env, log_dir=tmp_path) as server:
        replies = {
            flags: post_event(
                server.url,
                GENERATION_REQUESTED,
                {"prompt": "a fox", "width": 256, "height": 256},
                subject=f"unexported-{flags}",
                traceparent=f"00-{trace_id}-00f067aa0ba902b7-{flags}",
                timeout=30,
            )
            for flags in ("01", "00")
        }
        records = server.log_records()
    for flags, reply in replies.items():
        assert reply.status_code == 200, reply.text
        assert reply.headers["ce-type"] == PROMPT_ENHANCED, reply.text
        version, traced, parent, sampled = reply.headers["ce-traceparent"].split("-")
        assert (version, traced, sampled) == ("00", trace_id, flags)
        assert parent != "00f067aa0ba902b7"
        lines = [r for r in records if r.get("generation_id") == f"unexported-{flags}"]
        assert lines and all(r["trace_id"] == trace_id for r in lines)
