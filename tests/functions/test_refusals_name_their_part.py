"""Refusals of a real served function (gunicorn) name the part of the request at fault, and
fit what a broker keeps of an error's body, whoever wrote them: the function, or the server
before the function saw the request."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator

import httpx
import pytest

from tests.functions.conftest import base_env
from tests.functions.servers import FunctionServer

MAX_BODY_BYTES = 1024 * 1024
"""The most a stage reads of a body (functions/_binding.py, ``MAX_BODY_BYTES``)."""
DELIVERED_ERROR_BODY_MAX = 768
"""The most of an error's body a channel-based broker's dispatcher keeps without panicking
(functions/_binding.py, ``DELIVERED_ERROR_BODY_MAX``)."""


@pytest.fixture(scope="module")
def enhance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FunctionServer]:
    logs = tmp_path_factory.mktemp("logs")
    with FunctionServer("enhance", base_env(logs / "store"), log_dir=logs) as server:
        yield server


def _raw(server: FunctionServer, request: bytes) -> tuple[bytes, bytes]:
    """Send ``request`` as it is; the answer's head and body."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(request)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    return head, body


def test_a_body_one_byte_over_the_limit_is_a_413_naming_the_body(enhance: FunctionServer) -> None:
    body = b"x" * (MAX_BODY_BYTES + 1)
    reply = enhance.post("/", content=body, headers={"Content-Type": "application/json"})
    assert reply.status_code == 413, reply.text
    error = reply.json()
    assert error["error"] == "payload_too_large" and error["retryable"] is False
    assert [e["field"] for e in error["errors"]] == ["body"], error
    # One byte less is read, and refused for what it is: no JSON object.
    within = enhance.post("/", content=body[1:], headers={"Content-Type": "application/json"})
    assert within.status_code == 400 and [e["field"] for e in within.json()["errors"]] == ["body"]


def test_a_method_the_path_does_not_take_is_a_405_naming_the_method(
    enhance: FunctionServer,
) -> None:
    reply = httpx.put(enhance.url + "/", json={"prompt": "a calm lake"}, timeout=30)
    assert reply.status_code == 405, reply.text
    assert reply.headers["Allow"] == "POST"
    error = reply.json()
    assert error["error"] == "method_not_allowed" and error["retryable"] is False
    assert [e["field"] for e in error["errors"]] == ["method"], error
    assert "PUT" in error["errors"][0]["message"]


def test_a_refusal_of_the_server_quoting_the_request_fits_what_a_broker_keeps(
    enhance: FunctionServer,
) -> None:
    """gunicorn's own message quotes what it refused (a header's name, here 4,003 bytes,
    within its 8,190 a line); its answer is cut as a function's own error answered to a
    delivery is, still JSON naming the part at fault."""
    name = "X-" + "a" * 4000 + "("  # "(" is no token character (RFC 9110, section 5.6.2)
    request = (
        f"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\n{name}: 1\r\n"
        "ce-specversion: 1.0\r\nContent-Type: application/json\r\n"
        "Content-Length: 2\r\nConnection: close\r\n\r\n{}"
    )
    head, body = _raw(enhance, request.encode())
    assert head.startswith(b"HTTP/1.1 400 Bad Request"), head
    assert len(body) <= DELIVERED_ERROR_BODY_MAX, (len(body), body[:200])
    assert f"Content-Length: {len(body)}".encode() in head, head
    error = json.loads(body)
    assert error["error"] == "invalid_request" and error["retryable"] is False
    assert error["errors"] == [{"field": "headers", "message": "Bad Request"}], error
    assert error["message"].lower().startswith("bad request: invalid http header"), error
    assert "<html>" not in enhance.logs()
