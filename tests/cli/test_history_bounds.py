"""``--since``/``--until`` finer than a microsecond: raised to the next one, as the API's are."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from imagegen.cli.history import parse_when


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
