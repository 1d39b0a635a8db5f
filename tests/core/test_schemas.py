"""The committed JSON Schemas are generated from the models; they must not drift."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest
from pydantic import BaseModel

from imagegen.errors import InvalidRequest
from imagegen.events import dataschema, event_models, short_name
from imagegen.models import MAX_METADATA_KEYS
from imagegen.schemas import render_schemas
from imagegen.validation import parse_model
from tests.conftest import ROOT
from tests.core.test_models import DERIVED, JOB, PERSISTED


def test_committed_schemas_match_the_models() -> None:
    for name, text in render_schemas().items():
        committed = ROOT / "schemas" / name
        assert committed.is_file(), f"schemas/{name} is missing: run `make schemas`"
        assert committed.read_text() == text, f"schemas/{name} drifted: run `make schemas`"


def test_one_schema_per_event_type_with_its_url() -> None:
    names = render_schemas()
    for event_type in event_models():
        schema = json.loads(names[f"{short_name(event_type)}.json"])
        assert schema["$id"] == dataschema(event_type)
        jsonschema.Draft202012Validator.check_schema(schema)


def test_schema_rejects_what_the_model_rejects() -> None:
    schema = json.loads(render_schemas()["generation.requested.json"])
    validator = jsonschema.Draft202012Validator(schema)
    assert not list(validator.iter_errors({"prompt": "a cat", "width": 512}))
    assert list(validator.iter_errors({"width": 100}))
    assert list(validator.iter_errors({"colour": "red"}))


def _refused(model: type[BaseModel], data: dict[str, Any]) -> bool:
    try:
        parse_model(model, data)
    except InvalidRequest:
        return True
    return False


@pytest.mark.parametrize(
    ("name", "field", "value"),
    [
        *[
            (name, side, value)
            for name in ("generation.requested", "prompt.enhanced", "image.persisted")
            for side in ("width", "height")
            for value in (257, 1000, 272, 2048)
        ],
        *[
            ("generation.requested", "webhook", url)
            for url in (
                "ftp://hooks.example/x",
                "file:///etc/passwd",
                "ws://hooks.example/x",
                "mailto:ops@example.com",
                "https://hooks.example/x",
                "HTTP://hooks.example/x",
            )
        ],
    ],
)
def test_the_published_schema_refuses_what_the_model_refuses(
    name: str, field: str, value: object
) -> None:
    """A width not a multiple of 16 or a webhook of another scheme than http(s) is a 400: the
    schema a producer checks its event against says so too (multipleOf, pattern)."""
    model = event_models()[next(t for t in event_models() if short_name(t) == name)]
    valid = VALID[name]
    data = {**valid, field: value}
    validator = jsonschema.Draft202012Validator(json.loads(render_schemas()[f"{name}.json"]))
    assert not list(validator.iter_errors(valid))
    assert bool(list(validator.iter_errors(data))) == _refused(model, data)


VALID: dict[str, dict[str, Any]] = {
    "generation.requested": {"prompt": "a cat"},
    "prompt.enhanced": JOB,
    "image.persisted": PERSISTED,
    "image.derived": DERIVED,
}
INTEGER_FIELDS = {
    "generation.requested": ("width", "height", "seed", "steps"),
    "prompt.enhanced": ("width", "height", "seed", "steps"),
    "image.persisted": ("width", "height", "seed", "size"),
    "image.derived": ("thumbnail_size",),
}
WRONG_INTEGERS = [(1.5, True), (True, True), ("1", True), (1e300, True)]
SIDES = [(512.0, False), (1.0, True), (520.0, True), ("512", True), *WRONG_INTEGERS]
INTEGERS = {
    "width": SIDES,
    "height": SIDES,
    "seed": [(1.0, False), (4294967295.0, False), (4294967296.0, True), *WRONG_INTEGERS],
    "steps": [(1.0, False), (50.0, False), (51.0, True), *WRONG_INTEGERS],
    "size": [(1.0, False), (0.0, False), (2.0**63, True), *WRONG_INTEGERS],
    "thumbnail_size": [(256.0, False), (0.0, True), (1.5, True), (True, True), ("256", True)],
}
TOO_MANY_KEYS = {f"k{i}": i for i in range(MAX_METADATA_KEYS + 1)}
ENOUGH_KEYS = {f"k{i}": i for i in range(MAX_METADATA_KEYS)}


@pytest.mark.parametrize(
    ("name", "field", "value", "refused"),
    [
        # An integer: JSON Schema's "integer" is any number with a zero fraction (512.0), never
        # a fraction, a boolean or a string; bounded as the integer is.
        *[
            (name, field, value, refused)
            for name, fields in INTEGER_FIELDS.items()
            for field in fields
            for value, refused in INTEGERS[field]
        ],
        # The metadata's and a contribution's data's keys (maxProperties).
        *[
            (name, "metadata", keys, keys is TOO_MANY_KEYS)
            for name in ("generation.requested", "prompt.enhanced")
            for keys in (ENOUGH_KEYS, TOO_MANY_KEYS)
        ],
        *[
            ("prompt.enhanced", "contributions", [{"plugin": "p", "data": keys}], refused)
            for keys, refused in ((ENOUGH_KEYS, False), (TOO_MANY_KEYS, True))
        ],
        # A prompt's refused characters (pattern); tab, line feed and carriage return are not.
        *[
            (name, field, text, refused)
            for name, field in (
                ("generation.requested", "prompt"),
                ("prompt.enhanced", "prompt"),
                ("prompt.enhanced", "original_prompt"),
                ("image.persisted", "prompt"),
            )
            for text, refused in (
                ("a\tcat\non a\r\nmat", False),
                ("a cat\u00a0\u200b\u2028", False),
                ("a\x00cat", True),
                ("a\x1bcat", True),
                ("a\x7fcat", True),
                ("a cat\x85", True),
                ("evil\u202egnp.exe", True),
                ("a \u2066cat\u2069", True),
            )
        ],
    ],
)
def test_the_published_schema_and_the_model_read_alike(
    name: str, field: str, value: object, refused: bool
) -> None:
    """A limit JSON Schema can say, the schema says: an integer's type and range, the keys of
    the metadata, a prompt's characters. A producer that checks its event against the schema
    learns what the stage would answer."""
    model = event_models()[next(t for t in event_models() if short_name(t) == name)]
    data = {**VALID[name], field: value}
    validator = jsonschema.Draft202012Validator(json.loads(render_schemas()[f"{name}.json"]))
    assert not list(validator.iter_errors(VALID[name]))
    assert bool(list(validator.iter_errors(data))) is refused
    assert _refused(model, data) is refused
