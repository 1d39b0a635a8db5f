"""Tracing and metrics instruments of imagegen (OpenTelemetry API only).

The library records spans and metrics through the API; without an SDK configured they cost
nothing. :mod:`imagegen.observability` sets up the SDK for the functions and the CLI.

:data:`METRICS` is the contract: the name, kind, unit and attributes of every metric. The
Grafana dashboard and the Prometheus alert rules in ``observability/`` use the names these
become in Prometheus (:func:`prometheus_series`); a test keeps the three in step.
"""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar, Token
from functools import cache
from types import ModuleType
from typing import Literal, NamedTuple

from opentelemetry import context as otel_context
from opentelemetry import metrics, trace
from opentelemetry.metrics import CallbackOptions, Observation

from imagegen.errors import ImageGenError
from imagegen.identity import valid_generation_id

__all__ = [
    "INHERITED_ATTRIBUTES",
    "METRICS",
    "METRIC_NAMES",
    "REDELIVERED",
    "SINK_COUNTED_FROM_ZERO",
    "HttpRequest",
    "Instruments",
    "MetricSpec",
    "answered",
    "answered_again",
    "count_from_zero",
    "current_generation",
    "current_stage",
    "http_status",
    "instruments",
    "observe",
    "on_redelivery",
    "prometheus_name",
    "prometheus_series",
    "record_error",
    "redelivery_done",
    "server_span",
    "stage_span",
    "trace_extension",
    "tracer",
    "within_trace",
]

_SCOPE = "imagegen"

INHERITED_ATTRIBUTES = ("imagegen.generation_id", "imagegen.stage")
"""What a span shares with its children, so that every span of a generation, and every log line
written under one, names it."""

# The stage doing the work, for metrics recorded below it (storage calls): set by the service
# around each stage, and by a function around its handler.
current_stage: ContextVar[str] = ContextVar("imagegen_stage", default="none")

# The generation the current stage works on, for the log lines written below it: set where
# the stage's span is entered. A span keeps its attributes only when it records (the SDK's,
# sampled); this holds whatever the sampling, and without an SDK.
current_generation: ContextVar[str | None] = ContextVar("imagegen_generation", default=None)

REDELIVERED = "redelivered"
"""The outcome of a stage that answered with what an earlier delivery of the same event (or
another replica handling it at once) made: a stored image, a record, a remembered prompt.
Counted apart from ``success``, so that at-least-once redelivery adds no image, record or
prompt to a count of them."""

# Where the stage around the current call is told it answers from storage: a hook the service
# sets around each stage (imagegen.service._stage), called by :func:`answered_again`.
_redelivery_hook: ContextVar[Callable[[], None] | None] = ContextVar(
    "imagegen_redelivery_hook", default=None
)


def answered_again() -> None:
    """Say that the current stage's answer is what an earlier delivery made (its outcome is
    :data:`REDELIVERED`); nothing outside a stage."""
    hook = _redelivery_hook.get()
    if hook is not None:
        hook()


def on_redelivery(hook: Callable[[], None]) -> Token[Callable[[], None] | None]:
    """Have :func:`answered_again` call ``hook`` in this context; reset with the token."""
    return _redelivery_hook.set(hook)


def redelivery_done(token: Token[Callable[[], None] | None]) -> None:
    """Undo :func:`on_redelivery`."""
    _redelivery_hook.reset(token)


@cache
def tracer() -> trace.Tracer:
    """The tracer every imagegen span comes from (looked up once: a proxy until set up)."""
    return trace.get_tracer(_SCOPE)


def record_error(
    span: trace.Span,
    error: BaseException,
    *,
    traceback: bool | None = None,
    http_status: int | None = None,
) -> None:
    """Mark ``span`` failed by ``error``, as the SDK does when an exception leaves a span: status
    ``ERROR`` and the semantic conventions' ``exception`` event.

    The event's stacktrace is optional, and formatting it costs more than an expected failure:
    by default it is left out when the caller caused the error (an :class:`ImageGenError` of a
    4xx status, whose message names what was wrong), and kept for everything else.

    Args:
        http_status: For the ``SERVER`` span of an HTTP request, the status it is answered
            with (:func:`answered`): a 4xx is the client's error, and leaves the span's status
            unset.
    """
    if traceback is None:
        traceback = not (isinstance(error, ImageGenError) and error.status < 500)
    if traceback:
        span.record_exception(error)
    else:  # the type fully qualified, as the SDK writes it
        kind = type(error)
        qualified = f"{kind.__module__}.{kind.__qualname__}".removeprefix("builtins.")
        span.add_event("exception", {"exception.type": qualified, "exception.message": str(error)})
    if http_status is not None:
        answered(http_status, span, error)
        return
    span.set_status(trace.Status(trace.StatusCode.ERROR, f"{type(error).__name__}: {error}"))


