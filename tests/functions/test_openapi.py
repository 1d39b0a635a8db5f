"""The OpenAPI documents: generated from the models, valid, and true of real responses."""

from __future__ import annotations

import json
import socket
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import jsonschema
import pytest
from openapi_spec_validator import validate

from functions._binding import parse
from imagegen import stages
from imagegen.auth import new_api_key
from imagegen.errors import ImageGenError
from imagegen.events import (
    GENERATION_FAILED,
    GENERATION_REQUESTED,
    IMAGE_DERIVED,
    IMAGE_PERSISTED,
    IMAGE_RENDERED,
    PROMPT_ENHANCED,
)
from imagegen.openapi import render_documents
from tests.conftest import ROOT
from tests.functions.clients import InProcessFunction
from tests.functions.conftest import StartServer, base_env
from tests.functions.servers import cloudevent_headers, free_port

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
    assert _post_responses("deadletter") == {"202", "400", "401", "403", "431", "503"}
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


# -- every answer as its document says: status, content, body and headers --------------------

SAID_HEADERS = ("www-authenticate", "retry-after")
SAID_PREFIXES = ("ce-", "x-imagegen-")
"""Reply headers a caller reads: each one an answer carries must be declared for its status."""


def _answered_as_documented(
    doc: dict[str, Any], path: str, method: str, reply: httpx.Response
) -> None:
    """``reply`` is one ``doc`` gives ``method path``: a documented status and content type, a
    body of its schema, its required headers sent, and every header a caller reads declared
    (and of its schema)."""
    status = str(reply.status_code)
    responses = doc["paths"][path][method]["responses"]
    assert status in responses, f"{status} undocumented for {method} {path}: {reply.text[:200]}"
    documented = responses[status]
    declared = {name.lower(): spec for name, spec in documented.get("headers", {}).items()}
    for name, spec in declared.items():
        if spec.get("required"):
            assert name in reply.headers, f"{name} missing from {status} of {method} {path}"
        if name in reply.headers:
            value: Any = reply.headers[name]
            value = int(value) if spec["schema"].get("type") == "integer" else value
            jsonschema.validate(value, spec["schema"])
    for name in reply.headers:
        if name.lower() in SAID_HEADERS or name.lower().startswith(SAID_PREFIXES):
            assert name.lower() in declared, f"{name} undeclared for {status} of {method} {path}"
    content = documented.get("content")
    if content is None:
        assert reply.content == b"", reply.content[:200]
        return
    media = reply.headers.get("content-type", "").split(";")[0].strip()
    assert media in content, f"{media!r} undocumented for {status} of {method} {path}"
    if media == "application/json":
        schema = {**content[media]["schema"], "components": doc["components"]}
        jsonschema.validate(reply.json(), schema)


def _sent_as_documented(
    doc: dict[str, Any], headers: dict[str, str], body: Any, media: str = "application/json"
) -> None:
    """A ``POST /`` request is one ``doc`` describes: each ``ce-*`` header a declared
    parameter of its schema, the body of the schema of its media type."""
    operation = doc["paths"]["/"]["post"]
    parameters = {p["name"]: p for p in operation.get("parameters", []) if p["in"] == "header"}
    for name, value in headers.items():
        if name.lower().startswith("ce-"):
            assert name.lower() in parameters, f"{name} is no documented parameter"
            jsonschema.validate(value, parameters[name.lower()]["schema"])
    content = operation["requestBody"]["content"]
    assert media in content, f"{media} is no documented request body"
    jsonschema.validate(body, {**content[media]["schema"], "components": doc["components"]})


def _served_documents(functions: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: function.get("/openapi.json").json() for name, function in functions.items()}


