"""A served function closes what its stage holds as its worker exits (SIGTERM), in bounded
time: the enhance function's plugins get their ``aclose``."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from tests.functions.conftest import base_env
from tests.functions.servers import FunctionServer, free_port
from tests.plugins.sample_plugins import install_distribution

_ENTRY_POINTS = {
    "closing": "tests.plugins.sample_plugins:closing",
    "never_closing": "tests.plugins.sample_plugins:never_closing",
}


def _port() -> int:
    return free_port()


def _enhance(tmp_path: Path, plugins: str) -> FunctionServer:
    """The enhance function in a new interpreter, as in its container (a process forked from
    the suite's preloaded one ends without the interpreter's exit), with ``plugins`` enabled,
    installed as a third-party package declares them."""
    install_distribution(tmp_path / "site", "closing-plugins", _ENTRY_POINTS)
    env = {
        **base_env(tmp_path / "store"),
        "IMAGEGEN_PLUGINS": plugins,
        "CLOSED_MARKER": str(tmp_path / "closed"),
        "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), os.environ.get("PYTHONPATH", "")]),
    }
    server = FunctionServer("enhance", env, log_dir=tmp_path, fresh=True)
    server.port = _port()
    server.url = f"http://127.0.0.1:{server.port}"
    server.env["PORT"] = str(server.port)
    return server


def _terminated(server: FunctionServer) -> float:
    """SIGTERM the server's process group, as the kubelet stops a pod; the seconds to its exit."""
    assert server.process is not None
    started = time.monotonic()
    os.killpg(server.process.pid, signal.SIGTERM)
    server.process.wait(60)
    return time.monotonic() - started


def test_sigterm_closes_the_plugins(tmp_path: Path) -> None:
    server = _enhance(tmp_path, "closing,time_of_day").start()
    try:
        server.wait("/readyz")
        answer = server.post("/", json={"prompt": "a calm lake", "enhance": False})
        assert answer.status_code == 200, answer.text
        assert not (tmp_path / "closed").exists()  # open while it serves
        _terminated(server)
    finally:
        server.stop()
    assert (tmp_path / "closed").read_text() == "closing\n", server.logs()
    assert not [r for r in server.log_records() if r.get("level") in ("ERROR", "CRITICAL")]


def test_a_close_that_hangs_keeps_the_worker_no_longer_than_its_bound(tmp_path: Path) -> None:
    server = _enhance(tmp_path, "never_closing").start()
    try:
        server.wait("/readyz")
        assert server.post("/", json={"prompt": "a calm lake", "enhance": False}).is_success
        took = _terminated(server)
    finally:
        server.stop()
    assert took < 20, server.logs()  # its bound, 5 s, and the exit itself
    said = [r["message"] for r in server.log_records() if r.get("level") == "WARNING"]
    assert "closing took longer than 5s; exiting" in said, server.logs()
    assert not (tmp_path / "closed").exists()


def test_a_request_after_the_close_is_a_retryable_503_and_the_probe_not_ready(
    tmp_path: Path,
) -> None:
    """gunicorn's pool still runs requests queued as the worker exits, after the service is
    closed (Ctrl-C): each is answered a retryable 503, and the readiness probe says not ready,
    never a 500 of a service gone."""
    import sys

    from tests.conftest import ROOT
    from tests.functions.clients import InProcessFunction

    if str(ROOT / "functions") not in sys.path:
        sys.path.insert(0, str(ROOT / "functions"))
    import _adapter

    body = {"prompt": "a calm lake", "enhance": False}
    with InProcessFunction("enhance", base_env(tmp_path / "store")) as enhance:
        assert enhance.post(json=body).status_code == 200
        [function] = [f for f in _adapter._started if f.stage.name == "enhance"][-1:]
        closing = function.stop()
        assert closing is not None
        closing.result(10)
        assert function.stop() is None  # closed once
        answer = enhance.post(json=body)
        probe = enhance.get("/readyz")
    assert answer.status_code == 503, answer.text
    assert answer.json()["retryable"] is True and "Retry-After" in answer.headers
    assert probe.status_code == 503
