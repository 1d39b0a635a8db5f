from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import hypothesis
import pytest
from hypothesis import strategies as st
from pydantic import BaseModel

from imagegen.errors import InvalidRequest
from imagegen.models import (
    MAX_CONTRIBUTION_DATA_BYTES,
    MAX_CONTRIBUTIONS,
    MAX_FINAL_PROMPT_CHARS,
    MAX_LORA_HINTS,
    MAX_LORA_PATH_CHARS,
    MAX_LORAS,
    MAX_METADATA_BYTES,
    MAX_PLUGIN_NAME_CHARS,
    DerivedImage,
    EnhancedPrompt,
    GenerationFailed,
    GenerationRequest,
    PersistedImage,
    RenderedImage,
    RenderRequest,
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


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("width", "1024"),
        ("height", 1024.5),
        ("height", float("inf")),
        ("steps", "4"),
        ("seed", True),
        ("seed", "7"),
        ("guidance", True),
        ("guidance", "3.5"),
        ("enhance", "yes"),
        ("enhance", 1),
        ("requested_at", 1700000000),
        ("requested_at", "1700000000"),
        ("requested_at", True),
    ],
)
def test_a_value_of_the_wrong_type_is_refused_not_converted(field: str, value: object) -> None:
    """``{"seed": true}`` was seed 1, ``"width": "1024"`` 1024, ``"enhance": "yes"`` True,
    ``"requested_at": 1700000000`` a time in 2023: each answered 200. Event data arrives as a
    mapping parsed from JSON, a plain body as JSON text: both refuse it, naming the field."""
    for data in ({field: value}, json.dumps({field: value})):
        with pytest.raises(InvalidRequest) as caught:
            parse_model(GenerationRequest, data)
        assert caught.value.fields == [field] and caught.value.status == 400


@pytest.mark.parametrize(
    ("data", "read"),
    [
        (
            {"requested_at": "2026-11-24T10:00:00Z"},
            {"requested_at": datetime(2026, 11, 24, 10, tzinfo=UTC)},
        ),
        (
            {"requested_at": "2026-11-24T11:00:00+01:00"},
            {"requested_at": datetime(2026, 11, 24, 10, tzinfo=UTC)},
        ),
        ({"guidance": 3}, {"guidance": 3.0}),
        ({"seed": 0, "width": 256, "enhance": False}, {"seed": 0, "width": 256, "enhance": False}),
        ({"webhook": "https://hooks.example/x"}, {}),
    ],
)
def test_values_of_their_json_type_are_read(data: dict[str, Any], read: dict[str, Any]) -> None:
    for given in (data, json.dumps(data)):
        request = parse_model(GenerationRequest, given)
        assert {name: getattr(request, name) for name in read} == read


def test_python_callers_give_python_values() -> None:
    at = datetime(2026, 11, 24, 10, tzinfo=UTC)
    request = GenerationRequest(prompt="a fox", width=256, seed=3, requested_at=at)
    assert (request.width, request.seed, request.requested_at) == (256, 3, at)
    assert GenerationRequest.model_validate(request.model_dump()) == request
    assert GenerationRequest.model_validate(request.model_dump(mode="json")) == request


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


def test_a_request_time_without_an_offset_is_refused_as_the_time_attribute_is() -> None:
    """requested_at is an RFC 3339 timestamp, read by the `time` attribute's rule."""
    for value in ("2026-11-24T10:00:00", "2026-11-24", "2026-11-24 10:00:00Z"):
        with pytest.raises(InvalidRequest) as caught:
            parse_model(GenerationRequest, {"requested_at": value})
        assert caught.value.errors == [
            {
                "field": "requested_at",
                "message": "must be an RFC 3339 date-time with its offset (2026-01-02T03:04:05Z)",
            }
        ]
    leap = parse_model(GenerationRequest, {"requested_at": "2016-12-31T23:59:60Z"})
    assert leap.requested_at == datetime(2016, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)


@pytest.mark.parametrize(
    "value",
    [
        "1970-01-01T00:30:00+01:00",  # 1969-12-31T23:30Z: stored under 1969/12/31/
        "2999-12-31T23:30:00-01:00",  # 3000-01-01T00:30Z
        "2026-06-15T12:34:60Z",  # a leap second ends 23:59 UTC, no other minute
        "2016-12-31T23:59:60+09:00",
    ],
)
def test_a_time_is_in_range_and_a_leap_second_in_place_as_its_utc_instant_says(
    value: str,
) -> None:
    for model, data in ((GenerationRequest, {}), (EnhancedPrompt, JOB)):
        with pytest.raises(InvalidRequest) as caught:
            parse_model(model, {**data, "requested_at": value})
        assert caught.value.fields == ["requested_at"]


