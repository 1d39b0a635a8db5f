"""Fixtures for the plugin tests: settings, a fixed request time, a JSON endpoint on loopback."""

from __future__ import annotations

import contextlib
import functools
import gzip
import json
import threading
import zlib
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler
from typing import Any

import pytest

from imagegen.settings import Settings
from tests.fakes.loopback import LoopbackServer

NOW = datetime(2026, 11, 24, 9, 30, tzinfo=UTC)


@pytest.fixture
def settings() -> Settings:
    return Settings(timezone="UTC", holiday_countries=["US"])


@functools.cache
def gzip_bomb() -> bytes:
    """A JSON object of 16 MB once decompressed, about 16 KB gzipped (made without the 16 MB)."""
    packer = zlib.compressobj(9, zlib.DEFLATED, zlib.MAX_WBITS | 16)
    parts = [packer.compress(b'{"blob": "')]
    parts += [packer.compress(b" " * (1 << 20)) for _ in range(16)]
    parts += [packer.compress(b'"}'), packer.flush()]
    return b"".join(parts)


class _Handler(BaseHTTPRequestHandler):
    # Keep-alive, as most HTTP servers: a client may send its next request on the connection.
    protocol_version = "HTTP/1.1"
    # Headers and body leave in two writes: without this, the body waits for the client's
    # delayed ACK of the headers (Nagle), 40 ms a request on a kept-alive connection.
    disable_nagle_algorithm = True
    released: threading.Event
    peers: list[int]  # the client's port of each request: one per connection it opened

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _send(
        self, status: int, body: bytes, *, length: bool = True, encoding: str | None = None
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        if encoding is not None:
            self.send_header("Content-Encoding", encoding)
        if length:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.wfile.write(body)

    def do_GET(self) -> None:
        self.peers.append(self.client_address[1])
        if self.path == "/context":
            body = {
                "weather": "light rain\nand mist",
                "mood": "calm",
                "count": 3,
                "nested": {"x": "y"},
            }
            self._send(200, json.dumps(body).encode())
        elif self.path == "/big":
            self._send(200, json.dumps({"blob": "x" * 100_000}).encode())
        elif self.path == "/big-unannounced":  # no Content-Length: only reading tells the size
            self.close_connection = True  # the end of the body is the end of the connection
            self._send(200, json.dumps({"blob": "x" * 1_000_000}).encode(), length=False)
        elif self.path == "/slow":
            self.released.wait(5)
            self._send(200, b'{"late": "yes"}')
        elif self.path == "/text":
            self._send(200, b"def evil(): pass")
        elif self.path == "/list":
            self._send(200, b'["a", "b"]')
        elif self.path == "/surrogate":  # JSON's escapes make a lone surrogate, no UTF-8 text
            self._send(200, b'{"a": "snow \\ud800 storm", "\\udc00": "hail", "mood": "calm"}')
        elif self.path == "/empty":
            self._send(200, b'{"n": 1}')
        elif self.path == "/deep":  # 4000 bytes, nested deeper than the parser recurses
            self._send(200, b"[" * 2000 + b"]" * 2000)
        elif self.path == "/gzip":  # sent gzipped, as asked
            self._send(200, gzip.compress(b'{"weather": "fog"}'), encoding="gzip")
        elif self.path == "/gzip-bomb":  # no Content-Length: only decompressing tells the size
            self.close_connection = True
            self._send(200, gzip_bomb(), length=False, encoding="gzip")
        elif self.path == "/gzip-cut":
            self._send(200, gzip.compress(b'{"weather": "fog"}')[:-12], encoding="gzip")
        elif self.path == "/brotli":  # an encoding not asked for, and not decoded
            self._send(200, b'{"weather": "fog"}', encoding="br")
        else:
            self._send(500, b'{"error": "boom"}')


class JsonEndpoint(LoopbackServer):
    """A loopback HTTP server with fixed routes for the remote_context plugin."""

    def __init__(self) -> None:
        self.released = threading.Event()
        self.peers: list[int] = []
        handler = type("Handler", (_Handler,), {"released": self.released, "peers": self.peers})
        super().__init__(handler)

    def at(self, path: str) -> str:
        return self.url + path

    def stop(self) -> None:
        self.released.set()
        super().stop()


@pytest.fixture
def endpoint() -> Iterator[JsonEndpoint]:
    with JsonEndpoint() as server:
        yield server
