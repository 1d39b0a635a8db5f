"""Untrusted JSON and times: every bad input is an InvalidRequest naming its field."""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime, timedelta, timezone

import pytest

from imagegen.errors import InvalidRequest
from imagegen.identity import event_time
from imagegen.models import EnhancedPrompt, GenerationRequest
from imagegen.validation import MAX_JSON_DEPTH, check_json_value, loads, parse_model


def nested(depth: int, leaf: str = "1") -> str:
    return '{"a":' * depth + leaf + "}" * depth


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"[" * 1000 + b"]" * 1000, "nested deeper"),  # past the parser's own recursion guard
        (b"[" * 100_000, "nested deeper"),
        (nested(MAX_JSON_DEPTH + 1).encode(), "nested deeper"),
        (b"\xff", "not UTF-8"),
        (b'{"a": "caf\xe9"}', "not UTF-8"),
        (b'{"a": NaN}', "NaN"),
        (b"[-Infinity]", "Infinity"),
        (b'{"a": 1', "not valid JSON"),
        (b"", "not valid JSON"),
    ],
)
def test_bad_json_is_a_400_naming_the_field(body: bytes, message: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        loads(body, field="data")
    assert caught.value.fields == ["data"]
    assert message in caught.value.errors[0]["message"]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"a": 1', "not valid JSON (line 1 column 8: Expecting ',' delimiter)"),
        (b'{\n  "a": 1,\n  "b": }', "not valid JSON (line 3 column 8: Expecting value)"),
        (b"", "not valid JSON (line 1 column 1: Expecting value)"),
        (b'\xef\xbb\xbf{"a": 1}', "starts with a byte order mark (U+FEFF)"),
        ('\ufeff{"a": 1}', "starts with a byte order mark (U+FEFF)"),
        (
            b'{"n": ' + b"9" * 5000 + b"}",
            f"holds an integer of more than {sys.get_int_max_str_digits()} digits",
        ),
        (
            b"-" + b"1" * 5000,
            f"holds an integer of more than {sys.get_int_max_str_digits()} digits",
        ),
    ],
)
def test_what_is_wrong_is_said_of_the_body_alone(body: bytes | str, message: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        loads(body)
    assert caught.value.errors == [{"field": "body", "message": message}]
    assert str(caught.value) == f"body: {message}"
    assert "sys." not in str(caught.value) and "utf-8-sig" not in str(caught.value)


def test_good_json_round_trips() -> None:
    value = {"a": [1, 2.5, None, True, {"b": "[[[{{{"}], "c": "\\u00e9"}
    assert loads(json.dumps(value).encode()) == value
    assert loads(nested(MAX_JSON_DEPTH)) is not None


def test_parsed_values_are_checked_without_recursion() -> None:
    deep: object = 1
    for _ in range(100_000):
        deep = [deep]
    with pytest.raises(ValueError, match="nested deeper than 8"):
        check_json_value(deep, max_depth=8)
    with pytest.raises(ValueError, match="NaN"):
        check_json_value({"a": [1, {"b": float("inf")}]})
    check_json_value({"a": [1, {"b": 2.0}]}, max_depth=3)
    with pytest.raises(ValueError):
        check_json_value({"a": [1, {"b": [2]}]}, max_depth=3)


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        (json.loads(nested(300)), "nested deeper than 8"),
        ({"score": float("nan")}, "NaN"),
        ({"score": [float("-inf")]}, "NaN and Infinity"),
    ],
)
def test_metadata_is_bounded_in_every_event(metadata: object, message: str) -> None:
    for model, extra in (
        (GenerationRequest, {}),
        (
            EnhancedPrompt,
            {
                "generation_id": "g",
                "prompt": "p",
                "enhancer": "template",
                "model": "tiny",
                "width": 256,
                "height": 256,
                "steps": 2,
                "guidance": 1.0,
                "seed": 1,
                "requested_at": "2026-01-01T00:00:00Z",
            },
        ),
    ):
        with pytest.raises(InvalidRequest) as caught:
            parse_model(model, {**extra, "metadata": metadata})
        assert caught.value.fields == ["metadata"], model
        assert message in caught.value.errors[0]["message"]


