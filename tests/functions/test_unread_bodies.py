"""A body a function does not read to its end is never read into memory, nor waited for.

functions-framework reads whatever is left of a body after each answer (``read_request``): a
refusal sent before the body was read waited for the whole upload and held it in the worker.
These tests drive real gunicorn servers and measure their worker's memory.
"""

from __future__ import annotations

import http.client
import json
import select
import socket
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import TypeVar

import httpx
import pytest

from imagegen.auth import new_api_key
from tests.conftest import isolated_settings
from tests.fakes.oidc_issuer import SUBJECT, Issuer
from tests.functions.conftest import auth_env, base_env
from tests.functions.servers import FunctionServer, serving

MiB = 1024 * 1024
BODY = 200 * MiB
"""Far more than a function reads (1 MiB), and than a worker's memory may grow by."""
GROWTH = BODY // 8
"""The most a worker's memory may peak above its size once started while it answers one."""
API_KEY, API_KEY_HASH = new_api_key()
T = TypeVar("T")
REQUEST = {"prompt": "a red door", "width": 256, "height": 256, "enhance": False}


@pytest.fixture(scope="module")
def served(
    issuer: Issuer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, FunctionServer]]:
    """enhance and the dead-letter sink, authentication on (OIDC tokens of the issuer's one
    subject, and an API key), as real servers (THREADS=4)."""
    logs = tmp_path_factory.mktemp("logs")
    env = {
        **isolated_settings(logs),
        **base_env(tmp_path_factory.mktemp("store")),
        **auth_env(issuer.url, API_KEY_HASH),
        "IMAGEGEN_AUTH_SUBJECTS": SUBJECT,
    }
    with serving(("enhance", "deadletter"), env, log_dir=logs) as servers:
        yield servers


@pytest.fixture(scope="module")
def sizes(served: dict[str, FunctionServer], issuer: Issuer) -> dict[str, int]:
    """Each server's worker's memory once it has served a request (its first loads what the
    stage uses), before any upload: what its peak is held to.

    Not its size before each upload: memory freed after one the worker buffered may stay with
    the process, and the next upload would find it ready to hold the body again.
    """
    sizes = {}
    for stage, server in served.items():
        token = issuer.sign({}, audience=f"imagegen-{stage}")
        reply = server.post("/", json=REQUEST, headers={"Authorization": f"Bearer {token}"})
        assert reply.status_code < 300, reply.text
        sizes[stage] = _memory(server.worker(), "VmRSS")
    return sizes


def _memory(pid: int, field: str) -> int:
    """``VmHWM`` (the peak) or ``VmRSS`` of ``pid``, in bytes (proc(5))."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise LookupError(field)


def _peak_since(pid: int, size: int, send: Callable[[], T]) -> tuple[T, int]:
    """What ``send`` returns, and how far above ``size`` the memory of ``pid`` peaked meanwhile."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # the peak set to now (proc(5), clear_refs)
    sent = send()
    return sent, _memory(pid, "VmHWM") - size


def _body(size: int, *, chunked: bool) -> Iterator[bytes]:
    """``size`` bytes of JSON whitespace in 1 MiB writes, in chunks of the chunked coding if
    ``chunked``; made as they are sent, never whole."""
    block = b" " * MiB
    for start in range(0, size, MiB):
        piece = block[: min(MiB, size - start)]
        yield b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece
    if chunked:
        yield b"0\r\n\r\n"


def _upload(
    server: FunctionServer,
    path: str = "/",
    *,
    method: str = "POST",
    headers: dict[str, str] | None = None,
    size: int = BODY,
    chunked: bool = False,
    timeout: float = 30.0,
) -> tuple[int | None, float]:
    """Send a request of ``size`` body bytes as fast as the server takes them, reading its
    answer meanwhile, as a proxy does; stop at the answer. Returns its status (None if none came
    within ``timeout``) and the seconds it took."""
    framing = {"Transfer-Encoding": "chunked"} if chunked else {"Content-Length": str(size)}
    lines = [f"{method} {path} HTTP/1.1", "Host: test", "Content-Type: application/json"]
    lines += [f"{k}: {v}" for k, v in {**framing, **(headers or {})}.items()]
    body, pending, reply = _body(size, chunked=chunked), memoryview(b""), b""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        sock.setblocking(False)
        sending = True
        while b"\r\n" not in reply and time.monotonic() - started < timeout:
            readable, writable, _ = select.select([sock], [sock] if sending else [], [], 0.5)
            if readable:
                try:
                    received = sock.recv(4096)
                except ConnectionResetError:
                    break
                if not received:
                    break
                reply += received
            elif writable:
                pending = pending or memoryview(next(body, b""))
                if not pending:
                    sending = False  # all sent: only the answer to wait for
                    continue
                try:
                    pending = pending[sock.send(pending) :]
                except (BrokenPipeError, ConnectionResetError):
                    sending = False  # closed: what it answered may still be read
    status = reply.split(b"\r\n")[0].split(b" ")
    return (int(status[1]) if len(status) > 1 else None), time.monotonic() - started


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_an_unauthenticated_upload_is_refused_before_it_is_read(
    served: dict[str, FunctionServer], sizes: dict[str, int], chunked: bool
) -> None:
    enhance = served["enhance"]
    send = partial(_upload, enhance, chunked=chunked)
    (status, seconds), grew = _peak_since(enhance.worker(), sizes["enhance"], send)
    assert status == 401
    assert seconds < 5, f"answered after {seconds:.1f}s"
    assert grew < GROWTH, f"the worker grew by {grew / MiB:.0f} MiB"


