"""The largest job a stage accepts, wrapped in each later stage's reply, fits the body every
stage reads (1 MiB): what render accepts, persist, derive and the ledger accept too.

The job is built from the models' own bounds, every field at its most, each character one
that the events' JSON escapes to 12 bytes (an astral character, ``"\\ud83e\\udd8a"``); a field
the builder does not know, or a text field without a bound, fails the test rather than
letting a later stage's reply grow past the body unnoticed.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from annotated_types import MaxLen
from pydantic import BaseModel

from functions._binding import MAX_BODY_BYTES, event_reply
from imagegen.errors import InvalidRequest
from imagegen.events import (
    ATTRIBUTE_MAX_LENGTHS,
    IMAGE_DERIVED,
    IMAGE_PERSISTED,
    IMAGE_RENDERED,
    MODEL_ATTRIBUTE,
    PROMPT_ENHANCED,
    reply_attributes,
)
from imagegen.models import (
    MAX_CONTRIBUTION_DATA_BYTES,
    MAX_CONTRIBUTIONS_BYTES,
    MAX_GUIDANCE,
    MAX_METADATA_BYTES,
    MAX_SEED,
    MAX_STEPS,
    Contribution,
    DerivedImage,
    EnhancedPrompt,
    LoraHint,
    PersistedImage,
    RenderRequest,
)
from imagegen.render.stored_png import rendered_image
from imagegen.storage.base import GenerationKeys
from imagegen.validation import parse_model

# 4 bytes of UTF-8, 12 in the events' JSON, which escapes it to ASCII as its surrogate pair.
WIDEST = "\U0001f98a"
# The longest repr a float below the bounds has: 17 significant digits.
LONGEST_GUIDANCE = MAX_GUIDANCE - 2**-48
# The operator's storage root, as long as a path may be (PATH_MAX): no model bounds it.
ROOT = "s3://" + "r" * 4091


def _most(model: type[BaseModel], name: str) -> int:
    """The most characters (or items) ``model``'s field ``name`` takes: the field's own bound,
    or its type's (``Annotated[str, StringConstraints(max_length=...)] | None``), as the
    published JSON Schema says it."""
    bounds = [m.max_length for m in model.model_fields[name].metadata if isinstance(m, MaxLen)]
    schema = model.model_json_schema()["properties"][name]
    for each in (schema, *schema.get("anyOf", [])):
        bounds += [each[key] for key in ("maxLength", "maxItems") if key in each]
    assert bounds, f"{model.__name__}.{name} is unbounded"
    return min(bounds)


def _id(tag: str) -> str:
    return tag + "0" * (128 - len(tag))  # GENERATION_ID_PATTERN's most


def _widest(model: type[BaseModel], name: str, tag: str = "") -> str:
    return tag + WIDEST * (_most(model, name) - len(tag))


def _time(hours: int) -> str:
    # Microseconds and an offset: the longest an RFC 3339 time is written back.
    zone = timezone(timedelta(hours=5, minutes=45))
    return (
        (datetime(2026, 12, 6, 10, tzinfo=UTC) + timedelta(hours=hours))
        .astimezone(zone)
        .isoformat(timespec="microseconds")
    )


def _utf8_json(value: Any) -> int:
    """Bytes as the models measure an object: compact JSON in UTF-8."""
    return len(json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode())


def _padded(most: int, tag: str) -> dict[str, Any]:
    """An object of at most ``most`` bytes (as measured), all but a few its widest text."""
    room = most - _utf8_json({tag: ""})
    return {tag: WIDEST * (room // 4) + "x" * (room % 4)}


def _lora(i: int) -> dict[str, Any]:
    lora = {
        "name": (f"l{i}" + "a" * 128)[:128],  # its pattern's most
        "path": _widest(LoraHint, "path", f"{i}"),
        "weight": 2.0 - 2**-52,
        "trigger": _widest(LoraHint, "trigger"),
    }
    assert set(lora) == set(LoraHint.model_fields)
    return lora


def _contribution(i: int) -> dict[str, Any]:
    contribution = {
        "plugin": _widest(Contribution, "plugin", f"{i}"),
        "text": _widest(Contribution, "text"),
        "data": _padded(MAX_CONTRIBUTION_DATA_BYTES, f"k{i}"),
        "loras": [_lora(n) for n in range(_most(Contribution, "loras"))],
    }
    assert set(contribution) == set(Contribution.model_fields)
    return contribution


def _contributions() -> list[dict[str, Any]]:
    """As many contributions as the job takes, each at its most, the last cut (its LoRAs, then
    its data) to fill what they may take together within a character."""
    found: list[dict[str, Any]] = []
    while len(found) < _most(EnhancedPrompt, "contributions"):
        last = _contribution(len(found))
        if _utf8_json([*found, last]) <= MAX_CONTRIBUTIONS_BYTES:
            found.append(last)
            continue
        last["data"] = {}
        while last["loras"] and _utf8_json([*found, last]) > MAX_CONTRIBUTIONS_BYTES:
            last["loras"].pop()
        room = MAX_CONTRIBUTIONS_BYTES - _utf8_json([*found, last]) + _utf8_json({})
        last["data"] = _padded(room, f"k{len(found)}")
        found.append(last)
        break
    assert MAX_CONTRIBUTIONS_BYTES - 3 <= _utf8_json(found) <= MAX_CONTRIBUTIONS_BYTES
    return found


def largest_job() -> dict[str, Any]:
    """The largest job EnhancedPrompt and RenderRequest take, as JSON data."""
    job = {
        "generation_id": _id("g"),
        "prompt": _widest(EnhancedPrompt, "prompt"),
        "original_prompt": _widest(EnhancedPrompt, "original_prompt"),
        "dreamed": False,
        "fallback": False,
        "enhancer": _widest(EnhancedPrompt, "enhancer"),
        "contributions": _contributions(),
        "loras": [_lora(i) for i in range(_most(EnhancedPrompt, "loras"))],
        "model": _widest(EnhancedPrompt, "model"),
        "width": 2048,
        "height": 2048,
        "steps": MAX_STEPS,
        "guidance": LONGEST_GUIDANCE,
        "seed": MAX_SEED,
        "requested_at": _time(-1),
        "enhanced_at": _time(-1),
        "metadata": _padded(MAX_METADATA_BYTES, "m"),
        "replay_of": _id("r"),
    }
    assert set(job) == set(EnhancedPrompt.model_fields) == set(RenderRequest.model_fields)
    return job


def _wire(stage: str, event_type: str, data: BaseModel) -> bytes:
    """``data`` as ``stage`` answers it: the event's body, binary mode."""
    generation_id = getattr(data, "generation_id", None)
    return event_reply(reply_attributes(stage, event_type, data, generation_id, {}), data).body


