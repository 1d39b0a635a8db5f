"""A served function says when it begins to close as its worker exits, and when it has closed:
gunicorn's own lines of the exit are below its default level (``GUNICORN_LOG_LEVEL=error``),
and without these an operator reading a pod's log cannot tell a stop from a hang."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

from tests.functions.conftest import base_env
from tests.functions.servers import FunctionServer

CLOSING = "closing as the process exits; requests in flight: 0"


def test_sigterm_logs_the_close_as_it_begins_and_once_it_is_done(tmp_path: Path) -> None:
    # A new interpreter, as in the container: a process forked from the suite's preloaded one
    # ends without the interpreter's exit, where the function closes.
    server = FunctionServer("enhance", base_env(tmp_path / "store"), log_dir=tmp_path, fresh=True)
    with server:
        server.wait("/readyz")
        assert server.process is not None
        worker = server.worker()
        os.kill(server.process.pid, signal.SIGTERM)  # the master, PID 1 in its container
        assert server.process.wait(60) == 0, server.logs()
    assert not Path(f"/proc/{worker}").exists()  # the worker exited too: its lines are all in
    records = server.log_records()
    [closing] = [r for r in records if r.get("message") == CLOSING]
    [closed] = [r for r in records if re.fullmatch(r"closed in \d+\.\d\ds", r.get("message", ""))]
    assert records.index(closing) < records.index(closed)
    for record in (closing, closed):
        assert record["level"] == "INFO", record
        assert record["logger"] == "imagegen.functions" and record["stage"] == "enhance"
    assert closing["in_flight"] == 0
    assert 0 <= closed["seconds"] < 5.0  # within the close's bound (_adapter.CLOSE_SECONDS)
    assert not [r for r in records if r.get("level") in ("ERROR", "CRITICAL")], server.logs()
