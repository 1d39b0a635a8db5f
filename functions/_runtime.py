"""The HTTP/CloudEvents edge shared by the stage functions.

Each function file (``enhance.py``, ``render.py``, ``persist.py``, ``deadletter.py``) declares a
:class:`Stage` and hands every request to :func:`serve`. This module is the only place where
errors become status codes and where the CloudEvents SDK is used.

A function process runs one asyncio loop in a background thread; request threads submit
coroutines to it. The loop starts lazily in the process that serves (gunicorn forks workers
after importing the function), so nothing started before the fork is lost.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import threading
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import flask
from cloudevents.conversion import to_binary
from cloudevents.exceptions import GenericException as CloudEventError
from cloudevents.http import CloudEvent, from_http
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from pydantic import BaseModel

from imagegen import ImageGenService
from imagegen.errors import DependencyUnavailable, ImageGenError, InternalError, InvalidRequest
from imagegen.events import GENERATION_FAILED, dataschema, reply_id, source_for
from imagegen.models import GENERATION_ID_PATTERN, ErrorInfo, GenerationFailed
from imagegen.observability import setup_observability
from imagegen.settings import Settings
from imagegen.telemetry import instruments, tracer
from imagegen.validation import parse_model

__all__ = ["MAX_BODY_BYTES", "Incoming", "Runtime", "Stage", "serve"]

log = logging.getLogger("imagegen.functions")

MAX_BODY_BYTES = 1024 * 1024
T = TypeVar("T")


class PayloadTooLarge(InvalidRequest):
    status = 413
    code = "payload_too_large"


class UnsupportedMediaType(InvalidRequest):
    status = 415
    code = "unsupported_media_type"


class MethodNotAllowed(InvalidRequest):
    status = 405
    code = "method_not_allowed"


class RouteNotFound(InvalidRequest):
    status = 404
    code = "not_found"


@dataclass
class Incoming:
    """A parsed request: a CloudEvent (``event`` set) or a plain JSON body."""

    data: Any
    event: CloudEvent | None = None
    headers: Mapping[str, str] = field(default_factory=dict)

    @property
    def is_event(self) -> bool:
        return self.event is not None

    def attribute(self, name: str) -> Any:
        return self.event.get(name) if self.event is not None else None

    def carrier(self) -> dict[str, str]:
        """Trace context: HTTP headers, overridden by the CloudEvents tracing extension."""
        carrier = {
            k.lower(): v
            for k, v in self.headers.items()
            if k.lower() in ("traceparent", "tracestate")
        }
        for name in ("traceparent", "tracestate"):
            value = self.attribute(name)
            if value:
                carrier[name] = str(value)
        return carrier


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
    """

    name: str
    consumes: tuple[str, ...] | None
    emits: str | None
    input_model: type[BaseModel] | None
    handle: Handler
    timeout: Callable[[Settings], float]
    preload: bool = False
    png: Callable[[ImageGenService, Any], Awaitable[tuple[bytes, dict[str, str]]]] | None = None


