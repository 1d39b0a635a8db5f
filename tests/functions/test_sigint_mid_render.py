"""Ctrl-C (SIGINT) of a served render while it renders: the render is stopped, its request
answered the retryable 503 of a function closing, and nothing is logged at ERROR. An ordinary
stop is no failure: alerts and the runbook start from ERROR lines (docs/runbook.md)."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.functions.conftest import base_env
from tests.functions.servers import FunctionServer


@pytest.mark.slow
def test_a_render_stopped_by_sigint_is_a_retryable_503_and_no_error(tmp_path: Path) -> None:
    env = {**base_env(tmp_path / "store"), "WORKERS": "1"}
    # A new interpreter, as in the container: a process forked from the suite's preloaded one
    # ends without the interpreter's exit, where the function closes.
    server = FunctionServer("render", env, log_dir=tmp_path, fresh=True)
    # The most steps, at the largest size a test renders in moments: the signal comes while
    # the pipeline still has many steps to go, and the close stops it at the next.
    body = {"prompt": "a red door", "width": 1024, "height": 1024, "steps": 50, "seed": 5}
    replies: list[httpx.Response] = []
    with server:
        server.wait("/readyz")
        assert server.process is not None
        worker = server.worker()
        request = threading.Thread(target=lambda: replies.append(server.post("/", json=body)))
        request.start()
        server.logged("rendering")
        os.kill(worker, signal.SIGINT)  # Ctrl-C, as gunicorn's worker gets it
        request.join(120)
        deadline = time.monotonic() + 60
        while Path(f"/proc/{worker}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
    logs = server.logs()
    [reply] = replies
    assert reply.status_code == 503, (reply.text, logs)
    answer = reply.json()
    assert answer["error"] == "dependency_unavailable" and answer["retryable"] is True
    assert "shutting down" in answer["message"] and int(reply.headers["Retry-After"]) > 0
    records = server.log_records()
    failed = [r for r in records if r.get("message", "").startswith("request failed")]
    assert [(r["level"], r["status"]) for r in failed] == [("WARNING", 503)], logs
    assert not [r for r in records if r.get("level") in ("ERROR", "CRITICAL")], logs
    assert "Traceback" not in logs, logs
