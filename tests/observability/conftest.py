"""In-memory span and metric exporters, installed as this test process's global providers."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.test.globals_test import reset_metrics_globals, reset_trace_globals

from imagegen.observability import GenerationSpanProcessor
from imagegen.telemetry import instruments, tracer


@dataclass(frozen=True)
class MetricPoint:
    name: str
    attributes: dict[str, Any]
    point: Any


@dataclass
class InMemoryTelemetry:
    tracer_provider: TracerProvider
    meter_provider: MeterProvider
    spans: InMemorySpanExporter
    reader: InMemoryMetricReader

    def finished_spans(self) -> list[ReadableSpan]:
        return list(self.spans.get_finished_spans())

    def points(self, name: str | None = None) -> list[MetricPoint]:
        """Every data point collected so far (cumulative), optionally of one metric."""
        data = self.reader.get_metrics_data()
        found: list[MetricPoint] = []
        for resource_metrics in data.resource_metrics if data else ():
            for scope_metrics in resource_metrics.scope_metrics:
                for metric in scope_metrics.metrics:
                    if name is not None and metric.name != name:
                        continue
                    for point in metric.data.data_points:
                        found.append(MetricPoint(metric.name, dict(point.attributes or {}), point))
        return found


def _install(tracer_provider: TracerProvider, meter_provider: MeterProvider) -> None:
    # The API lets a process set its providers once; whatever ran earlier in this test
    # process (a CLI test, say) may have set them: reset with OpenTelemetry's test utilities.
    reset_trace_globals()
    trace.set_tracer_provider(tracer_provider)
    reset_metrics_globals()
    metrics.set_meter_provider(meter_provider)
    instruments.cache_clear()
    tracer.cache_clear()


@pytest.fixture(scope="session")
def otel() -> Iterator[InMemoryTelemetry]:
    """The global tracer and meter providers, exporting to memory, for the whole session."""
    resource = Resource.create({"service.name": "imagegen-tests"})
    spans = InMemorySpanExporter()
    tracer_provider = TracerProvider(resource=resource, shutdown_on_exit=False)
    tracer_provider.add_span_processor(GenerationSpanProcessor())
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(
        resource=resource, metric_readers=[reader], shutdown_on_exit=False
    )
    _install(tracer_provider, meter_provider)
    yield InMemoryTelemetry(tracer_provider, meter_provider, spans, reader)
