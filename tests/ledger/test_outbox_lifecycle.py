"""The webhook outbox as its process stops, without secrets, in a generation's order, and on
timeouts: nothing claimed is stranded, nothing owed goes unseen, no copy is sent at once."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest

from imagegen._threads import DaemonPool
from imagegen.ledger import Ledger, open_ledger
from imagegen.ledger.models import Delivery
from imagegen.ledger.outbox import Dispatcher
from imagegen.ledger.webhooks import WebhookSender
from imagegen.settings import Settings
from imagegen.stages import ledger as ledger_stage
from imagegen.telemetry import METRIC_NAMES
from tests.conftest import ROOT
from tests.fakes.loopback import LoopbackServer
from tests.functions.clients import InProcessFunction
from tests.functions.servers import FunctionServer
from tests.ledger.chain import binary, chain
from tests.ledger.test_outbox import _raw_receiver
from tests.ledger.test_webhooks import LOOPBACK, OLD
from tests.observability.conftest import InMemoryTelemetry, otel  # noqa: F401 - a fixture


@contextmanager
def _slow(seconds: float, status: int = 204) -> Iterator[tuple[str, list[float]]]:
    """A receiver answering each message ``status`` after ``seconds``; yields its URL and when
    each message came."""
    came: list[float] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("content-length", 0)))
            came.append(time.monotonic())
            time.sleep(seconds)
            try:
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()
            except OSError:
                pass  # the sender gave up waiting

        def log_message(self, *args: Any) -> None:
            pass

    with LoopbackServer(Handler, name="webhook-receiver") as server:
        yield server.url + "/hook", came


def _until(done: Callable[[], bool], seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not done() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert done(), "not within the time given"


# -- stopping -----------------------------------------------------------------------------


@pytest.mark.parametrize("ledger_url", ["sqlite"], indirect=True)
def test_sigterm_lets_the_sends_under_way_end_and_claims_nothing_more(
    ledger_url: str, tmp_path: Path
) -> None:
    """Five receivers, four senders: at SIGTERM four messages are being sent and the fifth
    waits. The four are delivered; the fifth is left unclaimed (due, its receiver free), and
    the process exits without an error."""
    with ExitStack() as stack:
        receivers = [stack.enter_context(_slow(3.0)) for _ in range(5)]
        env = {
            "IMAGEGEN_LEDGER_URL": ledger_url,
            "IMAGEGEN_WEBHOOK_SECRETS": OLD,
            "IMAGEGEN_WEBHOOK_ALLOWED": "127.0.0.0/8",
            "IMAGEGEN_WEBHOOK_TIMEOUT": "5",
        }
        # A new interpreter, as in its container: a process forked from the suite's preloaded one
        # ends without the interpreter's exit, whose hooks this test is about.
        server = FunctionServer("ledger", env, log_dir=tmp_path, fresh=True).start()
        try:
            for n, (url, _) in enumerate(receivers):
                event = chain(f"gen-{n}", webhook=url, webhook_events=["started"])["requested"]
                assert server.post("/", **binary(event)).status_code < 300
            _until(lambda: sum(bool(came) for _, came in receivers) == 4)
            assert server.process is not None
            os.killpg(server.process.pid, signal.SIGTERM)
            # The sends under way (3 s each) end first: waited for as long as a loaded machine
            # may need, not FunctionServer.stop's 10 s before it kills.
            server.process.wait(120)
        finally:
            server.stop()
        assert server.process is not None and server.process.poll() is not None
    logs = server.logs()
    assert "cannot schedule new futures" not in logs
    assert not [r for r in server.log_records() if r.get("level") in ("ERROR", "CRITICAL")]
    ledger = open_ledger(ledger_url)
    try:
        states = {n: ledger.delivery_states(f"gen-{n}")["started"] for n in range(5)}
        waiting = [n for n, s in states.items() if s["state"] == "pending"]
        delivered = [n for n, s in states.items() if s["state"] == "delivered"]
        assert len(delivered) == 4 and len(waiting) == 1
        assert states[waiting[0]]["attempts"] == 0
        # Due now, its receiver not held: the next claim (any replica's) takes it.
        [again] = ledger.claim_deliveries(limit=5, lease=60)
        assert (again.generation_id, again.attempts) == (f"gen-{waiting[0]}", 1)
    finally:
        ledger.close()


def test_a_claim_the_senders_cannot_take_is_given_back(ledger: Ledger) -> None:
    # No thread to send on (every sender busy; an interpreter exiting starts none): a claim
    # then made cannot be sent.
    ledger.ingest(chain("gen-1", webhook="https://hooks.example/x")["requested"])
    dispatcher = Dispatcher(ledger, WebhookSender([OLD], LOOPBACK))
    dispatcher._pool = DaemonPool("imagegen-webhook", max_threads=0)
    assert dispatcher.run_once() == 0
    [again] = ledger.claim_deliveries(limit=5, lease=60)
    assert (again.generation_id, again.attempts) == ("gen-1", 1)
    dispatcher.stop()


def test_stopping_ends_a_send_after_its_current_try(ledger: Ledger) -> None:
    with _slow(0.5, status=500) as (url, came):
        ledger.ingest(chain("gen-1", webhook=url, webhook_events=["started"])["requested"])
        sender = WebhookSender([OLD], LOOPBACK, timeout=5)
        dispatcher = Dispatcher(ledger, sender, quick_tries=3, backoff=60)
        dispatcher.start(poll=0.05)
        _until(lambda: bool(came))
        started = time.monotonic()
        dispatcher.stop()
        assert time.monotonic() - started < 2.0
        time.sleep(0.5)
    assert len(came) == 1
    state = ledger.delivery_states("gen-1")["started"]
    assert (state["state"], state["attempts"], state["last_error"]) == ("pending", 1, "HTTP 500")


def test_a_claim_under_way_as_it_stops_is_given_back(
    ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    """stop() comes while a claim waits on the database: the claim's message is not sent but
    given back, due at once with its attempts as before, for any replica to take."""
    claiming, answer = threading.Event(), threading.Event()
    claim = ledger.claim_deliveries

    def slow_claim(**kwargs: Any) -> list[Delivery]:
        claiming.set()
        answer.wait(10)
        return claim(**kwargs)

    with _slow(0.0) as (url, came):
        ledger.ingest(chain("gen-1", webhook=url, webhook_events=["started"])["requested"])
        monkeypatch.setattr(ledger, "claim_deliveries", slow_claim)
        dispatcher = Dispatcher(ledger, WebhookSender([OLD], LOOPBACK))
        dispatcher.start(poll=0.05)
        assert claiming.wait(10)
        stopping = threading.Thread(target=dispatcher.stop)
        stopping.start()
        _until(dispatcher._stop.is_set)  # stop() under way, the claim not yet answered
        answer.set()
        stopping.join(10)
        assert not stopping.is_alive()
        monkeypatch.undo()
        assert not came
        [again] = ledger.claim_deliveries(limit=5, lease=60)
    assert (again.generation_id, again.attempts) == ("gen-1", 1)


# -- timeouts -----------------------------------------------------------------------------


def test_a_try_that_times_out_is_not_repeated_within_the_claim(ledger: Ledger) -> None:
    connections: list[float] = []

    def silent(conn: socket.socket) -> None:
        connections.append(time.monotonic())
        time.sleep(5)

    with _raw_receiver(silent) as url:
        ledger.ingest(chain("gen-1", webhook=url, webhook_events=["started"])["requested"])
        sender = WebhookSender([OLD], LOOPBACK, timeout=0.3)
        dispatcher = Dispatcher(ledger, sender, quick_tries=3, backoff=60)
        assert dispatcher.run_once() == 1
        dispatcher.stop()
    assert len(connections) == 1
    state = ledger.delivery_states("gen-1")["started"]
    assert (state["state"], state["attempts"]) == ("pending", 1)
    assert "no reply within" in state["last_error"]


def test_the_default_webhook_timeout_is_within_standard_webhooks_advice() -> None:
    # Standard Webhooks, "Request timeouts": "somewhere between 15 and 30s".
    default = Settings.model_fields["webhook_timeout"].default
    assert 15 <= default <= 30


# -- a generation's order -----------------------------------------------------------------


def test_a_generations_end_waits_for_its_start(ledger: Ledger) -> None:
    url = "https://hooks.example/x"
    events = chain("gen-1", webhook=url, webhook_events=["started", "completed"])
    for name in ("requested", "enhanced", "rendered", "persisted"):
        ledger.ingest(events[name])
    [started] = ledger.claim_deliveries(limit=5, lease=60)
    assert started.event == "started"
    # Its start not delivered, due again later: its end is due, and waits.
    ledger.finish_delivery(started.msg_id, delivered=False, retry_in=600, attempts=1)
    assert ledger.claim_deliveries(limit=5, lease=60) == []
    # Another generation to the same receiver is not held up by it.
    ledger.ingest(chain("gen-2", webhook=url, webhook_events=["started"])["requested"])
    [other] = ledger.claim_deliveries(limit=5, lease=60)
    assert other.generation_id == "gen-2"
    ledger.finish_delivery(other.msg_id, delivered=True, retry_in=None, attempts=1)
    # The start given up: the end goes.
    ledger.finish_delivery(started.msg_id, delivered=False, retry_in=None, attempts=1)
    [completed] = ledger.claim_deliveries(limit=5, lease=60)
    assert (completed.generation_id, completed.event) == ("gen-1", "completed")


# -- without secrets ----------------------------------------------------------------------


class _Said(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_without_secrets_the_waiting_messages_are_said_and_counted(
    serve_ledger: Callable[..., InProcessFunction],
    otel: InMemoryTelemetry,  # noqa: F811 - the fixture imported above
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("IMAGEGEN_WEBHOOK_SECRETS", raising=False)
    ledger_stage._unsent_said.clear()
    said = _Said()  # on the logger itself: the function's log set-up decides where lines go
    logging.getLogger("imagegen.ledger").addHandler(said)
    try:
        function = serve_ledger()
        for n in range(2):
            event = chain(f"gen-{n}", webhook="https://hooks.example/x")["requested"]
            assert function.post("/", **binary(event)).status_code < 300
    finally:
        logging.getLogger("imagegen.ledger").removeHandler(said)
    warnings = said.messages
    assert [m for m in warnings if m.startswith("webhooks are off")], warnings
    assert len([m for m in warnings if m.startswith("an event names a webhook")]) == 1, warnings
    backlog = [p.point.value for p in otel.points(METRIC_NAMES["webhook_backlog"])]
    assert backlog and backlog[-1] >= 2


EXITING = """
import sys, threading, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from imagegen.ledger import open_ledger
from imagegen.ledger.outbox import Dispatcher
from imagegen.ledger.webhooks import WebhookSender
from tests.ledger.chain import chain
from tests.ledger.test_webhooks import LOOPBACK, OLD

