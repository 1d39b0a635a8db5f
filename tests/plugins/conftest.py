"""Fixtures for the plugin tests: settings, a fixed request time, a JSON endpoint on loopback."""

from __future__ import annotations

import contextlib
import json
import threading
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


class JsonEndpoint(LoopbackServer):
    """A loopback HTTP server with fixed routes for the remote_context plugin."""

    def __init__(self) -> None:
        self.released = threading.Event()
        super().__init__(type("Handler", (_Handler,), {"released": self.released}))

    def at(self, path: str) -> str:
        return self.url + path

    def stop(self) -> None:
        self.released.set()
        super().stop()


@pytest.fixture
def endpoint() -> Iterator[JsonEndpoint]:
    with JsonEndpoint() as server:
        yield server
