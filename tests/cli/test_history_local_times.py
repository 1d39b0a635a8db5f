"""``--since``/``--until`` without an offset: this machine's local time, even on a DST change."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime

import pytest

from imagegen.cli.history import parse_when

NOW = datetime(2026, 9, 6, 15, tzinfo=UTC)


@pytest.fixture
def local_zone(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str], None]]:
    """``local_zone(name)``: this process in that time zone (``TZ``), as a laptop there is."""

    def move(name: str) -> None:
        monkeypatch.setenv("TZ", name)
        time.tzset()

    yield move
    monkeypatch.undo()
    time.tzset()


@pytest.mark.parametrize("field", ["since", "until"])
@pytest.mark.parametrize(
    ("name", "text", "first"),
    [
        # 00:00 is 01:00 -03:00 there that day: the day starts then, as "today" does.
        ("America/Santiago", "2026-09-06", datetime(2026, 9, 6, 4)),
        ("America/Santiago", "2026-09-06T00:00", datetime(2026, 9, 6, 4)),
        ("America/Havana", "2026-03-08", datetime(2026, 3, 8, 5)),
        # A time the clock skips is the moment it jumps, its fraction too.
        ("America/Santiago", "2026-09-06T00:30", datetime(2026, 9, 6, 4)),
        ("America/Santiago", "2026-09-06T00:59:59.999999", datetime(2026, 9, 6, 4)),
        ("America/Los_Angeles", "2026-03-08T02:30", datetime(2026, 3, 8, 10)),
        # A time the clock shows twice is the first: 01:00 back to 00:00 in Havana, and
        # 00:00 back to 23:00 the day before in Santiago.
        ("America/Havana", "2026-11-01", datetime(2026, 11, 1, 4)),
        ("America/Havana", "2026-11-01T00:30", datetime(2026, 11, 1, 4, 30)),
        ("America/Santiago", "2026-04-04T23:30", datetime(2026, 4, 5, 2, 30)),
        ("America/Los_Angeles", "2026-11-01T01:30:00.25", datetime(2026, 11, 1, 8, 30, 0, 250000)),
        # Any other time is read as it is.
        ("America/Santiago", "2026-09-06T01:00:00.5", datetime(2026, 9, 6, 4, 0, 0, 500000)),
        ("America/Santiago", "2026-09-05T23:59:59", datetime(2026, 9, 6, 3, 59, 59)),
    ],
)
def test_a_local_date_or_time_is_the_first_instant_it_names(
    local_zone: Callable[[str], None], field: str, name: str, text: str, first: datetime
) -> None:
    """Never 23:00 the day before for a date whose midnight the clock skips."""
    local_zone(name)
    assert parse_when(text, field=field, now=NOW) == first.replace(tzinfo=UTC)


@pytest.mark.parametrize("field", ["since", "until"])
@pytest.mark.parametrize(
    ("name", "text", "instant"),
    [
        # The first 02:59:59.9999995 of the hour Berlin repeats is 00:59:59.9999995Z: raised
        # to 01:00Z, never to the 02:00Z that its next microsecond on the wall (03:00) is.
        ("Europe/Berlin", "2026-10-25T02:59:59.9999995", datetime(2026, 10, 25, 1)),
        ("America/Havana", "2026-11-01T00:59:59.9999991", datetime(2026, 11, 1, 5)),
        ("America/Havana", "2026-11-01T00:30:00.0000001", datetime(2026, 11, 1, 4, 30, 0, 1)),
        # Just before a time the clock skips: raised to the moment it jumps.
        ("America/Santiago", "2026-09-05T23:59:59.9999991", datetime(2026, 9, 6, 4)),
        # A time it skips is that moment itself, its fraction dropped, never a microsecond on.
        ("America/Santiago", "2026-09-06T00:59:59.9999991", datetime(2026, 9, 6, 4)),
        ("America/Santiago", "2026-09-06T00:30:00.0000001", datetime(2026, 9, 6, 4)),
    ],
)
def test_a_local_time_finer_than_a_microsecond_is_raised_as_an_instant(
    local_zone: Callable[[str], None], field: str, name: str, text: str, instant: datetime
) -> None:
    """The next microsecond after the instant the local time names, not the instant of the
    next microsecond on the wall, which a clock set back shows an hour later."""
    local_zone(name)
    assert parse_when(text, field=field, now=NOW) == instant.replace(tzinfo=UTC)


def test_a_date_starts_where_today_starts(local_zone: Callable[[str], None]) -> None:
    local_zone("America/Santiago")
    today = parse_when("today", field="since", now=NOW)
    assert parse_when("2026-09-06", field="since", now=NOW) == today
    assert today.isoformat() == "2026-09-06T01:00:00-03:00"
