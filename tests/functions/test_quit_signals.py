"""Ctrl-C (SIGINT, then the master's SIGQUIT) of a function served as in its container, as
its worker's main thread submits a connection to its thread pool: the server still exits at
once, exit 0. gthread's own quit shut the pool down under the pool's lock, which that thread
holds as it submits: the worker waited on it for good, and the master killed it after its
graceful timeout (an hour: ``_process.DRAIN_SECONDS``)."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROOT
from tests.functions.conftest import base_env
from tests.functions.servers import FunctionServer

_HELD_SUBMIT = ROOT / "tests" / "functions" / "held_submit"
"""A ``sitecustomize`` holding the server's thread pool's lock in a submit, once asked to."""


@pytest.mark.slow
def test_ctrl_c_as_the_worker_submits_a_connection_ends_the_server_at_once(
    tmp_path: Path,
) -> None:
    flag = tmp_path / "hold-the-next-submit"
    path = os.pathsep.join(filter(None, [str(_HELD_SUBMIT), os.environ.get("PYTHONPATH")]))
    env = {**base_env(tmp_path / "store"), "WORKERS": "1", "PYTHONPATH": path}
    env["SUBMIT_HELD_ONCE"] = str(flag)
    # A new interpreter, as in the container: one that runs the sitecustomize.
    server = FunctionServer("persist", env, log_dir=tmp_path, fresh=True)
    with server:
        with httpx.Client(timeout=10) as client:  # the connection kept alive
            assert client.get(server.url + "/healthz").status_code == 200
            flag.touch()
        # Closed: the worker's main thread submits it, and is held there.
        server.logged("submit held", timeout=10)
        assert server.process is not None
        os.killpg(server.process.pid, signal.SIGINT)  # a terminal's Ctrl-C: the whole group
        try:
            exit_status = server.process.wait(10)
        except subprocess.TimeoutExpired:
            exit_status = None
    logs = server.logs()
    assert exit_status == 0, logs
    assert "SIGKILL" not in logs and "Traceback" not in logs, logs
