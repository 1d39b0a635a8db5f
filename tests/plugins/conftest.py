"""Fixtures for the plugin tests: settings, a fixed request time, a JSON endpoint on loopback."""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from imagegen.settings import Settings

NOW = datetime(2026, 11, 24, 9, 30, tzinfo=UTC)


@pytest.fixture
def settings() -> Settings:
    return Settings(timezone="UTC", holiday_countries=["US"])


class _Handler(BaseHTTPRequestHandler):
    released: threading.Event

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _send(self, status: int, body: bytes, *, length: bool = True) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        if length:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.wfile.write(body)

    def do_GET(self) -> None:
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
            self._send(200, json.dumps({"blob": "x" * 1_000_000}).encode(), length=False)
        elif self.path == "/slow":
            self.released.wait(5)
            self._send(200, b'{"late": "yes"}')
        elif self.path == "/text":
            self._send(200, b"def evil(): pass")
        elif self.path == "/list":
            self._send(200, b'["a", "b"]')
        elif self.path == "/empty":
            self._send(200, b'{"n": 1}')
        else:
            self._send(500, b'{"error": "boom"}')


class JsonEndpoint:
    """A loopback HTTP server with fixed routes for the remote_context plugin."""

    def __init__(self) -> None:
        released = threading.Event()

        class Handler(_Handler):
            pass

        Handler.released = released
        self.released = released
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.block_on_close = False
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}{path}"

    def __enter__(self) -> JsonEndpoint:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.released.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def endpoint() -> Iterator[JsonEndpoint]:
    with JsonEndpoint() as server:
        yield server