def test_a_direct_render_cannot_start_a_generation_ahead_of_this_clock() -> None:
    """A direct call starts its generation at the time it names: not ahead of this clock,
    as at enhance; a job enhance wrote (its ``enhanced_at``) keeps the time enhance took."""
    late = (datetime.now(UTC) + timedelta(minutes=6)).isoformat()
    for value in (late, "2999-12-31T00:00:00Z"):
        with pytest.raises(InvalidRequest) as caught:
            parse_model(RenderRequest, {"prompt": "p", "requested_at": value})
        assert caught.value.errors == [
            {
                "field": "requested_at",
                "message": "must not be more than 5 minutes ahead of the current time",
            }
        ]
        # An enhanced_at does not let a body date its generation anywhere: enhance wrote it
        # after the request's time and before now.
        for enhanced_at, field in (
            (value, "enhanced_at"),
            ("2020-01-01T00:00:00Z", "requested_at"),
        ):
            written = {"prompt": "p", "requested_at": value, "enhanced_at": enhanced_at}
            with pytest.raises(InvalidRequest) as caught:
                parse_model(RenderRequest, written)
            assert [e["field"] for e in caught.value.errors] == [field]
        # Nor without a requested_at, which then is now.
        with pytest.raises(InvalidRequest) as caught:
            parse_model(RenderRequest, {"prompt": "p", "enhanced_at": "2999-01-01T00:00:00Z"})
        assert [e["field"] for e in caught.value.errors] == ["enhanced_at"]
        # Every stage after the start reads the time it is given, whatever its clock says.
        job = parse_model(EnhancedPrompt, {**JOB, "requested_at": value})
        assert job.requested_at == datetime.fromisoformat(value)
    soon = datetime.now(UTC) + timedelta(minutes=4)
    taken = parse_model(RenderRequest, {"prompt": "p", "requested_at": soon.isoformat()})
    assert taken.requested_at == soon
    # A job enhance wrote, redelivered a day on: its times, a caller's clock 4 minutes fast.
    asked = datetime.now(UTC) - timedelta(days=1)
    written = {
        "prompt": "p",
        "requested_at": (asked + timedelta(minutes=4)).isoformat(),
        "enhanced_at": asked.isoformat(),
    }
    assert parse_model(RenderRequest, written).enhanced_at == asked


def test_a_naive_request_time_given_in_python_is_taken_as_utc() -> None:
    request = GenerationRequest(requested_at=datetime(2026, 11, 24, 10))
    assert request.requested_at == datetime(2026, 11, 24, 10, tzinfo=UTC)


def test_generation_ids_and_seeds_are_stable() -> None:
    gid = derive_generation_id("/cron/dream", "evt-1")
    assert gid == derive_generation_id("/cron/dream", "evt-1")
    assert gid != derive_generation_id("/cron/dream", "evt-2")
    assert derive_seed(gid) == derive_seed(gid)
    assert 0 <= derive_seed(gid) < 2**32
    assert parse_model(GenerationRequest, {"generation_id": gid}).generation_id == gid


@pytest.mark.parametrize(
    ("generation_id", "seed"),
    [("d4000c7b33e554d1b4dac5aad9e3938d", 1155108690), ("gen-1", 1592058355)],
)
def test_a_derived_seed_never_changes(generation_id: str, seed: int) -> None:
    """Computed once from the code and written here by hand; it must never change. A request
    without a seed is rendered with this one (enhance, direct render), and stored images were
    made with it: a redelivery, a replay or a replica of another release deriving another seed
    would make another picture of a generation already stored under its job."""
    assert derive_seed(generation_id) == seed


def test_different_generations_get_different_seeds() -> None:
    ids = [derive_generation_id("/cron/dream", f"evt-{n}") for n in range(100)]
    assert len({derive_seed(gid) for gid in ids}) == len(ids)


JOB: dict[str, Any] = {
    "generation_id": "g-1",
    "prompt": "a cat",
    "enhancer": "passthrough",
    "model": "tiny",
    "width": 256,
    "height": 256,
    "steps": 2,
    "guidance": 0.0,
    "seed": 5,
    "requested_at": "2026-11-24T18:30:00Z",
}
IMAGE: dict[str, Any] = {
    "generation_id": "g-1",
    "key": "2026/11/24/g-1.png",
    "location": "file:///out/2026/11/24/g-1.png",
    "size": 1000,
    "sha256": "0" * 64,
    "width": 256,
    "height": 256,
    "seed": 5,
    "model": "tiny",
}
RENDERED: dict[str, Any] = {
    **IMAGE,
    "steps": 2,
    "guidance": 0.0,
    "rendered_at": "2026-11-24T18:31:00Z",
    "prompt": JOB,
}
PERSISTED: dict[str, Any] = {
    **IMAGE,
    "keys": {"image": "2026/11/24/g-1.png"},
    "metadata_location": "file:///out/2026/11/24/g-1.json",
    "prompt": "a cat",
    "created_at": "2026-11-24T18:31:00Z",
}
DERIVED: dict[str, Any] = {
    "generation_id": "g-1",
    "key": "2026/11/24/g-1.png",
    "sha256": "0" * 64,
    "keys": {},
    "created_at": "2026-11-24T18:31:00Z",
}
FAILED: dict[str, Any] = {
    "stage": "persist",
    "error": {"code": "invalid_request", "message": "no", "retryable": False},
    "failed_at": "2026-11-24T18:31:00Z",
}
# What the request refuses, every later model of the chain refuses too; sizes and times also
# past what the ledger's database and the storage keys hold.
TOO_BIG = [
    ("width", 2**70),
    ("width", 4096),
    ("width", 250),
    ("height", 2064),
    ("seed", 2**64),
    ("seed", 2**32),
    ("seed", -1),
    ("size", 10**30),
    ("size", 2**63),
    ("size", -1),
]
OUT_OF_TIME = ["9999-01-01T00:00:00Z", "3000-01-01T00:00:00Z", "1969-12-31T23:59:59Z"]


