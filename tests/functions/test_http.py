"""The HTTP surface of the functions: plain JSON, PNG, health, and bad input that never 500s."""

from __future__ import annotations

import io
import json
import re
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from PIL import Image

from imagegen.events import GENERATION_FAILED, GENERATION_REQUESTED, IMAGE_RENDERED, PROMPT_ENHANCED
from imagegen.modelspec import family_for
from tests.functions.servers import cloudevent_headers, post_event


def test_health_and_readiness(chain: dict[str, Any]) -> None:
    for stage, server in chain.items():
        alive = server.get("/healthz")
        assert alive.status_code == 200 and alive.json()["stage"] == stage
        ready = server.get("/readyz")
        assert ready.status_code == 200 and ready.json()["ready"] is True


def test_plain_json_invoke(chain: dict[str, Any]) -> None:
    enhanced = chain["enhance"].post(
        "/",
        json={"prompt": "a koi pond", "width": 256, "height": 256, "seed": 3},
        timeout=60,
    )
    assert enhanced.status_code == 200, enhanced.text
    assert "ce-type" not in enhanced.headers
    job = enhanced.json()
    assert job["seed"] == 3 and job["model"] == "tiny" and job["original_prompt"] == "a koi pond"
    assert job["fallback"] is True  # no Ollama here

    rendered = chain["render"].post("/", json=job, timeout=120)
    assert rendered.status_code == 200, rendered.text
    assert rendered.json()["sha256"]
    persisted = chain["persist"].post("/", json=rendered.json(), timeout=60)
    assert persisted.status_code == 200, persisted.text
    assert persisted.json()["url"].startswith("https://img.example.com/")


def test_render_returns_png_when_asked(chain: dict[str, Any], chain_store) -> None:
    job = (
        chain["enhance"]
        .post(
            "/",
            json={"prompt": "a teapot", "width": 256, "height": 288, "seed": 11},
            timeout=60,
        )
        .json()
    )
    before = sorted(chain_store.rglob("*"))
    reply = chain["render"].post("/", json=job, headers={"Accept": "image/png"}, timeout=120)
    assert reply.status_code == 200
    assert reply.headers["content-type"] == "image/png"
    assert reply.headers["x-imagegen-seed"] == "11"
    assert Image.open(io.BytesIO(reply.content)).size == (256, 288)
    assert sorted(chain_store.rglob("*")) == before  # nothing stored


def test_render_invoked_directly_fills_what_the_caller_cannot_know(
    chain: dict[str, Any], chain_store
) -> None:
    request = {"prompt": "a red door", "width": 256, "height": 256, "steps": 2, "seed": 3}
    before = sorted(chain_store.rglob("*"))
    png = chain["render"].post("/", json=request, headers={"Accept": "image/png"}, timeout=120)
    assert png.status_code == 200, png.text
    assert png.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(png.content)).size == (256, 256)
    assert png.headers["x-imagegen-seed"] == "3" and png.headers["x-imagegen-model"] == "tiny"
    assert re.fullmatch(r"[0-9a-f]{32}", png.headers["x-imagegen-generation-id"])
    assert sorted(chain_store.rglob("*")) == before  # nothing stored

    stored = chain["render"].post("/", json=request, timeout=120)
    assert stored.status_code == 200, stored.text
    image = stored.json()
    job = image["prompt"]
    assert job["enhancer"] == "none" and job["model"] == "tiny" and job["steps"] == 2
    assert job["guidance"] == family_for("tiny").default_guidance
    requested = datetime.fromisoformat(job["requested_at"])
    assert abs((datetime.now(UTC) - requested).total_seconds()) < 120
    assert image["generation_id"] != png.headers["x-imagegen-generation-id"]  # a new one each

    # Accept by its qualities (RFC 9110, section 12.5.1): q=0 is "not this", JSON preferred
    # over the PNG is JSON; */* alone is the JSON it always was.
    for accept in ("image/png;q=0, application/json", "image/png;q=0.5, application/json", "*/*"):
        reply = chain["render"].post("/", json=request, headers={"Accept": accept}, timeout=120)
        assert reply.headers["content-type"] == "application/json", accept
    png_first = {"Accept": "application/json;q=0.5, image/png"}
    reply = chain["render"].post("/", json=request, headers=png_first, timeout=120)
    assert reply.headers["content-type"] == "image/png"

    # An event keeps the strict contract: the same body is refused, naming what is missing.
    refused = post_event(chain["render"], PROMPT_ENHANCED, request)
    assert refused.headers["ce-type"] == GENERATION_FAILED
    missing = {e["field"] for e in refused.json()["error"]["errors"]}
    assert {"generation_id", "enhancer", "model", "guidance", "requested_at"} <= missing


def _assert_readable_4xx(
    reply: httpx.Response, field: str | None = None, status: int = 400
) -> dict:
    """A JSON error naming ``field``; or (status 200) a generation.failed event naming it."""
    assert reply.status_code == status, reply.text
    assert "Traceback" not in reply.text
    body = reply.json()
    if status == 200:  # a delivered event that can never succeed
        assert reply.headers["ce-type"] == GENERATION_FAILED
        errors = body["error"]["errors"]
        message = body["error"]["message"]
    else:  # a plain JSON error
        assert "ce-type" not in reply.headers
        errors = body.get("errors", [])
        message = body["message"]
    assert message
    if field is not None:
        assert field in {e["field"] for e in errors} or field in message, body
    return body


