"""One stage as an HTTP function, in func-python's shape: start, alive, ready, handle.

functions-framework owns the app, the server and the workers; this adapter owns the process's
event loop and service, and turns each request into one call of the stage's handler.
:mod:`_binding` turns bytes into a :class:`~_binding.Message` and outcomes into replies.

The loop and the service start on a process's first request (a probe, in a cluster), never at
import: gunicorn imports the function and then forks, and neither threads nor CUDA survive it.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import io
import logging
import os
import threading
import time
from collections.abc import Awaitable, Coroutine, Mapping
from concurrent.futures import CancelledError, Future
from typing import TYPE_CHECKING, Any, TypeVar

import _process  # first: it sets up the process the library loads into
import flask
from _binding import (
    MAX_BODY_BYTES,
    Message,
    Reply,
    error_headers,
    error_reply,
    event_reply,
    fit_error_body,
    is_delivery,
    json_reply,
    parse,
    parse_leniently,
    trace_carrier,
)
from opentelemetry import context as otel_context
from werkzeug.exceptions import HTTPException
from werkzeug.routing import WebsocketMismatch

from imagegen.auth.oidc import KeyNotFetched
from imagegen.errors import (
    ConfigurationError,
    DependencyUnavailable,
    ImageGenError,
    InternalError,
    InvalidRequest,
    MethodNotAllowed,
    Overloaded,
    PayloadTooLarge,
    RouteNotFound,
    first_line,
)
from imagegen.events import reply_attributes
from imagegen.identity import generation_id, identify, valid_generation_id
from imagegen.stages import Call, Route, RouteCall, Stage
from imagegen.stages import get as get_stage
from imagegen.telemetry import (
    HttpRequest,
    answered,
    count_from_zero,
    instruments,
    record_error,
    server_span,
    stage_span,
    trace_extension,
    within_trace,
)
from imagegen.validation import parse_model

if TYPE_CHECKING:
    from imagegen.settings import Settings

__all__ = ["Function", "entry_point"]

log = logging.getLogger("imagegen.functions")
_READ_ONLY = frozenset({"/healthz", "/readyz", "/openapi.json"})
"""Paths every function serves to GET (and HEAD): the probes and the OpenAPI document."""
_BODY_READ = "imagegen.body_read"
"""The WSGI environ key :func:`_read_body` sets once it has read a request's body to its end."""
T = TypeVar("T")


CLOSE_SECONDS = 6.0
"""Seconds the service of a process gets to close as the process exits (a worker at SIGTERM,
once its requests have ended): what the stage holds is released (the plugins' ``aclose``,
Ollama's connections), and a close that hangs keeps the process no longer than this. A second
more than each plugin's own bound (``imagegen.plugins._running.CLOSE_SECONDS``, not imported:
render and persist load no plugins), so a plugin whose close hangs is given up on, and named,
by that bound first."""

START_AGAIN_SECONDS = 30.0
"""Seconds after a failed start-up before a probe or request begins it again (the model load
of render, the storage check): a process recovers once what it waited for is there, without
the startup probe's restart. Each try that fails logs its line."""


def _importing(exc: BaseException) -> str | None:
    """The module whose import ``exc``, or an exception it was raised from, came out of (a
    frame running a module's body: the outermost one, the module the code asked for), if any.
    """
    seen: set[int] = set()
    failure: BaseException | None = exc
    while failure is not None and id(failure) not in seen:
        seen.add(id(failure))
        tb = failure.__traceback__
        while tb is not None:
            if tb.tb_frame.f_code.co_name == "<module>":
                return str(tb.tb_frame.f_globals.get("__name__", "a module"))
            tb = tb.tb_next
        failure = failure.__cause__ or failure.__context__
    return None


