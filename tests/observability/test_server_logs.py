"""gunicorn's own lines are JSON, as the library's: one object per line, naming the stage."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from tests.functions.conftest import base_env
from tests.functions.servers import FunctionServer, free_port


def on_port(server: FunctionServer, port: int) -> FunctionServer:
    server.port, server.url = port, f"http://127.0.0.1:{port}"
    server.env["PORT"] = str(port)
    return server


def json_lines(text: str) -> list[dict[str, Any]]:
    """Every line of ``text`` read as JSON: a line that is not fails the test, named."""
    found = []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            found.append(json.loads(line))
        except ValueError:
            pytest.fail(f"not a JSON line: {line!r}\n{text}")
    return found


def workers(master: int) -> list[int]:
    children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
    return [int(pid) for pid in children]


@pytest.mark.slow
def test_a_worker_killed_is_said_in_a_json_line(tmp_path: Path) -> None:
    env = {**base_env(tmp_path / "store"), "GUNICORN_LOG_LEVEL": "info"}
    server = FunctionServer("enhance", env, log_dir=tmp_path, fresh=True)
    with on_port(server, free_port()) as server:
        assert server.process is not None
        [worker] = workers(server.process.pid)
        os.kill(worker, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while "SIGKILL" not in server.logs() or workers(server.process.pid) == [worker]:
            assert time.monotonic() < deadline, server.logs()
            time.sleep(0.1)
        server.wait("/healthz")  # a new worker serves
    records = json_lines(server.logs())
    [killed] = [r for r in records if "SIGKILL" in r["message"]]
    assert killed["message"] == f"Worker (pid:{worker}) was sent SIGKILL! Perhaps out of memory?"
    assert killed["level"] == "ERROR" and killed["logger"] == "gunicorn.error"
    assert killed["stage"] == "enhance" and killed["time"].endswith("+00:00")
    booted = [r for r in records if r["message"].startswith("Booting worker")]
    assert len(booted) == 2 and all(r["level"] == "INFO" for r in booted)


@pytest.mark.slow
def test_a_port_in_use_is_said_in_json_lines(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))  # a port the system gives, held here
        taken.listen()
        server = on_port(
            FunctionServer("persist", base_env(tmp_path / "store"), log_dir=tmp_path, fresh=True),
            taken.getsockname()[1],
        )
        server.start(wait=False)
        assert server.process is not None
        server.process.wait(30)  # gunicorn gives up after its retries
    records = json_lines(server.logs())
    in_use = [r for r in records if r["message"].startswith("Connection in use")]
    assert in_use and all(r["level"] == "ERROR" and r["stage"] == "persist" for r in in_use)
