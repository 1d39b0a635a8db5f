"""Function servers forked from one process that has already imported the model libraries.

A render server spends most of its start importing torch, diffusers and transformers (about
7 s of CPU here, before it builds the tiny model): gunicorn imports once and forks its workers,
and the suite does the same one level up. With ``-n`` (xdist), the session starts this module as
a process of its own at once; it imports those libraries (never the project's modules), then
forks each server that asks, and the child runs functions-framework's command exactly as
``python -m functions_framework`` does: its own session, environment, working directory and log.
The project's modules, its settings and the model are the child's own, read under its
environment; what the child cannot show is what a fresh process prints while importing the
libraries (tests of that start processes afresh: ``FunctionServer(..., fresh=True)``).

Only a server whose environment equals this process's in every variable the preloaded libraries
read at import is forked (:func:`compatible`); any other starts afresh.

Protocol, one Unix-socket connection per server: the client sends one JSON line (``argv``,
``env``, ``cwd``, ``log``); this process answers the child's pid, then, when the child ends, its
exit status as :class:`subprocess.Popen` gives it (``-N`` for signal N). A connection closed
before that kills the child's process group. The process ends when its stdin closes.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

__all__ = ["ENV_VAR", "ForkedProcess", "compatible", "spawn", "start"]

ENV_VAR = "TESTS_PRELOADED_SOCKET"
"""Where the preloaded process listens (a Unix socket path); unset: every server starts afresh.
Not an ``IMAGEGEN_*`` name: each test's environment drops those (tests/conftest.py)."""
_ENV_VAR_ENV = "TESTS_PRELOADED_ENV"

# What the preloaded libraries read from the environment while they are imported (e.g.
# huggingface_hub/constants.py: HF_HOME, HF_HUB_OFFLINE; torch: TORCH_*, OMP_NUM_THREADS).
_READ_AT_IMPORT = (
    "ACCELERATE",
    "CUDA",
    "DIFFUSERS",
    "HF_",
    "HUGGINGFACE",
    "KMP_",
    "LD_",
    "MKL_",
    "OMP_",
    "PEFT",
    "PYTHONHASHSEED",
    "PYTHONPATH",
    "PYTORCH",
    "SAFETENSORS",
    "TOKENIZERS",
    "TORCH",
    "TRANSFORMERS",
)


def _read_at_import(env: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k.startswith(_READ_AT_IMPORT)}


def compatible(env: Mapping[str, str]) -> bool:
    """Whether a server with ``env`` can be forked: the same libraries' variables as ours."""
    base = os.environ.get(_ENV_VAR_ENV)
    return base is not None and _read_at_import(env) == json.loads(base)


def start(directory: Path) -> subprocess.Popen[bytes]:
    """Start the preloaded process; export where it listens to this process's children."""
    path = directory / "preloaded.sock"
    env = dict(os.environ)  # offline already: tests/__init__.py
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.functions.preloaded", str(path)],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=Path(__file__).resolve().parents[2],
    )
    while not path.exists():  # it binds before it imports anything heavy
        if process.poll() is not None:
            raise RuntimeError("the preloaded process exited at start")
        time.sleep(0.01)
    os.environ[ENV_VAR] = str(path)
    os.environ[_ENV_VAR_ENV] = json.dumps(_read_at_import(env))
    return process


class ForkedProcess:
    """A forked server, as much of :class:`subprocess.Popen` as the tests use."""

    def __init__(self, connection: socket.socket, pid: int) -> None:
        self._connection = connection
        self._buffer = b""
        self.pid = pid
        self.returncode: int | None = None

    def _read(self, timeout: float | None) -> None:
        self._connection.settimeout(timeout)
        while b"\n" not in self._buffer:
            chunk = self._connection.recv(64)
            if not chunk:
                raise RuntimeError(f"the preloaded process ended before server {self.pid}")
            self._buffer += chunk
        self.returncode = int(self._buffer.split(b"\n")[0])
        self._connection.close()

    def poll(self) -> int | None:
        if self.returncode is None:
            with contextlib.suppress(TimeoutError, BlockingIOError):
                self._read(0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            try:
                self._read(timeout)
            except TimeoutError:
                raise subprocess.TimeoutExpired(f"server {self.pid}", timeout or 0) from None
        assert self.returncode is not None
        return self.returncode


def spawn(argv: list[str], env: Mapping[str, str], cwd: Path, log: Path) -> ForkedProcess | None:
    """Fork a server from the preloaded process; None where there is none to ask."""
    path = os.environ.get(ENV_VAR)
    if path is None:
        return None
    connection = socket.socket(socket.AF_UNIX)
    try:
        connection.connect(path)
    except OSError:
        connection.close()
        return None
    request = {"argv": argv, "env": dict(env), "cwd": str(cwd), "log": str(log)}
    connection.sendall(json.dumps(request).encode() + b"\n")
    connection.settimeout(300)  # the libraries' imports come first, once
    line = b""
    while not line.endswith(b"\n"):
        chunk = connection.recv(64)
        if not chunk:
            connection.close()
            return None
        line += chunk
    return ForkedProcess(connection, int(line))


# -- the preloaded process ------------------------------------------------------------------


def _run_server(request: dict[str, object]) -> None:
    """In the child: become the server process functions-framework's command makes; never
    returns."""
    import runpy
    import traceback

    code = 1
    try:
        os.setsid()
        for number in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGPIPE):
            signal.signal(number, signal.SIG_DFL)
        signal.set_wakeup_fd(-1)
        log = os.open(str(request["log"]), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.closerange(3, 1024)  # the socket, the other servers' connections, the wakeup pipe
        os.chdir(str(request["cwd"]))
        os.environ.clear()
        os.environ.update(request["env"])  # type: ignore[arg-type]
        sys.argv = ["functions_framework", *request["argv"]]  # type: ignore[misc]
        runpy.run_module("functions_framework", run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as exit:
        code = exit.code if isinstance(exit.code, int) else int(exit.code is not None)
    except BaseException:
        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _preload() -> None:
    """What a served function imports before it can answer: the model libraries first."""
    import boto3  # noqa: F401
    import diffusers  # noqa: F401
    import functions_framework  # noqa: F401
    import gunicorn.app.base
    import gunicorn.workers.gthread  # noqa: F401
    import pydantic  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
    from diffusers import AutoencoderKL, FluxPipeline, FluxTransformer2DModel  # noqa: F401
    from transformers import CLIPTextModel, T5EncoderModel  # noqa: F401


def _serve(path: str) -> None:
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(64)
    _preload()
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_write, False)
    signal.set_wakeup_fd(wake_write)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    children: dict[int, socket.socket | None] = {}  # None: its client went away
    pending: dict[socket.socket, bytes] = {}

    def reap() -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            connection = children.pop(pid, None)
            if connection is not None:
                code = os.waitstatus_to_exitcode(status)
                with contextlib.suppress(OSError):
                    connection.sendall(b"%d\n" % code)
                connection.close()

    while True:
        clients = [c for c in children.values() if c is not None]
        watched = [sys.stdin, listener, wake_read, *pending, *clients]
        readable, _, _ = select.select(watched, [], [])
        if sys.stdin in readable and not sys.stdin.buffer.read1(1):
            break  # the session is over
        if wake_read in readable:
            os.read(wake_read, 512)
            reap()
        if listener in readable:
            connection, _ = listener.accept()
            pending[connection] = b""
        for connection in [c for c in pending if c in readable]:
            chunk = connection.recv(1 << 16)
            pending[connection] += chunk
            if not chunk:
                del pending[connection]
                connection.close()
            elif pending[connection].endswith(b"\n"):
                request = json.loads(pending.pop(connection))
                pid = os.fork()
                if pid == 0:
                    _run_server(request)
                children[pid] = connection
                connection.sendall(b"%d\n" % pid)
        for pid, client in list(children.items()):
            if client is None or client not in clients or client not in readable:
                continue
            with contextlib.suppress(OSError):
                if client.recv(1):
                    continue  # a client says nothing more after its request
            # Its client went away: so does its server (gone already if it lost the race).
            client.close()
            children[pid] = None
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
    for pid in children:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)


if __name__ == "__main__":
    _serve(sys.argv[1])
