"""The span and metric exporters the ``OTEL_*`` variables ask for (see imagegen.observability)."""

from __future__ import annotations

import importlib
import logging
import os
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from opentelemetry.sdk.metrics.export import MetricExporter
    from opentelemetry.sdk.trace.export import SpanExporter

__all__ = ["EXPORT_TIMEOUT", "env", "metric_exporter_from_env", "span_exporter_from_env"]

log = logging.getLogger("imagegen.observability")

EXPORT_TIMEOUT = 5.0
"""Seconds one OTLP export may take when ``OTEL_EXPORTER_OTLP[_<SIGNAL>]_TIMEOUT`` is unset."""


def env(name: str) -> str:
    """The variable ``name``, stripped; empty when unset."""
    return os.environ.get(name, "").strip()


_EXPORTER_KINDS = ("otlp", "console", "none")


def _exporter_kinds(signal: str) -> set[str]:
    """What ``OTEL_<SIGNAL>_EXPORTER`` names: ``otlp``, ``console`` or ``none``, one of them.

    The variable is a list (OpenTelemetry's SDK configuration), but one exporter is made: of
    ``otlp`` and ``console`` together, ``console`` (a developer's), with a warning, as for a
    kind not installed here (``zipkin``), which exports nothing.
    """
    name = f"OTEL_{signal.upper()}_EXPORTER"
    kinds = {part.strip().lower() for part in (env(name) or "otlp").split(",") if part.strip()}
    if unknown := sorted(kinds - set(_EXPORTER_KINDS)):
        log.warning("%s: %s not supported (otlp, console or none); ignored", name, unknown)
    if {"otlp", "console"} <= kinds:
        log.warning("%s: one exporter is made: console, not otlp", name)
    return kinds


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


# signal → its console exporter (module, class), and the module (under
# ``opentelemetry.exporter.otlp.proto.<grpc|http>``) and class of its OTLP exporter. The grpc
# package is optional; the http one is always installed.
_EXPORTERS = {
    "traces": (
        ("opentelemetry.sdk.trace.export", "ConsoleSpanExporter"),
        ("trace_exporter", "OTLPSpanExporter"),
    ),
    "metrics": (
        ("opentelemetry.sdk.metrics.export", "ConsoleMetricExporter"),
        ("metric_exporter", "OTLPMetricExporter"),
    ),
}


def _exporter_from_env(signal: str) -> Any:
    """The exporter ``OTEL_<SIGNAL>_EXPORTER`` asks for: console; OTLP over grpc when asked for
    and installed, else http/protobuf; None for OTLP with no endpoint set, or for ``none``."""
    (console_module, console), (module, name) = _EXPORTERS[signal]
    kinds = _exporter_kinds(signal)
    if "console" in kinds:
        # On stderr, with the logs: stdout is a command's output (``--json``), and the SDK's
        # console exporters write to stdout unless told otherwise.
        return getattr(importlib.import_module(console_module), console)(out=sys.stderr)
    found = _otlp_options(signal) if "otlp" in kinds else None
    if found is None:
        return None
    protocol, options = found
    if protocol == "grpc":
        try:
            grpc = importlib.import_module(f"opentelemetry.exporter.otlp.proto.grpc.{module}")
        except ImportError as error:
            _grpc_unavailable(signal, protocol, error)
        else:
            return getattr(grpc, name)(**options)
    elif protocol != "http/protobuf":
        _grpc_unavailable(signal, protocol)
    http = importlib.import_module(f"opentelemetry.exporter.otlp.proto.http.{module}")
    return getattr(http, name)(**options)


def span_exporter_from_env() -> SpanExporter | None:
    """The exporter for spans: console, OTLP (http/protobuf or grpc), or None."""
    exporter: SpanExporter | None = _exporter_from_env("traces")
    return exporter


def metric_exporter_from_env() -> MetricExporter | None:
    """The exporter for metrics: console, OTLP (http/protobuf or grpc), or None."""
    exporter: MetricExporter | None = _exporter_from_env("metrics")
    return exporter
