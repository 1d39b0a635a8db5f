"""``imagegen ledger prune``: what it deletes, what it keeps, and two of them at once."""

from __future__ import annotations

import threading
import time
from datetime import timedelta
from typing import Any

import pytest

from imagegen.ledger import Ledger
from imagegen.ledger._statements import PRUNE
from imagegen.ledger.postgres import PostgresLedger
from tests.ledger.chain import chain

HOOK = "https://hooks.example/x"
# A cutoff a second ahead: everything recorded so far is older than the retention.
EVERYTHING = timedelta(seconds=-1)


def _recorded_with_webhooks(ledger: Ledger, *gids: str) -> None:
    """Generations that asked for webhooks, recorded where none is sent (webhooks off)."""
    for gid in gids:
        events = chain(gid, webhook=HOOK, webhook_events=["started", "completed"])
        for name in ("requested", "enhanced", "rendered", "persisted"):
            ledger.ingest(events[name])


def _pending(ledger: Ledger) -> list[str]:
    with ledger.transaction() as db:
        rows = db.query(
            "SELECT generation_id, event FROM webhook_deliveries WHERE state = 'pending' "
            "ORDER BY generation_id, event",
            {},
        )
    return [f"{row['generation_id']}:{row['event']}" for row in rows]


def test_prune_deletes_messages_still_pending_after_the_retention(ledger: Ledger) -> None:
    """Webhooks off: the messages wait, pending. Older than the retention they go with the
    generations they are about, rather than pile up and be sent months late."""
    _recorded_with_webhooks(ledger, "gen-1", "gen-2")
    assert _pending(ledger) == [
        "gen-1:completed",
        "gen-1:started",
        "gen-2:completed",
        "gen-2:started",
    ]

    assert ledger.prune(timedelta(days=1)) == {"events": 0, "generations": 0, "deliveries": 0}
    deleted = ledger.prune(EVERYTHING)

    assert deleted == {"events": 8, "generations": 2, "deliveries": 4}
    assert _pending(ledger) == []
    assert ledger.claim_deliveries(limit=10, lease=60) == []


def test_prune_keeps_a_message_being_sent_and_its_outcome_is_recorded(ledger: Ledger) -> None:
    """A message a dispatcher is sending (claimed, its lease not over) is not deleted under
    it: its outcome is recorded, and its receiver stays marked as being sent to until then.
    The next prune deletes it."""
    _recorded_with_webhooks(ledger, "gen-1")
    [sending] = ledger.claim_deliveries(limit=10, lease=60)  # one at a time per receiver
    assert sending.event == "started"

    deleted = ledger.prune(EVERYTHING)

    assert deleted == {"events": 4, "generations": 1, "deliveries": 1}  # completed, waiting
    assert ledger.claim_deliveries(limit=10, lease=60) == []  # its receiver is still busy
    assert ledger.finish_delivery(
        sending.msg_id, delivered=True, retry_in=None, attempts=sending.attempts
    )
    assert ledger.delivery_states("gen-1")["started"]["state"] == "delivered"
    assert ledger.prune(EVERYTHING)["deliveries"] == 1


def test_a_lease_over_before_the_cutoff_keeps_no_message(ledger: Ledger) -> None:
    """A mark left by a dispatcher that stopped mid-send (its lease long over) is no reason
    to keep a message for ever."""
    _recorded_with_webhooks(ledger, "gen-1")
    [stale] = ledger.claim_deliveries(limit=10, lease=0.0)  # its lease ends as it starts

    assert ledger.prune(EVERYTHING)["deliveries"] == 2
    assert ledger.delivery_states("gen-1") == {}
    assert not ledger.finish_delivery(
        stale.msg_id, delivered=True, retry_in=None, attempts=stale.attempts
    )


@pytest.mark.parametrize("ledger_url", ["postgres"], indirect=True)
def test_prune_waits_for_rows_another_session_holds_past_the_lock_timeout(
    ledger_url: str,
) -> None:
    """A prune answers no request: rows another session holds locked longer than the
    requests' lock_timeout are waited for, then deleted, not a failure after it."""
    import psycopg

    ledger = PostgresLedger(ledger_url, lock_timeout=0.2)
    try:
        _recorded_with_webhooks(ledger, "gen-1")
        with psycopg.connect(ledger_url) as other:
            other.execute("SELECT * FROM ledger_events FOR UPDATE")
            released = threading.Timer(1.0, other.rollback)
            released.start()
            try:
                started = time.monotonic()
                deleted = ledger.prune(EVERYTHING)
                waited = time.monotonic() - started
            finally:
                released.join()
        assert deleted == {"events": 4, "generations": 1, "deliveries": 2}
        assert waited >= 0.8
    finally:
        ledger.close()


@pytest.mark.parametrize("ledger_url", ["postgres"], indirect=True)
def test_a_second_prune_waits_for_the_first_and_deletes_what_it_left(
    ledger_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two prunes at once (a scheduled one and one by hand): the second waits for the rows
    the first is deleting, past the requests' lock_timeout, then deletes none of them."""
    first, second = (PostgresLedger(ledger_url, lock_timeout=0.2) for _ in range(2))
    try:
        _recorded_with_webhooks(first, "gen-1", "gen-2")
        # The first holds its rows a second after deleting them, as a bulk delete would.
        monkeypatch.setitem(PRUNE, "slow", "SELECT pg_sleep(1)")
        results: dict[str, Any] = {}

        def prune_first() -> None:
            results["first"] = first.prune(EVERYTHING)

        running = threading.Thread(target=prune_first)
        running.start()
        time.sleep(0.3)  # the first has deleted its rows and sleeps, holding them
        try:
            results["second"] = second.prune(EVERYTHING)
        finally:
            running.join()
        assert results["first"] == {"events": 8, "generations": 2, "deliveries": 4, "slow": 1}
        assert results["second"] == {"events": 0, "generations": 0, "deliveries": 0, "slow": 1}
    finally:
        first.close()
        second.close()