@pytest.mark.parametrize(
    ("model", "data", "field", "value"),
    [
        *[(RenderedImage, RENDERED, field, value) for field, value in TOO_BIG],
        *[(PersistedImage, PERSISTED, field, value) for field, value in TOO_BIG],
        (RenderedImage, RENDERED, "steps", 51),
        (RenderedImage, RENDERED, "steps", 10**20),
        (RenderedImage, RENDERED, "guidance", 20.5),
        *[(RenderedImage, RENDERED, "rendered_at", when) for when in OUT_OF_TIME],
        *[(PersistedImage, PERSISTED, "created_at", when) for when in OUT_OF_TIME],
        *[(DerivedImage, DERIVED, "created_at", when) for when in OUT_OF_TIME],
        *[(GenerationFailed, FAILED, "failed_at", when) for when in OUT_OF_TIME],
    ],
)
def test_every_model_of_the_chain_refuses_what_the_request_refuses(
    model: type[BaseModel], data: dict[str, Any], field: str, value: object
) -> None:
    parse_model(model, data)  # valid as it is
    with pytest.raises(InvalidRequest) as caught:
        parse_model(model, {**data, field: value})
    assert caught.value.fields == [field]
    assert caught.value.status == 400 and not caught.value.retryable


def test_the_chain_s_times_are_aware() -> None:
    # A naive datetime from the library's API is UTC; on the wire a time carries its offset.
    naive = datetime(2026, 11, 24, 18, 31)
    image = RenderedImage.model_validate({**RENDERED, "rendered_at": naive})
    record = PersistedImage.model_validate({**PERSISTED, "created_at": naive})
    when = datetime(2026, 11, 24, 18, 31, tzinfo=UTC)
    assert image.rendered_at == record.created_at == when
    east = parse_model(RenderedImage, {**RENDERED, "rendered_at": "2026-11-24T19:31:00+01:00"})
    assert east.rendered_at == when


# What every stage reads from the wire, in each JSON type but its own: each was converted
# ("256" a width, true a seed, 1765000000 a time in seconds, a date alone its midnight in UTC).
WRONG_TYPES = [
    *[
        (EnhancedPrompt, JOB, field, value)
        for field, value in [
            ("width", "256"),
            ("height", 256.5),
            ("steps", "2"),
            ("seed", True),
            ("seed", "5"),
            ("guidance", "1.5"),
            ("guidance", True),
            ("dreamed", "yes"),
            ("fallback", 1),
            ("requested_at", 1765000000),
            ("requested_at", "1765000000"),
            ("requested_at", "2026-12-05"),
            ("requested_at", "2026-12-05T01:00:00"),
            ("enhanced_at", 1765000000),
            ("enhanced_at", "2026-12-05 01:00:00Z"),
        ]
    ],
    *[
        (RenderRequest, {"prompt": "p"}, field, value)
        for field, value in [
            ("width", "256"),
            ("steps", "2"),
            ("seed", "3"),
            ("guidance", "1.5"),
            ("dreamed", "yes"),
            ("requested_at", "2026-12-05"),
            ("enhanced_at", "2026-12-05T01:00:00"),
        ]
    ],
    *[
        (RenderedImage, RENDERED, field, value)
        for field, value in [
            ("width", "256"),
            ("seed", "5"),
            ("size", "1000"),
            ("size", 1000.5),
            ("size", float("nan")),
            ("steps", True),
            ("timings", {"render": "1.5"}),
            ("rendered_at", 1765000000),
            ("rendered_at", "2026-11-24T18:31:00"),
        ]
    ],
    *[
        (PersistedImage, PERSISTED, field, value)
        for field, value in [
            ("width", "256"),
            ("seed", "5"),
            ("size", "1000"),
            ("created_at", "2026-11-24"),
            ("persisted_at", 1765000000),
        ]
    ],
    (DerivedImage, DERIVED, "thumbnail_size", "256"),
    (DerivedImage, DERIVED, "created_at", 1765000000),
    (GenerationFailed, FAILED, "failed_at", "2026-11-24T18:31:00"),
]


