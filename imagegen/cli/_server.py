"""``python -m imagegen.cli._server ARGS``: the process ``imagegen serve`` becomes.

It runs functions-framework's own command, ``python -m functions_framework ARGS`` (the one a
function's container runs), in this process, and adds what the command line says of every
command:

- A Ctrl-C before the server listens (the function's imports take a second or more) is the
  one line ``imagegen: error: interrupted`` and exit 130, not click's ``Aborted!`` (exit 1)
  nor a traceback of the import it broke into. Once it listens, SIGINT is the server's:
  gunicorn's arbiter takes it over as it starts, werkzeug's development server (``--debug``)
  ends at the ``KeyboardInterrupt``; either exits 0.
- ``serving STAGE on http://HOST:PORT`` on stderr once the server listens, not before.
- Werkzeug's lines (``--debug``) carry no ANSI style where stderr is no terminal, or
  ``NO_COLOR`` is set.

It imports nothing of imagegen but this package's ``__init__``: the function imports what it
needs, as it does in its container.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import runpy
import signal
import socket
import stat
import sys
import threading
import time
from types import FrameType
from typing import NoReturn

from imagegen.cli import _INTERRUPTED, _no_color

__all__ = ["address", "main", "start"]

_EVERY = 0.05
"""Seconds between two looks at whether the server listens yet."""


def address(host: str) -> tuple[str, str]:
    """``host`` bare (to bind and connect to) and as a URL writes it: an IPv6 address in
    brackets (RFC 3986's IP-literal), given bare or in them."""
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") and ":" in host else host
    return bare, f"[{bare}]" if ":" in bare else bare


def start(args: list[str]) -> NoReturn:
    """Become the server: ``python -m imagegen.cli._server args`` in place of this process.

    ``args`` are functions-framework's command's. SIGINT is held, from here until the new
    process has set its handler (:func:`main`): a Ctrl-C meanwhile, while Python starts and
    imports this module there, is said then, in the one line, rather than as a traceback.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    held = _hold_sigint(signal.SIG_BLOCK)
    try:
        # functions-framework's own command, its public interface and the one containers run,
        # replacing this process as it does theirs (its signals and exit status are the
        # server's own), run by this module there.
        command = [sys.executable, "-m", __name__, *args]
        os.execv(sys.executable, command)  # noqa: S606
    finally:  # not replaced after all: SIGINT is this process's again
        if held:
            _hold_sigint(signal.SIG_UNBLOCK)


def _hold_sigint(how: int) -> bool:
    """Block or unblock SIGINT for this thread (kept across exec); False where the platform
    has no signal masks (Windows)."""
    if not hasattr(signal, "pthread_sigmask"):
        return False
    signal.pthread_sigmask(how, {signal.SIGINT})
    return True


def main(args: list[str]) -> None:
    """Run ``python -m functions_framework args`` in this process; see the module."""
    # Werkzeug's reloader (--debug) runs this module again, in a process of its own that
    # serves the socket the first one listens on: the first says where it serves, and stops
    # this one at its Ctrl-C; here SIGINT is the server's from the start.
    reloaded = os.environ.get("WERKZEUG_RUN_MAIN") == "true"
    serving = threading.Event()
    # Only over Python's own handler: a process started ignoring SIGINT (nohup, a script's
    # background job) goes on ignoring it.
    if not reloaded and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, functools.partial(_interrupted, serving))
    _hold_sigint(signal.SIG_UNBLOCK)  # held by start(): one that came meanwhile comes now
    if "--debug" in args and not (sys.stderr.isatty() and not _no_color()):
        import werkzeug.serving

        # Werkzeug styles its lines wherever they go (werkzeug/serving.py, _ansi_style).
        werkzeug.serving._log_add_style = False
    options, _ = _ARGUMENTS.parse_known_args(args)
    if not reloaded and options.host is not None and options.port is not None:
        said = f"serving {options.target} on http://{address(options.host)[1]}:{options.port}\n"
        threading.Thread(
            target=_say_once_listening,
            args=(options.port, said, serving),
            name="imagegen-serving",
            daemon=True,
        ).start()
    if "--debug" not in args:
        _quit_without_the_pools_lock()
    # sys.argv is already [this file, *args]: what the command reads its options from.
    runpy.run_module("functions_framework", run_name="__main__", alter_sys=True)


def _quit_without_the_pools_lock() -> None:
    """Have gunicorn's gthread worker quit (SIGQUIT, SIGINT: Ctrl-C) as its base class does,
    whichever function it serves.

    gthread's ``handle_quit`` shuts its thread pool down first (gunicorn/workers/gthread.py,
    ``ThreadWorker.handle_quit``: ``self.tpool.shutdown(wait=False)``), under the pool's
    non-reentrant ``_shutdown_lock`` (CPython's Lib/concurrent/futures/thread.py,
    ``shutdown``), which the worker's main thread, the one the handler interrupts, holds while
    it submits a connection (``submit``; gthread's ``enqueue_req``: a kept-alive one its
    client closes as the Ctrl-C comes). The handler then waited on it for good, and the
    master killed the worker after its graceful timeout, saying so (30 s; an hour for the
    functions of functions/). The shutdown is not needed: it only refuses later submits, the
    requests under way and queued still run, and the main thread ends at the base class's
    ``sys.exit`` (gunicorn/workers/base.py, ``Worker.handle_quit``); the pool's threads are
    joined as the interpreter exits (concurrent.futures' own exit hook, ``_python_exit``).

    A function's process in its container has its workers quit the same way
    (functions/_process.py, ``quit_once``), which this module cannot import: it has the
    function import what it needs, as in its container, and _process sets more than this.
    """
    try:
        from gunicorn.workers import base, gthread
    except ImportError:  # no gunicorn (Windows): werkzeug's server
        return
    gthread.ThreadWorker.handle_quit = base.Worker.handle_quit


_ARGUMENTS = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
_ARGUMENTS.add_argument("--target")
_ARGUMENTS.add_argument("--host")
_ARGUMENTS.add_argument("--port", type=int)


def _interrupted(serving: threading.Event, signum: int, frame: FrameType | None) -> None:
    """SIGINT's handler: once the server listens, Python's own (``KeyboardInterrupt``, for
    werkzeug to stop at); before, the command's one line and exit 130, at once. Nothing is
    served yet, and nothing to finish: a half-imported function is not cleaned up after."""
    if serving.is_set():
        signal.default_int_handler(signum, frame)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # closed, or being written as the signal came
            stream.flush()
    with contextlib.suppress(OSError):  # stderr closed or full: the exit status says it
        os.write(2, _INTERRUPTED.encode())
    os._exit(130)


def _say_once_listening(port: int, said: str, serving: threading.Event) -> None:
    """Write ``said`` on stderr, and set ``serving``, once this process listens on ``port``.

    Its own listening socket, looked for among its file descriptors, not a connection that
    succeeds: another program may have taken the port after the command checked it, and the
    server then fails to bind, never serving. gunicorn's arbiter binds in this process before
    it forks its workers, werkzeug's development server before its reloader's child starts
    (handing the socket down). Written with ``os.write``: gunicorn forks its workers as it
    listens, and a lock held by this thread then (a stream's) would stay held in them.
    """
    while not _listens_on(port):
        time.sleep(_EVERY)
    serving.set()
    with contextlib.suppress(OSError):
        os.write(2, said.encode())


def _listens_on(port: int) -> bool:
    """Whether one of this process's file descriptors is a socket listening on ``port``."""
    for name in _descriptors():
        try:
            fd = int(name)
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                continue
            with socket.socket(fileno=os.dup(fd)) as found:
                listening = found.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
                if listening and found.getsockname()[1] == port:
                    return True
        except (OSError, ValueError, IndexError, TypeError):  # closed meanwhile, not inet
            continue
    return False


def _descriptors() -> list[str]:
    """This process's open file descriptors, by number (Linux's /proc, the BSDs' /dev/fd)."""
    for folder in ("/proc/self/fd", "/dev/fd"):
        with contextlib.suppress(OSError):
            return os.listdir(folder)
    return []


if __name__ == "__main__":
    main(sys.argv[1:])