BAD_REQUESTS = [
    pytest.param(
        {"headers": {"content-type": "application/json"}, "content": b"{nope"},
        "body",
        id="malformed-json",
    ),
    pytest.param(
        {"headers": {"content-type": "text/plain"}, "content": b"hello"},
        "content-type",
        id="wrong-content-type",
    ),
    pytest.param({"json": {"width": 100, "steps": 99}}, "width", id="out-of-range"),
    pytest.param({"json": {"colour": "red"}}, "colour", id="unknown-field"),
    pytest.param({"json": {"model": "not-allowed"}}, "model", id="model-not-allowed"),
    pytest.param({"json": {"plugins": ["no_such_plugin"]}}, "plugins", id="unknown-plugin"),
    # A value of the wrong JSON type is refused, not converted (it was: 200).
    pytest.param({"json": {"width": "1024"}}, "width", id="width-a-string"),
    pytest.param({"json": {"seed": True}}, "seed", id="seed-a-bool"),
    pytest.param({"json": {"enhance": "yes"}}, "enhance", id="enhance-a-string"),
    pytest.param({"json": {"requested_at": 1700000000}}, "requested_at", id="time-a-number"),
]


@pytest.mark.parametrize(("kwargs", "field"), BAD_REQUESTS)
def test_bad_plain_requests(chain: dict[str, Any], kwargs: dict, field: str) -> None:
    status = 415 if field == "content-type" else 400
    _assert_readable_4xx(chain["enhance"].post("/", timeout=30, **kwargs), field, status)


def test_an_empty_model_is_refused_by_render_not_taken_as_its_default(
    chain: dict[str, Any], chain_store
) -> None:
    before = sorted(chain_store.rglob("*"))
    request = {"prompt": "a red door", "width": 256, "height": 256, "steps": 2, "model": ""}
    _assert_readable_4xx(chain["render"].post("/", json=request, timeout=120), "model")
    assert sorted(chain_store.rglob("*")) == before  # nothing rendered, nothing stored


def test_bad_events(chain: dict[str, Any]) -> None:
    enhance = chain["enhance"]
    # Missing required attributes (no ce-id, no ce-source).
    headers = {
        "ce-specversion": "1.0",
        "ce-type": GENERATION_REQUESTED,
        "content-type": "application/json",
    }
    missing = enhance.post("/", headers=headers, content=b"{}")
    assert {e["field"] for e in _assert_readable_4xx(missing, "id")["errors"]} == {"id", "source"}
    # Wrong type for this stage.
    _assert_readable_4xx(post_event(enhance, IMAGE_RENDERED, {}), "type")
    # Malformed data.
    bad = enhance.post("/", headers=cloudevent_headers(GENERATION_REQUESTED), content=b"{oops")
    _assert_readable_4xx(bad, "body")
    # Fields out of range: a generation.failed event naming them, with the subject kept.
    failed = post_event(enhance, GENERATION_REQUESTED, {"width": 5000, "seed": -2}, subject="bad-1")
    body = _assert_readable_4xx(failed, "width", status=200)
    assert {e["field"] for e in body["error"]["errors"]} == {"width", "seed"}
    assert failed.headers["ce-subject"] == "bad-1"
    assert body["stage"] == "enhance" and body["error"]["retryable"] is False
    # Invalid subject (it becomes the storage key).
    bad_subject = post_event(enhance, GENERATION_REQUESTED, {}, subject="../../etc")
    _assert_readable_4xx(bad_subject, "subject", status=200)
    assert "ce-subject" not in bad_subject.headers  # an invalid id is never echoed as one
    # Structured mode that is not JSON.
    structured = enhance.post(
        "/", headers={"content-type": "application/cloudevents+json"}, content=b"[1,2"
    )
    _assert_readable_4xx(structured, "event")
    # Render: data that is not an enhanced prompt.
    _assert_readable_4xx(
        post_event(chain["render"], PROMPT_ENHANCED, {"prompt": "x"}),
        "generation_id",
        status=200,
    )


def test_huge_body_is_refused(chain: dict[str, Any]) -> None:
    huge = json.dumps({"prompt": "x" * (1024 * 1024 + 10)})
    reply = chain["enhance"].post("/", content=huge, headers={"content-type": "application/json"})
    _assert_readable_4xx(reply, status=413)


def test_methods_and_routes(chain: dict[str, Any]) -> None:
    _assert_readable_4xx(chain["enhance"].get("/"), status=405)
    _assert_readable_4xx(chain["enhance"].post("/nope", json={}), status=404)


def test_an_error_answered_to_a_delivery_fits_what_a_channel_dispatcher_keeps(
    chain: dict[str, Any],
) -> None:
    """A broker keeps a failed delivery's body as ``knativeerrordata``; the channel-based
    broker's dispatcher panics on one over 768 bytes (``_binding.DELIVERED_ERROR_BODY_MAX``),
    so an error answered to a delivery is cut to fit, still JSON naming what was wrong; a
    plain caller's is whole."""
    long_type = "com.example." + "x" * 900  # quoted by the message: a body of over 768 bytes
    delivered = post_event(chain["persist"], long_type, {})
    assert delivered.status_code == 400 and len(delivered.content) <= 768, delivered.content
    body = _assert_readable_4xx(delivered, "type")
    assert body["error"] == "invalid_request" and body["retryable"] is False
    # A plain call, many fields wrong: its answer is not cut, however long.
    wrong = {f"field_{i:03}": i for i in range(60)}
    plain = chain["enhance"].post("/", json=wrong, timeout=30)
    assert plain.status_code == 400 and len(plain.content) > 768
    answer = plain.json()
    assert "errors_left_out" not in answer and not answer["message"].endswith("...")
    assert len(answer["errors"]) > 10  # as validation names them, none left out here