@pytest.mark.parametrize(("model", "data", "field", "value"), WRONG_TYPES)
def test_every_model_of_the_chain_reads_its_json_types_strictly(
    model: type[BaseModel], data: dict[str, Any], field: str, value: object
) -> None:
    """As the request is read: event data (a mapping parsed from JSON) and a plain body (JSON
    text) alike refuse a value of another JSON type, naming the field, never converting it."""
    parse_model(model, data)  # valid as it is
    for given in ({**data, field: value}, json.dumps({**data, field: value})):
        with pytest.raises(InvalidRequest) as caught:
            parse_model(model, given)
        assert caught.value.fields[0].split(".")[0] == field, caught.value.errors
        assert caught.value.status == 400 and not caught.value.retryable


def test_a_json_integer_is_a_number_for_every_float_of_the_chain() -> None:
    # JSON has one number type: 1 is as much a guidance as 1.0.
    for given in ({**RENDERED, "guidance": 1, "timings": {"render": 2}},):
        for data in (given, json.dumps(given)):
            image = parse_model(RenderedImage, data)
            assert (image.guidance, image.timings) == (1.0, {"render": 2.0})
    assert parse_model(EnhancedPrompt, {**JOB, "guidance": 3}).guidance == 3.0


# Each integer field of the chain, written as a number with a zero fraction.
INTEGRAL_NUMBERS = [
    (GenerationRequest, {}, "width", 512.0),
    (GenerationRequest, {}, "height", 1024.0),
    (GenerationRequest, {}, "steps", 1.0),
    (GenerationRequest, {}, "seed", 0.0),
    (GenerationRequest, {}, "seed", 4294967295.0),
    (RenderRequest, {"prompt": "p"}, "width", 256.0),
    (RenderRequest, {"prompt": "p"}, "steps", 50.0),
    (RenderRequest, {"prompt": "p"}, "seed", 7.0),
    (EnhancedPrompt, JOB, "width", 256.0),
    (EnhancedPrompt, JOB, "steps", 2.0),
    (EnhancedPrompt, JOB, "seed", 5e0),
    (RenderedImage, RENDERED, "size", 1e3),
    (RenderedImage, RENDERED, "height", 2048.0),
    (PersistedImage, PERSISTED, "size", 0.0),
    (PersistedImage, PERSISTED, "seed", 5.0),
    (DerivedImage, DERIVED, "thumbnail_size", 256.0),
]


@pytest.mark.parametrize(("model", "data", "field", "value"), INTEGRAL_NUMBERS)
def test_a_number_with_a_zero_fraction_is_an_integer(
    model: type[BaseModel], data: dict[str, Any], field: str, value: float
) -> None:
    """512.0 is the integer 512 to JSON Schema ("type": "integer"), so to every schema the
    events publish: it is read as 512, from a mapping and from JSON text alike."""
    for given in ({**data, field: value}, json.dumps({**data, field: value})):
        read = getattr(parse_model(model, given), field)
        assert read == value and type(read) is int


@pytest.mark.parametrize(
    ("model", "data", "field", "value", "message"),
    [
        (GenerationRequest, {}, "width", 1e300, "less than or equal to 2048"),
        (GenerationRequest, {}, "width", -1e300, "greater than or equal to 256"),
        (GenerationRequest, {}, "width", 520.0, "multiple of 16"),
        (GenerationRequest, {}, "steps", 1e300, "less than or equal to 50"),
        (GenerationRequest, {}, "seed", 4294967296.0, "less than or equal to 4294967295"),
        (RenderRequest, {"prompt": "p"}, "seed", 1e300, "less than or equal to 4294967295"),
        (RenderedImage, RENDERED, "size", 2.0**63, "less than or equal to 9223372036854775807"),
        (PersistedImage, PERSISTED, "size", 1e300, "less than or equal to 9223372036854775807"),
        (DerivedImage, DERIVED, "thumbnail_size", 0.0, "greater than or equal to 1"),
    ],
)
def test_a_number_with_a_zero_fraction_is_bounded_as_the_integer_is(
    model: type[BaseModel], data: dict[str, Any], field: str, value: float, message: str
) -> None:
    """1e300 has no fraction either: it is out of range, refused naming the field as 10**300
    would be; past 2**53 a float is still the one integer it holds exactly (2.0**63 is 2**63)."""
    for given in ({**data, field: value}, json.dumps({**data, field: value})):
        with pytest.raises(InvalidRequest) as caught:
            parse_model(model, given)
        assert caught.value.fields == [field]
        assert message in caught.value.errors[0]["message"]


