"""A ledger used after it was closed: one retryable error saying so, on both backends."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from imagegen.errors import DependencyUnavailable
from imagegen.ledger import Ledger
from tests.ledger.chain import chain


@pytest.mark.parametrize(
    "use",
    [
        lambda ledger: ledger.get("gen-1"),
        lambda ledger: ledger.history(),
        lambda ledger: ledger.ingest(chain("gen-1")["requested"]),
        lambda ledger: ledger.claim_deliveries(),
    ],
    ids=["get", "history", "ingest", "claim"],
)
def test_a_closed_ledger_answers_that_it_is_closed(
    open_test_ledger: Callable[[], Ledger], use: Callable[[Ledger], object]
) -> None:
    """A service closes its ledger as it ends; a call after that (a request that came late)
    is refused as the stage's shutdown is, to be retried where a ledger is open."""
    ledger = open_test_ledger()
    ledger.ingest(chain("gen-1")["requested"])
    ledger.close()
    with pytest.raises(DependencyUnavailable, match="is closed") as caught:
        use(ledger)
    assert caught.value.retryable
    ledger.close()  # closing again is harmless


@pytest.mark.parametrize("ledger_url", ["sqlite"], indirect=True)
def test_an_error_the_sqlite3_module_raises_itself_is_raised_as_it_is(ledger: Ledger) -> None:
    """Such an error carries no SQLite error name: it is no damaged file and no lock held."""
    import sqlite3

    with pytest.raises(sqlite3.ProgrammingError), ledger.statement() as db:  # type: ignore[attr-defined]
        db.query("SELECT :missing AS value", {})