came = []

class Failing(BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length", 0)))
        came.append(time.monotonic())
        time.sleep(1.0)
        self.send_response(500)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass

server = ThreadingHTTPServer(("127.0.0.1", 0), Failing)
threading.Thread(target=server.serve_forever, daemon=True).start()
url = f"http://127.0.0.1:{server.server_address[1]}/hook"
ledger = open_ledger(sys.argv[1])
ledger.ingest(chain("gen-exit", webhook=url, webhook_events=["started"])["requested"])
dispatcher = Dispatcher(ledger, WebhookSender([OLD], LOOPBACK, timeout=5))
dispatcher.start(poll=0.2)
while not came:
    time.sleep(0.01)
import atexit
atexit.register(lambda: print(len(came), flush=True))
"""


def test_at_exit_a_send_under_way_ends_after_its_current_try(tmp_path: Path) -> None:
    """The interpreter exits (the main thread returns, as a worker does at SIGTERM) during a
    try its receiver fails: that try is the last of the round, not the first of three."""
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    script = tmp_path / "exiting.py"
    script.write_text(EXITING)
    done = subprocess.run(
        [sys.executable, str(script), url],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["1"], done.stdout  # tries the receiver saw
    ledger = open_ledger(url)
    try:
        state = ledger.delivery_states("gen-exit")["started"]
        assert (state["state"], state["attempts"]) == ("pending", 1)  # retried next round
    finally:
        ledger.close()
