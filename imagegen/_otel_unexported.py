"""Tracing in a process that exports no spans: span contexts, nothing recorded.

Without an exporter nothing reads a span's name, attributes, events or times, but its ids are
still used: the JSON logs carry ``trace_id`` and ``span_id``, and each reply passes
``traceparent`` on, so the next stage's spans (exported there, perhaps) join the same trace.
The SDK's recording spans keep all of it, at some 30 µs a span: about a sixth of enhance's
CPU time per request went to spans nobody would see (docs/benchmarks.md). The tracer here
makes each span's context exactly as the SDK's ``Tracer.start_span`` does, and keeps only
what the logs read of a span: the generation's id and stage (``INHERITED_ATTRIBUTES``), handed
from parent to child as ``GenerationSpanProcessor`` hands them with the SDK.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, TraceFlags
from opentelemetry.util._decorator import _agnosticcontextmanager

from imagegen._otel_exporters import env
from imagegen.telemetry import INHERITED_ATTRIBUTES

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace.sampling import Sampler
    from opentelemetry.util.types import Attributes

__all__ = ["UnexportedTracerProvider"]

_DEFAULT_SAMPLER = "parentbased_always_on"  # the SDK's default for OTEL_TRACES_SAMPLER


class UnexportedTracerProvider(trace.TracerProvider):
    """Every tracer's spans record nothing but have their own ids, and the generation's id
    and stage, for the logs.

    The sampled flag each span passes on is the one the SDK would give it, so a next stage
    that exports spans samples them as it would behind an SDK: with the default sampler
    (``parentbased_always_on``) a trace started here is sampled, and a parent's flag is
    kept; another ``OTEL_TRACES_SAMPLER`` is the SDK's own sampler, asked per span.
    """

    def __init__(self) -> None:
        self.sampler: Sampler | None = None
        if (env("OTEL_TRACES_SAMPLER").lower() or _DEFAULT_SAMPLER) != _DEFAULT_SAMPLER:
            from opentelemetry.sdk.trace import TracerProvider

            # The SDK's choice from OTEL_TRACES_SAMPLER(_ARG), warnings included.
            self.sampler = TracerProvider(shutdown_on_exit=False).sampler
        self._tracer = _Tracer(self.sampler)

    def get_tracer(self, *args: Any, **kwargs: Any) -> trace.Tracer:
        return self._tracer

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        """Nothing is held back to flush."""
        return True

    def shutdown(self) -> None:
        """Nothing to stop."""


class _Tracer(trace.Tracer):
    def __init__(self, sampler: Sampler | None) -> None:
        self._sampler = sampler

    def start_span(
        self,
        name: str,
        context: Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: Attributes = None,
        links: Sequence[trace.Link] | None = (),
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
    ) -> trace.Span:
        # As opentelemetry-sdk's Tracer.start_span (src/opentelemetry/sdk/trace/__init__.py)
        # makes the span context, with its RandomIdGenerator's ids (sdk/trace/id_generator.py).
        parent_span = trace.get_current_span(context)
        parent = parent_span.get_span_context()
        if parent.is_valid:
            trace_id = parent.trace_id
            random_trace_id = parent.trace_flags.random_trace_id
        else:
            trace_id = _random_id(128)
            random_trace_id = True  # RandomIdGenerator.is_trace_id_random()
        if self._sampler is None:
            # ParentBased(ALWAYS_ON) (sdk/trace/sampling.py): a parent's decision, else sampled;
            # ALWAYS_ON and ALWAYS_OFF both keep the parent's trace state.
            sampled = parent.trace_flags.sampled if parent.is_valid else True
            trace_state = parent.trace_state if parent.is_valid else None
        else:
            result = self._sampler.should_sample(
                context, trace_id, name, kind, attributes, links or ()
            )
            sampled = result.decision.is_sampled()  # type: ignore[no-untyped-call]
            trace_state = result.trace_state
        flags = TraceFlags.SAMPLED if sampled else TraceFlags.DEFAULT
        if random_trace_id:
            flags |= TraceFlags.RANDOM_TRACE_ID
        # Its own attributes first, then its parent's (GenerationSpanProcessor's rule).
        kept = _kept(getattr(parent_span, "attributes", None)) | _kept(attributes)
        span_context = SpanContext(
            trace_id,
            _random_id(64),
            is_remote=False,
            trace_flags=TraceFlags(flags),
            trace_state=trace_state,
        )
        return _Span(span_context, kept)

    @_agnosticcontextmanager  # as the API's tracers: a context manager or a decorator
    def start_as_current_span(
        self, name: str, *args: Any, end_on_exit: bool = True, **kwargs: Any
    ) -> Iterator[trace.Span]:
        """:meth:`start_span` (the same parameters), as the current span while in use."""
        span = self.start_span(name, *args, **kwargs)
        with trace.use_span(span, end_on_exit=end_on_exit) as current:
            yield current


class _Span(NonRecordingSpan):
    """A span context, and of its attributes only the generation's id and stage."""

    def __init__(self, context: SpanContext, attributes: dict[str, Any]) -> None:
        super().__init__(context)
        self._attributes = attributes

    @property
    def attributes(self) -> Mapping[str, Any]:
        """What the logs read of the span (:data:`INHERITED_ATTRIBUTES`)."""
        return self._attributes

    def set_attribute(self, key: str, value: Any) -> None:
        if key in INHERITED_ATTRIBUTES:
            self._attributes[key] = value

    def set_attributes(self, attributes: Mapping[str, Any]) -> None:
        self._attributes |= _kept(attributes)


def _kept(attributes: Mapping[str, Any] | None) -> dict[str, Any]:
    if not attributes:
        return {}
    return {key: attributes[key] for key in INHERITED_ATTRIBUTES if key in attributes}


def _random_id(bits: int) -> int:
    """A random id of ``bits`` bits, never 0 (the invalid id)."""
    while not (value := random.getrandbits(bits)):
        pass
    return value
