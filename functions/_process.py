"""What a function's process sets before the library loads: imported first by :mod:`_adapter`.

Each line here makes a start or a first request cheaper and changes nothing a function does.
"""

import contextlib
import functools
import gc
import os
import signal
import sys
from typing import Any

# No collection while the function's modules load; :func:`loaded` freezes them and collects
# again. The import leaves ~70,000 objects that live as long as the process, none of them
# garbage, and every 700 allocations start a collection that walks the young ones (now and then
# all of them): 30-odd collections, ~10 ms of enhance's ~125 ms import. It is Python's advice
# for a server that forks (``gc.freeze``'s documentation): disable early in the parent, freeze
# before the fork; gunicorn forks its workers right after it imports the function.
_PAUSED = gc.isenabled()
gc.disable()

# httpx imports its command line (rich and pygments behind it) whenever click is installed,
# and functions-framework installs click (httpx/__init__.py: ``try: from ._main import main``
# ``except ImportError``). No function runs it: None here is the ImportError httpx expects,
# and the first request that talks HTTP (enhance's first prompt) does not load a terminal UI.
sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]

# Pydantic looks for plugins (an entry-point scan of every installed package) when it builds
# its first validator, at import (pydantic/plugin/_loader.py); no function has any. An empty
# PYDANTIC_DISABLE_PLUGINS in the environment lets them load.
os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")


