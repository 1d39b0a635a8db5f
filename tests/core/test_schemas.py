"""The committed JSON Schemas are generated from the models; they must not drift."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest
from pydantic import BaseModel

from imagegen.errors import InvalidRequest
from imagegen.events import dataschema, event_models, short_name
from imagegen.schemas import render_schemas
from imagegen.validation import parse_model
from tests.conftest import ROOT
from tests.core.test_models import JOB, PERSISTED


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
    valid = {
        "generation.requested": {"prompt": "a cat"},
        "prompt.enhanced": JOB,
        "image.persisted": PERSISTED,
    }[name]
    data = {**valid, field: value}
    validator = jsonschema.Draft202012Validator(json.loads(render_schemas()[f"{name}.json"]))
    assert not list(validator.iter_errors(valid))
    assert bool(list(validator.iter_errors(data))) == _refused(model, data)
