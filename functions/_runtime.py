"""What the stage functions share: the stage declaration, the process runtime, the handler.

Each function file (``enhance.py``, ``render.py``, ``persist.py``, ``deadletter.py``) declares a
:class:`Stage` and hands every request to :func:`serve`. :mod:`_http` parses requests and writes
replies; errors become status codes only there.

A function process runs one asyncio loop in a background thread; request threads submit
coroutines to it. The loop starts lazily in the process that serves (gunicorn forks workers
after importing the function), so nothing started before the fork is lost.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Awaitable, Callable, Coroutine
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass
from typing import Any, TypeVar

import flask
from _http import (
    Incoming,
    MethodNotAllowed,
    RouteNotFound,
    error_response,
    event_response,
    json_response,
    make_event,
    parse_anything,
    parse_request,
    valid_generation_id,
)
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from pydantic import BaseModel, ValidationError

from imagegen import ImageGenService
from imagegen.errors import DependencyUnavailable, ImageGenError, InternalError, InvalidRequest
from imagegen.models import GENERATION_ID_PATTERN, derive_generation_id
from imagegen.observability import setup_observability
from imagegen.settings import Settings
from imagegen.telemetry import instruments, tracer
from imagegen.validation import field_errors, parse_model

__all__ = ["Incoming", "Runtime", "Stage", "serve"]

log = logging.getLogger("imagegen.functions")

MAX_BODY_BYTES = 1024 * 1024
T = TypeVar("T")


Handler = Callable[[ImageGenService, Any, Incoming], Awaitable[BaseModel]]


@dataclass(frozen=True)
class Stage:
    """What one function consumes, emits and does.

    Attributes:
        name: ``enhance``, ``render``, ``persist`` or ``deadletter``.
        consumes: The CloudEvents types accepted (None: any type).
        emits: The reply type (None: no reply event, 202).
        input_model: Model of the request data.
        handle: ``await handle(service, data, incoming)`` → the reply data.
        timeout: Seconds a request may take before a retryable 503.
        preload: Whether the model is loaded at start-up (render).
        png: Optional handler for ``Accept: image/png`` plain requests (render).
        starts_generations: A request event without a subject gets the generation id
            derived from its ``source`` + ``id`` (enhance).
        sink: Accept whatever arrives, unvalidated (the dead-letter sink must lose nothing).
    """

    name: str
    consumes: tuple[str, ...] | None
    emits: str | None
    input_model: type[BaseModel] | None
    handle: Handler
    timeout: Callable[[Settings], float]
    preload: bool = False
    png: Callable[[ImageGenService, Any], Awaitable[tuple[bytes, dict[str, str]]]] | None = None
    starts_generations: bool = False
    sink: bool = False


class Runtime:
    """The per-process service, event loop and readiness of one function."""

    def __init__(self, stage: Stage) -> None:
        self.stage = stage
        self._lock = threading.Lock()
        self._pid: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._service: ImageGenService | None = None
        self._ready: Future[None] | None = None
        self._broken: str | None = None  # why start-up failed, once it has
        self.settings: Settings | None = None
        # gunicorn imports the function, then forks its workers: nothing may start before the
        # fork (threads die, CUDA cannot be re-initialised), so each worker starts on its own,
        # and a stage with a model begins loading it right away rather than on a request.
        os.register_at_fork(after_in_child=self._after_fork)

    def _after_fork(self) -> None:
        self._pid = None
        if self.stage.preload:
            self.ensure_started()

    def ensure_started(self) -> None:
        """Start the loop, the service and (render) the model load, once per process."""
        if self._pid == os.getpid():
            return
        with self._lock:
            if self._pid == os.getpid():
                return
            self._pid = os.getpid()
            try:
                self.settings = Settings()
                setup_observability(f"imagegen-{self.stage.name}", self.settings)
                preload = (self.settings.model,) if self.stage.preload else ()
                self._service = ImageGenService(
                    self.settings, preload=preload, load_on_demand=False
                )
            except Exception as exc:
                # A configuration error: every request would fail the same way until the
                # environment is fixed, so say so once and answer 503 (retried), never 400.
                self._broken = _describe_startup_error(exc)
                log.error("start-up failed: %s", self._broken, extra={"stage": self.stage.name})
                return
            loop = asyncio.new_event_loop()
            threading.Thread(target=loop.run_forever, name="imagegen-loop", daemon=True).start()
            self._loop = loop
            self._ready = asyncio.run_coroutine_threadsafe(self._start(), loop)

    async def _start(self) -> None:
        assert self._service is not None
        try:
            await self._service.__aenter__()
        except Exception:
            log.exception("start-up failed", extra={"stage": self.stage.name})
            raise

    @property
    def service(self) -> ImageGenService:
        self.ensure_started()
        self._raise_if_broken()
        assert self._service is not None
        return self._service

    def _raise_if_broken(self) -> None:
        if self._broken is not None:
            raise DependencyUnavailable(
                f"{self.stage.name} could not start: {self._broken}", retry_after=30
            )

    def readiness(self) -> tuple[bool, str]:
        """(ready, reason): ready once start-up (the model load, for render) has finished."""
        self.ensure_started()
        if self._broken is not None:
            return False, "start-up failed"
        assert self._ready is not None
        if not self.stage.preload:
            # Nothing to load: start-up is over in moments, so answer once it is.
            futures_wait([self._ready], timeout=5)
        if not self._ready.done():
            return False, "loading"
        if self._ready.exception() is not None:
            return False, "start-up failed"  # the reason is in the log
        return True, "ready"

    def run(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        """Run ``coro`` on the function's loop from a request thread."""
        self.ensure_started()
        self._raise_if_broken()
        assert self._loop is not None
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(timeout=timeout)
        except FutureTimeout:
            future.cancel()
            raise DependencyUnavailable(
                f"{self.stage.name} took longer than {timeout:.0f}s"
            ) from None