UNREAD = [
    pytest.param("enhance", "POST", "/healthz", None, 405, id="405-a-probe-posted-to"),
    pytest.param("enhance", "GET", "/healthz", None, 200, id="200-a-probe-with-a-body"),
    pytest.param("enhance", "POST", "/favicon.ico", None, 404, id="404-functions-frameworks"),
    pytest.param("enhance", "POST", "/", "api-key", 413, id="413-past-the-first-mib"),
    pytest.param("enhance", "POST", "/", "another-subject", 403, id="403-another-subject"),
    pytest.param("deadletter", "POST", "/", "oidc", 202, id="202-the-sink-keeps-what-fits"),
]


@pytest.mark.parametrize(("stage", "method", "path", "credential", "status"), UNREAD)
def test_what_a_function_leaves_unread_is_never_read(
    served: dict[str, FunctionServer],
    sizes: dict[str, int],
    issuer: Issuer,
    stage: str,
    method: str,
    path: str,
    credential: str | None,
    status: int,
) -> None:
    # Any answer, refusal or not, sent before the body's end: the probes, a caller refused
    # before the body is read, a stage that reads the first MiB and stops; and the 404 that
    # functions-framework answers itself (streamed, so it never read after it).
    server = served[stage]
    audience = f"imagegen-{stage}"
    token = {
        "api-key": API_KEY,
        "oidc": issuer.sign({}, audience=audience),
        "another-subject": issuer.sign({"sub": "system:serviceaccount:x:y"}, audience=audience),
    }
    headers = {"Authorization": f"Bearer {token[credential]}"} if credential else {}
    send = partial(_upload, server, path, method=method, headers=headers)
    (answered, seconds), grew = _peak_since(server.worker(), sizes[stage], send)
    assert answered == status
    assert seconds < 5, f"answered after {seconds:.1f}s"
    assert grew < GROWTH, f"the worker grew by {grew / MiB:.0f} MiB"


def test_slow_uploads_leave_the_probe_answering(served: dict[str, FunctionServer]) -> None:
    enhance = served["enhance"]
    head = (
        f"POST / HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        f"Content-Length: {BODY}\r\n\r\n{{ "
    ).encode()
    uploads: list[socket.socket] = []
    try:
        for _ in range(4):  # one for each of the worker's threads (THREADS)
            uploads.append(socket.create_connection(("127.0.0.1", enhance.port), timeout=3))
            uploads[-1].sendall(head)
        # Each is refused at once, though it sends no more and stays open.
        for upload in uploads:
            assert upload.recv(64).startswith(b"HTTP/1.1 401 ")
        # gunicorn gives each up to 5 s to end its body before it closes the connection
        # (gthread's ``_keepalive_after``): a probe may wait that long, but it is answered.
        started = time.monotonic()
        probe = httpx.get(enhance.url + "/healthz", timeout=10)
        assert probe.status_code == 200
        assert time.monotonic() - started < 10
    finally:
        for upload in uploads:
            upload.close()


def test_a_connection_stays_open_for_the_next_request(served: dict[str, FunctionServer]) -> None:
    authorized = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    exchanges = [
        (authorized, json.dumps(REQUEST), 200),
        (authorized, "{nope", 400),  # refused, its body read to the end
        # Refused unread, but short: gunicorn discards it and keeps the connection.
        ({"Content-Type": "application/json"}, json.dumps(REQUEST), 401),
        (authorized, json.dumps(REQUEST), 200),
    ]
    connection = http.client.HTTPConnection("127.0.0.1", served["enhance"].port, timeout=30)
    try:
        first = None
        for headers, body, status in exchanges:
            connection.request("POST", "/", body=body, headers=headers)
            reply = connection.getresponse()
            assert reply.status == status, reply.read()
            reply.read()
            assert reply.getheader("Connection") == "keep-alive"
            first = first or connection.sock
            assert connection.sock is first  # never closed and opened again
    finally:
        connection.close()
