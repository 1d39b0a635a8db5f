"""setup_observability and create_telemetry: exporters, resource, sampler, idempotence."""

from __future__ import annotations

import importlib.util
import json
import logging
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased

import imagegen
from imagegen import _otel_exporters, observability
from imagegen._otel_unexported import UnexportedTracerProvider
from imagegen.observability import (
    EXPORT_TIMEOUT,
    Telemetry,
    create_telemetry,
    setup_observability,
)
from imagegen.settings import Settings
from tests.conftest import ROOT
from tests.observability.blackhole import Blackhole
from tests.observability.collector import Collector
from tests.observability.conftest import InMemoryTelemetry

REFUSED = "http://127.0.0.1:9"  # nothing listens: connections are refused at once


@pytest.fixture
def made() -> Iterator[list[Telemetry]]:
    """Telemetry made by a test, shut down afterwards."""
    created: list[Telemetry] = []
    yield created
    for telemetry in created:
        telemetry.shutdown(timeout=1.0)


def make(made: list[Telemetry], service_name: str = "imagegen-test") -> Telemetry:
    telemetry = create_telemetry(service_name)
    made.append(telemetry)
    return telemetry


def exporting_to(
    endpoint: str, made: list[Telemetry], monkeypatch: pytest.MonkeyPatch
) -> Telemetry:
    """Telemetry made with ``endpoint`` as the OTLP endpoint its environment names."""
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
    return make(made)


def export_once(telemetry: Telemetry, span_name: str = "exported") -> None:
    """One span and one counter through ``telemetry``'s providers, flushed to its exporters."""
    if telemetry.tracer_provider is not None:
        with telemetry.tracer_provider.get_tracer("tests").start_as_current_span(span_name):
            pass
        assert telemetry.tracer_provider.force_flush(10_000)
    if telemetry.meter_provider is not None:
        telemetry.meter_provider.get_meter("tests").create_counter("tests.count").add(1)
        assert telemetry.meter_provider.force_flush(10_000)


def seconds_to_give_up(exporter: OTLPSpanExporter) -> float:
    """How long ``exporter``, pointed at a collector that never answers, tries one export."""
    provider = TracerProvider()
    with provider.get_tracer("tests").start_as_current_span("lost") as span:
        pass
    started = time.monotonic()
    exporter.export([span])  # type: ignore[list-item]
    return time.monotonic() - started


def test_without_an_endpoint_nothing_is_exported_and_spans_have_ids_only(
    made: list[Telemetry],
) -> None:
    telemetry = make(made)
    assert telemetry.span_exporter is None
    assert telemetry.metric_exporter is None
    # Nothing would read the metrics: the instruments stay the API's no-ops.
    assert telemetry.meter_provider is None
    # Nothing would read what a span records: spans have ids (for the logs and the
    # traceparent passed on) and record nothing.
    assert isinstance(telemetry.tracer_provider, UnexportedTracerProvider)
    tracer = telemetry.tracer_provider.get_tracer("tests")
    with tracer.start_as_current_span("parent") as parent, tracer.start_as_current_span("child"):
        child = trace.get_current_span()
    assert not parent.is_recording() and not child.is_recording()
    ids = parent.get_span_context(), child.get_span_context()
    assert all(each.is_valid and each.trace_flags.sampled for each in ids)
    assert ids[0].trace_id == ids[1].trace_id and ids[0].span_id != ids[1].span_id


