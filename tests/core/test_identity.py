"""Generation ids and request times, each decided in imagegen.identity; the models' id pattern
agrees with its rule."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from pydantic import TypeAdapter, ValidationError

from imagegen.errors import InvalidRequest
from imagegen.identity import MAX_AHEAD, generation_id, identify, valid_generation_id
from imagegen.models import GenerationId, GenerationRequest

VALID = ["a", "0f" * 16, "A-b_9", "x" * 128]
# Python's "$" matches before a final "\n" as well as at the end: re.match took "id\n".
INVALID = ["", "id\n", "a\n", "id\r\n", "\nid", "id\n\n", "x" * 129, "-a", "a.b", "../etc", "a b"]


@pytest.mark.parametrize("value", VALID + INVALID)
def test_the_rule_and_the_models_pattern_agree(value: str) -> None:
    try:
        TypeAdapter(GenerationId).validate_python(value)
    except ValidationError:
        modelled = False
    else:
        modelled = True
    assert valid_generation_id(value) is modelled is (value in VALID)


@pytest.mark.parametrize("subject", ["id\n", "a\n"])
def test_a_subject_ending_in_a_newline_is_refused_naming_it(subject: str) -> None:
    with pytest.raises(InvalidRequest) as refused:
        generation_id(None, {"subject": subject}, starts=True)
    assert [e["field"] for e in refused.value.errors] == ["subject"]


# A generation starts at its request's time: never far ahead of this clock (imagegen.identity).


def _ahead(delta: timedelta) -> datetime:
    return datetime.now(UTC) + delta


@pytest.mark.parametrize("field", ["requested_at", "time"])
def test_a_generation_cannot_start_ahead_of_this_clock(field: str) -> None:
    """One dated 2999 would be the gallery's latest day and head the history for good."""
    for when in (_ahead(MAX_AHEAD + timedelta(seconds=30)), datetime(2999, 12, 31, tzinfo=UTC)):
        data = GenerationRequest(requested_at=when if field == "requested_at" else None)
        attributes = {"source": "/tests", "id": "e-1"}
        if field == "time":
            attributes["time"] = when.isoformat()
        with pytest.raises(InvalidRequest) as refused:
            identify(data, attributes, starts=True)
        assert [e["field"] for e in refused.value.errors] == [field]
        assert "ahead of the current time" in refused.value.errors[0]["message"]


def test_a_time_ahead_within_the_skew_allowed_starts_at_that_time() -> None:
    when = _ahead(MAX_AHEAD - timedelta(minutes=1))
    call = identify(GenerationRequest(requested_at=when), starts=True)
    assert call.requested_at == when
    sent = identify(GenerationRequest(), {"time": when.isoformat()}, starts=True)
    assert sent.requested_at == when


def test_both_times_ahead_are_named_at_once() -> None:
    when = datetime(2999, 1, 1, tzinfo=UTC)
    with pytest.raises(InvalidRequest) as refused:
        identify(GenerationRequest(requested_at=when), {"time": when.isoformat()}, starts=True)
    assert [e["field"] for e in refused.value.errors] == ["requested_at", "time"]


def test_a_stage_after_the_start_takes_the_time_it_is_given() -> None:
    """render, persist, derive and the ledger read the time enhance fixed, on every delivery."""
    when = datetime(2999, 1, 1, tzinfo=UTC)
    call = identify(GenerationRequest(), {"subject": "g-1", "time": when.isoformat()}, starts=False)
    assert call.generation_id == "g-1" and call.requested_at is None
