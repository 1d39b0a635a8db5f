"""The ledger's webhook delivery in metrics: each claim's outcome, and the messages waiting."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from imagegen.ledger import Ledger, open_ledger
from imagegen.ledger.outbox import OUTCOMES, Dispatcher
from imagegen.ledger.webhooks import WebhookSender
from imagegen.stages import ledger as ledger_stage
from imagegen.telemetry import METRIC_NAMES
from tests.ledger.chain import chain
from tests.ledger.test_outbox import _raw_receiver
from tests.ledger.test_webhooks import LOOPBACK, OLD, answering
from tests.observability.conftest import InMemoryTelemetry


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    """A ledger on SQLite (the outbox on both backends: tests/ledger/test_outbox.py)."""
    opened = open_ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    yield opened
    opened.close()


def _counts(otel: InMemoryTelemetry) -> dict[str, int]:
    counted = {outcome: 0 for outcome in OUTCOMES}
    for p in otel.points(METRIC_NAMES["webhook_deliveries"]):
        assert set(p.attributes) == {"outcome"}, "receivers are no label: unbounded"
        counted[p.attributes["outcome"]] += p.point.value
    return counted


def _backlog(otel: InMemoryTelemetry) -> list[float]:
    return [p.point.value for p in otel.points(METRIC_NAMES["webhook_backlog"])]


@pytest.mark.parametrize(
    ("status", "max_attempts", "outcome"),
    [(204, 3, "delivered"), (503, 3, "retried"), (503, 1, "failed"), (410, 3, "refused")],
)
def test_each_claim_is_counted_by_its_outcome(
    otel: InMemoryTelemetry, ledger: Ledger, status: int, max_attempts: int, outcome: str
) -> None:
    before = _counts(otel)
    with answering(status) as (url, got):
        ledger.ingest(chain("gen-1", webhook=url, webhook_events=["started"])["requested"])
        sender = WebhookSender([OLD], LOOPBACK, timeout=2)
        dispatcher = Dispatcher(ledger, sender, quick_tries=1, max_attempts=max_attempts)
        assert dispatcher.run_once() == 1
        dispatcher.stop()
    assert len(got) == 1
    after = _counts(otel)
    assert {k: after[k] - before[k] for k in OUTCOMES} == {k: int(k == outcome) for k in OUTCOMES}


def test_a_silent_receivers_queue_shows_in_the_backlog(
    otel: InMemoryTelemetry, ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The ledger function reports the backlog of a ledger it opened without webhooks too: none
    # is open in this test, whatever another test of this process left open.
    monkeypatch.setattr(ledger_stage, "_opened", {})
    connected = threading.Event()

    def silent(conn: socket.socket) -> None:
        connected.set()
        time.sleep(30)

    with _raw_receiver(silent) as url:
        for n in range(3):
            request = chain(f"gen-{n}", webhook=url, webhook_events=["started"])["requested"]
            ledger.ingest(request)
        dispatcher = Dispatcher(
            ledger, WebhookSender([OLD], LOOPBACK, timeout=2), quick_tries=1, workers=2
        )
        assert _backlog(otel) == []  # reported only while a dispatcher runs
        dispatcher.start(poll=0.05)
        try:
            assert connected.wait(10)
            # One message is being sent (leased: not due); the other two wait for it.
            assert _backlog(otel) == [2]
        finally:
            dispatcher.stop()
    assert _backlog(otel) == []


def test_the_backlog_is_no_value_while_the_ledger_cannot_be_read(
    otel: InMemoryTelemetry, ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    from imagegen.errors import DependencyUnavailable

    dispatcher = Dispatcher(ledger, WebhookSender([OLD], LOOPBACK))
    assert dispatcher.backlog() == 0

    def down() -> None:
        raise DependencyUnavailable("the ledger database is unavailable: refused")

    monkeypatch.setattr(ledger, "statement", down, raising=False)
    monkeypatch.setattr(ledger, "transaction", down)
    assert dispatcher.backlog() is None  # no value, rather than a wrong 0
    dispatcher.stop()