def _refusal(sock: object, status: int, reason: str, message: str) -> None:
    """gunicorn's own answer to a request it cannot parse, as JSON like every other refusal.

    gunicorn refuses such a request before the function sees it (gunicorn/workers/base.py,
    ``Worker.handle_error``: headers too large or malformed, a bad request line) and writes it
    with ``gunicorn.util.write_error``, its one caller, as an HTML page. Here: the same status
    and reason, the body of :class:`~imagegen.errors.ImageGenError` naming the part at fault.

    gunicorn's message quotes what it refused (an invalid header's name, up to its 8,190 bytes
    a line); the body is cut as a function's own error answered to a broker's delivery is
    (``_binding.fit_error_body``), whoever sent it: the server refuses before the headers that
    would say it is a delivery are read, and a longer body can crash a channel-based broker's
    dispatcher (``_binding.DELIVERED_ERROR_BODY_MAX``).
    """
    import json

    from _binding import fit_error_body
    from gunicorn.util import write_nonblock

    from imagegen.errors import InternalError, InvalidRequest

    error: InternalError | InvalidRequest
    if status >= 500:
        error = InternalError("internal error; see the function's logs")
    else:
        lowered = message.lower()
        field = (
            "url"
            if status == 414
            else "headers"
            if status == 431 or "header" in lowered
            else "body"
            if "chunk" in lowered
            else "request"
        )
        error = InvalidRequest(f"{reason}: {message}", errors=[{"field": field, "message": reason}])
    body = fit_error_body(json.dumps(error.to_dict()).encode())
    head = (
        f"HTTP/1.1 {status} {reason}\r\nConnection: close\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    write_nonblock(sock, head.encode("latin-1") + body)


DRAIN_SECONDS = 3600
"""How long gunicorn lets requests in flight finish after SIGTERM (``graceful_timeout``; its
default, 30 s, is shorter than any stage's time budget, and functions-framework's
``GunicornApplication`` sets only ``bind``, ``workers``, ``threads``, ``loglevel`` and
``timeout``). Longer than any grace period the pod gets (Knative's ``timeoutSeconds``): the
kubelet's SIGKILL, not gunicorn, ends a request that outlives it."""

_stage: str | None = None  # the stage this process serves, once its function is imported


def serves(stage: str) -> None:
    """Name the stage this process serves: gunicorn's own log lines name it too."""
    global _stage
    _stage = stage


try:
    import gunicorn.config
    import gunicorn.glogging
    import gunicorn.util
except ImportError:  # no gunicorn (Windows): werkzeug's server, whose refusals are rare
    pass
else:

    class JsonLogger(gunicorn.glogging.Logger):  # type: ignore[misc]  # gunicorn has no types
        """gunicorn's logger, writing its lines (a worker killed, a port in use, the access
        log when on) as the library's: one JSON object per line, with ``time``, ``level``,
        ``message``, ``logger`` and ``stage``.

        ``Logger.setup`` gives ``gunicorn.error`` (and ``gunicorn.access``) a handler of its
        own with a plain-text formatter (gunicorn/glogging.py, ``_set_handler``); here, each
        such handler gets the library's formatter instead, at every setup (a reload's too).
        The settings are not read in the master: the values given to secret settings'
        variables are redacted as given.
        """

        def setup(self, cfg: gunicorn.config.Config) -> None:
            super().setup(cfg)
            from imagegen._logging import JsonFormatter

            formatter = JsonFormatter.from_environment(_stage)
            for log in (self.error_log, self.access_log):
                for handler in log.handlers:
                    if getattr(handler, "_gunicorn", False):  # gunicorn's mark on its own
                        handler.setFormatter(formatter)

    gunicorn.util.write_error = _refusal
    # Read when gunicorn makes its Config, after the function is imported (a Setting's class
    # default: gunicorn/config.py, GracefulTimeout and LoggerClass, which takes a class as
    # well as a path: validate_class, util.load_class). functions-framework sets neither.
    gunicorn.config.GracefulTimeout.default = DRAIN_SECONDS
    gunicorn.config.LoggerClass.default = JsonLogger
    # gunicorn 25.1+ serves ``gunicornc`` on a Unix socket at $XDG_RUNTIME_DIR/gunicorn.ctl, else
    # ~/.gunicorn/gunicorn.ctl (gunicorn/config.py, ControlSocket): no function uses it, a home
    # it cannot write (a read-only root file system, an arbitrary UID) is an ERROR at every
    # start, and the functions on one host would share the one path. Off, where it exists.
    if hasattr(gunicorn.config, "ControlSocketDisable"):
        gunicorn.config.ControlSocketDisable.default = True
    # Each worker's heartbeat is a temporary file (gunicorn/workers/workertmp.py: mkstemp in
    # ``worker_tmp_dir``, else the system's temporary directory): on a read-only root file
    # system without a volume at /tmp no worker could start. /dev/shm is a writable tmpfs in
    # every container, and where gunicorn's own docs point a container's heartbeats (faq.rst,
    # "Blocking os.fchmod"); the system's directory where it is not there to write.
    # A shared directory is safe here: mkstemp opens a random name with O_EXCL.
    heartbeats = "/dev/shm"  # noqa: S108
    if os.access(heartbeats, os.W_OK | os.X_OK):
        gunicorn.config.WorkerTmpDir.default = heartbeats

    def quit_once(worker: Any) -> None:
        """Have ``worker``'s SIGQUIT/SIGINT handler run once: a second signal while it runs
        returns at once, leaving the first to end the worker (gunicorn's ``post_worker_init``
        hook, run after the worker set its handlers: gunicorn/workers/base.py, ``init_process``).

        Ctrl-C reaches a worker twice: the terminal's SIGINT, and the master's SIGQUIT as it
        stops (gunicorn/arbiter.py, ``handle_int``: ``stop(False)``). Each quits as gunicorn's
        base worker does (gunicorn/workers/base.py, ``Worker.handle_quit``: ``alive`` false,
        the ``worker_int`` hook, ``sys.exit(0)``), not as gthread's, which first shuts its
        thread pool down (gunicorn/workers/gthread.py, ``ThreadWorker.handle_quit``:
        ``self.tpool.shutdown(wait=False)``). That takes the pool's non-reentrant
        ``_shutdown_lock``, which the main thread this handler interrupts holds while it
        submits a connection (CPython's Lib/concurrent/futures/thread.py, ``submit`` and
        ``shutdown``; gthread's ``enqueue_req``: a new connection, or a kept-alive one its
        client closes as the Ctrl-C comes), as the first handler held it when the second ran
        inside it: the handler waited on it for good, and the master waited its whole graceful
        timeout (:data:`DRAIN_SECONDS`) before it killed the worker.

        The pool's shutdown is not needed: ``shutdown(wait=False)`` neither stops nor drops
        the requests its threads run or have queued, it only refuses later submits, and the
        main thread, the one that submits, ends at the handler's ``sys.exit``. The pool's
        threads are woken and joined as the interpreter exits, by concurrent.futures' own exit
        hook (``_python_exit``, after the function's close: ``_adapter._close_at_exit``): a
        request in flight is still answered, with its result or the retryable 503 of a
        function closing. ``imagegen serve`` has gthread's worker quit the same way for any
        function (imagegen/cli/_server.py), one that does not import this module included.
        """
        from gunicorn.workers import base, gthread

        quit = worker.handle_quit
        if isinstance(worker, gthread.ThreadWorker):
            quit = functools.partial(base.Worker.handle_quit, worker)
        quitting = False

        def handle_quit(sig: int, frame: Any) -> None:
            nonlocal quitting
            if quitting:
                return
            quitting = True
            quit(sig, frame)

        worker.handle_quit = handle_quit
        signal.signal(signal.SIGQUIT, handle_quit)
        signal.signal(signal.SIGINT, handle_quit)

    def stop_listening_when_stopping(worker: Any) -> None:
        """Have ``worker`` close its listening sockets as soon as it stops accepting for good
        (SIGTERM), while the requests under way go on to their answers.

        At SIGTERM gunicorn's master closes its listening sockets (gunicorn/arbiter.py,
        ``stop``), but gthread's worker keeps its own copies open until it exits, after the
        requests under way (gunicorn/workers/gthread.py, ``run``: ``s.close()`` after the
        graceful wait): the kernel still takes connections, which wait unanswered in the
        backlog (a probe's too) for as long as a render takes, and are then reset. Closed now,
        the last copy gone, a new connection is refused at once, and its client retries
        elsewhere. Under Knative none comes: the queue-proxy has drained before the SIGTERM.

        Closed in the worker's main loop, where ``run`` stops accepting
        (``set_accept_enabled(False)`` once ``alive`` is false), never in the signal handler:
        there, the poller could still hold a readiness event of the socket, and the
        ``accept`` of a closed one raises (EBADF) out of ``run``. Where the master still
        listens (a reload's old workers, ``max_requests``), the worker only drops its copy.
        A worker class without that method (not gthread) is left as it is.
        """
        enable = getattr(worker, "set_accept_enabled", None)
        if enable is None:
            return

        def set_accept_enabled(enabled: bool) -> None:
            enable(enabled)  # stopping: the sockets leave the poller first, still open
            if enabled or worker.alive:
                return
            for listener in worker.sockets:
                with contextlib.suppress(OSError):
                    listener.close()  # gunicorn closes it again as it exits: a no-op

        worker.set_accept_enabled = set_accept_enabled

    def post_worker_init(worker: Any) -> None:
        """gunicorn's ``post_worker_init`` hook: run in each worker once it has set its signal
        handlers, before its main loop (gunicorn/workers/base.py, ``init_process``)."""
        quit_once(worker)
        stop_listening_when_stopping(worker)

    gunicorn.config.PostWorkerInit.default = staticmethod(post_worker_init)


class _EventAttributeFields(frozenset[str]):
    """gunicorn's header names that may come once (upper-cased, as it compares them), and
    every ``CE-*`` name besides: each binary-mode attribute, extensions included, is one value.

    Repeated, gunicorn would join a header's values with commas into one the sender never meant
    (gunicorn/http/wsgi.py, ``create``: a WSGI environ holds one value per name), where sdk-go
    takes the first (v2/protocol/http/message.go, ReadBinary: ``v[0]``): one message, two
    events. The names are compared as gunicorn upper-cases them, so ``ce-Foo`` repeats
    ``CE-FOO``.
    """

    def __contains__(self, name: object) -> bool:
        return (isinstance(name, str) and name.startswith("CE-")) or super().__contains__(name)


def refuse_repeated_event_attributes() -> None:
    """Have gunicorn refuse a request that repeats a ``ce-*`` header, as it refuses a repeated
    ``Host`` or ``Content-Type`` (RFC 9110, section 5.3): a 400 naming the header, written by
    :func:`_refusal`. A no-op where gunicorn has no such rule (before 23.0).

    gunicorn checks each header of a request against ``RFC9110_5_3_SINGLETON_FIELDS`` as it
    parses it, by HTTP/1.1 and HTTP/2 alike (gunicorn/http/message.py,
    ``_apply_header_policy``): the one place where a request's headers are still a list, before
    the environ joins them. Flask's development server (``--debug``) joins them as it builds
    the environ, and has no such place.
    """
    try:
        from gunicorn.http import message
    except ImportError:
        return
    singletons = getattr(message, "RFC9110_5_3_SINGLETON_FIELDS", None)
    if isinstance(singletons, frozenset):
        message.RFC9110_5_3_SINGLETON_FIELDS = _EventAttributeFields(singletons)


def loaded() -> None:
    """The function's modules are loaded: freeze them (never scanned, shared with the workers
    gunicorn forks) and collect again if this module paused it."""
    gc.freeze()
    if _PAUSED:
        gc.enable()