class Runtime:
    """The per-process service, event loop and readiness of one function."""

    def __init__(self, stage: Stage) -> None:
        self.stage = stage
        self._lock = threading.Lock()
        self._pid: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._service: ImageGenService | None = None
        self._ready: Future[None] | None = None
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
            self.settings = Settings()
            setup_observability(f"imagegen-{self.stage.name}", self.settings)
            loop = asyncio.new_event_loop()
            threading.Thread(target=loop.run_forever, name="imagegen-loop", daemon=True).start()
            preload = (self.settings.model,) if self.stage.preload else ()
            self._service = ImageGenService(self.settings, preload=preload, load_on_demand=False)
            self._loop = loop
            self._ready = asyncio.run_coroutine_threadsafe(self._start(), loop)
            self._pid = os.getpid()

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
        assert self._service is not None
        return self._service

    def readiness(self) -> tuple[bool, str]:
        """(ready, reason): ready once start-up (the model load, for render) has finished."""
        self.ensure_started()
        assert self._ready is not None
        if not self.stage.preload:
            # Nothing to load: start-up is over in moments, so answer once it is.
            futures_wait([self._ready], timeout=5)
        if not self._ready.done():
            return False, "loading"
        exc = self._ready.exception()
        if exc is not None:
            return False, f"start-up failed: {exc}"
        return True, "ready"

    def run(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        """Run ``coro`` on the function's loop from a request thread."""
        self.ensure_started()
        assert self._loop is not None
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(timeout=timeout)
        except FutureTimeout:
            future.cancel()
            raise DependencyUnavailable(
                f"{self.stage.name} took longer than {timeout:.0f}s"
            ) from None


# -- requests ------------------------------------------------------------------------------


def _read_body(request: flask.Request) -> bytes:
    length = request.content_length
    if length is not None and length > MAX_BODY_BYTES:
        raise PayloadTooLarge(f"body is {length} bytes; the limit is {MAX_BODY_BYTES}")
    body = request.stream.read(MAX_BODY_BYTES + 1)
    if len(body) > MAX_BODY_BYTES:
        raise PayloadTooLarge(f"body is larger than {MAX_BODY_BYTES} bytes")
    return body


def _parse(request: flask.Request, stage: Stage) -> Incoming:
    body = _read_body(request)
    headers = {k: v for k, v in request.headers.items()}
    lowered = {k.lower(): v for k, v in headers.items()}
    content_type = lowered.get("content-type", "").split(";")[0].strip().lower()
    binary = "ce-specversion" in lowered
    structured = content_type == "application/cloudevents+json"

    if binary or structured:
        if binary and content_type not in ("", "application/json"):
            raise UnsupportedMediaType(
                f"event data must be application/json, got {content_type!r}",
                errors=[{"field": "datacontenttype", "message": "must be application/json"}],
            )
        try:
            event = from_http(headers, body)
        except CloudEventError as exc:
            raise InvalidRequest(
                f"not a valid CloudEvent: {_first_line(exc)}",
                errors=[{"field": "event", "message": _first_line(exc)}],
            ) from None
        if stage.consumes is not None and event["type"] not in stage.consumes:
            expected = " or ".join(stage.consumes)
            raise InvalidRequest(
                f"{stage.name} consumes {expected}, not {event['type']}",
                errors=[{"field": "type", "message": f"expected {expected}"}],
            )
        data = event.get_data()
        if isinstance(data, bytes | str):
            data = _json(data)
        return Incoming(data=data if data is not None else {}, event=event, headers=headers)

    if content_type != "application/json":
        raise UnsupportedMediaType(
            "send a CloudEvent, or JSON with Content-Type: application/json",
            errors=[
                {"field": "content-type", "message": f"unsupported {content_type or 'none'!r}"}
            ],
        )
    return Incoming(data=_json(body), headers=headers)


def _json(body: bytes | str) -> Any:
    try:
        return json.loads(body or b"{}")
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequest(
            "body is not valid JSON", errors=[{"field": "body", "message": _first_line(exc)}]
        ) from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


# -- responses -----------------------------------------------------------------------------


def _json_response(
    body: Any, status: int, headers: Mapping[str, str] | None = None
) -> flask.Response:
    return flask.Response(
        json.dumps(body, separators=(",", ":"), default=str),
        status=status,
        headers=dict(headers or {}),
        mimetype="application/json",
    )


def _event(
    stage: str,
    event_type: str,
    data: BaseModel,
    generation_id: str | None,
    extensions: Mapping[str, str],
) -> CloudEvent:
    attributes: dict[str, Any] = {
        "type": event_type,
        "source": source_for(stage),
        "id": reply_id(generation_id or "unknown", event_type),
        "time": datetime.now(UTC).isoformat(),
        "datacontenttype": "application/json",
        "dataschema": dataschema(event_type),
    }
    if generation_id:
        attributes["subject"] = generation_id
    attributes.update({k: v for k, v in extensions.items() if v})
    return CloudEvent(attributes, data.model_dump(mode="json"))


def _event_response(
    event: CloudEvent, status: int, extra: Mapping[str, str] | None = None
) -> flask.Response:
    headers, body = to_binary(event)
    headers = {**headers, **(extra or {})}
    return flask.Response(body, status=status, headers=headers)


def _error_response(
    exc: ImageGenError, stage: Stage, incoming: Incoming | None, gid: str | None
) -> flask.Response:
    headers: dict[str, str] = {}
    if exc.retry_after is not None:
        headers["Retry-After"] = str(max(1, round(exc.retry_after)))
    if gid is not None and not _valid_gid(gid):
        gid = None
    if incoming is not None and incoming.is_event and not exc.retryable and stage.emits is not None:
        # A failure that will not be retried: tell the platform with a generation.failed event.
        failed = GenerationFailed(
            generation_id=gid,
            stage=stage.name,  # type: ignore[arg-type]
            error=ErrorInfo(
                code=exc.code,
                message=exc.message,
                retryable=exc.retryable,
                errors=getattr(exc, "errors", []),
            ),
            failed_at=datetime.now(UTC),
        )
        event = _event(stage.name, GENERATION_FAILED, failed, gid, {})
        return _event_response(event, exc.status, headers)
    return _json_response(exc.to_dict(), exc.status, headers)


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
            return _json_response({"status": "alive", "stage": stage.name}, 200)
        if path == "/readyz":
            ready, reason = runtime.readiness()
            body = {"ready": ready, "status": reason, "stage": stage.name}
            return _json_response(
                body, 200 if ready else 503, {} if ready else {"Retry-After": "5"}
            )
        if path == "/openapi.json" and request.method == "GET":
            from _openapi import STAGE_MODELS, document

            if stage.name in STAGE_MODELS:
                return _json_response(document(stage.name), 200)
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
        return _error_response(exc, stage, exchange.incoming, exchange.gid)
    except Exception:
        log.exception(
            "unexpected error", extra={"stage": stage.name, "generation_id": exchange.gid}
        )
        error = InternalError("internal error; see the function's logs")
        return _error_response(error, stage, exchange.incoming, exchange.gid)


def _invoke(request: flask.Request, runtime: Runtime, exchange: _Exchange) -> flask.Response:
    """POST /: parse, validate, run the stage, and reply with an event or JSON."""
    stage = runtime.stage
    # 1. Parse the event or body; the subject is known before the data is valid.
    incoming = exchange.incoming = _parse(request, stage)
    subject = incoming.attribute("subject")
    if subject and _valid_gid(str(subject)):
        exchange.gid = str(subject)
    if stage.preload:
        ready, reason = runtime.readiness()
        if not ready:
            raise DependencyUnavailable(f"{stage.name} is not ready ({reason})", retry_after=15)

    # 2. Validate.
    data = parse_model(stage.input_model, incoming.data) if stage.input_model else incoming.data
    gid = exchange.gid = generation_id_of(incoming, data)
    if gid is not None and not _valid_gid(gid):
        raise InvalidRequest(
            f"invalid generation id {gid!r}",
            errors=[{"field": "subject", "message": f"must match {GENERATION_ID_PATTERN}"}],
        )

    # 3. Run the stage inside the caller's trace.
    timeout = stage.timeout(runtime.settings or Settings())
    accept = request.headers.get("Accept", "")
    exchange.dispatched = True
    if stage.png is not None and not incoming.is_event and "image/png" in accept:
        work_png = stage.png(runtime.service, data)
        (png, png_headers), _ = runtime.run(_in_trace(stage, incoming, work_png), timeout)
        return flask.Response(png, status=200, headers=png_headers, mimetype="image/png")
    work = stage.handle(runtime.service, data, incoming)
    result, carrier = runtime.run(_in_trace(stage, incoming, work), timeout)

    # 4. Reply.
    body = result.model_dump(mode="json")
    if stage.emits is None:
        return _json_response(body, 202 if incoming.is_event else 200)
    if not incoming.is_event:
        return _json_response(body, 200, carrier)
    extensions = dict(carrier)
    location = getattr(result, "location", None)
    if location:
        extensions["dataref"] = location
    out_gid = getattr(result, "generation_id", gid)
    return _event_response(_event(stage.name, stage.emits, result, out_gid, extensions), 200)


def _valid_gid(gid: str) -> bool:
    return re.fullmatch(GENERATION_ID_PATTERN, gid) is not None


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
                if subject and _valid_gid(str(subject)):
                    span.set_attribute("imagegen.generation_id", str(subject))
            result = await work
            carrier: dict[str, str] = {}
            propagate.inject(carrier)
            return result, carrier
    finally:
        otel_context.detach(token)