def test_a_cloudevent_that_can_never_succeed_is_a_documented_200(
    chain: dict[str, Any],
) -> None:
    """enhance answers an event dated ahead of its clock, in either mode, 200 with a
    generation.failed event: its data and attributes are documented, and so is the request."""
    doc = _served_documents(chain)["enhance"]
    ahead = (datetime.now(UTC) + timedelta(minutes=10)).isoformat()
    data = {"prompt": "a lake", "width": 256, "height": 256}
    headers = cloudevent_headers(GENERATION_REQUESTED, time=ahead)
    _sent_as_documented(doc, headers, data)
    binary = chain["enhance"].post("/", headers=headers, json=data)
    assert binary.status_code == 200 and binary.headers["ce-type"] == GENERATION_FAILED
    assert {e["field"] for e in binary.json()["error"]["errors"]} == {"time"}
    _answered_as_documented(doc, "/", "post", binary)

    envelope = {
        "specversion": "1.0",
        "type": GENERATION_REQUESTED,
        "source": "/tests",
        "id": uuid.uuid4().hex,
        "time": ahead,
        "datacontenttype": "application/json",
        "data": data,
    }
    _sent_as_documented(doc, {}, envelope, "application/cloudevents+json")
    structured = chain["enhance"].post(
        "/", content=json.dumps(envelope), headers={"content-type": "application/cloudevents+json"}
    )
    assert structured.status_code == 200 and structured.headers["ce-type"] == GENERATION_FAILED
    _answered_as_documented(doc, "/", "post", structured)


def test_the_events_of_a_chain_are_documented_both_ways(chain: dict[str, Any]) -> None:
    """Each stage's reply event (its ce-* headers, dataref and the model's routing attribute
    included) is a documented answer, and a documented request of the next stage."""
    docs = _served_documents(chain)
    headers = cloudevent_headers(GENERATION_REQUESTED, subject=f"oa-{uuid.uuid4().hex[:8]}")
    body: Any = {"prompt": "a lake", "width": 256, "height": 256}
    expected = [PROMPT_ENHANCED, IMAGE_RENDERED, IMAGE_PERSISTED, IMAGE_DERIVED]
    sent: set[str] = set()
    for stage, emitted in zip(("enhance", "render", "persist", "derive"), expected, strict=True):
        _sent_as_documented(docs[stage], headers, body)
        sent |= {name for name in headers if name.startswith("ce-")}
        reply = chain[stage].post("/", headers=headers, json=body, timeout=120)
        assert reply.status_code == 200 and reply.headers["ce-type"] == emitted, reply.text
        _answered_as_documented(docs[stage], "/", "post", reply)
        body = reply.json()
        headers = {k: v for k, v in reply.headers.items() if k.startswith("ce-")}
        headers["content-type"] = reply.headers["content-type"]
    assert {"ce-imagegenmodel", "ce-dataref", "ce-time", "ce-dataschema"} <= sent


STRUCTURED = "application/cloudevents+json"
DATACONTENTTYPES = [
    "application/json",
    "Application/JSON; charset=utf-8",
    " application/json ;",
    "",
    ";",
    "\u2003application/json\x1c",  # spaces to Python's strip(), none to ECMA-262's \\s
    "application/json\x85",
    "\ufeffapplication/json",  # a space to ECMA-262's \\s, none to strip()
    "\u200bapplication/json",
    "text/plain",
    "application/json+x",
    "application/jsonp; charset=utf-8",
    "application/json x",
    STRUCTURED,
]
SUBJECTS = ["gen-1", "G" * 128, "G" * 129, "bad id", "-gen", "gen.1", "gen/1", "génération"]
FAILURE = {"stage": "persist", "error": {"code": "x", "message": "no", "retryable": False}}


def _refused(reply: httpx.Response) -> bool:
    """Whether a function refused the event: a 4xx, or a stage's generation.failed reply."""
    return reply.status_code >= 400 or reply.headers.get("ce-type") == GENERATION_FAILED


def test_a_structured_event_s_attributes_are_documented_as_each_function_reads_them(
    chain: dict[str, Any], tmp_path: Path
) -> None:
    """A datacontenttype of JSON in any case, with parameters, is taken, and documented so; a
    subject that is no generation id is refused where the stage reads the generation from it
    (enhance, in either mode), and documented so, and kept where it is not (the ledger)."""
    env = {"IMAGEGEN_LEDGER_URL": str(tmp_path / "ledger.db")}
    request = {"prompt": "a lake", "enhance": False, "width": 256, "height": 256}
    with InProcessFunction("ledger", env) as ledger:
        cases = [
            (chain["enhance"], GENERATION_REQUESTED, request),
            (ledger, GENERATION_FAILED, FAILURE),
        ]
        for function, event_type, data in cases:
            doc = function.get("/openapi.json").json()
            content = doc["paths"]["/"]["post"]["requestBody"]["content"]
            envelope = jsonschema.Draft202012Validator(
                {**content[STRUCTURED]["schema"], "components": doc["components"]}
            )
            attributes = [("datacontenttype", v) for v in DATACONTENTTYPES]
            attributes += [("subject", v) for v in SUBJECTS]
            for name, value in attributes:
                event = {
                    "specversion": "1.0",
                    "type": event_type,
                    "source": "/tests",
                    "id": uuid.uuid4().hex,
                    name: value,
                    "data": data,
                }
                reply = function.post(
                    "/", content=json.dumps(event), headers={"content-type": STRUCTURED}
                )
                said = (function.stage, name, value, reply.status_code, reply.text[:300])
                assert envelope.is_valid(event) is not _refused(reply), said
            parameters = {p["name"]: p for p in doc["paths"]["/"]["post"]["parameters"]}
            header = jsonschema.Draft202012Validator(parameters["ce-subject"]["schema"])
            for value in SUBJECTS:
                # A space and what is not ASCII percent-encoded (HTTP binding, 3.1.3.2).
                sent = quote(value)
                headers = cloudevent_headers(event_type, subject=sent)
                reply = function.post("/", headers=headers, json=data)
                said = (function.stage, "ce-subject", sent, reply.status_code, reply.text[:300])
                assert header.is_valid(sent) is not _refused(reply), said


