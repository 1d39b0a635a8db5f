"""The history's query parameters read exactly: time bounds finer than the ledger keeps its
times, and page sizes in digits alone, on both backends."""

from __future__ import annotations

from datetime import timedelta

import pytest

from tests.functions.clients import InProcessFunction
from tests.ledger.chain import T0, binary, chain

# Created at 2026-06-01T12:00:00.557514Z: the ledger keeps times to the microsecond.
CREATED = T0 + timedelta(microseconds=557514)


@pytest.fixture
def created(function: InProcessFunction) -> InProcessFunction:
    """The ledger function, holding one generation created at :data:`CREATED`."""
    reply = function.post("/", **binary(chain("gen-b", start=CREATED)["requested"]))
    assert reply.status_code == 202, reply.text
    listed = function.client.get("/generations").json()["items"]
    assert [g["created_at"] for g in listed] == ["2026-06-01T12:00:00.557514Z"]
    return function


def _listed(function: InProcessFunction, **query: str) -> bool:
    reply = function.client.get("/generations", params=query)
    assert reply.status_code == 200, reply.text
    return [g["generation_id"] for g in reply.json()["items"]] == ["gen-b"]


@pytest.mark.parametrize(
    ("fraction", "at_or_after"),
    [
        ("557514", True),
        ("5575140", True),  # the same instant, a digit longer
        ("557514000", True),
        ("5575139", True),  # a tenth of a microsecond before it
        ("557513999", True),
        ("5575141", False),  # a tenth of a microsecond after it
        ("557514001", False),
        ("557515", False),
    ],
)
def test_a_bound_finer_than_a_microsecond_keeps_each_generation_on_its_side(
    created: InProcessFunction, fraction: str, at_or_after: bool
) -> None:
    """``since`` is "created at or after", ``until`` "created before": a generation is listed
    by exactly one of them, the one its time is on the side of."""
    bound = f"2026-06-01T12:00:00.{fraction}Z"
    assert _listed(created, since=bound) is at_or_after
    assert _listed(created, until=bound) is not at_or_after
    east = f"2026-06-01T13:00:00.{fraction}+01:00"  # the same instant, another offset
    assert _listed(created, since=east) is at_or_after
    assert _listed(created, until=east) is not at_or_after


def test_a_bound_in_the_last_microsecond_of_2999_is_taken(created: InProcessFunction) -> None:
    """Raised, it would be in 3000, out of range: it is 2999's last microsecond instead, as
    only an instant outside 1970-2999 is refused."""
    for last in ("2999-12-31T23:59:59.9999991Z", "3000-01-01T00:59:59.999999999+01:00"):
        assert _listed(created, until=last) is True
        assert _listed(created, since=last) is False


@pytest.mark.parametrize("bound", ["since", "until"])
@pytest.mark.parametrize("value", ["1969-12-31T23:59:59.9999991Z", "3000-01-01T00:00:00.0000001Z"])
def test_a_bound_outside_the_years_is_refused_however_it_rounds(
    function: InProcessFunction, bound: str, value: str
) -> None:
    """1969's last tenth of a microsecond is in 1969, though raised it would be in 1970."""
    reply = function.client.get("/generations", params={bound: value})
    assert reply.status_code == 400, reply.text
    assert reply.json()["errors"] == [
        {"field": bound, "message": "must be between 1970 and 2999 (UTC)"}
    ]


@pytest.mark.parametrize(
    "limit",
    # "\u0661" and "\uff11": an Arabic-Indic and a fullwidth one, digits to str.isdigit().
    ["1_0", "+5", "-5", " 1", "1 ", "1.0", "1e1", "0x10", "\u0661", "\uff11", ""],
)
def test_a_limit_is_digits_alone(function: InProcessFunction, limit: str) -> None:
    """As ``since`` and ``until`` are read strictly: no sign, underscore, space or fraction
    that pydantic's integer would take."""
    reply = function.client.get("/generations", params={"limit": limit})
    assert reply.status_code == 400, reply.text
    assert [e["field"] for e in reply.json()["errors"]] == ["limit"]


def test_a_limit_in_digits_is_taken(created: InProcessFunction) -> None:
    for limit in ("1", "007", "500"):
        reply = created.client.get("/generations", params={"limit": limit})
        assert reply.status_code == 200, reply.text
