"""The OpenAPI documents declare the bearer token every invocation needs, and no other."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from openapi_spec_validator import validate

from imagegen.auth import new_api_key
from imagegen.openapi import render_documents
from tests.fakes.oidc_issuer import Issuer
from tests.functions.clients import InProcessFunction
from tests.functions.conftest import auth_env, base_env

DOCUMENTS = {
    name.removesuffix(".json"): json.loads(text) for name, text in render_documents().items()
}
PROBES = {"/healthz", "/readyz"}
_, API_KEY_HASH = new_api_key()


def _operations(doc: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(p, m, op) for p, methods in doc["paths"].items() for m, op in methods.items()]


@pytest.mark.parametrize("stage", sorted(DOCUMENTS))
def test_every_invocation_needs_the_bearer_token_and_no_probe_does(stage: str) -> None:
    doc = DOCUMENTS[stage]
    validate(doc)
    scheme = doc["components"]["securitySchemes"]["bearer"]
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")
    assert "API key" in scheme["description"] and "OIDC token" in scheme["description"]
    assert f"imagegen-{stage}" in scheme["description"]  # the audience it must name
    assert "security" not in doc  # nothing for all: the probes take none
    for path, method, operation in _operations(doc):
        expected: list[dict[str, list[str]]] | None = None if path in PROBES else [{"bearer": []}]
        assert operation.get("security") == expected, (method, path)
        if expected is not None:  # and the refusal that goes with it is documented
            assert "401" in operation["responses"], (method, path)


@pytest.mark.parametrize("stage", ["enhance", "ledger"])
def test_the_documents_say_what_a_function_with_auth_on_does(
    stage: str, issuer: Issuer, tmp_path: Path
) -> None:
    env = {
        **base_env(tmp_path / "store"),
        "IMAGEGEN_LEDGER_URL": str(tmp_path / "ledger.db"),
        **auth_env(issuer.url, API_KEY_HASH),
    }
    function = InProcessFunction(stage, env)
    served = function.get("/openapi.json")
    assert served.status_code == 200  # the document itself needs no token
    doc = served.json()
    assert doc == DOCUMENTS[stage]
    for path, method, operation in _operations(doc):
        url = path.replace("{generation_id}", "0f" * 16)
        reply = function.client.request(method.upper(), url, json={} if method == "post" else None)
        if operation.get("security"):
            assert reply.status_code == 401, (method, path, reply.text)
            assert reply.headers["WWW-Authenticate"].startswith("Bearer ")
        else:
            assert reply.status_code == 200, (method, path, reply.text)
