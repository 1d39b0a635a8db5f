"""The OpenAPI documents: generated from the models, valid, and true of real responses."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
from openapi_spec_validator import validate

from imagegen import stages
from imagegen.openapi import render_documents
from tests.conftest import ROOT
from tests.functions.clients import InProcessFunction
from tests.functions.conftest import base_env

STAGE_MODELS = [s.name for s in stages.all_stages() if s.output_model is not None]


def _schema(doc: dict[str, Any], path: str, method: str, status: str) -> dict[str, Any]:
    """The response schema, with the document's components so that $refs resolve."""
    content = doc["paths"][path][method]["responses"][status]["content"]["application/json"]
    return {**content["schema"], "components": doc["components"]}


def _check(doc: dict[str, Any], path: str, method: str, reply: httpx.Response) -> None:
    status = str(reply.status_code)
    assert status in doc["paths"][path][method]["responses"], (
        f"{status} is not documented for {method} {path}"
    )
    jsonschema.validate(reply.json(), _schema(doc, path, method, status))


def test_documents_are_valid_and_committed() -> None:
    for name, text in render_documents().items():
        validate(json.loads(text))
        committed = ROOT / "docs" / "openapi" / name
        assert committed.read_text() == text, f"docs/openapi/{name} drifted: run `make schemas`"


def test_real_responses_match_the_documents(chain: dict[str, Any]) -> None:
    docs = {stage: chain[stage].get("/openapi.json").json() for stage in STAGE_MODELS}
    for stage, doc in docs.items():
        assert doc == json.loads((ROOT / "docs" / "openapi" / f"{stage}.json").read_text())
        _check(doc, "/healthz", "get", chain[stage].get("/healthz"))
        _check(doc, "/readyz", "get", chain[stage].get("/readyz"))

    enhanced = chain["enhance"].post(
        "/", json={"prompt": "a map", "width": 256, "height": 256}, timeout=60
    )
    _check(docs["enhance"], "/", "post", enhanced)
    rendered = chain["render"].post("/", json=enhanced.json(), timeout=120)
    _check(docs["render"], "/", "post", rendered)
    persisted = chain["persist"].post("/", json=rendered.json(), timeout=60)
    _check(docs["persist"], "/", "post", persisted)

    for stage, body in [("enhance", {"width": 1}), ("render", {"seed": "x"}), ("persist", {})]:
        _check(docs[stage], "/", "post", chain[stage].post("/", json=body, timeout=30))
    _check(
        docs["enhance"],
        "/",
        "post",
        chain["enhance"].post("/", content=b"x", headers={"content-type": "text/plain"}),
    )


@pytest.mark.parametrize("stage", STAGE_MODELS)
def test_request_schemas_reject_what_the_functions_reject(stage: str) -> None:
    doc = json.loads(render_documents()[f"{stage}.json"])
    request = doc["paths"]["/"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"unexpected": 1}, {**request, "components": doc["components"]})


def _post_responses(stage: str) -> set[str]:
    doc = json.loads(render_documents()[f"{stage}.json"])
    return set(doc["paths"]["/"]["post"]["responses"])


def test_only_a_stage_that_refuses_at_capacity_documents_429() -> None:
    # Overloaded is raised by render's admission alone (imagegen/render/stage.py).
    documented = {s.name for s in stages.all_stages() if "429" in _post_responses(s.name)}
    assert documented == {"render"}
    assert "Retry-After" in json.loads(render_documents()["render.json"])["paths"]["/"]["post"][
        "responses"
    ]["429"].get("headers", {})


def test_the_sink_documents_what_it_answers_to_any_body(tmp_path: Path) -> None:
    sink = stages.get("deadletter")
    assert sink.consumes == () and sink.input_model is None  # it takes any body
    assert _post_responses("deadletter") == {"202", "401", "403", "503"}
    doc = json.loads(render_documents()["deadletter.json"])
    assert "202" in doc["info"]["description"]
    function = InProcessFunction("deadletter", base_env(tmp_path / "store"))
    try:
        assert function.get("/openapi.json").json() == doc
        bodies: list[dict[str, Any]] = [
            {"json": {"unexpected": 1}},
            {"content": b"\xff not json", "headers": {"content-type": "text/plain"}},
            {"content": b"x" * (1024 * 1024 + 1), "headers": {"content-type": "text/plain"}},
            {"json": {"x": 1}, "headers": {"ce-specversion": "2.0", "ce-type": "nothing.known"}},
        ]
        for body in bodies:
            reply = function.post("/", **body)
            assert str(reply.status_code) in _post_responses("deadletter"), reply.text[:200]
            assert (reply.status_code, reply.content) == (202, b"")
    finally:
        function.close()
