"""The parts of the set-up that need the OpenTelemetry SDK: imported only when something is
exported (see imagegen.observability), so a process that exports nothing starts without it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from opentelemetry import trace
from opentelemetry.sdk.resources import OTELResourceDetector, Resource
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
)

from imagegen import __version__
from imagegen._otel_exporters import env
from imagegen.telemetry import INHERITED_ATTRIBUTES

if TYPE_CHECKING:
    from opentelemetry import context as otel_context

__all__ = ["GenerationSpanProcessor", "resource_for", "sdk_tracer_provider"]


class GenerationSpanProcessor(SpanProcessor):
    """Copies ``imagegen.generation_id`` and ``imagegen.stage`` from a span to its children.

    Only spans of this process are seen, so a child of a remote parent starts without them.
    """

    def on_start(self, span: Span, parent_context: otel_context.Context | None = None) -> None:
        parent = trace.get_current_span(parent_context)
        attributes: Mapping[str, Any] = getattr(parent, "attributes", None) or {}
        for key in INHERITED_ATTRIBUTES:
            if key in attributes and (span.attributes is None or key not in span.attributes):
                span.set_attribute(key, attributes[key])

    def on_end(self, span: ReadableSpan) -> None:
        pass


def resource_for(service_name: str) -> Resource:
    """The resource: ``service_name``, the version and Knative's names; ``OTEL_*`` on top."""
    attributes: dict[str, str] = {"service.name": service_name, "service.version": __version__}
    knative = {
        "K_SERVICE": "faas.name",
        "K_REVISION": "faas.version",
        "K_CONFIGURATION": "knative.configuration.name",
    }
    attributes.update({key: env(var) for var, key in knative.items() if env(var)})
    # Resource.create puts its arguments over OTEL_RESOURCE_ATTRIBUTES; the variables win here.
    return Resource.create(attributes).merge(OTELResourceDetector().detect())


def sdk_tracer_provider(resource: Resource, exporter: SpanExporter) -> TracerProvider:
    """The SDK's tracer provider, its spans to ``exporter``: from a background thread, or as
    each ends for the console."""
    provider = TracerProvider(resource=resource, shutdown_on_exit=False)
    provider.add_span_processor(GenerationSpanProcessor())
    if isinstance(exporter, ConsoleSpanExporter):
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    else:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider
