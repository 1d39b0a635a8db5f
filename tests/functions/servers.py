"""The functions as real HTTP servers: functions-framework (gunicorn) in a subprocess."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Self

import httpx
import pytest

from tests.conftest import CALLER_SETTINGS, ROOT
from tests.functions import preloaded

__all__ = ["FunctionServer", "cloudevent_headers", "free_port", "post_event", "serving"]


def free_port() -> int:
    """A free loopback port below the ephemeral range.

    Ports bound to port 0 (by other tests' servers) and the source ports of outgoing
    connections come from the ephemeral range only, so none of them can take this one between
    now and the moment a server started on it binds it, seconds later.
    """
    ephemeral = Path("/proc/sys/net/ipv4/ip_local_port_range")
    low = int(ephemeral.read_text().split()[0]) if ephemeral.exists() else 32768
    while True:
        port = random.randrange(low // 2, low)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


class FunctionServer:
    """One stage served as in its container (functions-framework's command), on a free
    loopback port.

    Forked from the suite's preloaded process where there is one (:mod:`preloaded`: the model
    libraries already imported); ``fresh`` starts a new interpreter instead, for the tests of
    what a process does while it imports.
    """

    def __init__(
        self, stage: str, env: Mapping[str, str], *, log_dir: Path, fresh: bool = False
    ) -> None:
        self.stage = stage
        self.fresh = fresh
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, **env, "PORT": str(self.port), "THREADS": "4"}
        self.log_path = log_dir / f"{stage}-{self.port}.log"
        self.process: subprocess.Popen[bytes] | preloaded.ForkedProcess | None = None

    def start(self, *, wait: bool = True) -> Self:
        source = ROOT / "functions" / f"{self.stage}.py"
        arguments = ["--target", self.stage, "--source", str(source)]
        arguments += ["--host", "127.0.0.1", "--port", str(self.port)]
        forked = None
        if not self.fresh and preloaded.compatible(self.env):
            forked = preloaded.spawn(arguments, self.env, ROOT, self.log_path)
        self.process = forked or subprocess.Popen(
            [sys.executable, "-m", "functions_framework", *arguments],
            env=self.env,
            stdout=self.log_path.open("ab"),
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            start_new_session=True,  # gunicorn and its worker share one process group
        )
        if wait:
            self.wait("/healthz")
        return self

    def wait(self, path: str, *, timeout: float = 60.0) -> None:
        """Wait until ``path`` answers 200."""
        deadline = time.monotonic() + timeout
        # One client for the polls: ``httpx.get`` builds a TLS context each call (~50 ms CPU).
        with httpx.Client(timeout=1.0) as client:
            while time.monotonic() < deadline:
                assert self.process is not None
                if self.process.poll() is not None:
                    raise RuntimeError(f"{self.stage} exited:\n{self.logs()}")
                try:
                    reply = client.get(self.url + path)
                    # From this stage: not another test's function on a port it never bound.
                    if reply.status_code == 200 and reply.json().get("stage") == self.stage:
                        return
                except (httpx.HTTPError, ValueError):
                    pass
                time.sleep(0.05)
        raise TimeoutError(f"{self.stage} {path} not 200 after {timeout}s:\n{self.logs()}")

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_records(self) -> list[dict[str, Any]]:
        records = []
        for line in self.logs().splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
        return records

    def logged(self, message: str, *, timeout: float = 60.0) -> None:
        """Wait until a log record says ``message`` (render's ``rendering``, say)."""
        deadline = time.monotonic() + timeout
        while not any(record.get("message") == message for record in self.log_records()):
            assert time.monotonic() < deadline, self.logs()
            time.sleep(0.02)

    def worker(self) -> int:
        """The pid of the server's one gunicorn worker: the child of its arbiter."""
        assert self.process is not None
        for entry in Path("/proc").iterdir():
            try:
                status = (entry / "status").read_text()
            except (OSError, ValueError):
                continue  # not a process, or one that ended meanwhile
            if f"\nPPid:\t{self.process.pid}\n" in status:
                return int(entry.name)
        raise LookupError(f"no worker under {self.process.pid}")

    def post(self, path: str = "/", **kwargs: Any) -> httpx.Response:
        return httpx.post(self.url + path, **{"timeout": 120.0, **kwargs})

    def get(self, path: str) -> httpx.Response:
        return httpx.get(self.url + path)

    def kill(self) -> None:
        """SIGKILL the whole process group, as a node failure would."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextmanager
def serving(
    stages: Iterable[str], env: Mapping[str, str], *, log_dir: Path
) -> Iterator[dict[str, FunctionServer]]:
    """``stages`` as real servers on ``env``, started together, each answering ``/healthz``
    before the block; stopped at its end.

    Made before any test's own environment is set up (a module's fixture): the caller's own
    settings (:data:`~tests.conftest.CALLER_SETTINGS`) are left out of what they inherit.
    """
    with pytest.MonkeyPatch.context() as patched:
        for name in list(os.environ):
            if name.startswith(CALLER_SETTINGS):
                patched.delenv(name)
        servers = {stage: FunctionServer(stage, env, log_dir=log_dir) for stage in stages}
    try:
        for server in servers.values():
            server.start(wait=False)
        for server in servers.values():
            server.wait("/healthz")
        yield servers
    finally:
        for server in servers.values():
            server.stop()


def cloudevent_headers(
    event_type: str, *, source: str = "/tests", event_id: str | None = None, **extensions: str
) -> dict[str, str]:
    headers = {
        "ce-specversion": "1.0",
        "ce-type": event_type,
        "ce-source": source,
        "ce-id": event_id or uuid.uuid4().hex,
        "content-type": "application/json",
    }
    headers.update({f"ce-{k}": v for k, v in extensions.items()})
    return headers


def post_event(
    target: Any, event_type: str, data: Any, *, timeout: float = 120.0, **attributes: str
) -> httpx.Response:
    """POST a binary-mode CloudEvent to a URL, or to a function object (``.post``)."""
    headers = cloudevent_headers(event_type, **attributes)
    if isinstance(target, str):
        return httpx.post(target, headers=headers, content=json.dumps(data), timeout=timeout)
    response: httpx.Response = target.post(
        "/", headers=headers, content=json.dumps(data), timeout=timeout
    )
    return response
