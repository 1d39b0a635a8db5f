"""Process-wide telemetry set-up: JSON logs and the OpenTelemetry SDK.

Configured only by the standard ``OTEL_*`` variables (and ``IMAGEGEN_LOG_LEVEL``), read when
:func:`setup_observability` first runs. Precedence, highest first: per-signal variables
(``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``), the shared ones (``OTEL_EXPORTER_OTLP_ENDPOINT``), the
defaults here.

- ``OTEL_SDK_DISABLED=true``: no SDK at all; spans and metrics stay no-ops (logs still work).
- An OTLP exporter per signal when an endpoint is set for it, none otherwise. Spans go through
  a ``BatchSpanProcessor``, metrics through a ``PeriodicExportingMetricReader``: both export
  from a background thread, never on a request's path. ``OTEL_TRACES_EXPORTER`` /
  ``OTEL_METRICS_EXPORTER`` = ``none`` turn one signal's export off, ``console`` prints it.
- ``OTEL_EXPORTER_OTLP_PROTOCOL``: ``http/protobuf`` (default); ``grpc`` when
  ``opentelemetry-exporter-otlp-proto-grpc`` is installed, else a warning and HTTP.
- ``OTEL_SERVICE_NAME`` and ``OTEL_RESOURCE_ATTRIBUTES`` override the resource attributes set
  here: ``service.name`` (the caller's), ``service.version``, and on Knative ``faas.name``
  (``K_SERVICE``), ``faas.version`` (``K_REVISION``) and ``knative.configuration.name``
  (``K_CONFIGURATION``).
- ``OTEL_TRACES_SAMPLER`` (+ ``_ARG``), ``OTEL_PROPAGATORS``, ``OTEL_BSP_*``,
  ``OTEL_METRIC_EXPORT_*`` and the exporters' headers, TLS and compression variables are read
  by the SDK itself.

A tracer or meter provider that is already an SDK provider (tests install in-memory ones) is
kept as it is. Providers installed here are flushed at exit, within a bounded time.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import sys
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import metrics as metrics_api
from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    ConsoleMetricExporter,
    MetricExporter,
    MetricReader,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.resources import OTELResourceDetector, Resource
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
)
from pydantic import SecretStr

from imagegen import __version__
from imagegen.settings import Settings

__all__ = [
    "GenerationSpanProcessor",
    "JsonFormatter",
    "Telemetry",
    "create_telemetry",
    "setup_logging",
    "setup_observability",
]

log = logging.getLogger("imagegen.observability")

EXPORT_TIMEOUT = 5.0
"""Seconds one OTLP export may take when ``OTEL_EXPORTER_OTLP[_<SIGNAL>]_TIMEOUT`` is unset."""

SHUTDOWN_TIMEOUT = 5.0
"""Seconds the exit handler waits for the last spans and metrics to leave."""

# Attributes a span shares with its children, so any span of a generation can be found by id.
_INHERITED = ("imagegen.generation_id", "imagegen.stage")
# Extras that can carry a prompt (personal data): logged only with settings.log_prompts.
_PROMPT_KEYS = frozenset({"prompt", "original_prompt", "final_prompt"})
# Attributes every LogRecord has; anything else was passed with ``extra=``.
_RESERVED = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


# -- logs ----------------------------------------------------------------------------------


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, message, logger, stage, ids and extras.

    ``generation_id`` and ``stage`` come from the record's extras, else from the current span
    (``imagegen.generation_id``, ``imagegen.stage``); ``trace_id`` and ``span_id`` from the
    current span. Every value in ``secrets`` is replaced by ``***`` wherever it appears.

    Args:
        stage: The stage to name when neither the record nor the span does.
        secrets: Values that must never appear in a log line.
        log_prompts: Whether ``prompt`` extras are written.
    """

    def __init__(
        self,
        stage: str | None = None,
        *,
        secrets: Iterable[str] = (),
        log_prompts: bool = False,
    ) -> None:
        super().__init__()
        self.stage = stage
        self.log_prompts = log_prompts
        # The JSON-escaped form too: a secret with a quote or backslash is written escaped.
        forms = {form for s in secrets if s for form in (s, json.dumps(s)[1:-1])}
        self._secrets = sorted(forms, key=len, reverse=True)

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "message": record.getMessage(),
            "logger": record.name,
        }
        span = trace.get_current_span()
        attributes: Mapping[str, Any] = getattr(span, "attributes", None) or {}
        stage = attributes.get("imagegen.stage") or self.stage
        if stage:
            entry["stage"] = stage
        if gid := attributes.get("imagegen.generation_id"):
            entry["generation_id"] = gid
        context = span.get_span_context()
        if context.is_valid:
            entry["trace_id"] = trace.format_trace_id(context.trace_id)
            entry["span_id"] = trace.format_span_id(context.span_id)
        for key, value in vars(record).items():
            if key in _RESERVED or value is None or key.startswith("_"):
                continue
            if key in _PROMPT_KEYS and not self.log_prompts:
                continue
            entry[key] = value
        if record.exc_info and record.exc_info[0] is not None:
            entry["error_type"] = record.exc_info[0].__name__
            entry["exception"] = self.formatException(record.exc_info)
        line = json.dumps(entry, default=str)
        # Redacted last, over the whole line: message, extras and tracebacks alike.
        for secret in self._secrets:
            line = line.replace(secret, "***")
        return line


