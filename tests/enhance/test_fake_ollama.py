"""The fake Ollama keeps to the connection rules of Ollama's Go HTTP server."""

from __future__ import annotations

import socket

from tests.fakes.ollama_server import FakeOllama

REQUEST = b"GET /api/version HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


def _answer(connection: socket.socket) -> bytes:
    """One response: its head, then exactly Content-Length bytes of body."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = connection.recv(4096)
        assert chunk, f"connection closed mid-answer: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        body += connection.recv(4096)
    return head


def test_a_connection_serves_request_after_request_until_stopped() -> None:
    fake = FakeOllama().start()
    try:
        with socket.create_connection(("127.0.0.1", fake.port), timeout=5) as connection:
            for _ in range(2):
                connection.sendall(REQUEST)
                assert _answer(connection).startswith(b"HTTP/1.1 200")
            fake.stop()
            assert connection.recv(4096) == b"", "a stopped Ollama answers no kept-alive connection"
    finally:
        fake.stop()
    assert [r.path for r in fake.requests] == ["/api/version", "/api/version"]
