"""A function driven in this process: functions-framework's app, called through httpx's WSGI
transport, so the tests speak HTTP to it without a server, a port or a second process."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Mapping
from concurrent import futures
from typing import Any, Self

import functions_framework
import httpx

from tests.conftest import ROOT

__all__ = ["InProcessFunction"]


class InProcessFunction:
    """One stage's app; started (settings read, model loaded) under ``env`` at creation."""

    def __init__(self, stage: str, env: Mapping[str, str], *, timeout: float = 600.0) -> None:
        self.stage = stage
        saved = dict(os.environ)
        os.environ.update(env)
        try:
            source = ROOT / "functions" / f"{stage}.py"
            self.app: Any = functions_framework.create_app(stage, str(source))
            # functions/_adapter.py, loaded with the function: what it starts, this closes.
            self._adapter = sys.modules["_adapter"]
            before = list(self._adapter._started)
            self.client = httpx.Client(
                transport=httpx.WSGITransport(app=self.app),
                base_url=f"http://{stage}.functions.test",
                timeout=timeout,
            )
            # The first request starts the function: its settings are read from ``env`` now.
            deadline = time.monotonic() + timeout
            while self.client.get("/readyz").json()["status"] == "loading":
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{stage} still loading after {timeout}s")
                time.sleep(0.02)  # polling the probe
            self._mine = [f for f in self._adapter._started if f not in before]
        finally:
            os.environ.clear()
            os.environ.update(saved)

    @property
    def url(self) -> str:
        return str(self.client.base_url)

    def post(self, path: str = "/", **kwargs: Any) -> httpx.Response:
        return self.client.post(path, **kwargs)

    def get(self, path: str) -> httpx.Response:
        return self.client.get(path)

    def close(self) -> None:
        """Close the client and the function this started, as its process would at exit: left
        for the interpreter's exit, the function's closing lines would be written to a stream
        the test run has closed by then."""
        self.client.close()
        started = self._adapter._started
        for function in self._mine:
            if function not in started:
                continue  # closed already
            started.remove(function)
            if (closing := function.stop()) is not None:
                # As the process's exit waits for it (_adapter._close_started).
                futures.wait([closing], timeout=self._adapter.CLOSE_SECONDS)
                function.stopped(closing)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