def _describe_startup_error(exc: Exception) -> str:
    """What was wrong, naming settings but never echoing their values."""
    if isinstance(exc, ValidationError):
        return "invalid settings: " + ", ".join(e["field"] for e in field_errors(exc))
    if isinstance(exc, ImageGenError):
        fields = getattr(exc, "fields", [])
        return f"invalid setting: {', '.join(fields)}" if fields else exc.message
    return type(exc).__name__


# -- the handler ---------------------------------------------------------------------------


def generation_id_of(incoming: Incoming, data: Any) -> str | None:
    """The generation id: the data's, else the event's subject."""
    gid = getattr(data, "generation_id", None)
    subject = incoming.attribute("subject")
    if gid and subject and subject != gid:
        raise InvalidRequest(
            f"subject {subject!r} does not match generation_id {gid!r}",
            errors=[{"field": "subject", "message": "must equal data.generation_id"}],
        )
    found = gid or subject
    return str(found) if found else None


@dataclass
class _Exchange:
    """What is known of one request so far, for the error reply."""

    incoming: Incoming | None = None
    gid: str | None = None
    dispatched: bool = False  # the stage ran: it counted its own outcome


def serve(request: flask.Request, runtime: Runtime) -> flask.Response:
    """Answer one HTTP request for ``runtime``'s stage; never raises, never leaks a trace."""
    stage = runtime.stage
    exchange = _Exchange()
    try:
        path = request.path.rstrip("/") or "/"
        if path == "/healthz":
            runtime.ensure_started()
            return json_response({"status": "alive", "stage": stage.name}, 200)
        if path == "/readyz":
            ready, reason = runtime.readiness()
            body = {"ready": ready, "status": reason, "stage": stage.name}
            return json_response(body, 200 if ready else 503, {} if ready else {"Retry-After": "5"})
        if path == "/openapi.json" and request.method == "GET":
            from _openapi import STAGE_MODELS, document

            if stage.name in STAGE_MODELS:
                return json_response(document(stage.name), 200)
        if path != "/":
            raise RouteNotFound(f"no route {request.path!r}; POST / with an event or JSON")
        if request.method != "POST":
            raise MethodNotAllowed(f"{request.method} is not allowed; POST / instead")
        return _invoke(request, runtime, exchange)
    except ImageGenError as exc:
        level = logging.WARNING if exc.status < 500 else logging.ERROR
        extra = {"stage": stage.name, "generation_id": exchange.gid, "status": exc.status}
        log.log(level, "request failed: %s", exc.message, extra=extra)
        if not exchange.dispatched and request.method == "POST":
            # Refused before the stage ran (bad input, not ready): count it here.
            labels = {"stage": stage.name, "outcome": "failed", "reason": exc.code}
            instruments().generations.add(1, labels)
        return error_response(
            exc,
            stage=stage.name,
            replies=stage.emits is not None,
            incoming=exchange.incoming,
            gid=exchange.gid,
        )
    except Exception:
        log.exception(
            "unexpected error", extra={"stage": stage.name, "generation_id": exchange.gid}
        )
        error = InternalError("internal error; see the function's logs")
        return error_response(
            error,
            stage=stage.name,
            replies=stage.emits is not None,
            incoming=exchange.incoming,
            gid=exchange.gid,
        )