class HttpRequest(NamedTuple):
    """What the ``SERVER`` span of one HTTP request says of it (OpenTelemetry semantic
    conventions, HTTP server spans: ``http.request.method``, ``url.path``, ``url.scheme``,
    ``http.route``)."""

    method: str
    path: str
    route: str
    scheme: str = "http"


def _http_attributes(span: trace.Span, request: HttpRequest) -> None:
    span.set_attribute("http.request.method", request.method)
    span.set_attribute("url.path", request.path)
    span.set_attribute("url.scheme", request.scheme)
    span.set_attribute("http.route", request.route)


def answered(
    status: int, span: trace.Span | None = None, error: BaseException | None = None
) -> None:
    """Say on an HTTP request's ``SERVER`` span (by default the current one) what it was
    answered: ``http.response.status_code``, and for a 5xx the status ``ERROR`` and
    ``error.type``.

    OpenTelemetry semantic conventions, HTTP spans ("Status"): a ``SERVER`` span's status
    MUST be left unset for a 4xx (the client's error, not the server's) and for 1xx-3xx, and
    is ``ERROR`` for a 5xx; ``error.type`` is then the status code, as a string.
    """
    if span is None:
        span = trace.get_current_span()
    span.set_attribute("http.response.status_code", status)
    if status >= 500:
        span.set_attribute("error.type", str(status))
        why = f"{type(error).__name__}: {error}" if error is not None else None
        span.set_status(trace.Status(trace.StatusCode.ERROR, why))


def http_status(error: BaseException) -> int:
    """The status the function edge answers ``error`` with: its own for an
    :class:`ImageGenError`; 503 for a stage cancelled past its time budget (what
    ``functions/_adapter.py`` ``Function._run`` raises then); 500 for anything else."""
    if isinstance(error, ImageGenError):
        return error.status
    return 503 if isinstance(error, asyncio.CancelledError) else 500


_TRACE_EXTENSION = ("traceparent", "tracestate")
"""The CloudEvents Distributed Tracing extension's attributes (cloudevents/spec
``cloudevents/extensions/distributed-tracing.md``): W3C Trace Context's two headers."""


@cache
def _propagate() -> ModuleType:
    """``opentelemetry.propagate``, imported on a request's first trace context, not at start.

    Its import builds the ``OTEL_PROPAGATORS`` propagators (``tracecontext,baggage`` by
    default: entry points, the baggage module and their patterns), a few milliseconds no probe
    needs; by then :func:`imagegen.observability.setup_observability` has checked the variable.
    """
    from opentelemetry import propagate

    return propagate


def trace_extension() -> dict[str, str]:
    """The current trace context as the CloudEvents Distributed Tracing extension's attributes.

    What the configured propagators (``OTEL_PROPAGATORS``) write, but for ``traceparent`` and
    ``tracestate``, is left out: another format's field (AWS X-Ray's ``X-Amzn-Trace-Id``, B3's
    ``b3``, ``baggage``) is no attribute of that extension, and most are no valid attribute
    name at all (CloudEvents 1.0, section 3.1.1: lower-case letters and digits only).
    """
    written: dict[str, str] = {}
    _propagate().inject(written)
    return {name: written[name] for name in _TRACE_EXTENSION if written.get(name)}


