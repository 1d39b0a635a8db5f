"""One stage as an HTTP function, in func-python's shape: start, alive, ready, handle.

functions-framework owns the app, the server and the workers; this adapter owns the process's
event loop and service, and turns each request into one call of the stage's handler.
:mod:`_binding` turns bytes into a :class:`~_binding.Message` and outcomes into replies.

The loop and the service start on a process's first request (a probe, in a cluster), never at
import: gunicorn imports the function and then forks, and neither threads nor CUDA survive it.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import threading
from collections.abc import Awaitable, Iterator
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager
from typing import Any, TypeVar

import flask
from _binding import (
    MAX_BODY_BYTES,
    Message,
    Reply,
    error_reply,
    event_reply,
    json_reply,
    parse,
    parse_leniently,
)
from werkzeug.exceptions import RequestEntityTooLarge

from imagegen.errors import (
    ConfigurationError,
    DependencyUnavailable,
    ImageGenError,
    InternalError,
    InvalidRequest,
    MethodNotAllowed,
    PayloadTooLarge,
    RouteNotFound,
)
from imagegen.events import reply_attributes
from imagegen.identity import generation_id, identify
from imagegen.stages import Call, Route, RouteCall, Stage
from imagegen.stages import get as get_stage
from imagegen.telemetry import instruments, stage_span
from imagegen.validation import parse_model

__all__ = ["Function", "entry_point"]

log = logging.getLogger("imagegen.functions")
T = TypeVar("T")


class Function:
    """The process-wide state of one stage's function: settings, service, loop, readiness."""

    def __init__(self, stage: Stage) -> None:
        self.stage = stage
        self._lock = threading.Lock()
        self._pid: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._service: Any = None
        self._started: Future[None] | None = None
        self._broken: ConfigurationError | None = None
        self._timeout = 60.0
        self._auth: Any = None  # an imagegen.auth.Authenticator once started

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Read the settings, build the service and (render) begin loading the model; once."""
        if self._pid == os.getpid():
            return
        with self._lock, _long_lived():
            if self._pid == os.getpid():
                return
            self._broken = None  # what a parent process found says nothing of this one
            from imagegen.observability import setup_observability
            from imagegen.service import ImageGenService
            from imagegen.settings import Settings

            try:
                settings = Settings()
                setup_observability(f"imagegen-{self.stage.name}", settings)
                preload = (settings.model,) if self.stage.loads_model else ()
                self._service = ImageGenService(settings, preload=preload, load_on_demand=False)
                self._timeout = self.stage.timeout(settings)
                from imagegen.auth import Authenticator

                self._auth = Authenticator(settings, function=self.stage.name)
            except Exception as exc:
                # Every request would fail alike until the environment is fixed: say it once,
                # and answer 503 (not ready, retried), never 400.
                self._broken = ConfigurationError.of(f"{self.stage.name} could not start", exc)
                log.error("start-up failed: %s", self._broken.message, extra=self._extra())
                self._pid = os.getpid()
                return
            loop = asyncio.new_event_loop()
            threading.Thread(target=loop.run_forever, name="imagegen-loop", daemon=True).start()
            self._loop = loop
            self._started = asyncio.run_coroutine_threadsafe(self._enter(), loop)
            # Last: a request thread that sees this process started finds it whole.
            self._pid = os.getpid()
        if not self.stage.loads_model and self._started is not None:
            self._started.exception()  # nothing to load: over in moments

    async def _enter(self) -> None:
        try:
            await self._service.__aenter__()
        except Exception:
            log.exception("start-up failed", extra=self._extra())
            raise

    def alive(self) -> bool:
        """Whether the process can serve at all (it always can: failures show in ``ready``)."""
        self.start()
        return True

    def ready(self) -> tuple[bool, str]:
        """(ready, why): ready once start-up, the model load included, has succeeded."""
        self.start()
        if self._broken is not None or self._started is None:
            return False, "start-up failed"
        if not self._started.done():
            return False, "loading"
        if self._started.exception() is not None:
            return False, "start-up failed"  # the reason is in the log
        return True, "ready"

    def _check_ready(self) -> None:
        """Raise the 503 of a process that cannot serve: broken settings, or not ready yet."""
        ready, why = self.ready()
        if self._broken is not None:
            raise self._broken
        if not ready:
            raise DependencyUnavailable(f"{self.stage.name} is not ready ({why})", retry_after=15)

    def _run(self, work: Awaitable[T], traced: Message | None = None) -> tuple[T, dict[str, str]]:
        """Run ``work`` on the process's loop within the stage's time budget; with ``traced``,
        inside that message's trace. Returns the result and the trace context to pass on.
        """
        assert self._loop is not None

        async def run() -> tuple[T, dict[str, str]]:
            if traced is None:
                return await work, {}
            # A task of its own on the loop: what the span sets stays in its context.
            carrier, attributes = traced.carrier(), traced.attributes
            with stage_span(self.stage.name, attributes, carrier, event=traced.is_event) as out:
                return await work, out

        future = asyncio.run_coroutine_threadsafe(run(), self._loop)
        try:
            return future.result(timeout=self._timeout)
        except FutureTimeout:
            future.cancel()
            raise DependencyUnavailable(
                f"{self.stage.name} took longer than {self._timeout:.0f}s"
            ) from None

    def _extra(self, **fields: Any) -> dict[str, Any]:
        return {"stage": self.stage.name, **fields}

    # -- requests -----------------------------------------------------------------------------

    def handle(self, message: Message, *, accept: str = "") -> Reply:
        """Run the stage on one message; never raises."""
        stage = self.stage
        gid: str | None = None
        dispatched = False
        try:
            # 1. Check the input; the generation is known before the data is valid.
            if stage.input_model is None:  # the sink takes anything as it comes
                self._check_ready()
                data: Any = message.data
                call = Call(attributes=message.attributes, headers=message.headers, raw=message.raw)
            else:
                gid = _generation_hint(stage, message)
                self._check_ready()
                if stage.direct is not None and not message.is_event:
                    body = parse_model(stage.direct.model, message.data)
                    data = stage.direct.complete(self._service.settings, body)
                else:
                    data = parse_model(stage.input_model, message.data)
                call = identify(data, message.attributes, starts=stage.starts_generations)
                gid = call.generation_id
            # 2. Run the stage inside the caller's trace.
            dispatched = True
            if stage.png is not None and not message.is_event and "image/png" in accept:
                (png, headers), _ = self._run(stage.png(self._service, data), message)
                return Reply(200, png, {"Content-Type": "image/png", **headers})
            result, extensions = self._run(stage.handler(self._service, data, call), message)
            # 3. Reply: the next event, JSON, or nothing.
            if result is None or stage.emits is None:
                return Reply(202)
            if not message.is_event:
                return json_reply(result.model_dump(mode="json"), 200)
            if location := getattr(result, "location", None):
                extensions["dataref"] = location
            gid = getattr(result, "generation_id", gid)
            return event_reply(
                reply_attributes(stage.name, stage.emits, result, gid, extensions), result
            )
        except Exception as exc:
            return self._failed(self._error(exc, generation_id=gid), message, gid, dispatched)

    def _error(self, exc: Exception, **fields: Any) -> ImageGenError:
        """``exc`` as what the caller is told; anything unforeseen is logged and hidden."""
        if isinstance(exc, ImageGenError):
            return exc
        log.exception("unexpected error", extra=self._extra(**fields))
        return InternalError("internal error; see the function's logs")

    def _failed(
        self, exc: ImageGenError, message: Message | None, gid: str | None, dispatched: bool
    ) -> Reply:
        level = logging.WARNING if exc.status < 500 else logging.ERROR
        extra = self._extra(generation_id=gid, status=exc.status)
        log.log(level, "request failed: %s", exc.message, extra=extra)
        if not dispatched:
            # Refused before the stage ran (bad input, not ready): the stage counted nothing.
            labels = {"stage": self.stage.name, "outcome": "failed", "reason": exc.code}
            instruments().generations.add(1, labels)
        # A stage that emits nothing never answers with an event: beside the stage that
        # consumes the same type, its generation.failed would report the generation twice.
        answered = message if self.stage.emits is not None else None
        return error_reply(exc, stage=self.stage.name, message=answered, generation_id=gid)

    # -- the HTTP edge ------------------------------------------------------------------------

    def __call__(self, request: flask.Request) -> flask.Response:
        """Route one request: probes, the OpenAPI document, the stage's routes, ``POST /``."""
        reply = self._dispatch(request)
        return flask.Response(reply.body, status=reply.status, headers=dict(reply.headers))

    def _dispatch(self, request: flask.Request) -> Reply:
        path, method = request.path.rstrip("/") or "/", request.method
        if path == "/healthz":  # the liveness probe is a process's first request: it starts
            return json_reply(
                {"status": "alive", "stage": self.stage.name}, 200 if self.alive() else 503
            )
        if path == "/readyz":
            ready, why = self.ready()
            body = {"ready": ready, "status": why, "stage": self.stage.name}
            return json_reply(body, 200 if ready else 503, {} if ready else {"Retry-After": "5"})
        if path == "/openapi.json" and method == "GET":
            from imagegen.openapi import document

            return json_reply(document(self.stage), 200)
        routes = [(r, p) for r in self.stage.routes if (p := r.match(path)) is not None]
        chosen = [(r, p) for r, p in routes if r.method == method]
        refusal: ImageGenError | None = None
        if routes and not chosen:
            allowed = ", ".join(r.method for r, _ in routes)
            refusal = MethodNotAllowed(f"{method} is not allowed: {allowed}")
        elif not routes and path != "/":
            refusal = RouteNotFound(f"no route {request.path!r}; POST / instead")
        elif not routes and method != "POST":
            refusal = MethodNotAllowed(f"{method} is not allowed; POST / instead")
        if refusal is not None:
            return error_reply(refusal, stage=self.stage.name, message=None, generation_id=None)
        if refused := self._refused(request):
            return refused
        return self._route(*chosen[0], request) if chosen else self._post(request)

    def _refused(self, request: flask.Request) -> Reply | None:
        """The 401/403 (or 503) for a caller who may not invoke; None for one who may.

        Probes and the OpenAPI document never get here. The token is never logged: errors
        name what was wrong with it, not what it was.
        """
        self.start()
        if self._auth is None:
            return None  # start-up failed: the request is answered 503
        try:
            self._auth.authenticate(request.headers.get("Authorization"))
        except ImageGenError as exc:
            reply = self._failed(exc, None, None, dispatched=False)
            if challenge := getattr(exc, "challenge", None):
                return Reply(
                    reply.status, reply.body, {**reply.headers, "WWW-Authenticate": challenge}
                )
            return reply
        return None

    def _route(self, route: Route, params: dict[str, str], request: flask.Request) -> Reply:
        """One of the stage's own routes: the query checked, the handler run, JSON out.

        A query is no generation: nothing for the generation counters (``dispatched``).
        """
        gid = params.get("generation_id")
        try:
            self._check_ready()
            query = None
            if route.query_model is not None:
                query = parse_model(route.query_model, request.args.to_dict())
            elif request.args:
                raise InvalidRequest(
                    f"{route.path} takes no query parameters",
                    errors=[{"field": n, "message": "unknown parameter"} for n in request.args],
                )
            result, _ = self._run(
                route.handler(self._service, RouteCall(params=params, query=query))
            )
            return json_reply(result.model_dump(mode="json"), route.status)
        except Exception as exc:
            return self._failed(self._error(exc, route=route.path), None, gid, dispatched=True)

    def _post(self, request: flask.Request) -> Reply:
        try:
            message = _message(request, self.stage)
        except ImageGenError as exc:
            return self._failed(exc, None, None, dispatched=False)
        return self.handle(message, accept=request.headers.get("Accept", ""))