def test_metadata_nan_in_json_text_is_refused() -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_model(GenerationRequest, b'{"metadata": {"x": NaN}}')
    assert caught.value.fields == ["metadata"]


@pytest.mark.parametrize(
    "value",
    [
        "1969-12-31T23:59:59Z",
        "0001-01-01T00:00:00Z",
        "9999-12-31T23:59:59-23:59",
        "3000-01-01T00:00:00",
        "0001-01-01T00:00:00+01:00",
        # The year is the instant's in UTC: these are 1969-12-31T23:30Z and 3000-01-01T00:30Z,
        # which would be stored under 1969/ and 3000/.
        "1970-01-01T00:30:00+01:00",
        "2999-12-31T23:30:00-01:00",
        "2999-12-31T23:59:00-23:00",
    ],
)
def test_event_times_out_of_range_are_a_400(value: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        event_time({"time": value})
    assert caught.value.fields == ["time"]


def test_event_times_in_range_are_read() -> None:
    late = datetime(2999, 12, 31, 23, 59, tzinfo=timezone(timedelta(hours=23)))
    assert event_time({"time": late.isoformat()}) == late
    # The first and last instants of the range, written with an offset that changes the year.
    early = datetime(1969, 12, 31, 23, 0, tzinfo=timezone(-timedelta(hours=1)))
    assert event_time({"time": early.isoformat()}) == datetime(1970, 1, 1, tzinfo=UTC)
    last = datetime(3000, 1, 1, 0, 59, 59, tzinfo=timezone(timedelta(hours=1)))
    assert event_time({"time": last.isoformat()}) == datetime(2999, 12, 31, 23, 59, 59, tzinfo=UTC)
    assert event_time({}) is None


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        # RFC 3339, section 5.6: "T" and "Z" in either case, any number of fraction digits.
        ("2026-01-07T10:00:00Z", datetime(2026, 1, 7, 10, tzinfo=UTC)),
        ("2026-01-07t10:00:00z", datetime(2026, 1, 7, 10, tzinfo=UTC)),
        ("2026-01-07T10:00:00.123456789Z", datetime(2026, 1, 7, 10, 0, 0, 123456, tzinfo=UTC)),
        ("2026-01-07T15:30:00+05:30", datetime(2026, 1, 7, 10, tzinfo=UTC)),
        # A leap second (section 5.7): before the next minute, after the one it ends.
        ("2016-12-31T23:59:60Z", datetime(2016, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)),
        # The same one in Tokyo: at the same instant around the globe.
        ("2017-01-01T08:59:60+09:00", datetime(2016, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)),
        ("2016-12-31T18:59:60-05:00", datetime(2016, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)),
    ],
)
def test_event_times_are_rfc_3339(value: str, expected: datetime) -> None:
    assert event_time({"time": value}) == expected


@pytest.mark.parametrize(
    "value",
    [
        "",  # sent, and empty: no timestamp
        "2026-01-07",  # a date alone
        "2026-01-07T10:00:00",  # no offset: RFC 3339 has none naive
        "2026-01-07 10:00:00Z",  # a space
        "2026-W02-3T10:00:00Z",  # an ISO week date
        "2026-01-07T10:00:00+05:30:15",  # an offset with seconds
        "2026-01-07T10:00Z",  # no seconds
        # A leap second (RFC 3339, section 5.7) only ends the minute 23:59 UTC.
        "2026-06-15T12:34:60Z",
        "2016-12-31T23:59:60+09:00",  # 14:59:60 UTC
        "2016-12-31T23:58:60Z",
        "0001-01-01T00:59:60+01:00",  # before UTC's year 1
    ],
)
def test_event_times_other_than_rfc_3339_are_a_400(value: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        event_time({"time": value})
    assert caught.value.fields == ["time"]
