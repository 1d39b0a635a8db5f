"""A redelivered event changes nothing: its generation's row stays exactly as the first
delivery left it, ``updated_at`` included (on both backends: PostgreSQL records an event and
folds it in with one statement, SQLite in two)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from imagegen.ledger import Ledger
from tests.ledger.chain import chain


def _row(ledger: Ledger, generation_id: str) -> dict[str, Any]:
    """The generation's row as stored, every column."""
    with ledger.statement() as db:
        [row] = db.query(
            "SELECT * FROM generations WHERE generation_id = :gid", {"gid": generation_id}
        )
    return row


@pytest.mark.parametrize("redelivered", ["requested", "enhanced"])
def test_a_redelivery_leaves_the_row_as_the_first_delivery_left_it(
    ledger: Ledger, monkeypatch: pytest.MonkeyPatch, redelivered: str
) -> None:
    events = chain("gen-1")
    for name in ("requested", "enhanced"):
        assert not ledger.ingest(events[name]).duplicate
    recorded = _row(ledger, "gen-1")
    # Redelivered an hour later: a write would move updated_at by an hour.
    later = datetime.now(UTC) + timedelta(hours=1)
    monkeypatch.setattr(ledger, "_now", lambda: later)
    again = ledger.ingest(events[redelivered])
    assert again.duplicate and again.generation_id == "gen-1"
    assert _row(ledger, "gen-1") == recorded