def test_an_exporter_gets_the_generation_attributes_on_child_spans(
    made: list[Telemetry], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    telemetry = make(made)
    assert isinstance(telemetry.tracer_provider, TracerProvider)
    # The processor in place hands the generation's attributes down to child spans.
    spans = InMemorySpanExporter()
    telemetry.tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    tracer = telemetry.tracer_provider.get_tracer("tests")
    parent = {"imagegen.generation_id": "g-1"}
    with (
        tracer.start_as_current_span("parent", attributes=parent),
        tracer.start_as_current_span("child"),
    ):
        pass
    child = next(s for s in spans.get_finished_spans() if s.name == "child")
    assert (child.attributes or {})["imagegen.generation_id"] == "g-1"


def test_an_endpoint_configures_otlp_exporters_off_the_request_path(
    made: list[Telemetry], monkeypatch: pytest.MonkeyPatch
) -> None:
    with Collector() as collector:
        telemetry = exporting_to(collector.url, made, monkeypatch)
        assert isinstance(telemetry.span_exporter, OTLPSpanExporter)
        assert isinstance(telemetry.metric_exporter, OTLPMetricExporter)
        export_once(telemetry)
    assert [span.name for span in collector.spans("/v1/traces")] == ["exported"]
    assert collector.metric_resources("/v1/metrics")

    # An export is given EXPORT_TIMEOUT, 5 s as observability.md says; 1 s here, to keep it short.
    assert EXPORT_TIMEOUT == 5.0
    timeout = 1.0
    monkeypatch.setattr(_otel_exporters, "EXPORT_TIMEOUT", timeout)
    with Blackhole() as hung:
        telemetry = exporting_to(hung.url, made, monkeypatch)
        assert telemetry.tracer_provider is not None
        # Spans leave in the background: ending one never waits for a collector that hangs...
        started = time.monotonic()
        with telemetry.tracer_provider.get_tracer("tests").start_as_current_span("quick"):
            pass
        assert time.monotonic() - started < timeout / 2
        # ...and an export gives up after EXPORT_TIMEOUT, not the exporter's own 10 s.
        assert isinstance(telemetry.span_exporter, OTLPSpanExporter)
        given_up = seconds_to_give_up(telemetry.span_exporter)
        assert timeout * 0.8 <= given_up < timeout + 3


def test_per_signal_endpoints_timeouts_and_exporter_choice(
    made: list[Telemetry], monkeypatch: pytest.MonkeyPatch
) -> None:
    with Collector() as collector:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", f"{collector.url}/custom/traces")
        telemetry = make(made)
        assert isinstance(telemetry.span_exporter, OTLPSpanExporter)
        assert telemetry.metric_exporter is None  # no endpoint for metrics
        export_once(telemetry)
    assert collector.paths() == ["/custom/traces"]

    with Blackhole() as hung:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", f"{hung.url}/custom/traces")
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "1")
        telemetry = make(made)
        assert isinstance(telemetry.span_exporter, OTLPSpanExporter)
        assert 0.8 <= seconds_to_give_up(telemetry.span_exporter) < 4

    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", REFUSED)
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "none")
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    telemetry = make(made)
    assert telemetry.metric_exporter is None
    assert isinstance(telemetry.span_exporter, ConsoleSpanExporter)


def test_grpc_is_used_when_installed_else_http_with_a_warning(
    made: list[Telemetry], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", REFUSED)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    with caplog.at_level(logging.WARNING, logger="imagegen.observability"):
        telemetry = make(made)
    if importlib.util.find_spec("opentelemetry.exporter.otlp.proto.grpc") is not None:
        assert type(telemetry.span_exporter).__module__.startswith(
            "opentelemetry.exporter.otlp.proto.grpc"
        )
        return
    assert isinstance(telemetry.span_exporter, OTLPSpanExporter)
    assert isinstance(telemetry.metric_exporter, OTLPMetricExporter)
    warnings = [r.getMessage() for r in caplog.records]
    assert any("grpc" in m and "http/protobuf" in m for m in warnings), warnings


@pytest.mark.parametrize(
    ("value", "said"),
    [("otlp,console", "console, not otlp"), ("zipkin", "['zipkin'] not supported")],
)
def test_an_exporter_list_that_is_not_all_made_says_so(
    made: list[Telemetry],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    value: str,
    said: str,
) -> None:
    # OTEL_TRACES_EXPORTER is a list; one exporter is made, and a kind not installed here
    # exports nothing: never silently.
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", REFUSED)
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", value)
    with caplog.at_level(logging.WARNING, logger="imagegen.observability"):
        make(made)
    warnings = [r.getMessage() for r in caplog.records]
    assert any("OTEL_TRACES_EXPORTER" in m and said in m for m in warnings), warnings


def test_resource_names_the_service_and_its_knative_revision(
    made: list[Telemetry], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("K_SERVICE", "imagegen-render")
    monkeypatch.setenv("K_REVISION", "imagegen-render-00007")
    monkeypatch.setenv("K_CONFIGURATION", "imagegen-render")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", REFUSED)  # metrics exported
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")  # and spans
    telemetry = make(made, "imagegen-render")
    assert isinstance(telemetry.tracer_provider, TracerProvider)
    attributes = telemetry.tracer_provider.resource.attributes
    assert attributes["service.name"] == "imagegen-render"
    assert attributes["service.version"] == imagegen.__version__
    assert attributes["service.instance.id"]
    assert attributes["faas.name"] == "imagegen-render"
    assert attributes["faas.version"] == "imagegen-render-00007"
    assert attributes["knative.configuration.name"] == "imagegen-render"
    # The metrics carry the same resource.
    with Collector() as collector:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", f"{collector.url}/v1/metrics")
        export_once(make(made, "imagegen-render"))
    [resource] = collector.metric_resources()
    assert resource["faas.name"] == "imagegen-render"


def test_otel_variables_override_the_resource_and_pick_the_sampler(
    made: list[Telemetry], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("K_SERVICE", "imagegen-render")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "render-eu")
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "faas.name=override,deployment.environment=prod")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "parentbased_traceidratio")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "0.25")
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    telemetry = make(made, "imagegen-render")
    assert isinstance(telemetry.tracer_provider, TracerProvider)
    attributes = telemetry.tracer_provider.resource.attributes
    assert attributes["service.name"] == "render-eu"
    assert attributes["faas.name"] == "override"
    assert attributes["deployment.environment"] == "prod"
    sampler = telemetry.tracer_provider.sampler
    assert isinstance(sampler, ParentBased)
    assert sampler.get_description().startswith("ParentBased{root:TraceIdRatioBased{0.25}")


