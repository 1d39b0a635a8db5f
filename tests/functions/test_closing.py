"""A served function closes what its stage holds as its worker exits (SIGTERM), in bounded
time: the enhance function's plugins get their ``aclose``; render's model load under way is
stopped, and said to be, as no failure."""

from __future__ import annotations

import os
import signal
import threading
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest

from tests.fakes.loopback import LoopbackServer
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
    assert took < 20, server.logs()  # the plugin's bound, 5 s, and the exit itself
    said = [r["message"] for r in server.log_records() if r.get("level") == "WARNING"]
    # Given up on by the plugins' own bound, which names it, before the function's.
    assert "plugin never_closing did not close: timed out after 5s" in said, server.logs()
    assert not (tmp_path / "closed").exists()


def test_the_function_s_close_outlasts_a_plugin_s() -> None:
    """The function's bound is the backstop: a plugin's close that hangs is given up on, and
    named, by its own bound first, not cut short by the function's with no name."""
    import sys

    from tests.conftest import ROOT

    if str(ROOT / "functions") not in sys.path:
        sys.path.insert(0, str(ROOT / "functions"))
    import _adapter

    from imagegen.plugins import _running

    assert _adapter.CLOSE_SECONDS >= _running.CLOSE_SECONDS + 1


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


class _Hub(BaseHTTPRequestHandler):
    """A model hub that answers nothing until released, then 404 to everything: a model load
    hangs in its download, exactly where a cold start spends its time, and fails once let go.
    Each test makes its own (:func:`_hub`)."""

    reached: threading.Event
    released: threading.Event

    def _answer(self) -> None:
        self.reached.set()
        self.released.wait(120)
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_HEAD = _answer

    def log_message(self, *args: Any) -> None:
        pass


def _hub() -> type[_Hub]:
    return type("Hub", (_Hub,), {"reached": threading.Event(), "released": threading.Event()})


@pytest.mark.parametrize(
    "ends_after",
    [
        pytest.param(1.0, id="the-load-fails-while-the-close-waits-for-it"),
        pytest.param(3.0, id="the-load-ends-after-the-close-stopped-it"),
    ],
)
def test_a_sigterm_while_the_model_loads_stops_the_start_up_without_an_error(
    tmp_path: Path, ends_after: float
) -> None:
    """A pod scaled down, or replaced by a rollout, while render loads its model: the start-up
    stops as the process exits, said at INFO. An ERROR ``start-up failed`` is the line an
    operator reads to find why a pod could not start.

    The load's thread cannot be stopped: it ends ``ends_after`` seconds into the worker's exit,
    within the close's grace (imagegen.service.CLOSE_GRACE_SECONDS, 2 s: the load's own
    failure comes back), or after the close stopped the call and before it gave up on it (2 s
    more: the call's end comes back as stopped by the close)."""
    hub_handler = _hub()
    with LoopbackServer(hub_handler, port=free_port(), name="hub") as hub:
        env = {
            **base_env(tmp_path / "store"),
            "IMAGEGEN_MODEL": "black-forest-labs/FLUX.1-schnell",
            "IMAGEGEN_ALLOWED_MODELS": "black-forest-labs/FLUX.1-schnell",
            "HF_HUB_OFFLINE": "0",
            "HF_ENDPOINT": hub.url,
            "HF_HOME": str(tmp_path / "hf"),
            "GUNICORN_LOG_LEVEL": "info",  # gunicorn says when its worker exits
        }
        server = FunctionServer("render", env, log_dir=tmp_path)
        try:
            server.start()
            assert hub_handler.reached.wait(120), server.logs()  # the load is under way
            assert server.get("/readyz").json()["status"] == "loading"
            assert server.process is not None
            os.killpg(server.process.pid, signal.SIGTERM)
            _wait_for_line(server, "Worker exiting")
            # The worker closes its service next, at its interpreter's exit, in moments.
            time.sleep(ends_after)
            hub_handler.released.set()
            server.process.wait(60)
        finally:
            hub_handler.released.set()
            server.stop()
    assert server.process.returncode == 0, server.logs()
    said = [
        (r["level"], r["message"])
        for r in server.log_records()
        if r.get("logger") == "imagegen.functions"
    ]
    assert ("INFO", "start-up stopped: the process is exiting") in said, server.logs()
    assert not [m for _, m in said if m.startswith("start-up failed")], server.logs()
    assert not [r for r in server.log_records() if r.get("level") in ("ERROR", "CRITICAL")]


def _wait_for_line(server: FunctionServer, start: str) -> None:
    """Wait until the server has logged a line whose message starts with ``start``."""
    deadline = time.monotonic() + 60
    while not any(r.get("message", "").startswith(start) for r in server.log_records()):
        assert time.monotonic() < deadline, server.logs()
        time.sleep(0.02)
