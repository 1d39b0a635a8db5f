"""The functions as real HTTP servers inside the test process (so its exporters see them)."""

from __future__ import annotations

import threading
import time
from typing import Any, Self

import functions_framework
import httpx
from werkzeug.serving import BaseWSGIServer, make_server

from tests.conftest import ROOT

__all__ = ["InProcessServer"]


class InProcessServer:
    """One function, built by functions-framework, served by werkzeug on a free port."""

    def __init__(self, stage: str) -> None:
        self.stage = stage
        source = ROOT / "functions" / f"{stage}.py"
        self.app: Any = functions_framework.create_app(stage, str(source))
        self._server: BaseWSGIServer | None = None
        self._thread: threading.Thread | None = None
        self.url = ""

    def start(self) -> Self:
        self._server = make_server("127.0.0.1", 0, self.app, threaded=True)
        self.url = f"http://127.0.0.1:{self._server.server_port}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, name=f"serve-{self.stage}", daemon=True
        )
        self._thread.start()
        return self

    def wait(self, path: str, *, timeout: float = 60.0) -> None:
        """Wait until ``path`` answers 200 (the first request starts the function)."""
        deadline = time.monotonic() + timeout
        # One client for the polls: ``httpx.get`` builds a TLS context each call (~50 ms CPU).
        with httpx.Client(timeout=5.0) as client:
            while True:
                response = client.get(self.url + path)
                if response.status_code == 200:
                    return
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"{self.stage} {path}: {response.status_code} {response.text}"
                    )
                time.sleep(0.05)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(5)