def test_the_documented_datacontenttype_is_the_one_the_binding_takes() -> None:
    """Each character up to U+3000 (the last that Python's strip() takes off as a space) and
    U+FEFF (ECMA-262's \\s has it, strip() does not), around and after application/json:
    the document's pattern takes the datacontenttype that the functions' binding takes."""
    doc = json.loads(render_documents()["persist.json"])
    content = doc["paths"]["/"]["post"]["requestBody"]["content"]
    schema = content[STRUCTURED]["schema"]["properties"]["datacontenttype"]
    documented = jsonschema.Draft202012Validator(schema)
    for code in [*range(0x3001), 0xFEFF]:
        character = chr(code)
        for value in (
            f"{character}application/json{character}",
            f"{character}Application/Json;{character}",
            character,
        ):
            event = {"specversion": "1.0", "type": "t", "source": "/s", "id": "1"}
            body = json.dumps({**event, "datacontenttype": value, "data": {}}).encode()
            try:
                parse({"Content-Type": STRUCTURED}, body, consumes=())
            except ImageGenError as exc:
                assert exc.errors[0]["field"] == "datacontenttype", (value, exc.errors)
                taken = False
            else:
                taken = True
            assert documented.is_valid(value) is taken, ascii(value)


def test_a_png_answer_declares_its_headers(chain: dict[str, Any]) -> None:
    doc = _served_documents(chain)["render"]
    job = {"prompt": "a red door", "width": 256, "height": 256, "steps": 1, "seed": 3}
    reply = chain["render"].post("/", json=job, headers={"accept": "image/png"}, timeout=120)
    assert reply.status_code == 200 and reply.content.startswith(b"\x89PNG")
    assert {"x-imagegen-generation-id", "x-imagegen-seed", "x-imagegen-model"} <= set(reply.headers)
    _answered_as_documented(doc, "/", "post", reply)


def test_an_empty_body_is_documented_as_an_empty_object(chain: dict[str, Any]) -> None:
    """An empty body is read as {}: enhance dreams a prompt, persist names what it needs; the
    documents require no body and say so."""
    docs = _served_documents(chain)
    empty = {"content": b"", "headers": {"content-type": "application/json"}, "timeout": 60}
    dreamed = chain["enhance"].post("/", **empty)
    assert dreamed.status_code == 200 and dreamed.json()["prompt"], dreamed.text
    refused = chain["persist"].post("/", **empty)
    assert refused.status_code == 400 and "key" in {e["field"] for e in refused.json()["errors"]}
    for stage, reply in (("enhance", dreamed), ("persist", refused)):
        request = docs[stage]["paths"]["/"]["post"]["requestBody"]
        assert request["required"] is False and "{}" in request["description"]
        _answered_as_documented(docs[stage], "/", "post", reply)
    _sent_as_documented(docs["enhance"], {}, {})  # what the empty body is read as: valid
    with pytest.raises(jsonschema.ValidationError):
        _sent_as_documented(docs["persist"], {}, {})