def _message(request: flask.Request, stage: Stage) -> Message:
    """The request as a :class:`Message`, its body read within ``MAX_BODY_BYTES``.

    The sink keeps what fits and marks the rest cut; every other stage refuses more (413).
    """
    if stage.input_model is None:
        body = request.stream.read(MAX_BODY_BYTES + 1)
        cut = len(body) > MAX_BODY_BYTES
        return parse_leniently(dict(request.headers), body[:MAX_BODY_BYTES], truncated=cut)
    # werkzeug refuses a body past the limit; lifted again for functions-framework, which
    # drains the body after every request.
    request.max_content_length = MAX_BODY_BYTES
    try:
        body = request.get_data()
    except RequestEntityTooLarge:
        raise PayloadTooLarge(f"the body is larger than {MAX_BODY_BYTES} bytes") from None
    finally:
        request.max_content_length = None
    return parse(dict(request.headers), body, consumes=stage.consumes)


@contextmanager
def _long_lived() -> Iterator[None]:
    """Collection paused while start-up loads what lives as long as the process, then frozen.

    Modules, classes, schemas and settings are never garbage, yet a full collection during
    start-up walks every one of them (tens of thousands of objects) and, in a forked worker,
    copies each page the fork shared. Frozen, they are left out of every later collection:
    Python's ``gc.freeze`` advice for servers that fork.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if enabled:
            gc.enable()


def _generation_hint(stage: Stage, message: Message) -> str | None:
    """The generation named by the event alone, for a failure reply before the data is valid."""
    try:
        return generation_id(None, message.attributes, starts=stage.starts_generations)
    except ImageGenError:
        return None


def entry_point(name: str) -> Any:
    """The functions-framework HTTP target of the stage called ``name``."""
    function = Function(get_stage(name))
    gc.freeze()  # gunicorn forks after this import: what it loaded stays shared, unscanned

    def serve(request: flask.Request) -> flask.Response:
        return function(request)

    serve.__name__ = serve.__qualname__ = name
    serve.function = function  # type: ignore[attr-defined]
    return serve