@pytest.mark.parametrize(
    ("model", "data", "field"),
    [
        (EnhancedPrompt, JOB, "prompt"),
        (EnhancedPrompt, JOB, "original_prompt"),
        (RenderRequest, {"prompt": "p"}, "prompt"),
        (RenderRequest, {"prompt": "p"}, "original_prompt"),
        (RenderedImage, RENDERED, "prompt.prompt"),
        (PersistedImage, PERSISTED, "prompt"),
    ],
)
@pytest.mark.parametrize("prompt", ["evil\u202egnp.exe \x1b[31m", "a\x00fox", "a \u2066fox\u2069"])
def test_every_prompt_of_the_chain_holds_to_the_prompt_rule(
    model: type[BaseModel], data: dict[str, Any], field: str, prompt: str
) -> None:
    """A prompt.enhanced event, an image.rendered's job, a persisted record refuse a control or
    bidirectional character as a request and a plain render body do, naming the field."""
    *outer, name = field.split(".")
    given = json.loads(json.dumps(data))
    inner = given
    for part in outer:
        inner = inner[part]
    inner[name] = prompt
    for each in (given, json.dumps(given)):
        with pytest.raises(InvalidRequest) as caught:
            parse_model(model, each)
        assert caught.value.fields == [field]


def test_a_written_prompt_is_read_as_it_was_written() -> None:
    # Refused characters aside, a job's prompt is never changed on reading: its fingerprint,
    # and the record's digest, are of what was written.
    job = parse_model(
        EnhancedPrompt, {**JOB, "prompt": "a cat\non a mat\t", "original_prompt": "a"}
    )
    assert job.prompt == "a cat\non a mat\t"
    assert parse_model(PersistedImage, {**PERSISTED, "prompt": "a\ncat"}).prompt == "a\ncat"


def test_metadata_is_measured_in_bytes_of_compact_utf8_json() -> None:
    """≤ 4 KiB as stored: 1,000 "é" are 2,011 bytes (not 6,012 with each as \\u00e9)."""
    accented = {"k": "é" * 1000}
    assert parse_model(GenerationRequest, {"metadata": accented}).metadata == accented
    # {"k":"…"} is 8 bytes around the text: the text of the largest is 4,088 bytes.
    largest = {"k": "猫" * 1362 + "ab"}  # 3 bytes a character: 4,086 + 2
    assert len(json.dumps(largest, ensure_ascii=False, separators=(",", ":")).encode()) == 4096
    assert parse_model(GenerationRequest, {"metadata": largest}).metadata == largest
    with pytest.raises(InvalidRequest) as caught:
        parse_model(GenerationRequest, {"metadata": {"k": largest["k"] + "c"}})
    assert caught.value.errors == [
        {
            "field": "metadata",
            "message": f"at most {MAX_METADATA_BYTES} bytes as UTF-8 JSON, got 4097",
        }
    ]


def test_a_final_prompt_is_bounded_as_no_text_encoder_reads_further() -> None:
    job = RENDERED["prompt"]
    longest = "a" * MAX_FINAL_PROMPT_CHARS
    assert parse_model(EnhancedPrompt, {**job, "prompt": longest}).prompt == longest
    for model, data in ((EnhancedPrompt, job), (RenderRequest, {})):
        with pytest.raises(InvalidRequest) as caught:
            parse_model(model, {**data, "prompt": longest + "a"})
        assert caught.value.fields == ["prompt"]


def _loras(count: int, **same: str) -> list[dict[str, str]]:
    return [{"name": f"l{i}", "path": f"/loras/l{i}", **same} for i in range(count)]


@pytest.mark.parametrize(
    ("loras", "field"),
    [
        # Each name is an adapter render loads and holds: as many as it keeps per model.
        (_loras(MAX_LORAS + 1), "loras"),
        (_loras(2, name="twice"), "loras"),
        (_loras(2, path="/loras/same"), "loras"),  # the same weights, added up
        # torch refuses a "." in an adapter's name: refused here, naming the name.
        ([{"name": "my.lora", "path": "/loras/my.lora"}], "loras.0.name"),
    ],
)
def test_a_job_s_loras_are_bounded_and_each_given_once(
    loras: list[dict[str, str]], field: str
) -> None:
    most = parse_model(RenderRequest, {"prompt": "p", "loras": _loras(MAX_LORAS)})
    assert len(most.loras) == MAX_LORAS
    for model, data in ((EnhancedPrompt, JOB), (RenderRequest, {"prompt": "p"})):
        with pytest.raises(InvalidRequest) as caught:
            parse_model(model, {**data, "loras": loras})
        assert caught.value.fields == [field]


@pytest.mark.parametrize(
    ("source", "event_id"),
    [
        ("/cron/dream", "ping-1"),
        ("//a/b?c", "é ü 🐈"),
        ("", ""),
        ("/s", "a\ud800b"),
        ("/a#b", "c#d"),
        ("/100%23", "%"),
    ],
)
def test_a_derived_generation_id_is_uuid5_of_source_and_id(source: str, event_id: str) -> None:
    import uuid

    from imagegen.identity import derive_generation_id as derived

    # A source with a "#": both parts escaped ("%", "#", "|"), joined by "|".
    def escaped(part: str) -> str:
        return part.replace("%", "%25").replace("#", "%23").replace("|", "%7C")

    name = f"{escaped(source)}|{escaped(event_id)}" if "#" in source else f"{source}#{event_id}"
    if "\ud800" in name:  # uuid5 cannot encode it: the same hash of its bytes as they came
        first = derived(source, event_id)
        assert first == derived(source, event_id) and len(first) == 32
        assert first != derived(source, event_id.replace("\ud800", "x"))
    else:
        assert derived(source, event_id) == uuid.uuid5(uuid.NAMESPACE_URL, name).hex