def test_refused_credentials_declare_their_challenge(tmp_path: Path) -> None:
    """A 401 and a 403 always carry WWW-Authenticate (RFC 6750), on every operation."""
    key, digest = new_api_key()
    env = {
        **base_env(tmp_path / "store"),
        "IMAGEGEN_LEDGER_URL": str(tmp_path / "ledger.db"),
        "IMAGEGEN_AUTH_REQUIRED": "true",
        # Never asked: no request here carries an OIDC token.
        "IMAGEGEN_OIDC_DISCOVERY_URL": f"http://127.0.0.1:{free_port()}",
        "IMAGEGEN_OIDC_CA_FILE": "",
        "IMAGEGEN_OIDC_TOKEN_FILE": "",
        "IMAGEGEN_API_KEY_HASHES": digest,
    }
    with InProcessFunction("ledger", env) as ledger, InProcessFunction("enhance", env) as enhance:
        for function in (ledger, enhance):
            doc = function.get("/openapi.json").json()
            for path, methods in doc["paths"].items():
                for method, operation in methods.items():
                    if "security" not in operation:
                        continue
                    url = path.replace("{generation_id}", "gen-x")
                    reply = function.client.request(method, url)
                    assert reply.status_code == 401, (path, reply.text)
                    _answered_as_documented(doc, path, method, reply)
        doc = ledger.get("/openapi.json").json()
        reply = ledger.post("/", json={}, headers={"authorization": f"Bearer {key}"})
        assert reply.status_code == 403, reply.text  # an API key at an event sink
        _answered_as_documented(doc, "/", "post", reply)


def test_each_ledger_route_documents_its_own_503(tmp_path: Path) -> None:
    """A replay whose broker cannot be reached is a 503 its document describes as such."""
    env = {"IMAGEGEN_LEDGER_URL": str(tmp_path / "ledger.db")}
    env["IMAGEGEN_SINK_URL"] = f"http://127.0.0.1:{free_port()}/"  # nothing listens there
    with InProcessFunction("ledger", env) as ledger:
        doc = ledger.get("/openapi.json").json()
        data = {"generation_id": "gen-r", "prompt": "a lake", "width": 256, "height": 256}
        recorded = ledger.post("/", headers=cloudevent_headers(GENERATION_REQUESTED), json=data)
        assert recorded.status_code == 202, recorded.text
        reply = ledger.post("/generations/gen-r/replay?from=requested")
    assert reply.status_code == 503 and "broker" in reply.json()["message"], reply.text
    _answered_as_documented(doc, "/generations/{generation_id}/replay", "post", reply)
    said = {
        (path, method): operation["responses"]["503"]["description"]
        for path, methods in doc["paths"].items()
        for method, operation in methods.items()
        if path.startswith("/generations")
    }
    assert "broker" in said["/generations/{generation_id}/replay", "post"]
    assert len(set(said.values())) == len(said), said


def test_every_operation_documents_the_servers_431() -> None:
    for name, text in render_documents().items():
        doc = json.loads(text)
        for path, methods in doc["paths"].items():
            for method, operation in methods.items():
                assert "431" in operation["responses"], (name, method, path)


def _raw(port: int, request: bytes) -> httpx.Response:
    """``request`` sent as it is to a server on ``port``; its answer, read to the end."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(request)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    status, *lines = head.decode("latin-1").split("\r\n")
    headers = [tuple(part.strip() for part in line.split(":", 1)) for line in lines]
    return httpx.Response(int(status.split()[1]), headers=headers, content=body)


@pytest.mark.slow
def test_what_the_server_refuses_itself_is_documented(
    start_server: StartServer, tmp_path: Path
) -> None:
    """gunicorn answers headers too large 431 on any operation, and a malformed request 400,
    before the function: the dead-letter sink's documents say so too."""
    env = {**base_env(tmp_path / "store"), "IMAGEGEN_LEDGER_URL": str(tmp_path / "ledger.db")}
    for name in ("deadletter", "ledger"):
        server = start_server(name, env)
        doc = server.get("/openapi.json").json()
        for path, methods in doc["paths"].items():
            for method in methods:
                url = server.url + path.replace("{generation_id}", "gen-x")
                reply = httpx.request(method, url, headers={"x-big": "x" * 9000}, timeout=30)
                assert reply.status_code == 431, (name, method, path, reply.text)
                assert reply.json()["errors"][0]["field"] == "headers"
                _answered_as_documented(doc, path, method, reply)
        twice = (
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            "Content-Length: 2\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}"
        )
        reply = _raw(server.port, twice.encode())
        assert reply.status_code == 400, reply.text
        _answered_as_documented(doc, "/", "post", reply)