def _secret_values(settings: Settings) -> list[str]:
    return [
        value.get_secret_value()
        for name in type(settings).model_fields
        if isinstance(value := getattr(settings, name), SecretStr) and value.get_secret_value()
    ]


def setup_logging(settings: Settings, stage: str | None = None) -> None:
    """JSON log lines on stderr at ``settings.log_level``; the settings' secrets redacted."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter(stage, secrets=_secret_values(settings), log_prompts=settings.log_prompts)
    )
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(settings.log_level)


# -- the SDK -------------------------------------------------------------------------------


class GenerationSpanProcessor(SpanProcessor):
    """Copies ``imagegen.generation_id`` and ``imagegen.stage`` from a span to its children.

    Only spans of this process are seen, so a child of a remote parent starts without them.
    """

    def on_start(self, span: Span, parent_context: otel_context.Context | None = None) -> None:
        parent = trace.get_current_span(parent_context)
        attributes: Mapping[str, Any] = getattr(parent, "attributes", None) or {}
        for key in _INHERITED:
            if key in attributes and (span.attributes is None or key not in span.attributes):
                span.set_attribute(key, attributes[key])

    def on_end(self, span: ReadableSpan) -> None:
        pass


@dataclass(frozen=True)
class Telemetry:
    """The SDK set-up of a process.

    Attributes:
        tracer_provider: The SDK tracer provider in use; None when the SDK is disabled.
        meter_provider: The SDK meter provider in use; None when the SDK is disabled.
        span_exporter: The exporter spans leave by (None: not exported).
        metric_exporter: The exporter metrics leave by (None: not exported).
        installed: Whether the providers were made here (rather than found in place).
    """

    tracer_provider: TracerProvider | None = None
    meter_provider: MeterProvider | None = None
    span_exporter: SpanExporter | None = None
    metric_exporter: MetricExporter | None = None
    installed: bool = False

    def shutdown(self, timeout: float = SHUTDOWN_TIMEOUT) -> bool:
        """Flush and stop the providers; give up after ``timeout`` seconds.

        Returns:
            Whether everything was flushed in time.
        """
        tracer_provider, meter_provider = self.tracer_provider, self.meter_provider

        def stop() -> None:
            if tracer_provider is not None:
                tracer_provider.shutdown()
            if meter_provider is not None:
                meter_provider.shutdown(timeout_millis=timeout * 1000)

        # A daemon thread: an exporter stuck on a dead collector must not hold the exit up.
        worker = threading.Thread(target=stop, name="otel-shutdown", daemon=True)
        worker.start()
        worker.join(timeout)
        return not worker.is_alive()


def _env(name: str) -> str:
    return os.environ.get(name, "").strip()


def _sdk_disabled() -> bool:
    return _env("OTEL_SDK_DISABLED").lower() == "true"


def resource_for(service_name: str) -> Resource:
    """The resource: ``service_name``, the version and Knative's names; ``OTEL_*`` on top."""
    attributes: dict[str, str] = {"service.name": service_name, "service.version": __version__}
    knative = {
        "K_SERVICE": "faas.name",
        "K_REVISION": "faas.version",
        "K_CONFIGURATION": "knative.configuration.name",
    }
    attributes.update({key: _env(var) for var, key in knative.items() if _env(var)})
    # Resource.create puts its arguments over OTEL_RESOURCE_ATTRIBUTES; the variables win here.
    return Resource.create(attributes).merge(OTELResourceDetector().detect())


def _exporter_kinds(signal: str) -> set[str]:
    value = _env(f"OTEL_{signal.upper()}_EXPORTER") or "otlp"
    return {part.strip().lower() for part in value.split(",") if part.strip()}