# Any text, lone surrogates included (an event's JSON may escape one).
_TEXT = st.text(st.characters(codec=None, exclude_categories=()), max_size=12)


@hypothesis.given(source=_TEXT.filter(lambda s: "#" not in s), event_id=_TEXT)
@hypothesis.settings(max_examples=200, deadline=None)
def test_a_derived_generation_id_is_unchanged_for_a_source_without_hash(
    source: str, event_id: str
) -> None:
    import hashlib
    import uuid

    from imagegen.identity import derive_generation_id as derived

    # Generations in flight keep their ids: uuid5's hash of "source#id", as before.
    name = f"{source}#{event_id}".encode("utf-8", "surrogatepass")
    digest = hashlib.sha1(uuid.NAMESPACE_URL.bytes + name, usedforsecurity=False).digest()
    assert derived(source, event_id) == uuid.UUID(bytes=digest[:16], version=5).hex


# Pairs from a few pieces of the names a source with a "#" is given: "#", "|", "%" and the
# escapes they take.
_SMALL = st.lists(st.sampled_from(["/", "a", "#", "%", "23", "25", "7C", "|"]), max_size=5).map(
    "".join
)
_RESPELLINGS = [("#", "%23"), ("%23", "#"), ("|", "%7C"), ("%7C", "|"), ("%", "%25"), ("%25", "%")]


@st.composite
def _read_alike(draw: st.DrawFn) -> tuple[tuple[str, str], tuple[str, str]]:
    """Two pairs whose names, joined, read alike: one text cut in two at one "#" or "|" and at
    another, or one pair and the same with a character written as its escape (or back)."""
    if draw(st.booleans()):
        head, middle, tail = draw(_SMALL), draw(_SMALL), draw(_SMALL)
        first, second = draw(st.sampled_from("#|")), draw(st.sampled_from("#|"))
        return (head, middle + second + tail), (head + first + middle, tail)
    source, event_id = draw(_SMALL), draw(_SMALL)
    old, new = draw(st.sampled_from(_RESPELLINGS))
    if draw(st.booleans()):
        return (source, event_id), (source.replace(old, new, 1), event_id)
    return (source, event_id), (source, event_id.replace(old, new, 1))


@hypothesis.given(
    first=st.tuples(_TEXT, _TEXT), second=st.tuples(_SMALL, _SMALL), alike=_read_alike()
)
@hypothesis.settings(max_examples=500, deadline=None)
def test_distinct_sources_and_ids_derive_distinct_generation_ids(
    first: tuple[str, str],
    second: tuple[str, str],
    alike: tuple[tuple[str, str], tuple[str, str]],
) -> None:
    import itertools

    from imagegen.identity import derive_generation_id as derived

    # CloudEvents' source is a URI-reference (a "#" in it is a fragment), its id any string:
    # no split of the joined name may stand for another event. Each pair is compared with
    # every other, and with each one's swap.
    pairs = [first, second, *alike]
    pairs += [pair[::-1] for pair in pairs]
    for one, other in itertools.combinations(pairs, 2):
        assert (derived(*one) == derived(*other)) == (one == other), (one, other)


@pytest.mark.parametrize(
    ("one", "other"),
    [
        (("/a#b", "c"), ("/a", "b#c")),
        (("/a%23b", "c"), ("/a#b", "c")),
        (("/a#", ""), ("/a", "#")),
        (("/a#b", "c|d"), ("/a#b|c", "d")),
        (("/a%23b|c", "d"), ("/a#b", "c#d")),
        (("/a%23b#x", "c"), ("/a#b#x", "c")),
        (("/a#b", "c"), ("/a", "b|c")),
    ],
)
def test_events_whose_joined_name_reads_alike_derive_distinct_generation_ids(
    one: tuple[str, str], other: tuple[str, str]
) -> None:
    from imagegen.identity import derive_generation_id as derived

    assert derived(*one) != derived(*other)


@hypothesis.given(source=st.one_of(_TEXT, _SMALL), event_id=st.one_of(_TEXT, _SMALL))
@hypothesis.example(source="/a#b|c%23", event_id="d#e|f%7C")
@hypothesis.example(source="/s\ud800#", event_id="|\udfff")
@hypothesis.settings(max_examples=300, deadline=None)
def test_a_derived_generation_id_is_uuid5_of_the_name_a_failure_gives_its_event(
    source: str, event_id: str
) -> None:
    import hashlib
    import uuid

    from imagegen.events import failure_cause
    from imagegen.identity import derive_generation_id as derived

    # One rule names an event by its source and id: the generation it starts and the failure
    # that answers it (its cause) agree, for a source with a "#" as for one without. The hash
    # is uuid5's, of the name's bytes as they came (a lone surrogate included).
    name = failure_cause(source, event_id).encode("utf-8", "surrogatepass")
    digest = hashlib.sha1(uuid.NAMESPACE_URL.bytes + name, usedforsecurity=False).digest()
    assert derived(source, event_id) == uuid.UUID(bytes=digest[:16], version=5).hex


