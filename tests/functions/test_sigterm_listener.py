"""After SIGTERM a served function stops listening at once: a new connection is refused, which
a client retries elsewhere, while the request under way is answered and the process exits 0.

Without it, gunicorn's master closes its listening socket but the worker keeps its own copy
open until it exits: a connection made meanwhile (a probe's too) waits unanswered in the
backlog for as long as the request under way takes, and is then reset.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.fakes.ollama_server import FakeOllama, reply
from tests.functions.conftest import base_env
from tests.functions.servers import FunctionServer, free_port

UNDER_WAY_SECONDS = 6.0
"""How long Ollama takes to write the prompt of the request under way."""


def _refused_within(port: int, seconds: float) -> bool:
    """Whether a connection to ``port`` is refused within ``seconds``: until then, one that is
    taken (before the worker stopped listening) is closed and tried again."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except ConnectionRefusedError:
            return True
        except OSError:
            pass
        time.sleep(0.05)
    return False


def test_after_sigterm_a_new_connection_is_refused_and_the_request_under_way_answered(
    tmp_path: Path,
) -> None:
    ollama = FakeOllama()
    ollama.port = free_port()
    ollama.answer(reply({"prompt": "a quiet harbour at dawn"}, delay=UNDER_WAY_SECONDS))
    with ollama:
        env = {**base_env(tmp_path / "store"), "IMAGEGEN_OLLAMA_HOST": ollama.url}
        with FunctionServer("enhance", env, log_dir=tmp_path) as server:
            server.wait("/readyz")
            answers: list[httpx.Response | Exception] = []

            def under_way() -> None:
                try:
                    answers.append(server.post("/", json={"prompt": "a harbour"}, timeout=60))
                except Exception as exc:
                    answers.append(exc)

            request = threading.Thread(target=under_way)
            request.start()
            deadline = time.monotonic() + 30
            while not ollama.chat_requests:  # enhance now waits on Ollama: under way
                assert time.monotonic() < deadline and request.is_alive(), answers
                time.sleep(0.02)
            assert server.process is not None
            signalled = time.monotonic()
            os.kill(server.process.pid, signal.SIGTERM)  # the master, PID 1 in its container
            assert _refused_within(server.port, 3.0), server.logs()
            with pytest.raises(httpx.ConnectError):  # not a wait for the request under way
                httpx.get(server.url + "/readyz", timeout=3)
            assert time.monotonic() - signalled < UNDER_WAY_SECONDS
            request.join(60)
            assert server.process.wait(60) == 0, server.logs()
    assert not [r for r in server.log_records() if r.get("level") in ("ERROR", "CRITICAL")]
    [answer] = answers
    assert isinstance(answer, httpx.Response), answer
    assert answer.status_code == 200, answer.text
    assert answer.json()["prompt"].startswith("a quiet harbour at dawn")
