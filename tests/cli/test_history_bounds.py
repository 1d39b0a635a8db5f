"""``--since``/``--until`` finer than a microsecond: raised to the next one, as the API's are."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from imagegen.cli.history import parse_when
from imagegen.errors import InvalidRequest


@pytest.mark.parametrize("field", ["since", "until"])
@pytest.mark.parametrize(
    ("text", "microsecond"),
    [
        ("2026-12-07T07:04:24.557514Z", 557514),
        ("2026-12-07T07:04:24.5575140Z", 557514),  # the same instant, a digit longer
        ("2026-12-07T07:04:24.557514000+00:00", 557514),
        ("2026-12-07T07:04:24.5575141Z", 557515),  # a tenth of a microsecond after 557514
        ("2026-12-07T07:04:24,557514001+00:00", 557515),
        ("2026-12-07T07:04:24.5575139Z", 557514),
    ],
)
def test_a_bound_finer_than_a_microsecond_is_raised_to_the_next(
    field: str, text: str, microsecond: int
) -> None:
    """The ledger keeps times to the microsecond: "at or after" 24.5575141 is "at or after"
    24.557515, and "before" it "before" 24.557515, never the 24.557514 Python's reader keeps."""
    expected = datetime(2026, 12, 7, 7, 4, 24, microsecond, tzinfo=UTC)
    assert parse_when(text, field=field) == expected


@pytest.mark.parametrize("field", ["since", "until"])
def test_a_bound_in_the_last_microsecond_of_2999_stays_in_range(field: str) -> None:
    """Its next microsecond is in 3000, which no bound may be: the last one of 2999 it is."""
    last = datetime(2999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)
    assert parse_when("2999-12-31T23:59:59.9999991Z", field=field) == last
    assert parse_when("3000-01-01T00:59:59.9999991+01:00", field=field) == last


@pytest.mark.parametrize("field", ["since", "until"])
@pytest.mark.parametrize("text", ["1969-12-31T23:59:59.9999991Z", "3000-01-01T00:00:00.0000001Z"])
def test_a_bound_outside_the_years_is_refused_however_it_rounds(field: str, text: str) -> None:
    """1969's last tenth of a microsecond is 1969, though raised it would be 1970."""
    with pytest.raises(InvalidRequest, match="between 1970 and 2999"):
        parse_when(text, field=field)
