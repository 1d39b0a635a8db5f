"""Process-wide telemetry set-up: JSON logs and the OpenTelemetry SDK.

Configured only by the standard ``OTEL_*`` variables (and ``IMAGEGEN_LOG_LEVEL``), read when
:func:`setup_observability` first runs. Precedence, highest first: per-signal variables
(``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``), the shared ones (``OTEL_EXPORTER_OTLP_ENDPOINT``), the
defaults here.

- ``OTEL_SDK_DISABLED=true``: no SDK at all; spans and metrics stay no-ops (logs still work).
- An OTLP exporter per signal when an endpoint is set for it, none otherwise. Without a metrics
  exporter no meter provider is made: nothing would read the metrics, so the instruments stay
  the API's no-ops and the metrics SDK is never imported. Without a span exporter the tracer
  provider is :class:`~imagegen._otel_unexported.UnexportedTracerProvider`: spans have ids
  (for the logs, and the ``traceparent`` passed on) and record nothing. Exported spans go through
  a ``BatchSpanProcessor``, metrics through a ``PeriodicExportingMetricReader``: both export
  from a background thread, never on a request's path; a function also exports its metrics
  once as it starts (:meth:`Telemetry.export_metrics`), so that counters begun at 0 reach
  Prometheus at 0 before anything is counted. ``OTEL_TRACES_EXPORTER`` /
  ``OTEL_METRICS_EXPORTER`` = ``none`` turn one signal's export off, ``console`` prints it.
- ``OTEL_EXPORTER_OTLP_PROTOCOL``: ``http/protobuf`` (default); ``grpc`` when
  ``opentelemetry-exporter-otlp-proto-grpc`` is installed, else a warning and HTTP.
- ``OTEL_SERVICE_NAME`` and ``OTEL_RESOURCE_ATTRIBUTES`` override the resource attributes set
  here: ``service.name`` (the caller's), ``service.version``, and on Knative ``faas.name``
  (``K_SERVICE``), ``faas.version`` (``K_REVISION``) and ``knative.configuration.name``
  (``K_CONFIGURATION``).
- ``OTEL_TRACES_SAMPLER`` (+ ``_ARG``), ``OTEL_PROPAGATORS``, ``OTEL_BSP_*``,
  ``OTEL_METRIC_EXPORT_*`` and the exporters' headers, TLS and compression variables are read
  by the SDK itself. A propagator ``OTEL_PROPAGATORS`` names that is not installed is refused
  here (:func:`check_propagators`), in imagegen's words.

A tracer or meter provider that is already an SDK provider (tests install in-memory ones) is
kept as it is. Providers installed here are flushed at exit, within a bounded time.

The JSON log format lives in :mod:`imagegen._logging`, the choice of exporters in
:mod:`imagegen._otel_exporters`; both are re-exported here.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from opentelemetry import metrics as metrics_api
from opentelemetry import trace

from imagegen._logging import JsonFormatter, setup_logging
from imagegen._otel_exporters import EXPORT_TIMEOUT as EXPORT_TIMEOUT
from imagegen._otel_exporters import env, metric_exporter_from_env, span_exporter_from_env
from imagegen.errors import ConfigurationError, first_line
from imagegen.settings import Settings

if TYPE_CHECKING:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import MetricExporter, PeriodicExportingMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

    from imagegen._otel_sdk import GenerationSpanProcessor as GenerationSpanProcessor
    from imagegen._otel_unexported import UnexportedTracerProvider

__all__ = [
    "GenerationSpanProcessor",
    "JsonFormatter",
    "Telemetry",
    "check_propagators",
    "create_telemetry",
    "setup_logging",
    "setup_observability",
]

log = logging.getLogger("imagegen.observability")

SHUTDOWN_TIMEOUT = 5.0
"""Seconds the exit handler waits for the last spans and metrics to leave."""

COLLECT_WAIT = 1.0
"""Seconds :meth:`Telemetry.export_metrics` waits at most for its collection (in memory: it
takes moments), never for the export that follows."""


class _Collections:
    """How many times a reader made here has collected the metrics, waited on by
    :meth:`Telemetry.export_metrics`."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._count = 0

    def count(self) -> int:
        with self._changed:
            return self._count

    def note(self) -> None:
        with self._changed:
            self._count += 1
            self._changed.notify_all()

    def wait_past(self, count: int, timeout: float) -> bool:
        """Whether a collection after the ``count``-th was taken within ``timeout`` seconds."""
        with self._changed:
            return self._changed.wait_for(lambda: self._count > count, timeout)