@contextmanager
def stage_span(
    stage: str,
    attributes: Mapping[str, str],
    carrier: Mapping[str, str],
    *,
    event: bool,
    generation_id: str | None = None,
    http: HttpRequest | None = None,
) -> Iterator[dict[str, str]]:
    """The span of one request to a stage, inside the caller's trace (``carrier``).

    For a delivered event, ``<stage> process`` of kind ``CONSUMER``; for a plain call, a
    ``SERVER`` span named ``{method} {route}`` as the HTTP semantic conventions name one
    (``POST /``; the stage is the resource's ``service.name`` and the ``imagegen.stage``
    attribute). It carries the event's CloudEvents attributes, and the generation's id:
    ``generation_id`` (what the function derived, for a request that names none), else the
    event's ``subject``, also as :data:`current_generation` while it lasts, as the stage is
    :data:`current_stage` (the log lines name them whether the span is sampled or not; both
    are what they were again once it ends, for a caller that enters it in its own context).
    Yields the trace context to pass on with the reply (:func:`trace_extension`).

    A plain call's span carries its request (``http``) and the status a failure is answered
    with; its status stays unset for a 4xx (:func:`answered`). The caller says what a success
    is answered with, by :func:`answered`, before the span ends. An event's span is marked
    ``ERROR`` by any failure, a bad event included: its processing failed (semantic
    conventions, ``docs/general/recording-errors.md``: an operation that ends with an error
    SHOULD set the span status ``Error``; the rule that leaves a 4xx unset is the HTTP
    conventions', for HTTP ``SERVER`` spans, and the messaging ones have none like it).
    """
    token = otel_context.attach(_propagate().extract(carrier))
    running = current_stage.set(stage)
    named = generation_id or attributes.get("subject")
    if not (named and valid_generation_id(named)):
        named = None
    generation = current_generation.set(named)
    kind = trace.SpanKind.CONSUMER if event else trace.SpanKind.SERVER
    server = None if event else http
    title = f"{stage} process" if server is None else f"{server.method} {server.route}"
    try:
        with tracer().start_as_current_span(
            title, kind=kind, record_exception=False, set_status_on_exception=False
        ) as span:
            span.set_attribute("imagegen.stage", stage)
            for key in ("id", "source", "type", "subject", "specversion"):
                if value := attributes.get(key):
                    name = "spec_version" if key == "specversion" else key
                    span.set_attribute(f"cloudevents.event_{name}", value)
            if named:
                span.set_attribute("imagegen.generation_id", named)
            if server is not None:
                _http_attributes(span, server)
            try:
                yield trace_extension()
            except BaseException as error:
                status = http_status(error) if server is not None else None
                record_error(span, error, http_status=status)
                raise
    finally:
        current_generation.reset(generation)
        current_stage.reset(running)
        otel_context.detach(token)


@contextmanager
def server_span(request: HttpRequest, carrier: Mapping[str, str]) -> Iterator[trace.Span]:
    """The ``SERVER`` span of one HTTP request of a stage's own routes (the ledger's queries
    and replays), inside the caller's trace (``carrier``), current while it lasts.

    Named ``{method} {route}`` (semantic conventions, HTTP server spans: the route template,
    never the path, which would make a name per generation). The caller says what the request
    was answered with (:func:`answered`, or :func:`record_error` with ``http_status``).
    """
    token = otel_context.attach(_propagate().extract(carrier))
    try:
        with tracer().start_as_current_span(
            f"{request.method} {request.route}",
            kind=trace.SpanKind.SERVER,
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            _http_attributes(span, request)
            yield span
    finally:
        otel_context.detach(token)


@contextmanager
def within_trace(carrier: Mapping[str, str]) -> Iterator[None]:
    """Inside the trace context ``carrier`` names, as the current one: what is logged under it
    names its trace and span, after the span itself has ended."""
    token = otel_context.attach(_propagate().extract(carrier))
    try:
        yield
    finally:
        otel_context.detach(token)


class MetricSpec(NamedTuple):
    """One metric: what the code records and what the dashboards may rely on."""

    name: str
    kind: Literal["histogram", "counter", "updowncounter", "gauge"]
    unit: str
    description: str
    attributes: tuple[str, ...]
    buckets: tuple[float, ...] = ()


# Bucket boundaries in seconds: the SDK's default ones are meant for milliseconds. Each latency
# alert's threshold is a boundary (observability/prometheus/alerts.yaml): histogram_quantile
# reads a boundary exactly and interpolates inside a bucket (a 2 s threshold between 1 s and
# 2.5 s fired at 2.4 s on calls that all took 1.1 s). Storage: 2 s.
_FAST = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 2.5, 5.0, 10.0)
_STEP = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# Stages: persist 15 s, enhance 30 s, render 90 s (below its 120 s timeout); Ollama 20 s.
_SLOW = (
    *(0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0),
    *(60.0, 90.0, 120.0, 300.0, 600.0),
)