def test_a_table_hub_id_in_another_case_has_its_revision_and_family() -> None:
    from imagegen.modelspec import MODELS, family_for, spec_for

    pinned = next(s for s in MODELS.values() if s.revision and "/" in s.id)
    other = pinned.id.upper()
    assert spec_for(other).revision == pinned.revision
    assert family_for(other) is pinned.family
    # A local path is no Hub id, whatever its case.
    assert spec_for("./" + other).revision is None


# Every str field of each event model given, dict keys and list items included: a lone
# surrogate put in any one of them is refused naming it.
_LORA = {"name": "ink", "path": "loras/ink", "trigger": "inked"}
FULL_JOB: dict[str, Any] = {
    **JOB,
    "original_prompt": "cat",
    "contributions": [
        {"plugin": "season", "text": "in snow", "data": {"season": "winter"}, "loras": [_LORA]}
    ],
    "loras": [_LORA],
    "enhanced_at": "2026-11-24T18:30:01Z",
    "metadata": {"team": "art"},
    "replay_of": "g-0",
}
FULL: list[tuple[type[BaseModel], dict[str, Any]]] = [
    (
        GenerationRequest,
        {
            "generation_id": "g-1",
            "prompt": "a cat",
            "model": "tiny",
            "plugins": ["season"],
            "plugin_options": {"season": {"hemisphere": "north"}},
            "timezone": "Europe/Paris",
            "requested_at": "2026-11-24T18:30:00Z",
            "metadata": {"team": "art"},
            "webhook": "https://hooks.example.com/done",
            "webhook_events": ["failed"],
            "replay_of": "g-0",
        },
    ),
    (EnhancedPrompt, FULL_JOB),
    (RenderRequest, FULL_JOB),
    (
        RenderedImage,
        {
            **RENDERED,
            "content_type": "image/png",
            "timings": {"render": 1.0},
            "prompt": FULL_JOB,
        },
    ),
    (
        PersistedImage,
        {
            **PERSISTED,
            "content_type": "image/png",
            "url": "https://img.example.com/g-1.png",
            "urls": {"image": "https://img.example.com/g-1.png"},
            "timings": {"render": 1.0},
            "persisted_at": "2026-11-24T18:32:00Z",
            "replay_of": "g-0",
        },
    ),
    (
        DerivedImage,
        {
            **DERIVED,
            "keys": {"record": "2026/11/24/g-1.derived.json"},
            "persisted_at": "2026-11-24T18:32:00Z",
            "replay_of": "g-0",
        },
    ),
    (
        GenerationFailed,
        {
            **FAILED,
            "generation_id": "g-1",
            "error": {**FAILED["error"], "errors": [{"field": "width", "message": "too wide"}]},
        },
    ),
]


def _with_a_surrogate(value: Any) -> list[tuple[tuple[str, ...], Any]]:
    """``value`` once for each string in it, a key below the top or a value, that string then
    ending in a lone surrogate; each with the path to the string."""
    found: list[tuple[tuple[str, ...], Any]] = []
    if isinstance(value, str):
        return [((), value + "\ud800")]
    if isinstance(value, list):
        for i, item in enumerate(value):
            for path, changed in _with_a_surrogate(item):
                found.append(((str(i), *path), [*value[:i], changed, *value[i + 1 :]]))
    if isinstance(value, dict):
        for key, item in value.items():
            for path, changed in _with_a_surrogate(item):
                found.append(((key, *path), {**value, key: changed}))
            if isinstance(item, dict):  # a key of a mapping the field holds
                for inner in item:
                    renamed = {k + "\ud800" if k == inner else k: v for k, v in item.items()}
                    found.append(((key, inner), {**value, key: renamed}))
    return found


@pytest.mark.parametrize(("model", "data"), FULL, ids=[m.__name__ for m, _ in FULL])
def test_a_lone_surrogate_in_any_text_of_a_model_is_refused_naming_its_field(
    model: type[BaseModel], data: dict[str, Any]
) -> None:
    """JSON's ``\\ud800`` escape makes a string UTF-8 cannot hold: in any field of the event data
    (a model, an enhancer, a key, a dict's key) it is a 400 naming the field, never a value that
    fails later where it is written (a digest, an event, a record)."""
    parse_model(model, data)  # valid as it is
    changes = _with_a_surrogate(data)
    texts = {
        name
        for name, node in model.model_json_schema()["properties"].items()
        if '"string"' in json.dumps(node) or "$ref" in json.dumps(node)
    }
    assert texts <= {path[0] for path, _ in changes}  # every field that may hold text is tried
    for path, changed in changes:
        with pytest.raises(InvalidRequest) as caught:
            parse_model(model, changed)
        assert caught.value.fields[0].split(".")[0] == path[0], (path, caught.value.errors)
        assert caught.value.status == 400


