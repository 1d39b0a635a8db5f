"""The committed JSON Schemas are generated from the models; they must not drift."""

from __future__ import annotations

import json

import jsonschema

from imagegen.events import dataschema, event_models, short_name
from imagegen.schemas import render_schemas
from tests.conftest import ROOT


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