def test_sdk_disabled_means_no_providers(
    otel: InMemoryTelemetry, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", REFUSED)
    assert create_telemetry("imagegen-test") == Telemetry()
    monkeypatch.setattr(observability, "_active", None)
    telemetry = setup_observability("imagegen-test", Settings())
    assert telemetry.tracer_provider is None and telemetry.meter_provider is None
    assert trace.get_tracer_provider() is otel.tracer_provider


def test_setup_keeps_sdk_providers_in_place_and_is_idempotent(
    otel: InMemoryTelemetry, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(observability, "_active", None)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", REFUSED)
    first = setup_observability("imagegen-test", Settings())
    assert first.tracer_provider is otel.tracer_provider
    assert first.meter_provider is otel.meter_provider
    assert not first.installed and first.span_exporter is None
    assert setup_observability("imagegen-other", Settings()) is first
    assert trace.get_tracer_provider() is otel.tracer_provider
    assert len(logging.getLogger().handlers) == 1


def test_setup_installs_the_global_providers_in_a_fresh_process() -> None:
    script = """
import json, sys
from opentelemetry import trace
from imagegen.observability import setup_observability
telemetry = setup_observability("imagegen-cli")
print(json.dumps({
    "tracer": trace.get_tracer_provider() is telemetry.tracer_provider,
    "ids only": type(telemetry.tracer_provider).__name__,
    # No metrics exporter: no meter provider.
    "meter": telemetry.meter_provider is None,
    # Nothing exported: the SDK is never imported.
    "sdk": sorted(name for name in sys.modules if name.startswith("opentelemetry.sdk")),
    "installed": telemetry.installed,
    "again": setup_observability("imagegen-cli") is telemetry,
}))
"""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {
        "tracer": True,
        "ids only": "UnexportedTracerProvider",
        "meter": True,
        "sdk": [],
        "installed": True,
        "again": True,
    }


def test_shutdown_gives_up_on_a_collector_that_never_answers(
    made: list[Telemetry], monkeypatch: pytest.MonkeyPatch
) -> None:
    with Blackhole() as collector:
        telemetry = exporting_to(collector.url, made, monkeypatch)
        assert telemetry.tracer_provider is not None
        tracer = telemetry.tracer_provider.get_tracer("tests")
        for i in range(10):
            with tracer.start_as_current_span(f"span {i}"):
                pass
        started = time.monotonic()
        flushed = telemetry.shutdown(timeout=0.3)
        assert not flushed
        assert time.monotonic() - started < 3.0  # bounded by the timeout, not the exporter's


def test_a_trace_exporter_that_hangs_never_keeps_the_last_metrics_in(
    made: list[Telemetry], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The providers stop side by side: the last count (a failure just before exit) leaves
    # while the span exporter waits on a collector that never answers.
    with Blackhole() as hung, Collector() as collector:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", f"{hung.url}/v1/traces")
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", f"{collector.url}/v1/metrics")
        telemetry = make(made)
        assert telemetry.tracer_provider is not None and telemetry.meter_provider is not None
        with telemetry.tracer_provider.get_tracer("tests").start_as_current_span("stuck"):
            pass
        telemetry.meter_provider.get_meter("tests").create_counter("tests.count").add(1)
        started = time.monotonic()
        flushed = telemetry.shutdown(timeout=2.0)
        waited = time.monotonic() - started
        assert collector.paths() == ["/v1/metrics"]
    assert not flushed  # the spans did not leave
    assert waited < 2.0 + 1.0  # one deadline for both, not one each


def test_a_console_program_may_keep_its_own_logging(
    otel: InMemoryTelemetry, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(observability, "_active", None)
    handler = logging.NullHandler()
    logging.getLogger().handlers = [handler]
    setup_observability("imagegen-cli", Settings(), logs=False)
    assert logging.getLogger().handlers == [handler]