def _otlp_options(signal: str) -> tuple[str, dict[str, Any]] | None:
    """(protocol, exporter arguments) when an OTLP endpoint is set for ``signal``."""
    upper = signal.upper()
    if not (_env(f"OTEL_EXPORTER_OTLP_{upper}_ENDPOINT") or _env("OTEL_EXPORTER_OTLP_ENDPOINT")):
        return None
    options: dict[str, Any] = {}
    if not (_env(f"OTEL_EXPORTER_OTLP_{upper}_TIMEOUT") or _env("OTEL_EXPORTER_OTLP_TIMEOUT")):
        options["timeout"] = EXPORT_TIMEOUT
    protocol = (
        _env(f"OTEL_EXPORTER_OTLP_{upper}_PROTOCOL")
        or _env("OTEL_EXPORTER_OTLP_PROTOCOL")
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


def _span_exporter() -> SpanExporter | None:
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


def _metric_exporter() -> MetricExporter | None:
    kinds = _exporter_kinds("metrics")
    if "console" in kinds:
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


def create_telemetry(service_name: str, *, traces: bool = True, metrics: bool = True) -> Telemetry:
    """SDK providers configured from the ``OTEL_*`` variables, without installing them.

    Args:
        service_name: ``service.name`` unless ``OTEL_SERVICE_NAME`` says otherwise.
        traces: Whether to make a tracer provider.
        metrics: Whether to make a meter provider.

    Returns:
        The providers and their exporters; an empty :class:`Telemetry` when
        ``OTEL_SDK_DISABLED`` is true.
    """
    if _sdk_disabled() or not (traces or metrics):
        return Telemetry()
    resource = resource_for(service_name)

    tracer_provider, span_exporter = None, None
    if traces:
        span_exporter = _span_exporter()
        tracer_provider = TracerProvider(resource=resource, shutdown_on_exit=False)
        tracer_provider.add_span_processor(GenerationSpanProcessor())
        if isinstance(span_exporter, ConsoleSpanExporter):
            tracer_provider.add_span_processor(SimpleSpanProcessor(span_exporter))
        elif span_exporter is not None:
            tracer_provider.add_span_processor(BatchSpanProcessor(span_exporter))

    meter_provider, metric_exporter = None, None
    if metrics:
        metric_exporter = _metric_exporter()
        readers: list[MetricReader] = []
        if metric_exporter is not None:
            readers.append(PeriodicExportingMetricReader(metric_exporter))
        meter_provider = MeterProvider(
            resource=resource, metric_readers=readers, shutdown_on_exit=False
        )
    return Telemetry(
        tracer_provider=tracer_provider,
        meter_provider=meter_provider,
        span_exporter=span_exporter,
        metric_exporter=metric_exporter,
        installed=True,
    )


_lock = threading.Lock()
_active: Telemetry | None = None


def setup_observability(
    service_name: str, settings: Settings | None = None, *, logs: bool = True
) -> Telemetry:
    """JSON logs and the OpenTelemetry SDK for one process (the functions, the CLI).

    Idempotent: later calls return what the first one set up. An SDK provider already in
    place is kept; ``installed`` tells whether any provider was made here.

    Args:
        service_name: ``service.name`` unless ``OTEL_SERVICE_NAME`` says otherwise, e.g.
            ``imagegen-render``; the part after ``imagegen-`` names the stage in logs.
        settings: Log level, prompt logging and the secrets to redact; default
            ``Settings()``.
        logs: Whether to install the JSON log handler (a console program may keep its own).
    """
    global _active
    with _lock:
        if _active is not None:
            return _active
        if logs:
            setup_logging(settings or Settings(), service_name.removeprefix("imagegen-"))
        if _sdk_disabled():
            _active = Telemetry()
            return _active
        current_tracer = trace.get_tracer_provider()
        current_meter = metrics_api.get_meter_provider()
        kept_tracer = current_tracer if isinstance(current_tracer, TracerProvider) else None
        kept_meter = current_meter if isinstance(current_meter, MeterProvider) else None
        made = create_telemetry(
            service_name, traces=kept_tracer is None, metrics=kept_meter is None
        )
        if made.tracer_provider is not None:
            trace.set_tracer_provider(made.tracer_provider)
        if made.meter_provider is not None:
            metrics_api.set_meter_provider(made.meter_provider)
        if made.installed:
            atexit.register(made.shutdown)
        _active = Telemetry(
            tracer_provider=made.tracer_provider or kept_tracer,
            meter_provider=made.meter_provider or kept_meter,
            span_exporter=made.span_exporter,
            metric_exporter=made.metric_exporter,
            installed=made.installed,
        )
        log.debug(
            "telemetry: traces to %s, metrics to %s",
            type(made.span_exporter).__name__ if made.span_exporter else "nowhere",
            type(made.metric_exporter).__name__ if made.metric_exporter else "nowhere",
        )
        return _active