def _largest_envelope() -> int:
    """Bytes a structured envelope adds to its data at most: the attributes at the ledger's
    bounds and the trace context and Knative's extensions at theirs, each character widest."""
    attributes = {name: WIDEST * most for name, most in ATTRIBUTE_MAX_LENGTHS.items()} | {
        "specversion": "1.0",
        "subject": _id("g"),
        "time": _time(0),
        "datacontenttype": "application/json",
        "dataschema": "https://schemas.example/" + "s" * 1000,
        MODEL_ATTRIBUTE: _widest(EnhancedPrompt, "model"),
        "traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01",
        # W3C Trace Context: 32 list-members, a key and a value of 256 each.
        "tracestate": ",".join(f"{i:0>256}={'v' * 256}" for i in range(32)),
        "knativearrivaltime": _time(0),
        "knativeerrorcode": "500",
        "knativeerrordest": "http://" + "d" * 1000,
        "knativeerrordata": "A" * 1024,
    }
    return len(json.dumps({**attributes, "data": None}).encode())


@pytest.fixture(scope="module")
def job() -> EnhancedPrompt:
    return parse_model(EnhancedPrompt, largest_job())


def test_the_largest_job_is_valid_both_as_an_event_and_as_a_direct_request() -> None:
    data = largest_job()
    request = parse_model(RenderRequest, data)
    assert request.model_dump(mode="json") == parse_model(EnhancedPrompt, data).model_dump(
        mode="json"
    )


