"""The span and metric exporters the ``OTEL_*`` variables ask for (see imagegen.observability)."""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SpanExporter

if TYPE_CHECKING:
    from opentelemetry.sdk.metrics.export import MetricExporter

__all__ = ["EXPORT_TIMEOUT", "env", "metric_exporter_from_env", "span_exporter_from_env"]

log = logging.getLogger("imagegen.observability")

EXPORT_TIMEOUT = 5.0
"""Seconds one OTLP export may take when ``OTEL_EXPORTER_OTLP[_<SIGNAL>]_TIMEOUT`` is unset."""


def env(name: str) -> str:
    """The variable ``name``, stripped; empty when unset."""
    return os.environ.get(name, "").strip()


def _exporter_kinds(signal: str) -> set[str]:
    value = env(f"OTEL_{signal.upper()}_EXPORTER") or "otlp"
    return {part.strip().lower() for part in value.split(",") if part.strip()}


def _otlp_options(signal: str) -> tuple[str, dict[str, Any]] | None:
    """(protocol, exporter arguments) when an OTLP endpoint is set for ``signal``."""
    upper = signal.upper()
    if not (env(f"OTEL_EXPORTER_OTLP_{upper}_ENDPOINT") or env("OTEL_EXPORTER_OTLP_ENDPOINT")):
        return None
    options: dict[str, Any] = {}
    if not (env(f"OTEL_EXPORTER_OTLP_{upper}_TIMEOUT") or env("OTEL_EXPORTER_OTLP_TIMEOUT")):
        options["timeout"] = EXPORT_TIMEOUT
    protocol = (
        env(f"OTEL_EXPORTER_OTLP_{upper}_PROTOCOL")
        or env("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "http/protobuf"
    ).lower()
    return protocol, options


def _grpc_unavailable(signal: str, protocol: str, error: ImportError | None = None) -> None:
    why = (
        "install opentelemetry-exporter-otlp-proto-grpc for grpc"
        if error is not None
        else "only http/protobuf and grpc are supported"
    )
    log.warning(
        "OTEL_EXPORTER_OTLP_PROTOCOL=%s: %s; exporting %s with OTLP http/protobuf instead"
        " (point the endpoint at the collector's HTTP port, 4318)",
        protocol,
        why,
        signal,
    )


def span_exporter_from_env() -> SpanExporter | None:
    """The exporter for spans: console, OTLP (http/protobuf or grpc), or None."""
    kinds = _exporter_kinds("traces")
    if "console" in kinds:
        return ConsoleSpanExporter()
    found = _otlp_options("traces") if "otlp" in kinds else None
    if found is None:
        return None
    protocol, options = found
    if protocol == "grpc":
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
                OTLPSpanExporter as GrpcSpanExporter,
            )
        except ImportError as error:
            _grpc_unavailable("traces", protocol, error)
        else:
            return GrpcSpanExporter(**options)  # type: ignore[no-any-return]
    elif protocol != "http/protobuf":
        _grpc_unavailable("traces", protocol)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter(**options)


def metric_exporter_from_env() -> MetricExporter | None:
    """The exporter for metrics: console, OTLP (http/protobuf or grpc), or None."""
    kinds = _exporter_kinds("metrics")
    if "console" in kinds:
        from opentelemetry.sdk.metrics.export import ConsoleMetricExporter

        return ConsoleMetricExporter()
    found = _otlp_options("metrics") if "otlp" in kinds else None
    if found is None:
        return None
    protocol, options = found
    if protocol == "grpc":
        try:
            from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (
                OTLPMetricExporter as GrpcMetricExporter,
            )
        except ImportError as error:
            _grpc_unavailable("metrics", protocol, error)
        else:
            return GrpcMetricExporter(**options)  # type: ignore[no-any-return]
    elif protocol != "http/protobuf":
        _grpc_unavailable("metrics", protocol)
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

    return OTLPMetricExporter(**options)