METRICS: dict[str, MetricSpec] = {
    "stage_duration": MetricSpec(
        "imagegen.stage.duration",
        "histogram",
        "s",
        "Time one stage took for one generation.",
        ("stage", "outcome"),
        _SLOW,
    ),
    "generations": MetricSpec(
        "imagegen.generations",
        "counter",
        "{generation}",
        "Stage outcomes: success, fallback, redelivered (answered with what an earlier delivery"
        " made), failed (with the error code as reason).",
        ("stage", "outcome", "reason"),
    ),
    "sink_deliveries": MetricSpec(
        "imagegen.sink.deliveries",
        "counter",
        "{delivery}",
        "Deliveries to the dead-letter sink and the ledger: recorded, or failed (with the"
        " error code as reason).",
        ("stage", "outcome", "reason"),
    ),
    "ollama_duration": MetricSpec(
        "imagegen.ollama.duration",
        "histogram",
        "s",
        "Latency of one Ollama chat call (each retry is a call).",
        ("gen_ai.request.model", "outcome", "error.type"),
        _SLOW,
    ),
    "enhance_fallbacks": MetricSpec(
        "imagegen.enhance.fallbacks",
        "counter",
        "{prompt}",
        "Prompts composed from the template because the LLM could not write them.",
        ("reason",),
    ),
    "circuit_transitions": MetricSpec(
        "imagegen.circuit.transitions",
        "counter",
        "{transition}",
        "Circuit breaker state changes (to open, half_open, closed) per dependency.",
        ("dependency", "state"),
    ),
    "model_load_duration": MetricSpec(
        "imagegen.model.load.duration",
        "histogram",
        "s",
        "Model load (cold start) time.",
        ("imagegen.model",),
        _SLOW,
    ),
    "denoise_step_duration": MetricSpec(
        "imagegen.render.denoise.step.duration",
        "histogram",
        "s",
        "Denoising seconds per step (a render's denoising time over its steps).",
        ("imagegen.model",),
        _STEP,
    ),
    "renders_in_flight": MetricSpec(
        "imagegen.render.in_flight",
        "updowncounter",
        "{render}",
        "Renders running or queued.",
        (),
    ),
    "render_rejections": MetricSpec(
        "imagegen.render.rejections",
        "counter",
        "{render}",
        "Renders refused at capacity (429).",
        (),
    ),
    "storage_bytes_written": MetricSpec(
        "imagegen.storage.written",
        "counter",
        "By",
        "Bytes written to object storage.",
        ("stage",),
    ),
    "storage_duration": MetricSpec(
        "imagegen.storage.duration",
        "histogram",
        "s",
        "Latency of storage operations, those that fail included.",
        ("stage", "operation", "outcome"),
        _FAST,
    ),
    # No receiver attribute: receivers are URLs each caller chooses, a series apiece without
    # bound; the log lines name them (imagegen/ledger/outbox.py).
    "webhook_deliveries": MetricSpec(
        "imagegen.webhook.deliveries",
        "counter",
        "{delivery}",
        "Outcomes of the ledger's webhook claims: delivered, retried (due again later), failed"
        " (given up after the last claim) or refused (a URL not allowed, a receiver gone: 410).",
        ("outcome",),
    ),
    "webhook_backlog": MetricSpec(
        "imagegen.webhook.backlog",
        "gauge",
        "{message}",
        "Webhook messages due and not being sent, in the whole ledger (each replica reports"
        " the same total).",
        (),
    ),
}

METRIC_NAMES: dict[str, str] = {key: spec.name for key, spec in METRICS.items()}
"""The OpenTelemetry name of each metric, by instrument."""


class Instruments(NamedTuple):
    stage_duration: metrics.Histogram
    generations: metrics.Counter
    sink_deliveries: metrics.Counter
    ollama_duration: metrics.Histogram
    enhance_fallbacks: metrics.Counter
    circuit_transitions: metrics.Counter
    model_load_duration: metrics.Histogram
    denoise_step_duration: metrics.Histogram
    renders_in_flight: metrics.UpDownCounter
    render_rejections: metrics.Counter
    storage_bytes_written: metrics.Counter
    storage_duration: metrics.Histogram
    webhook_deliveries: metrics.Counter
    webhook_backlog: metrics.ObservableGauge


# What each observable gauge reports, by instrument: the sources the code that knows the
# value registered (:func:`observe`), read at each collection, from the SDK's reader thread.
_gauge_sources: dict[str, list[Callable[[], float | None]]] = {}
_gauge_lock = threading.Lock()


def observe(key: str, source: Callable[[], float | None]) -> Callable[[], None]:
    """Have the gauge ``key`` of :data:`METRICS` report what ``source`` returns at each
    collection (summed over the sources registered; None: nothing to say now); returns what
    stops it."""
    with _gauge_lock:
        _gauge_sources.setdefault(key, []).append(source)

    def stop() -> None:
        with _gauge_lock:
            sources = _gauge_sources.get(key, [])
            if source in sources:
                sources.remove(source)

    return stop