def _invoke(request: flask.Request, runtime: Runtime, exchange: _Exchange) -> flask.Response:
    """POST /: parse, validate, run the stage, and reply with an event or JSON."""
    stage = runtime.stage
    # 1. Parse and validate; the generation is known before the data is valid.
    if stage.sink:
        incoming = exchange.incoming = parse_anything(request)
        data = incoming.data
    else:
        incoming = exchange.incoming = parse_request(
            request, stage=stage.name, consumes=stage.consumes
        )
        exchange.gid = _generation_of_event(stage, incoming)
        if stage.preload:
            ready, reason = runtime.readiness()
            if not ready:
                raise DependencyUnavailable(f"{stage.name} is not ready ({reason})", retry_after=15)
        data = parse_model(stage.input_model, incoming.data) if stage.input_model else incoming.data
        exchange.gid = generation_id_of(incoming, data) or exchange.gid
        if exchange.gid is not None and not valid_generation_id(exchange.gid):
            raise InvalidRequest(
                f"invalid generation id {exchange.gid!r}",
                errors=[{"field": "subject", "message": f"must match {GENERATION_ID_PATTERN}"}],
            )

    # 2. Run the stage inside the caller's trace.
    timeout = stage.timeout(runtime.settings or Settings())
    exchange.dispatched = True
    if (
        stage.png is not None
        and not incoming.is_event
        and "image/png" in request.headers.get("Accept", "")
    ):
        work_png = stage.png(runtime.service, data)
        (png, png_headers), _ = runtime.run(_in_trace(stage, incoming, work_png), timeout)
        return flask.Response(png, status=200, headers=png_headers, mimetype="image/png")
    work = stage.handle(runtime.service, data, incoming)
    result, carrier = runtime.run(_in_trace(stage, incoming, work), timeout)

    # 3. Reply: the next event, or JSON.
    body = result.model_dump(mode="json")
    if stage.emits is None:
        return json_response(body, 202 if incoming.is_event else 200)
    if not incoming.is_event:
        return json_response(body, 200, carrier)
    extensions = dict(carrier)
    location = getattr(result, "location", None)
    if location:
        extensions["dataref"] = location
    out_gid = getattr(result, "generation_id", exchange.gid)
    return event_response(make_event(stage.name, stage.emits, result, out_gid, extensions), 200)


def _generation_of_event(stage: Stage, incoming: Incoming) -> str | None:
    """The generation an event belongs to, from its subject (or, for a request, source + id)."""
    subject = incoming.attribute("subject")
    if subject is not None:
        return str(subject) if valid_generation_id(str(subject)) else None
    if incoming.is_event and stage.starts_generations:
        return derive_generation_id(
            str(incoming.attribute("source")), str(incoming.attribute("id"))
        )
    return None


async def _in_trace(
    stage: Stage, incoming: Incoming, work: Awaitable[T]
) -> tuple[T, dict[str, str]]:
    """Await ``work`` inside the caller's trace; return its result and the trace to pass on."""
    token = otel_context.attach(propagate.extract(incoming.carrier()))
    try:
        kind = trace.SpanKind.CONSUMER if incoming.is_event else trace.SpanKind.SERVER
        with tracer().start_as_current_span(f"{stage.name} process", kind=kind) as span:
            span.set_attribute("imagegen.stage", stage.name)
            if incoming.event is not None:
                for name in ("id", "source", "type", "subject"):
                    value = incoming.attribute(name)
                    if value:
                        span.set_attribute(f"cloudevents.event_{name}", str(value))
                span.set_attribute(
                    "cloudevents.event_spec_version", str(incoming.attribute("specversion"))
                )
                subject = incoming.attribute("subject")
                if subject and valid_generation_id(str(subject)):
                    span.set_attribute("imagegen.generation_id", str(subject))
            result = await work
            carrier: dict[str, str] = {}
            propagate.inject(carrier)
            return result, carrier
    finally:
        otel_context.detach(token)
