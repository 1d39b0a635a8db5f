from __future__ import annotations

from datetime import UTC, datetime

import pytest

from imagegen.errors import InvalidRequest
from imagegen.models import (
    MAX_METADATA_BYTES,
    GenerationRequest,
    derive_generation_id,
    derive_seed,
)
from imagegen.validation import parse_model


def test_defaults() -> None:
    request = parse_model(GenerationRequest, {})
    assert request.prompt is None
    assert (request.width, request.height) == (1024, 1024)
    assert request.enhance is True
    assert request.seed is None


def test_prompt_is_stripped_and_empty_means_dream() -> None:
    assert parse_model(GenerationRequest, {"prompt": "  a cat  "}).prompt == "a cat"
    assert parse_model(GenerationRequest, {"prompt": "   "}).prompt is None


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("width", 255),
        ("width", 2064),
        ("width", 1000),
        ("height", 100),
        ("steps", 0),
        ("steps", 51),
        ("guidance", -0.5),
        ("guidance", 20.5),
        ("seed", -1),
        ("seed", 2**32),
        ("prompt", "x" * 2001),
        ("timezone", "Mars/Olympus_Mons"),
        ("generation_id", "../etc/passwd"),
        ("generation_id", "has space"),
        ("metadata", {"blob": "x" * MAX_METADATA_BYTES}),
        ("metadata", {f"k{i}": i for i in range(40)}),
        ("plugins", "time_of_day"),
        ("enhance", "perhaps"),
    ],
)
def test_each_invalid_field_is_named(field: str, value: object) -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_model(GenerationRequest, {field: value})
    assert caught.value.fields == [field] or caught.value.fields[0].startswith(field)
    assert field in caught.value.message
    assert caught.value.status == 400 and not caught.value.retryable


def test_every_offending_field_is_named_at_once() -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_model(GenerationRequest, {"width": 100, "height": 1000, "steps": 0, "colour": "red"})
    assert set(caught.value.fields) == {"width", "height", "steps", "colour"}
    body = caught.value.to_dict()
    assert body["error"] == "invalid_request"
    assert {e["field"] for e in body["errors"]} == {"width", "height", "steps", "colour"}


def test_malformed_json_is_invalid_request() -> None:
    with pytest.raises(InvalidRequest, match="not valid JSON"):
        parse_model(GenerationRequest, b"{not json")


def test_naive_request_time_is_taken_as_utc() -> None:
    request = parse_model(GenerationRequest, {"requested_at": "2026-11-24T10:00:00"})
    assert request.requested_at == datetime(2026, 11, 24, 10, tzinfo=UTC)


def test_generation_ids_and_seeds_are_stable() -> None:
    gid = derive_generation_id("/cron/dream", "evt-1")
    assert gid == derive_generation_id("/cron/dream", "evt-1")
    assert gid != derive_generation_id("/cron/dream", "evt-2")
    assert derive_seed(gid) == derive_seed(gid)
    assert 0 <= derive_seed(gid) < 2**32
    assert parse_model(GenerationRequest, {"generation_id": gid}).generation_id == gid