def _observed(key: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
    def collect(options: CallbackOptions) -> Iterable[Observation]:
        with _gauge_lock:
            sources = list(_gauge_sources.get(key, ()))
        values = [value for value in (source() for source in sources) if value is not None]
        return [Observation(sum(values))] if values else []

    return collect


@cache
def instruments() -> Instruments:
    """The metric instruments, created once per process from the global meter provider."""
    meter = metrics.get_meter(_SCOPE)
    created: dict[str, metrics.Instrument] = {}
    for key, spec in METRICS.items():
        if spec.kind == "histogram":
            created[key] = meter.create_histogram(
                spec.name,
                unit=spec.unit,
                description=spec.description,
                explicit_bucket_boundaries_advisory=list(spec.buckets) or None,
            )
        elif spec.kind == "counter":
            created[key] = meter.create_counter(
                spec.name, unit=spec.unit, description=spec.description
            )
        elif spec.kind == "gauge":
            created[key] = meter.create_observable_gauge(
                spec.name,
                callbacks=[_observed(key)],
                unit=spec.unit,
                description=spec.description,
            )
        else:
            created[key] = meter.create_up_down_counter(
                spec.name, unit=spec.unit, description=spec.description
            )
    return Instruments(**created)  # type: ignore[arg-type]


# The failures an alert counts by reason, and the outcomes a dashboard rates: each stage's
# series of them exist from its process's start.
COUNTED_FROM_ZERO = (
    {"outcome": "success"},
    {"outcome": "fallback"},
    *(
        {"outcome": "failed", "reason": reason}
        for reason in ("internal", "dependency_unavailable", "not_configured", "not_found")
    ),
    {"outcome": "failed", "reason": "cancelled"},
)


# A sink fails a delivery it cannot record for its storage or database
# (dependency_unavailable), its settings (not_configured) or a bug (internal): each pages.
SINK_COUNTED_FROM_ZERO = (
    {"outcome": "recorded"},
    *(
        {"outcome": "failed", "reason": reason}
        for reason in ("dependency_unavailable", "internal", "not_configured")
    ),
)


def count_from_zero(stage: str, *, sink: bool = False) -> None:
    """Start ``stage``'s :data:`COUNTED_FROM_ZERO` generation series at 0 (a sink's
    :data:`SINK_COUNTED_FROM_ZERO` delivery series).

    Each process is an ``instance`` of its own to Prometheus, and functions scale to zero:
    a series first exported at 1 has no earlier sample, so ``increase()`` and ``rate()`` never
    see that first count, and a pod that fails once and is scaled away fails unseen. The
    zeros reach Prometheus only once exported: a function exports them at once
    (:meth:`imagegen.observability.Telemetry.export_metrics`), not an export interval later.
    """
    if sink:
        for labels in SINK_COUNTED_FROM_ZERO:
            instruments().sink_deliveries.add(0, {"stage": stage, **labels})
        return
    counter = instruments().generations
    for labels in COUNTED_FROM_ZERO:
        if labels["outcome"] != "fallback" or stage == "enhance":
            counter.add(0, {"stage": stage, **labels})


# How the collector's Prometheus exporters name OTLP metrics (the default translation,
# with suffixes): units in words, ``{annotations}`` dropped, ``_total`` on monotonic counters.
_PROMETHEUS_UNITS = {"s": "seconds", "ms": "milliseconds", "By": "bytes", "1": ""}


def prometheus_name(spec: MetricSpec) -> str:
    """The metric's name in Prometheus, as the OpenTelemetry collector exports it.

    ``imagegen.stage.duration`` (unit ``s``) → ``imagegen_stage_duration_seconds``;
    ``imagegen.storage.written`` (``By``, counter) → ``imagegen_storage_written_bytes_total``.
    """
    tokens = [t for t in re.split(r"[^A-Za-z0-9]+", spec.name) if t]
    unit = "" if spec.unit.startswith("{") else _PROMETHEUS_UNITS.get(spec.unit, spec.unit)
    if unit and unit not in tokens:
        tokens.append(unit)
    if spec.kind == "counter":
        tokens = [t for t in tokens if t != "total"] + ["total"]
    return "_".join(tokens)


def prometheus_series(spec: MetricSpec) -> Sequence[str]:
    """Every series name the metric has in Prometheus (a histogram has three)."""
    name = prometheus_name(spec)
    if spec.kind == "histogram":
        return (f"{name}_bucket", f"{name}_sum", f"{name}_count")
    return (name,)