@pytest.mark.parametrize("model", [EnhancedPrompt, RenderRequest])
@pytest.mark.parametrize(("field", "longest"), [("enhancer", 256), ("model", 200)])
def test_what_wrote_a_job_and_its_model_are_names_of_bounded_length(
    model: type[BaseModel], field: str, longest: int
) -> None:
    """A job renders only if its reply can be published: a megabyte enhancer was rendered and
    stored, then persist refused the image.rendered reply that carried it."""
    assert getattr(parse_model(model, {**JOB, field: "x" * longest}), field) == "x" * longest
    with pytest.raises(InvalidRequest) as caught:
        parse_model(model, {**JOB, field: "x" * (longest + 1)})
    assert caught.value.fields == [field]
    # Said of text, as for any string (an optional field's bound was said of a list: "items").
    assert f"at most {longest} characters" in caught.value.errors[0]["message"]
    schema = model.model_json_schema()["properties"][field]
    bounds = [schema, *schema.get("anyOf", [])]  # RenderRequest's model may be null
    assert longest in {bound.get("maxLength") for bound in bounds}


def test_a_failure_quoting_a_lone_surrogate_is_still_text() -> None:
    from imagegen.models import ErrorInfo

    refused = InvalidRequest("bad \ud800", errors=[{"field": "x\udc00", "message": "no \ud800"}])
    info = ErrorInfo.of(refused)
    assert info.message == "bad \\ud800"
    assert info.errors == [{"field": "x\\udc00", "message": "no \\ud800"}]
    info.model_dump_json()  # UTF-8, as its event is written


def _contributions(count: int, **one: Any) -> list[dict[str, Any]]:
    return [{"plugin": f"p{i}", "text": "t", **one} for i in range(count)]


@pytest.mark.parametrize(
    ("contributions", "field"),
    [
        # One a plugin: as many as a request may run.
        (_contributions(MAX_CONTRIBUTIONS + 1), "contributions"),
        (_contributions(1, plugin="p" * (MAX_PLUGIN_NAME_CHARS + 1)), "contributions.0.plugin"),
        # The metadata's rule, in more bytes.
        (
            _contributions(1, data={"k": "x" * MAX_CONTRIBUTION_DATA_BYTES}),
            "contributions.0.data",
        ),
        (_contributions(1, data={f"k{i}": i for i in range(40)}), "contributions.0.data"),
        # More than a job applies: enhance keeps the first MAX_LORAS of them all.
        (_contributions(1, loras=_loras(MAX_LORA_HINTS + 1)), "contributions.0.loras"),
        (
            _contributions(1, loras=[{"name": "l", "path": "p" * (MAX_LORA_PATH_CHARS + 1)}]),
            "contributions.0.loras.0.path",
        ),
    ],
    ids=["count", "plugin", "data-bytes", "data-keys", "loras", "lora-path"],
)
def test_a_job_s_contributions_are_bounded(contributions: list[dict[str, Any]], field: str) -> None:
    most = _contributions(
        MAX_CONTRIBUTIONS,
        plugin="p" * MAX_PLUGIN_NAME_CHARS,
        data={"k": "x" * (MAX_CONTRIBUTION_DATA_BYTES - 8)},
        loras=[
            {"name": f"l{i}", "path": f"/{i:0>{MAX_LORA_PATH_CHARS - 1}}"}
            for i in range(MAX_LORA_HINTS)
        ],
    )
    with pytest.raises(InvalidRequest) as caught:  # each at its most: too many together
        parse_model(EnhancedPrompt, {**JOB, "contributions": most})
    assert caught.value.fields == ["contributions"]
    for model, data in ((EnhancedPrompt, JOB), (RenderRequest, {"prompt": "p"})):
        kept = parse_model(model, {**data, "contributions": most[:1]})
        assert len(kept.contributions[0].loras) == MAX_LORA_HINTS
        with pytest.raises(InvalidRequest) as caught:
            parse_model(model, {**data, "contributions": contributions})
        assert caught.value.fields == [field]


def test_a_lora_s_path_is_bounded() -> None:
    longest = "/" + "p" * (MAX_LORA_PATH_CHARS - 1)
    lora = {"name": "l", "path": longest}
    assert parse_model(RenderRequest, {"prompt": "p", "loras": [lora]}).loras[0].path == longest
    with pytest.raises(InvalidRequest) as caught:
        parse_model(RenderRequest, {"prompt": "p", "loras": [{**lora, "path": longest + "p"}]})
    assert caught.value.fields == ["loras.0.path"]
