"""What the ledger's columns cannot hold is a 400 naming the field, never a 500, on both backends.

Event times are read as every stage reads them (:func:`imagegen.identity.event_time`), and
integers bound for a column must fit its PostgreSQL type (SQLite's INTEGER holds them all).
"""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from imagegen.errors import InvalidRequest
from imagegen.ledger import Ledger, open_ledger
from imagegen.ledger.sqlite import SqliteLedger
from tests.functions.clients import InProcessFunction
from tests.ledger.chain import binary, chain


def _nothing_recorded(ledger_url: str) -> None:
    ledger = open_ledger(ledger_url)
    try:
        assert list(ledger.events()) == []
        assert ledger.history().items == []
    finally:
        ledger.close()


@pytest.mark.parametrize(
    "time",
    [
        "0001-01-01T00:00:00Z",
        "0999-01-01T00:00:00Z",
        "9999-12-31T23:59:59-23:59",  # a year 10000 in UTC
        "1969-12-31T23:59:59Z",
        "3000-01-01T00:00:00Z",
    ],
)
def test_an_event_time_outside_the_services_years_is_a_400_naming_time(
    function: InProcessFunction, ledger_url: str, time: str
) -> None:
    request = binary(chain("gen-t")["requested"])
    request["headers"]["ce-time"] = time
    reply = function.post("/", **request)
    assert reply.status_code == 400, reply.text
    assert [e["field"] for e in reply.json()["errors"]] == ["time"]
    _nothing_recorded(ledger_url)


@pytest.mark.parametrize(
    "values",
    [
        {"width": 2**70},
        {"seed": 2**64},
        {"seed": -(2**63) - 1},
        {"width": 2**40},  # fits SQLite's INTEGER, not PostgreSQL's
        {"height": 2**31, "seed": 2**63},
    ],
)
def test_integers_a_column_cannot_hold_are_a_400_naming_each_field(
    function: InProcessFunction, ledger_url: str, values: dict[str, int]
) -> None:
    events = chain("gen-i")
    # The request is recorded whatever it holds (enhance answers it with a failure)...
    asked = {**events["requested"].data, **values}
    request = events["requested"].model_copy(update={"data": asked})
    assert function.post("/", **binary(request)).status_code == 202
    # ... an image.persisted that no column can hold is refused, naming every field...
    data = events["persisted"].data
    persisted = events["persisted"].model_copy(update={"data": {**data, **values}})
    reply = function.post("/", **binary(persisted))
    assert reply.status_code == 400, reply.text
    assert {e["field"] for e in reply.json()["errors"]} == set(values)
    ledger = open_ledger(ledger_url)
    try:
        assert [e.type for e in ledger.events()] == [request.type]
        found = ledger.get("gen-i")
        assert found is not None and found.status == "requested" and found.seed is None
        # ... and the event, mended, is recorded.
        assert function.post("/", **binary(events["persisted"])).status_code == 202
        found = ledger.get("gen-i")
        assert found is not None and found.status == "persisted"
        assert (found.width, found.height, found.seed) == (256, 256, 42)
    finally:
        ledger.close()


@pytest.mark.parametrize(
    "time",
    [
        datetime(1, 1, 1, tzinfo=timezone(timedelta(hours=1))),  # before year 1 in UTC
        datetime(9999, 12, 31, 23, tzinfo=timezone(-timedelta(hours=23))),
        datetime(999, 1, 1, tzinfo=UTC),
    ],
)
def test_an_event_handed_to_the_library_out_of_range_names_time(
    ledger: Ledger, time: datetime
) -> None:
    event = chain("gen-l")["requested"].model_copy(update={"time": time})
    with pytest.raises(InvalidRequest) as refused:
        ledger.ingest(event)
    assert [e["field"] for e in refused.value.errors] == ["time"]
    assert list(ledger.events()) == []


def test_sqlite_compares_times_before_year_1000_as_times(tmp_path: Path) -> None:
    # SQLite keeps times as text, in order only while every year has four digits.
    ledger = SqliteLedger(tmp_path / "ledger.db")
    try:
        ledger.ingest(chain("gen-h")["requested"])
        since = datetime(999, 1, 1, tzinfo=UTC)
        assert [g.generation_id for g in ledger.history(since=since).items] == ["gen-h"]
        assert ledger.history(until=since).items == []
    finally:
        ledger.close()


def _cursor(at: str) -> str:
    """A cursor in the ledger's form (base64 of ``[time, id]``) for a forged position."""
    raw = json.dumps([at, "gen-c"]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ({"since": "0001-01-01T00:00:00+01:00"}, "since"),  # before year 1 in UTC
        ({"until": "9999-12-31T23:59:59-23:59"}, "until"),
        ({"since": "0999-01-01T00:00:00Z"}, "since"),
        ({"cursor": _cursor("0001-01-01T00:00:00+01:00")}, "cursor"),
    ],
)
def test_a_history_bound_outside_the_services_years_is_a_400_naming_it(
    function: InProcessFunction, query: dict[str, str], field: str
) -> None:
    reply = function.client.get("/generations", params=query)
    assert reply.status_code == 400, reply.text
    assert [e["field"] for e in reply.json()["errors"]] == [field]