def _periodic_reader(
    exporter: MetricExporter, collections: _Collections
) -> PeriodicExportingMetricReader:
    """The SDK's periodic reader of ``exporter``, noting each collection in ``collections``
    before its export begins."""
    from opentelemetry.sdk.metrics.export import MetricsData, PeriodicExportingMetricReader

    class Reader(PeriodicExportingMetricReader):
        # _receive_metrics: the method the SDK has readers override (MetricReader's docs).
        def _receive_metrics(
            self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
        ) -> None:
            collections.note()
            super()._receive_metrics(metrics_data, timeout_millis=timeout_millis, **kwargs)

    return Reader(exporter)


def _flush(meter_provider: MeterProvider, timeout: float) -> None:
    try:
        meter_provider.force_flush(timeout_millis=timeout * 1000)
    except Exception as exc:  # a collection that timed out: the next one carries the same
        log.warning("metrics not exported: %s", first_line(exc))


@dataclass(frozen=True)
class Telemetry:
    """The SDK set-up of a process.

    Attributes:
        tracer_provider: The tracer provider in use: the SDK's, or without a span exporter one
            that records nothing (:class:`UnexportedTracerProvider`); None when the SDK is
            disabled.
        meter_provider: The SDK meter provider in use; None when the SDK is disabled.
        span_exporter: The exporter spans leave by (None: not exported).
        metric_exporter: The exporter metrics leave by (None: not exported).
        installed: Whether the providers were made here (rather than found in place).
        collections: The collections of the metric reader made here (None: none made here).
    """

    tracer_provider: TracerProvider | UnexportedTracerProvider | None = None
    meter_provider: MeterProvider | None = None
    span_exporter: SpanExporter | None = None
    metric_exporter: MetricExporter | None = None
    installed: bool = False
    collections: _Collections | None = field(default=None, compare=False, repr=False)

    def export_metrics(self, timeout: float = EXPORT_TIMEOUT) -> threading.Thread | None:
        """Collect the metrics now and export them from a daemon thread, without waiting on
        the export.

        A function calls it once its counters are set at 0
        (:func:`~imagegen.telemetry.count_from_zero`): the periodic reader first exports an
        interval after start-up (``OTEL_METRIC_EXPORT_INTERVAL``, 60 s), and a count made
        meanwhile would reach Prometheus as the series' first sample, which ``increase()``
        never sees. Returns once
        the metrics are collected (at most :data:`COLLECT_WAIT`), so what is counted next is
        not in this export; a collector that is slow or away holds up neither the caller nor
        the periodic exports for longer than the exporter's own timeout.

        Args:
            timeout: Seconds the collection may take (the OTLP exporters keep to their own
                timeout, ``OTEL_EXPORTER_OTLP_TIMEOUT``).

        Returns:
            The thread exporting; None where metrics are not exported (no exporter, or the SDK
            disabled): nothing is done then.
        """
        meter_provider = self.meter_provider
        if meter_provider is None:
            return None
        seen = self.collections.count() if self.collections is not None else 0
        flush = threading.Thread(
            target=_flush, args=(meter_provider, timeout), name="otel-metrics-now", daemon=True
        )
        flush.start()
        if self.collections is not None:
            self.collections.wait_past(seen, COLLECT_WAIT)
        else:  # a provider found in place: its reader's collections are not seen from here
            flush.join(COLLECT_WAIT)
        return flush

    def shutdown(self, timeout: float = SHUTDOWN_TIMEOUT) -> bool:
        """Flush and stop the providers, side by side; give up after ``timeout`` seconds.

        Each provider stops in a daemon thread of its own, both within one deadline: a span
        exporter stuck on a dead collector neither holds the exit up nor keeps the last
        metrics (a failure counted just before exit) from leaving, as it would if the meter
        provider waited its turn behind it.

        Returns:
            Whether both were flushed in time.
        """
        deadline = time.monotonic() + timeout
        stops = {}
        if self.tracer_provider is not None:
            stops["traces"] = self.tracer_provider.shutdown
        if self.meter_provider is not None:
            meter_provider = self.meter_provider
            stops["metrics"] = lambda: meter_provider.shutdown(timeout_millis=timeout * 1000)
        workers = [
            threading.Thread(target=stop, name=f"otel-shutdown-{signal}", daemon=True)
            for signal, stop in stops.items()
        ]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(max(0.0, deadline - time.monotonic()))
        return not any(worker.is_alive() for worker in workers)


def _sdk_disabled() -> bool:
    return env("OTEL_SDK_DISABLED").lower() == "true"


_PROPAGATORS = "OTEL_PROPAGATORS"
_PROPAGATOR_GROUP = "opentelemetry_propagator"
"""The entry-point group OpenTelemetry loads ``OTEL_PROPAGATORS``' names from."""