def test_the_largest_job_fits_each_later_stage_reply(job: EnhancedPrompt) -> None:
    keys = GenerationKeys(job.generation_id, job.requested_at)
    rendered = rendered_image(
        job,
        keys.image,
        f"{ROOT}/{keys.image}",
        size=2**63 - 1,
        sha256="f" * 64,
        stage_timings={
            name: 1 / 3
            for name in ("queue", "load", "lora", "denoise", "decode", "encode", "total")
        },
        at=datetime.fromisoformat(_time(0)),
    )
    signed = f"https://{'h' * 253}/{{}}?exp=99999999999&sig={'f' * 64}"
    persisted = PersistedImage(
        generation_id=job.generation_id,
        key=keys.image,
        location=f"{ROOT}/{keys.image}",
        url=signed.format(keys.image),
        keys={"image": keys.image, "thumbnail": keys.thumbnail, "metadata": keys.metadata},
        urls={"image": signed.format(keys.image), "thumbnail": signed.format(keys.thumbnail)},
        metadata_location=f"{ROOT}/{keys.metadata}",
        size=rendered.size,
        sha256=rendered.sha256,
        width=job.width,
        height=job.height,
        seed=job.seed,
        model=job.model,
        prompt=job.prompt,
        timings=rendered.timings,
        created_at=rendered.occurred_at,
        persisted_at=rendered.occurred_at,
        replay_of=job.replay_of,
    )
    derived = DerivedImage(
        generation_id=job.generation_id,
        key=keys.image,
        sha256=rendered.sha256,
        keys={
            "record": keys.derivatives,
            "thumbnail": keys.thumbnail,
            **{
                f"{kind}:{width}": f"{keys.prefix}.{width}.{kind}"
                for kind in ("avif", "webp")
                for width in range(64, 2049, 64)
            },
        },
        thumbnail_size=2048,
        created_at=persisted.created_at,
        persisted_at=persisted.persisted_at,
        replay_of=job.replay_of,
    )
    envelope = _largest_envelope()
    replies = {
        "enhance": _wire("enhance", PROMPT_ENHANCED, job),
        "render": _wire("render", IMAGE_RENDERED, rendered),
        "persist": _wire("persist", IMAGE_PERSISTED, persisted),
        "derive": _wire("derive", IMAGE_DERIVED, derived),
    }
    sizes = {stage: len(body) + envelope for stage, body in replies.items()}
    assert max(sizes.values()) <= MAX_BODY_BYTES, sizes
    # Render's reply carries the job whole: the largest, and most of the body.
    assert max(sizes, key=sizes.__getitem__) == "render"
    assert sizes["render"] > MAX_BODY_BYTES // 2, sizes


@pytest.mark.parametrize("model", [EnhancedPrompt, RenderRequest])
def test_a_byte_more_of_contributions_is_refused(model: type[BaseModel]) -> None:
    data = largest_job()
    room = MAX_CONTRIBUTIONS_BYTES - _utf8_json(data["contributions"])
    last = data["contributions"][-1]["data"]
    [tag] = last
    last[tag] += "x" * (room + 1)
    with pytest.raises(InvalidRequest) as caught:
        parse_model(model, data)
    size = MAX_CONTRIBUTIONS_BYTES + 1
    assert caught.value.errors == [
        {
            "field": "contributions",
            "message": f"at most {MAX_CONTRIBUTIONS_BYTES} bytes as UTF-8 JSON, got {size}",
        }
    ]
