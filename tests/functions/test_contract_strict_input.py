"""Every stage reads its input as the published schemas say, over events and plain HTTP alike:
a value of another JSON type, a time without its offset, a prompt with a control character is
refused naming the field (a ``generation.failed`` reply to an event, a 400 to a plain body),
never converted, rendered or stored. And the ledger, a sink, answers as its document says."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from imagegen.events import (
    GENERATION_FAILED,
    IMAGE_PERSISTED,
    IMAGE_RENDERED,
    PROMPT_ENHANCED,
)
from imagegen.openapi import render_documents
from tests.functions.clients import InProcessFunction
from tests.functions.conftest import base_env
from tests.functions.servers import post_event

JOB: dict[str, Any] = {
    "prompt": "a map",
    "enhancer": "template",
    "model": "tiny",
    "width": 256,
    "height": 256,
    "steps": 2,
    "guidance": 1.0,
    "seed": 1,
    "requested_at": "2026-12-06T01:00:00Z",
}
# A control character and a right-to-left override: shown as "evilexe.png", read as it is.
HOSTILE_PROMPT = "evil\u202egnp.exe \x1b[31m"


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("store")


@pytest.fixture(scope="module")
def functions(store: Path) -> Iterator[dict[str, InProcessFunction]]:
    env = base_env(store)
    started = {stage: InProcessFunction(stage, env) for stage in ("render", "persist", "derive")}
    yield started
    for function in started.values():
        function.close()


@pytest.fixture(scope="module")
def persisted(functions: dict[str, InProcessFunction]) -> dict[str, Any]:
    """A real chain's replies: the image.rendered and image.persisted of one valid job."""
    rendered = post_event(functions["render"], PROMPT_ENHANCED, {**JOB, "generation_id": "ok-1"})
    assert rendered.headers["ce-type"] == IMAGE_RENDERED, rendered.text
    stored = post_event(functions["persist"], IMAGE_RENDERED, rendered.json())
    assert stored.headers["ce-type"] == IMAGE_PERSISTED, stored.text
    return {"rendered": rendered.json(), "persisted": stored.json()}


def failed_fields(reply: httpx.Response) -> set[str]:
    assert reply.status_code == 200, reply.text
    assert reply.headers["ce-type"] == GENERATION_FAILED, reply.text[:300]
    return {e["field"] for e in reply.json()["error"]["errors"]}


def stored_under(store: Path, generation_id: str) -> list[Path]:
    return [path for path in store.rglob("*") if generation_id in path.name]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("requested_at", 1765000000),  # was read as seconds: the PNG stored under 2025/12/06
        ("requested_at", "2026-12-05"),  # a date alone: its midnight in UTC
        ("requested_at", "2026-12-05T01:00:00"),  # no offset: taken as UTC
        ("enhanced_at", "2026-12-05T01:00:00"),
        ("width", "256"),
        ("seed", True),
        ("guidance", "1.5"),
        ("dreamed", "yes"),
        ("prompt", HOSTILE_PROMPT),
        ("original_prompt", HOSTILE_PROMPT),
    ],
)
def test_render_refuses_a_prompt_enhanced_the_schema_refuses_and_stores_nothing(
    functions: dict[str, InProcessFunction], store: Path, field: str, value: object
) -> None:
    generation_id = f"strict-{field}-{uuid.uuid4().hex[:8]}"
    job = {**JOB, "generation_id": generation_id, field: value}
    reply = post_event(functions["render"], PROMPT_ENHANCED, job)
    assert failed_fields(reply) == {field}
    assert reply.json()["generation_id"] == generation_id
    assert stored_under(store, generation_id) == []


def test_a_plain_render_body_is_read_in_its_json_types(
    functions: dict[str, InProcessFunction],
) -> None:
    body = {"width": "256", "steps": "2", "seed": "3", "guidance": "1.5", "dreamed": "yes"}
    reply = functions["render"].post("/", json={"prompt": "a red door", **body})
    assert reply.status_code == 400 and "ce-type" not in reply.headers, reply.text
    assert {e["field"] for e in reply.json()["errors"]} == set(body)
    # The same prompt rule as over events: refused, naming it.
    for field in ("prompt", "original_prompt"):
        hostile = {"prompt": "a red door", field: HOSTILE_PROMPT, "width": 256, "height": 256}
        reply = functions["render"].post("/", json=hostile)
        assert reply.status_code == 400, reply.text
        assert {e["field"] for e in reply.json()["errors"]} == {field}


def test_persist_refuses_an_image_rendered_of_other_json_types(
    functions: dict[str, InProcessFunction], persisted: dict[str, Any]
) -> None:
    rendered = persisted["rendered"]
    lax = {**rendered, "width": "256", "seed": "1", "size": str(rendered["size"])}
    assert failed_fields(post_event(functions["persist"], IMAGE_RENDERED, lax)) == {
        "width",
        "seed",
        "size",
    }
    hostile = {**rendered, "prompt": {**rendered["prompt"], "prompt": HOSTILE_PROMPT}}
    reply = post_event(functions["persist"], IMAGE_RENDERED, hostile)
    assert failed_fields(reply) == {"prompt.prompt"}
    naive = {**rendered, "rendered_at": rendered["rendered_at"].removesuffix("Z")}
    assert naive != rendered
    assert failed_fields(post_event(functions["persist"], IMAGE_RENDERED, naive)) == {"rendered_at"}


def test_derive_refuses_an_image_persisted_of_other_json_types(
    functions: dict[str, InProcessFunction], persisted: dict[str, Any]
) -> None:
    record = persisted["persisted"]
    for field, value in [
        ("width", "256"),
        ("created_at", 1765000000),
        ("prompt", HOSTILE_PROMPT),
    ]:
        reply = post_event(functions["derive"], IMAGE_PERSISTED, {**record, field: value})
        assert failed_fields(reply) == {field}


def test_the_ledger_answers_as_its_document_says(tmp_path: Path) -> None:
    """202 and nothing else to an event it records; a 400 to plain JSON and to an event whose
    data the stages refuse; never the next event, nor a generation.failed."""
    doc = json.loads(render_documents()["ledger.json"])
    about = doc["info"]["description"]
    assert "202" in about and "400" in about and "next event" not in about
    documented = set(doc["paths"]["/"]["post"]["responses"])
    job = {**JOB, "generation_id": "ledgered-1"}
    with InProcessFunction("ledger", {"IMAGEGEN_LEDGER_URL": str(tmp_path / "l.db")}) as ledger:
        replies = {
            "event": post_event(ledger, PROMPT_ENHANCED, job),
            "plain": ledger.post("/", json=job),
            "invalid": post_event(ledger, PROMPT_ENHANCED, {**job, "width": "256"}),
        }
        for reply in replies.values():
            assert str(reply.status_code) in documented, reply.text
            assert "ce-type" not in reply.headers
        assert (replies["event"].status_code, replies["event"].content) == (202, b"")
        assert replies["plain"].status_code == replies["invalid"].status_code == 400
        assert {e["field"] for e in replies["invalid"].json()["errors"]} == {"width"}