def check_propagators() -> None:
    """Refuse an ``OTEL_PROPAGATORS`` that names a propagator not installed here.

    OpenTelemetry's API reads the variable once, as ``opentelemetry.propagate`` is first
    imported (imagegen, on a request's first trace context), and raises a bare
    ``ValueError`` for a name no installed package provides (``b3`` needs
    ``opentelemetry-propagator-b3``); this says the same before that import, naming the
    variable and what is installed. Its rules are the API's
    (``opentelemetry/propagate/__init__.py``, ``_load_propagators``): comma-separated names,
    each stripped, looked up in the ``opentelemetry_propagator`` entry points; ``none``
    (any case) ends the list with no propagator at all; unset or empty, the default (blank is
    no name, refused).

    Raises:
        ConfigurationError: A name is not installed (an empty one included).
    """
    configured = os.environ.get(_PROPAGATORS)  # as the API reads it: unstripped
    if not configured:
        return
    from importlib.metadata import entry_points

    installed = sorted({ep.name for ep in entry_points(group=_PROPAGATOR_GROUP)})
    for name in (part.strip() for part in configured.split(",")):
        if name.lower() == "none":
            return
        if name not in installed:
            said = f"no propagator {name!r} is installed" if name else "an empty name"
            reason = f"{said}; installed: {', '.join(installed) or 'none'}"
            raise ConfigurationError(
                f"invalid settings: {_PROPAGATORS}",
                errors=[{"field": _PROPAGATORS, "message": reason}],
            )


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
    span_exporter = span_exporter_from_env() if traces else None
    metric_exporter = metric_exporter_from_env() if metrics else None
    tracer_provider: TracerProvider | UnexportedTracerProvider | None = None
    meter_provider = None
    collections = None
    if traces and span_exporter is None:  # nothing would read what a span records: ids only
        from imagegen._otel_unexported import UnexportedTracerProvider

        tracer_provider = UnexportedTracerProvider()
    if span_exporter is not None or metric_exporter is not None:
        # Imported here: with nothing exported, start-up skips the SDK.
        from imagegen._otel_sdk import resource_for, sdk_tracer_provider

        resource = resource_for(service_name)
        if span_exporter is not None:
            tracer_provider = sdk_tracer_provider(resource, span_exporter)
        if metric_exporter is not None:
            # Without an exporter nothing would read the metrics: the instruments stay the
            # API's no-ops and start-up skips the metrics SDK (a fifth of a second).
            from opentelemetry.sdk.metrics import MeterProvider

            collections = _Collections()
            meter_provider = MeterProvider(
                resource=resource,
                metric_readers=[_periodic_reader(metric_exporter, collections)],
                shutdown_on_exit=False,
            )
    return Telemetry(
        tracer_provider=tracer_provider,
        meter_provider=meter_provider,
        span_exporter=span_exporter,
        metric_exporter=metric_exporter,
        installed=True,
        collections=collections,
    )


def __getattr__(name: str) -> Any:
    # The processor needs the SDK, imported when it is first asked for (PEP 562).
    if name == "GenerationSpanProcessor":
        from imagegen._otel_sdk import GenerationSpanProcessor

        return GenerationSpanProcessor
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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

    Raises:
        ConfigurationError: ``OTEL_PROPAGATORS`` names a propagator not installed
            (:func:`check_propagators`).
    """
    global _active
    with _lock:
        if _active is not None:
            return _active
        check_propagators()
        if logs:
            setup_logging(settings or Settings(), service_name.removeprefix("imagegen-"))
        if _sdk_disabled():
            _active = Telemetry()
            return _active
        current_tracer = trace.get_tracer_provider()
        current_meter = metrics_api.get_meter_provider()
        # An SDK module not imported yet means no SDK provider of its kind is in place.
        sdk_trace = sys.modules.get("opentelemetry.sdk.trace")
        kept_tracer = (
            current_tracer
            if sdk_trace is not None and isinstance(current_tracer, sdk_trace.TracerProvider)
            else None
        )
        sdk_metrics = sys.modules.get("opentelemetry.sdk.metrics")
        kept_meter = (
            current_meter
            if sdk_metrics is not None and isinstance(current_meter, sdk_metrics.MeterProvider)
            else None
        )
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
            collections=made.collections,
        )
        log.debug(
            "telemetry: traces to %s, metrics to %s",
            type(made.span_exporter).__name__ if made.span_exporter else "nowhere",
            type(made.metric_exporter).__name__ if made.metric_exporter else "nowhere",
        )
        return _active