class Function:
    """The process-wide state of one stage's function: settings, service, loop, readiness."""

    def __init__(self, stage: Stage) -> None:
        self.stage = stage
        self._lock = threading.Lock()
        self._pid: int | None = None
        self._started: Future[None] = Future()  # start-up: done, failed, or loading the model
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_ended: str | None = None  # why the loop's thread ended, once it has
        self._waiting: set[Future[Any]] = set()  # requests' work on the loop, until answered
        self._waiting_lock = threading.Lock()
        self._service: Any = None
        self._closed = False  # the service closed as the process exits (:meth:`stop`)
        self._closing_since = 0.0  # when :meth:`stop` began the close (time.monotonic)
        self._auth: Any = None  # an imagegen.auth.Authenticator once started
        self._timeout = 60.0
        self._warming: Future[None] | None = None  # the warm-up, once begun
        self._said_ready = False  # whether ready() has said so yet
        self._failed_at: float | None = None  # when a failed start-up was first seen
        self._import_failed: str | None = None  # a module whose import failed start-up

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Read the settings, build the service and (render) begin loading the model; once."""
        if self._pid == os.getpid():
            return
        with self._lock:
            if self._pid == os.getpid():
                return
            # Collection paused while start-up loads what lives as long as the process, then
            # frozen. Modules, classes, schemas and settings are never garbage, yet a full
            # collection walks every one of them (tens of thousands of objects) and, in a forked
            # worker, copies each page the fork shared: Python's ``gc.freeze`` advice for
            # servers that fork.
            enabled = gc.isenabled()
            gc.disable()
            try:
                self._started = self._start()
            finally:
                gc.freeze()
                if enabled:
                    gc.enable()
            # Last: a request thread that sees this process started finds it whole.
            self._pid = os.getpid()
        if not self.stage.loads_model:
            self._started.exception()  # nothing to load: over in moments

    def _start(self) -> Future[None]:
        from imagegen.auth import Authenticator
        from imagegen.service import ImageGenService
        from imagegen.settings import Settings

        try:
            try:
                settings = Settings()
            except Exception:
                self._observe(None)
                raise
            self._observe(settings)
            for unknown in Settings.unknown_variables():
                log.warning(unknown, extra={"stage": self.stage.name})
            for warning in settings.start_up_warnings():
                log.warning(warning, extra={"stage": self.stage.name})
            preload = (settings.model,) if self.stage.loads_model else ()
            # What the stage makes of the settings, checked before the function says ready.
            parts = self.stage.prepare(settings) if self.stage.prepare is not None else {}
            self._service = ImageGenService(
                settings, preload=preload, load_on_demand=False, **parts
            )
            self._timeout = self.stage.timeout(settings)
            self._auth = Authenticator(settings, function=self.stage.name)
        except Exception as exc:
            # Every request would fail alike until the environment is fixed: say it once,
            # and answer 503 (not ready, retried), never 400.
            summary = f"{self.stage.name} could not start"
            broken = ConfigurationError.of(summary, exc, name=Settings.variable)
            log.error("start-up failed: %s", broken.explained(), extra={"stage": self.stage.name})
            failed: Future[None] = Future()
            failed.set_exception(broken)
            return failed
        if self.stage.warm_up is None:
            _build_models(self.stage)  # no warm-up to build them once ready: now
        self._warming, self._said_ready = None, False
        self._loop, self._loop_ended = asyncio.new_event_loop(), None
        threading.Thread(target=self._serve_loop, name="imagegen-loop", daemon=True).start()
        _close_at_exit(self)
        return asyncio.run_coroutine_threadsafe(self._enter(), self._loop)

    def _observe(self, settings: Settings | None) -> None:
        """Logs and the SDK for this process, from ``settings``; without them (they could not
        be read) the line saying why start-up failed is JSON like any other, and the 503s that
        follow are counted (the SDK reads only ``OTEL_*`` variables)."""
        from imagegen.observability import setup_logging, setup_observability

        if settings is None:
            setup_logging(None, self.stage.name)  # the defaults
        service = f"imagegen-{self.stage.name}"
        telemetry = setup_observability(service, settings, logs=settings is not None)
        count_from_zero(self.stage.name, sink=self.stage.emits is None)
        # The zeros leave now, not an export interval later: collected before any request
        # is counted, exported from a thread of their own.
        telemetry.export_metrics()

    def _serve_loop(self) -> None:
        """The loop's thread: run the loop for as long as the process lives.

        The loop only stops when something on it raises what asyncio lets through
        (``SystemExit``, ``KeyboardInterrupt`` from a task). Nothing could then run on it
        again: the process says so, once, turns not ready and not alive (to be restarted),
        and fails at once the requests that were waiting on it rather than at their timeout.
        """
        assert self._loop is not None
        why = "stopped"
        try:
            self._loop.run_forever()
        except BaseException as exc:
            why = f"{type(exc).__name__}: {first_line(exc)}".rstrip(": ")
            log.critical(
                "the event loop ended (%s); answering 503 until restarted",
                why,
                exc_info=True,
                extra={"stage": self.stage.name},
            )
        else:
            log.critical(
                "the event loop stopped; answering 503 until restarted",
                extra={"stage": self.stage.name},
            )
        finally:
            self._loop_ended = why
            self._release(self._loop)
            # What its release did not answer (a task that outlived its cancellation), now.
            with self._waiting_lock:
                waiting, self._waiting = list(self._waiting), set()
            for future in waiting:
                with contextlib.suppress(Exception):  # one answered meanwhile
                    future.set_exception(self._loop_gone())

    def _release(self, loop: asyncio.AbstractEventLoop) -> None:
        """Release what the service holds, on the loop that ended, in the loop's thread.

        The process answers 503 until it is restarted, and its exit's close (:meth:`stop`)
        skips a loop that ended: its clients' connections (Ollama's, a plugin's) and the
        ledger's database connections would stay open until it is killed, each client's
        collection said as an error ("Unclosed client session"). So the loop is run once
        more, as :func:`asyncio.run` ends its own (asyncio/runners.py, ``Runner.close``): the
        tasks left on it cancelled and waited for, then the service closed, each within
        :data:`CLOSE_SECONDS`. A request whose task is cancelled is answered then, through its
        future (:meth:`_run`: the 503 of a loop that ended); one handed over as the loop ended
        is run by this, and does not run its work. The loop is left open. What raises
        meanwhile (the code that ended the loop may end this too) ends the release, said at
        DEBUG: the end was said already.
        """
        with self._lock:
            service = None if self._closed else self._service
            self._closed = True  # no warm-up begins, no close at the exit
        extra = {"stage": self.stage.name}
        try:
            left = asyncio.all_tasks(loop)
            for task in left:
                task.cancel()
            if left:
                loop.run_until_complete(asyncio.wait(left, timeout=CLOSE_SECONDS))
            if service is not None:
                loop.run_until_complete(asyncio.wait_for(service.aclose(), CLOSE_SECONDS))
        except BaseException as exc:  # SystemExit, KeyboardInterrupt: a thread's end either way
            said = f"{type(exc).__name__}: {first_line(exc)}".rstrip(": ")
            log.debug("releasing after the loop ended: %s", said, extra=extra)

    def stop(self) -> Future[None] | None:
        """Begin closing the service on the loop (func-python's ``stop``): what the stage holds
        is released, a warm-up still under way stopped first. Returns the close under way;
        None where this process has nothing to close (never started here, its loop ended, or
        closed already).

        Run as the process exits (:func:`_close_at_exit`). At SIGTERM that is once the
        requests in flight have ended, the worker having stopped listening at the signal
        (:mod:`_process`): no request sees the close. At SIGINT or SIGQUIT (Ctrl-C) the worker
        exits at once, and requests gunicorn's pool still runs are answered the retryable 503
        of a function ``closing``."""
        if self._pid != os.getpid() or self._loop is None or self._loop_ended is not None:
            return None
        with self._lock:
            if self._closed or self._service is None:
                return None
            # Not ready from now on; a request still queued is answered a retryable 503 (by
            # _check_ready, or by the closed service: ServiceClosed), never run on no service.
            self._closed = True
            service, warming = self._service, self._warming
        # A warm-up still under way stops first: the close would close what it uses (enhance's
        # Ollama client, the ledger's database) under it, a failure that is none.
        if warming is not None:
            warming.cancel()
        with self._waiting_lock:
            in_flight = len(self._waiting)
        # gunicorn's own lines of the exit are below its default level (GUNICORN_LOG_LEVEL).
        log.info(
            "closing as the process exits; requests in flight: %d",
            in_flight,
            extra={"stage": self.stage.name, "in_flight": in_flight},
        )
        self._closing_since = time.monotonic()
        return asyncio.run_coroutine_threadsafe(service.aclose(), self._loop)

    def stopped(self, closing: Future[None]) -> None:
        """Say how the close :meth:`stop` began ended, once it has or its time is over."""
        extra = {"stage": self.stage.name}
        if not closing.done():
            closing.cancel()
            log.warning("closing took longer than %gs; exiting", CLOSE_SECONDS, extra=extra)
        elif (failure := closing.exception()) is not None:
            log.warning("closing failed: %s: %s", type(failure).__name__, failure, extra=extra)
        else:
            seconds = time.monotonic() - self._closing_since
            log.info("closed in %.2fs", seconds, extra={**extra, "seconds": round(seconds, 3)})

    def _loop_gone(self) -> DependencyUnavailable:
        return DependencyUnavailable(
            f"{self.stage.name} cannot serve: its event loop ended ({self._loop_ended})"
        )

    async def _enter(self) -> None:
        from imagegen.service import ServiceClosed

        extra = {"stage": self.stage.name}
        try:
            await self._service.__aenter__()
            if self.stage.start is not None:
                await self.stage.start(self._service)
        except Exception as exc:
            if self._closed or isinstance(exc, ServiceClosed):
                # The process exits (a scale-down, a rollout) while it starts: its close
                # stopped the start-up (render's model load), or the start-up ended while the
                # close waited for it. No failure to start: ``start-up failed`` is the line
                # that says why a process could not start (docs/runbook.md).
                log.info("start-up stopped: the process is exiting", extra=extra)
                raise
            said = ""
            if module := _importing(exc):
                # A module left half-imported (torch's registries, a C extension's state):
                # importing it again in this process fails with some other error, or worse.
                self._import_failed = module
                said = (
                    f" (raised while importing {module}, which this process cannot import"
                    " again: restart it once the cause is fixed; on Knative its probes do)"
                )
            if isinstance(exc, ImageGenError):  # in its own words: a traceback adds nothing
                log.error("start-up failed: %s%s", exc.message, said, extra=extra)
            else:
                log.exception(
                    "start-up failed: %s: %s%s", type(exc).__name__, exc, said, extra=extra
                )
            raise

    async def _warm_up(self) -> None:
        assert self.stage.warm_up is not None
        started = time.perf_counter()
        extra = {"stage": self.stage.name}
        try:
            _build_models(self.stage)
            await self.stage.warm_up(self._service)
        except Exception as exc:
            if self._closed:  # one that went on past its cancellation, the close under it
                log.debug("warm-up stopped: the process is exiting", extra=extra)
            else:
                log.warning("warm-up failed: %s: %s", type(exc).__name__, exc, extra=extra)
        else:
            log.info("warmed up in %.0f ms", (time.perf_counter() - started) * 1e3, extra=extra)
        finally:
            gc.freeze()  # what it loaded lives as long as the process, as at start-up

    def _begin_warm_up(self) -> None:
        """Start the stage's warm-up on the loop, once, when the process has turned ready.

        Not before: the warm-up holds the interpreter, and the probe that says ready would
        wait for it; and not before that probe's answer is sent (:meth:`replied`), for the
        same reason. A request that comes before the warm-up ends waits only for what it would
        have built itself.
        """
        if self._warming is not None or self.stage.warm_up is None:
            return
        with self._lock:
            if self._warming is None and not self._closed:  # none begun as the close begins
                assert self._loop is not None
                self._warming = asyncio.run_coroutine_threadsafe(self._warm_up(), self._loop)

    def warm(self) -> bool:
        """Whether the stage's warm-up (:attr:`Stage.warm_up`) has ended; True if it has none."""
        if self.stage.warm_up is None:
            return True
        return self._warming is not None and self._warming.done()

    def alive(self) -> bool:
        """Whether the process can serve at all: it can unless its event loop has ended, or
        its start-up failed importing a module, which only a new process imports whole: the
        liveness probe's failure is that restart (other failures show in ``ready``)."""
        self.start()
        return self._loop_ended is None and self._import_failed is None

    def ready(self) -> tuple[bool, str]:
        """(ready, why): ready once start-up, the model load included, has succeeded."""
        self.start()
        if self._loop_ended is not None:
            return False, "event loop ended"  # the reason is in the log
        if self._closed:
            return False, "closing"
        if not self._started.done():
            return False, "loading"
        if self._started.exception() is not None:
            self._start_again()
            # The reason is in the log, and in the 503 of a request (:meth:`_check_ready`): not
            # here, where a probe path answers whoever asks, authenticated or not.
            return False, "start-up failed"
        if self._said_ready:  # where no server closes its answers (a test client): now
            self._begin_warm_up()
        self._said_ready = True
        return True, "ready"

    def _start_again(self) -> None:
        """Begin start-up again, :data:`START_AGAIN_SECONDS` after it failed, where it got as
        far as its loop: what it waited for (a model pulled into the cache, a directory made
        writable, storage back) may be there now. Settings that failed to read fail again
        until the process is restarted with others, so those are not tried again; nor a
        start-up that failed importing a module (:func:`_importing`), which only a new process
        imports whole."""
        if self._loop is None or self._loop_ended is not None or self._import_failed:
            return
        now = time.monotonic()
        with self._lock:
            if not self._started.done() or self._started.exception() is None:
                return  # another thread began it again meanwhile
            if self._failed_at is None:
                self._failed_at = now
            if now - self._failed_at < START_AGAIN_SECONDS:
                return
            self._failed_at = None
            self._started = asyncio.run_coroutine_threadsafe(self._enter(), self._loop)

    def replied(self) -> None:
        """After each answer has been sent: the warm-up begins once the process is ready."""
        if self._warming is None and self.stage.warm_up is not None and self.ready()[0]:
            self._begin_warm_up()

    def _check_ready(self) -> None:
        """Raise the 503 of a process that cannot serve: broken settings, or not ready yet."""
        ready, why = self.ready()
        if not ready:
            failure = self._started.exception() if self._started.done() else None
            if isinstance(failure, ConfigurationError):
                raise failure
            if isinstance(failure, ImageGenError):  # in imagegen's words, never a traceback
                why = f"{why}: {failure.message[:500]}"
            raise DependencyUnavailable(f"{self.stage.name} is not ready ({why})", retry_after=15)

    def _run(
        self,
        work: Awaitable[T],
        traced: Message | None = None,
        generation_id: str | None = None,
        *,
        spanned: dict[str, str] | None = None,
        http: HttpRequest | None = None,
        within: otel_context.Context | None = None,
    ) -> tuple[T, dict[str, str]]:
        """Run ``work`` on the process's loop within the stage's time budget; with ``traced``,
        inside that message's trace, its span naming ``generation_id`` (and, for a plain call,
        its request, ``http``). Returns the result and the trace context to pass on;
        ``spanned`` gets that context as soon as the span starts, for a failure to be logged
        and answered under the span that failed. Without ``traced``, ``work`` runs in the
        trace context ``within`` (a route's span), if any: a task on the loop starts in the
        loop's own context, not the request thread's.
        """
        assert self._loop is not None

        async def run() -> tuple[T, dict[str, str]]:
            if self._loop_ended is not None:  # handed over as the loop ended: run by _release
                if isinstance(work, Coroutine):
                    work.close()
                raise self._loop_gone()
            if traced is None:
                token = otel_context.attach(within) if within is not None else None
                try:
                    return await work, {}
                finally:
                    if token is not None:
                        otel_context.detach(token)
            # A task of its own on the loop: what the span sets stays in its context.
            carrier, attributes = traced.carrier(), traced.attributes
            event = traced.is_event
            with stage_span(
                self.stage.name,
                attributes,
                carrier,
                event=event,
                generation_id=generation_id,
                http=http,
            ) as out:
                if spanned is not None:
                    spanned.update(out)
                result = await work
                if not event:  # the plain call's SERVER span says what it is answered
                    answered(self._answers(result))
                return result, out

        future = asyncio.run_coroutine_threadsafe(run(), self._loop)
        with self._waiting_lock:
            self._waiting.add(future)
        try:
            if self._loop_ended is not None:  # ended as the work was handed over
                raise self._loop_gone()
            return future.result(timeout=self._timeout)
        except TimeoutError:  # concurrent.futures' own, since Python 3.11
            future.cancel()
            raise DependencyUnavailable(
                f"{self.stage.name} took longer than {self._timeout:g}s"
            ) from None
        except CancelledError:
            if self._loop_ended is not None:  # its task cancelled as the loop was released
                raise self._loop_gone() from None
            raise
        finally:
            with self._waiting_lock:
                self._waiting.discard(future)

    # -- requests -----------------------------------------------------------------------------

    def dispatch(self, request: flask.Request) -> Reply:
        """Route one request: probes, the OpenAPI document, the stage's routes, ``POST /``."""
        path, method = request.path.rstrip("/") or "/", request.method
        routes = {r.method: (r, p) for r in self.stage.routes if (p := r.match(path)) is not None}
        if path in _READ_ONLY:
            allowed = ["GET", "HEAD"]
        else:
            allowed = list(routes) or (["POST"] if path == "/" else [])
            if "GET" in routes:  # HEAD is GET without the body (RFC 9110, section 9.3.2)
                allowed.append("HEAD")
                routes["HEAD"] = routes["GET"]
        if method not in allowed:
            refusal: ImageGenError = (
                MethodNotAllowed(method, allowed=allowed)
                if allowed
                else RouteNotFound(f"no route {request.path!r}; POST / instead")
            )
            return error_reply(refusal, stage=self.stage.name, message=None, generation_id=None)
        if path == "/healthz":  # the liveness probe is a process's first request: it starts
            alive = self.alive()
            status = "alive" if alive else "restart needed"  # why: in the log
            return json_reply({"status": status, "stage": self.stage.name}, 200 if alive else 503)
        if path == "/readyz":
            ready, why = self.ready()
            # Warm only once ready: a render still loading has no warm-up of its own to end.
            warm = ready and self.warm()
            body = {"ready": ready, "status": why, "stage": self.stage.name, "warm": warm}
            return json_reply(body, 200 if ready else 503, {} if ready else {"Retry-After": "5"})
        if path == "/openapi.json":
            from imagegen.openapi import document

            return json_reply(document(self.stage), 200)
        # The caller, checked before anything is read: a 401 or 403, or a 503 once start-up has
        # failed. The token is never logged: errors name what was wrong with it, not what it was.
        # Then its kind against what the route admits: an event sink takes the broker's token
        # only, never an API key (a 403).
        self.start()
        try:
            if self._auth is None:
                # Start-up failed before the gate was built: nobody can be authenticated, so
                # the 503 comes before anything is read, as a refusal's does, whatever the body.
                self._check_ready()
                raise InternalError(f"{self.stage.name} started without its authenticator")
            caller = self._auth.authenticate(request.headers.get("Authorization"))
            caller.admit(*self.stage.callers_of(routes[method][0] if routes else None))
        except Exception as exc:  # anything unforeseen too: a JSON 500, never Flask's HTML page
            # A refused query of the stage's own routes (the ledger's) is no delivery: named by
            # its route, it is not counted.
            route = routes[method][0].path if routes else None
            if route is not None:
                return self._failed(exc, None, dispatched=False, generation_id=None, route=route)
            return self._failed(exc, None, dispatched=False, generation_id=None)
        return self._route(*routes[method], request) if routes else self.handle(request)

    def handle(self, request: flask.Request) -> Reply:
        """Run the stage on one request; never raises."""
        stage, message, gid, dispatched = self.stage, None, None, False
        spanned: dict[str, str] = {}  # the stage span's context, once it has started
        try:
            # 1. Read the body within MAX_BODY_BYTES: the sink (a stage that consumes any event
            #    and takes its data as it comes) keeps what fits and marks the rest cut; every
            #    other stage refuses more, and a Content-Length that says more before reading
            #    any (the rest is left unread: `_unread_body_left`).
            sink = stage.input_model is None and not stage.consumes  # it takes anything
            if not sink and (request.content_length or 0) > MAX_BODY_BYTES:
                raise _too_large()
            body = _read_body(request)
            cut, headers = len(body) > MAX_BODY_BYTES, dict(request.headers)
            if sink:
                message = parse_leniently(headers, body[:MAX_BODY_BYTES], truncated=cut)
                data: Any = message.data
                # The generation it names, as its record does (the subject, else the data's),
                # for its span and the line saying why it failed.
                named = message.attributes.get("subject") or (
                    data.get("generation_id") if isinstance(data, dict) else None
                )
                gid = named if isinstance(named, str) and valid_generation_id(named) else None
                self._check_ready()
                call = Call(attributes=message.attributes, headers=message.headers, raw=message.raw)
            elif cut:
                raise _too_large()
            else:
                # 2. Check the data; the event names the generation before the data is valid.
                message = parse(headers, body, consumes=stage.consumes)
                with contextlib.suppress(ImageGenError):
                    named = message.data.get("generation_id")
                    named = named if isinstance(named, str) else None
                    gid = generation_id(named, message.attributes, starts=stage.starts_generations)
                self._check_ready()
                if stage.input_model is None:  # events of its types, their data as it comes
                    data = message.data
                    call = Call(attributes=message.attributes, headers=message.headers)
                else:
                    if stage.direct is not None and not message.is_event:
                        given = parse_model(stage.direct.model, message.data)
                        data = stage.direct.complete(self._service.settings, given)
                    else:
                        data = parse_model(stage.input_model, message.data)
                    call = identify(data, message.attributes, starts=stage.starts_generations)
                    gid = call.generation_id
            # 3. Run the stage inside the caller's trace.
            dispatched = True
            plain = not message.is_event
            http = _http_request(request, "/")
            if stage.png is not None and plain and _wants_png(request.accept_mimetypes):
                drawn = stage.png(self._service, data)
                (png, more), _ = self._run(drawn, message, gid, spanned=spanned, http=http)
                return Reply(200, png, {"Content-Type": "image/png", **more})
            work = stage.handler(self._service, data, call)
            result, extensions = self._run(work, message, gid, spanned=spanned, http=http)
            # 4. Reply: the next event, JSON, or nothing.
            if stage.emits is None:  # a sink: the dead-letter records, the ledger
                labels = {"stage": stage.name, "outcome": "recorded"}
                instruments().sink_deliveries.add(1, labels)
                return Reply(202)
            if result is None:
                return Reply(202)
            if plain:
                return json_reply(result.model_dump(mode="json"), 200)
            if location := getattr(result, "location", None):
                extensions["dataref"] = location
            attributes = reply_attributes(stage.name, stage.emits, result, gid, extensions)
            return event_reply(attributes, result)
        except Exception as exc:
            return self._failed(
                exc,
                message,
                dispatched=dispatched,
                spanned=spanned,
                headers=dict(request.headers),
                generation_id=gid,
            )

    def _answers(self, result: object) -> int:
        """The status :meth:`handle` answers a plain call's ``result`` with (its step 4): 202
        from a sink or for no result, else 200."""
        return 202 if self.stage.emits is None or result is None else 200

    def _route(self, route: Route, params: dict[str, str], request: flask.Request) -> Reply:
        """One of the stage's own routes, in a ``SERVER`` span of its own inside the caller's
        trace (its W3C ``traceparent`` header): the query checked, the handler run, JSON out.

        A query is no generation: nothing for the generation counters (``dispatched``). The
        handler runs, and a failure is logged, under the route's span: a replay's event goes
        on in its trace (:func:`imagegen.ledger.api.replay`).
        """
        carrier = trace_carrier(dict(request.headers))
        with server_span(_http_request(request, route.path), carrier) as span:
            try:
                self._check_ready()
                query = None
                if "" in request.args:  # `?=1`: a value no parameter's name can claim
                    raise InvalidRequest(
                        "a query parameter has no name",
                        errors=[{"field": "query", "message": "a parameter has no name"}],
                    )
                repeated = [name for name, values in request.args.lists() if len(values) > 1]
                if repeated:  # never one of them silently: which one the caller meant is unknown
                    raise InvalidRequest(
                        f"{', '.join(repeated)} given more than once",
                        errors=[{"field": n, "message": "given more than once"} for n in repeated],
                    )
                if route.query_model is not None:
                    query = parse_model(route.query_model, request.args.to_dict())
                elif request.args:
                    raise InvalidRequest(
                        f"{route.path} takes no query parameters",
                        errors=[{"field": n, "message": "unknown parameter"} for n in request.args],
                    )
                # A route reads no body (a Route has no body model): the replay, the one POST
                # route, takes `from` from its query alone. A body such as {"from": "requested"}
                # would be ignored, and the replay started from where its caller did not ask.
                if route.method == "POST" and (request.content_length or _read_body(request)):
                    raise InvalidRequest(
                        f"{route.path} takes no body: `from` is a query parameter"
                        " (?from=requested)",
                        errors=[{"field": "body", "message": "none taken: `from` is a query"}],
                    )
                headers = {name.lower(): value for name, value in request.headers.items()}
                call = RouteCall(params=params, query=query, headers=headers)
                within = otel_context.get_current()
                result, _ = self._run(route.handler(self._service, call), within=within)
                reply = json_reply(result.model_dump(mode="json"), route.status)
            except Exception as exc:
                gid, here = params.get("generation_id"), trace_extension()
                reply = self._failed(
                    exc, None, dispatched=True, spanned=here, generation_id=gid, route=route.path
                )
                record_error(span, exc, http_status=reply.status)
                return reply
            answered(reply.status, span)
            return reply

    def _failed(
        self,
        exc: Exception,
        message: Message | None,
        *,
        dispatched: bool,
        spanned: dict[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        **fields: Any,
    ) -> Reply:
        """The reply to ``exc``, logged with ``fields``; anything unforeseen is logged whole and
        hidden. The ``generation_id`` among ``fields`` is the one a ``generation.failed`` names.

        Logged and answered in the trace of the stage span that failed (``spanned``), else in
        the caller's: the line saying why a request failed is the one an operator starts from,
        and a ``generation.failed`` hangs off the span that failed, as a reply off its own.
        """
        gid, extra = fields.get("generation_id"), {"stage": self.stage.name, **fields}
        carrier = spanned or (message.carrier() if message is not None else {})
        if not carrier and headers is not None:
            # Refused before it was read as an event (a body that is no JSON, another type):
            # the caller's trace from its headers, a binary-mode event's ce-traceparent first.
            raw = {k.lower(): v for k, v in headers.items()}
            carrier = trace_carrier(
                {
                    k.removeprefix("ce-"): raw[k]
                    for k in ("ce-traceparent", "ce-tracestate")
                    if k in raw
                }
            ) or trace_carrier(raw)
        with within_trace(carrier):
            if not isinstance(exc, ImageGenError):
                log.exception("unexpected error", extra=extra)
                exc = InternalError("internal error; see the function's logs")
            # A retryable 503 while the function closes (Ctrl-C, SIGQUIT: a render the close
            # stopped, a request the pool ran after it) is the process exiting, its request
            # sent again elsewhere: no failure of the function, whose ERROR lines alerts and
            # the runbook start from.
            closing = self._closed and exc.status == 503 and exc.retryable
            # Nor is the 503 of a token naming a key not fetched: anyone can send one (a
            # made-up key id), as anyone can a token refused with a 401.
            refused = exc.status < 500 or exc.code == KeyNotFetched.code
            level = logging.WARNING if refused or closing else logging.ERROR
            log.log(level, "request failed: %s", exc.message, extra={**extra, "status": exc.status})
        labels = {"stage": self.stage.name, "outcome": "failed", "reason": exc.code}
        if "route" in fields:
            pass  # a query of the stage's own routes (the ledger's): no delivery, no generation
        elif self.stage.emits is None:
            # A sink's delivery that failed: a record the broker may drop once it gives up.
            instruments().sink_deliveries.add(1, labels)
        elif not dispatched:
            # Refused before the stage ran (bad input, not ready): the stage counted nothing.
            instruments().generations.add(1, labels)
        # A stage that emits nothing never answers with an event: beside the stage that
        # consumes the same type, its generation.failed would report the generation twice.
        answered = message if self.stage.emits is not None else None
        return error_reply(
            exc, stage=self.stage.name, message=answered, generation_id=gid, carrier=carrier
        )


_started: list[Function] = []  # the functions started in this process, closed as it exits
_closing_hooked: int | None = None  # the process whose exit closes them


def _close_at_exit(function: Function) -> None:
    """Close ``function``'s service as the interpreter exits (a gunicorn worker at SIGTERM,
    once its requests have ended: its ``sys.exit``), each within :data:`CLOSE_SECONDS`.

    threading's exit hooks run while the loop's (daemon) thread still runs, before the
    threads are joined, the last registered first (CPython's Lib/threading.py,
    ``_shutdown``): this one, registered after concurrent.futures' own (imported with
    asyncio), runs before that one refuses new work to the loop's default executor.
    """
    global _closing_hooked
    _started.append(function)
    if _closing_hooked != os.getpid():  # once a process; a forked one registers its own
        _closing_hooked = os.getpid()
        threading._register_atexit(_close_started)  # type: ignore[attr-defined]  # no typeshed


def _close_started() -> None:
    """Close every function started in this process, at once, within one :data:`CLOSE_SECONDS`."""
    from concurrent.futures import wait

    closing = [(f, c) for f in _started if (c := f.stop()) is not None]
    wait([c for _, c in closing], timeout=CLOSE_SECONDS)
    for function, close in closing:
        function.stopped(close)


def _build_models(stage: Stage) -> None:
    """Build the validators and serializers of the models the stage's requests use, as its
    first request would (imagegen.models defers them)."""
    for model in stage.models():
        model.model_rebuild()  # nothing to do (and no lock taken) for one already built


def _read_body(request: flask.Request) -> bytes:
    """Up to one byte past :data:`MAX_BODY_BYTES` of the body, as the server hands it over.

    Raises:
        InvalidRequest: naming ``body`` when the server cannot read it: a malformed chunk, a
            client that hung up mid-body (gunicorn raises its own ``ParseException`` kinds
            and ``NoMoreData`` for a chunked body; werkzeug's server its own), or one that
            ended before its ``Content-Length`` did: the request's fault, not ours.
    """
    declared = request.content_length
    wanted = MAX_BODY_BYTES + 1 if declared is None else min(declared, MAX_BODY_BYTES + 1)
    parts: list[bytes] = []
    got = 0
    try:
        # Read until nothing more comes: a read stops short at the body's end, and at the
        # connection's too, where a client hung up before its Content-Length's end (gunicorn's
        # LengthReader hands over what came as if it were the whole body).
        while got < wanted and (part := request.stream.read(wanted - got)):
            parts.append(part)
            got += len(part)
    except Exception as exc:
        reason = type(exc).__name__
        if (text := first_line(exc)) != reason:
            reason += f": {text}"
        raise _unreadable(f"the body could not be read ({reason})") from None
    if declared is not None and got < wanted:
        raise _unreadable(
            f"the body ended after {got} of the {declared} bytes its Content-Length gives"
        )
    if got <= MAX_BODY_BYTES:  # read to its end
        request.environ[_BODY_READ] = True
    return b"".join(parts)


def _unreadable(message: str) -> InvalidRequest:
    return InvalidRequest(message, errors=[{"field": "body", "message": "could not be read"}])


def _too_large() -> PayloadTooLarge:
    return PayloadTooLarge(
        f"the body is larger than {MAX_BODY_BYTES} bytes",
        errors=[{"field": "body", "message": f"larger than {MAX_BODY_BYTES} bytes"}],
    )


def _unread_body_left(response: flask.Response) -> flask.Response:
    """Leave what the request did not read of its body unread, whatever the answer.

    functions-framework's after-request hook reads all that is left of the body into memory,
    unbounded, before the answer goes out (``read_request``: ``flask.request.get_data()``;
    it skips only a streamed answer, such as its own 404). An answer sent before the body's
    end (a 401, 403, 405, 413, a probe's 200, the sink's 202 of the first MiB) waited for an
    upload of any size and held it whole: an unauthenticated 800 MB POST grew a worker past
    the pod's 512 MiB, and slow uploads held every thread. With an empty stream it reads
    nothing. gunicorn then discards at most 64 KiB of the rest within 5 s and closes the
    connection where more is left (gthread's ``_keepalive_after``); a ``Connection: close``
    of ours would change nothing, as gunicorn drops the header. A body read to its end keeps
    the connection alive.
    """
    if not flask.request.environ.get(_BODY_READ):
        flask.request.stream = io.BytesIO()  # werkzeug's cached_property: setting it is public
    return response


def _http_request(request: flask.Request, route: str) -> HttpRequest:
    """What a ``SERVER`` span says of ``request``, served by ``route`` (a path template)."""
    return HttpRequest(request.method, request.path, route, request.scheme)


def _wants_png(accept: Any) -> bool:
    """Whether ``Accept`` names ``image/png``, at a quality above 0 and no lower than JSON's.

    ``image/png;q=0`` is "not acceptable" (RFC 9110, section 12.4.2); ``*/*`` alone, or no
    ``Accept``, is the JSON reply, as before there was a PNG to give.
    """
    png = max((q for value, q in accept if value.lower() == "image/png"), default=0)
    return bool(png > 0 and png >= accept.quality("application/json"))


def entry_point(name: str) -> Any:
    """The functions-framework HTTP target of the stage called ``name``."""
    stage = get_stage(name)
    function = Function(stage)
    _process.serves(name)
    if stage.input_model is not None or stage.consumes:
        # Not the sink, which keeps whatever comes, merged headers too: a refusal loses it.
        _process.refuse_repeated_event_attributes()

    def serve(request: flask.Request) -> flask.Response:
        # Before the app's own after-request hooks (Flask's ``process_response``), and on an
        # answer to an exception too.
        flask.after_this_request(_unread_body_left)
        reply = function.dispatch(request)
        body = reply.body
        if reply.status >= 300 and is_delivery(request.headers.keys(), request.content_type):
            body = fit_error_body(body)  # a broker keeps it; a longer one can crash its dispatcher
        response = flask.Response(body, reply.status, dict(reply.headers))
        if not reply.body and "Content-Type" not in reply.headers:
            del response.headers["Content-Type"]  # nothing said: not Flask's text/html
        response.call_on_close(function.replied)  # the server closes it once it is sent
        return response

    serve.__name__ = serve.__qualname__ = name
    if flask.has_app_context():  # functions-framework's create_app imports this module in one
        app = flask.current_app

        # Its _configure_app, run after the import, answers /robots.txt and /favicon.ico with
        # a view of its own (endpoint "error": flask.abort(404), an HTML page); that 404 goes
        # through the app's error handlers, and then answers as any unknown path: JSON.
        # A request asking to switch to WebSocket (`Connection: Upgrade`, `Upgrade:
        # websocket`) is matched by werkzeug's router against WebSocket rules alone; it finds
        # none among functions-framework's and raises WebsocketMismatch, its HTML 400, before
        # any view. No function speaks WebSocket, and a server may ignore an Upgrade (RFC 9110,
        # section 7.8): it is served as the same request without one.
        def served(_: Exception) -> flask.Response:
            return serve(flask.request)

        app.register_error_handler(404, served)
        app.register_error_handler(WebsocketMismatch, served)
        # Any other error werkzeug or Flask would answer with a page of their own, and a bug
        # that escapes ``serve``, which functions-framework's 500 handler answers as text
        # (its ``crash_handler``): JSON too.
        app.register_error_handler(HTTPException, _http_error)
        app.register_error_handler(500, _http_error)
    return serve


def _http_error(exc: HTTPException) -> flask.Response:
    """An error werkzeug or Flask raised (an ``abort``, a routing error), as the functions'
    JSON: its status and headers kept (a 405's ``Allow``), its name and description said."""
    flask.after_this_request(_unread_body_left)
    status = exc.code or 500
    error: ImageGenError
    # Each as the functions' own error of that status says it, retryable ones with their
    # Retry-After (none of these is raised today: an ``abort`` or a Flask setting added later).
    if status == 413:
        error = _too_large()
    elif status == 429:
        error = Overloaded(f"{exc.name}: {exc.description}")
    elif status == 503:
        error = DependencyUnavailable(f"{exc.name}: {exc.description}")
    elif status >= 500:
        error = InternalError("internal error; see the function's logs")
    else:
        error = InvalidRequest(
            f"{exc.name}: {exc.description}", errors=[{"field": "request", "message": exc.name}]
        )
    headers = [(k, v) for k, v in exc.get_headers() if k.lower() != "content-type"]
    said = {k.lower() for k, _ in headers}  # werkzeug's own (a 405's Allow) are kept
    headers += [(k, v) for k, v in error_headers(error).items() if k.lower() not in said]
    reply = json_reply(error.to_dict(), status, dict(headers))
    return flask.Response(reply.body, reply.status, dict(reply.headers))


_process.loaded()  # last: everything a function imports has been imported above
