"""An OTLP/HTTP collector on loopback that keeps what it receives, to test exporters by it.

OTLP/HTTP (opentelemetry-proto ``docs/specification.md``, "OTLP/HTTP"): a protobuf body
POSTed to ``/v1/traces`` or ``/v1/metrics`` (or the per-signal endpoint configured), answered
200 with an empty ``Export*ServiceResponse``.
"""

from __future__ import annotations

from http.server import BaseHTTPRequestHandler
from typing import Any

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from tests.fakes.loopback import LoopbackServer

__all__ = ["Collector"]


class Collector(LoopbackServer):
    """Records every export as (path, body); ``url`` is the base endpoint."""

    def __init__(self, *, port: int = 0) -> None:
        self.exports: list[tuple[str, bytes]] = []
        received = self.exports

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                received.append((self.path, body))
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        super().__init__(Handler, port=port, name="collector")

    def paths(self) -> list[str]:
        return [path for path, _ in self.exports]

    def spans(self, path: str = "/v1/traces") -> list[Any]:
        """The spans received at ``path``, with their resources' attributes as ``resource``."""
        found = []
        for received, body in self.exports:
            if received == path:
                request = ExportTraceServiceRequest.FromString(body)
                for resource_spans in request.resource_spans:
                    for scope_spans in resource_spans.scope_spans:
                        found.extend(scope_spans.spans)
        return found

    def metric_resources(self, path: str = "/v1/metrics") -> list[dict[str, str]]:
        """The resource attributes of each batch of metrics received at ``path``."""
        resources = []
        for received, body in self.exports:
            if received == path:
                request = ExportMetricsServiceRequest.FromString(body)
                for resource_metrics in request.resource_metrics:
                    attributes = resource_metrics.resource.attributes
                    resources.append({a.key: a.value.string_value for a in attributes})
        return resources

    def counts(self, name: str, path: str = "/v1/metrics") -> dict[frozenset[tuple[str, str]], int]:
        """The latest value of each series of the counter ``name`` received at ``path``, by its
        attributes (string-valued, as the functions' counters have)."""
        latest: dict[frozenset[tuple[str, str]], int] = {}
        for received, body in self.exports:
            if received != path:
                continue
            request = ExportMetricsServiceRequest.FromString(body)
            for resource_metrics in request.resource_metrics:
                for scope_metrics in resource_metrics.scope_metrics:
                    for metric in scope_metrics.metrics:
                        if metric.name != name:
                            continue
                        for point in metric.sum.data_points:
                            labels = frozenset(
                                (a.key, a.value.string_value) for a in point.attributes
                            )
                            latest[labels] = point.as_int
        return latest
