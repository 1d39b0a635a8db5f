"""A webhook message's reason says the wait it was given, where that is not the one asked."""

from __future__ import annotations

import re
from datetime import UTC, datetime

import pytest

from imagegen.ledger import Ledger
from imagegen.ledger.outbox import Dispatcher
from imagegen.ledger.webhooks import WebhookSender
from tests.ledger.chain import chain
from tests.ledger.test_webhooks import LOOPBACK, OLD, answering

FAR = "Thu, 01 Jan 2099 00:00:00 GMT"  # decades ahead: read as a day at most


def _round(ledger: Ledger, retry_after: str, **options: float) -> tuple[str, float]:
    """The reason recorded after one round answered 503 with ``retry_after``, and the seconds
    until the message is due again."""
    with answering(503, {"Retry-After": retry_after}) as (url, got):
        ledger.ingest(chain("gen-1", webhook=url)["requested"])
        dispatcher = Dispatcher(ledger, WebhookSender([OLD], LOOPBACK, timeout=2), **options)
        assert dispatcher.run_once() == 1
        dispatcher.stop()
    assert len(got) == 1
    with ledger.transaction() as db:
        (row,) = db.query("SELECT next_attempt_at, last_error FROM webhook_deliveries", {})
    due: datetime = row["next_attempt_at"]
    return row["last_error"], (due - datetime.now(UTC)).total_seconds()


def _kept(reason: str) -> int:
    found = re.fullmatch(r"HTTP 503, Retry-After \d+ s(?: or more)?; next round in (\d+) s", reason)
    assert found is not None, reason
    return int(found[1])


@pytest.mark.parametrize(
    ("retry_after", "asked"),
    [(FAR, "Retry-After 86400 s or more"), ("86400", "Retry-After 86400 s or more")],
)
def test_a_wait_asked_past_the_longest_says_the_longest(
    ledger: Ledger, retry_after: str, asked: str
) -> None:
    """Asked for 2099, or a day, it waits 12 h: the reason says both, never a day alone."""
    reason, due_in = _round(ledger, retry_after, backoff=1)
    assert reason == f"HTTP 503, {asked}; next round in 43200 s"
    assert 43190 < due_in <= 43200


def test_a_wait_asked_past_backoff_max_says_backoff_max(ledger: Ledger) -> None:
    reason, due_in = _round(ledger, "120", backoff=1, backoff_max=30)
    assert reason == "HTTP 503, Retry-After 120 s; next round in 30 s"
    assert 25 < due_in <= 30


def test_a_wait_asked_shorter_than_the_backoff_says_the_backoff(ledger: Ledger) -> None:
    reason, due_in = _round(ledger, "1", backoff=60)
    assert reason.startswith("HTTP 503, Retry-After 1 s; ")
    assert 48 <= _kept(reason) <= 72  # the backoff's, ± 20 %
    assert abs(_kept(reason) - due_in) < 5


def test_the_wait_asked_and_kept_is_said_once(ledger: Ledger) -> None:
    reason, due_in = _round(ledger, "120", backoff=1)
    assert reason == "HTTP 503, Retry-After 120 s"
    assert 110 < due_in <= 120
