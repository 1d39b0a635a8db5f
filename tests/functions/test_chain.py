"""The chain by hand: request → enhance → render → persist → derive, each stage's app called
in this process through httpx (:class:`~tests.functions.clients.InProcessFunction`).

The same chain over real servers, one process a stage, is ``tests/knative/test_eventing_path.py``
(routed by the Triggers, S3 storage) and ``tests/test_readme.py`` (the documented commands).
"""

from __future__ import annotations

import hashlib
import io
import json
from contextlib import ExitStack
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from imagegen.events import (
    GENERATION_REQUESTED,
    IMAGE_DERIVED,
    IMAGE_PERSISTED,
    IMAGE_RENDERED,
    PROMPT_ENHANCED,
)
from tests.fakes.s3_server import S3Server
from tests.functions.clients import InProcessFunction
from tests.functions.conftest import base_env, s3_env
from tests.functions.servers import post_event

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


def forward(server: Any, reply: httpx.Response, expected_type: str) -> httpx.Response:
    """Deliver a reply event to the next stage, as the broker would (binary mode)."""
    assert reply.status_code == 200, reply.text
    assert reply.headers["ce-type"] == expected_type
    headers = {k: v for k, v in reply.headers.items() if k.lower().startswith("ce-")}
    headers["content-type"] = "application/json"
    return server.post("/", headers=headers, content=reply.content, timeout=120)


def run_chain(
    servers: dict[str, Any], request: dict[str, Any], **attributes: str
) -> list[httpx.Response]:
    enhanced = post_event(servers["enhance"], GENERATION_REQUESTED, request, **attributes)
    rendered = forward(servers["render"], enhanced, PROMPT_ENHANCED)
    persisted = forward(servers["persist"], rendered, IMAGE_RENDERED)
    derived = forward(servers["derive"], persisted, IMAGE_PERSISTED)
    assert derived.status_code == 200, derived.text
    assert derived.headers["ce-type"] == IMAGE_DERIVED
    return [enhanced, rendered, persisted, derived]


def check_replies(replies: list[httpx.Response], subject: str) -> dict[str, Any]:
    for reply in replies:
        assert reply.headers["ce-subject"] == subject
        assert reply.headers["ce-specversion"] == "1.0"
        assert reply.headers["ce-source"].startswith("/imagegen/")
        assert reply.headers["ce-dataschema"].startswith("https://")
        assert reply.headers["ce-time"]
        assert reply.headers["ce-traceparent"].split("-")[1] == TRACE_ID
        assert len(reply.content) < 16 * 1024  # claim check: no image bytes in events
    rendered, persisted = replies[1].json(), replies[2].json()
    # Render Triggers may route on the model: the enhanced event names it.
    assert replies[0].headers["ce-imagegenmodel"] == replies[0].json()["model"] == "tiny"
    assert "ce-imagegenmodel" not in replies[1].headers
    assert replies[1].headers["ce-dataref"] == rendered["location"]
    assert persisted["sha256"] == rendered["sha256"]
    # The derivatives: made from the persisted image, at the time of its event.
    derived = replies[3].json()
    assert (derived["key"], derived["sha256"]) == (persisted["key"], persisted["sha256"])
    assert replies[3].headers["ce-time"] == replies[2].headers["ce-time"]
    assert {"avif:256", "webp:256", "record"} <= set(derived["keys"])
    return persisted


def test_chain_with_local_storage(chain: dict[str, Any], chain_store: Path) -> None:
    replies = run_chain(
        chain,
        {"prompt": "a lighthouse at dusk", "width": 256, "height": 256, "seed": 7},
        subject="chain-local-1",
        traceparent=TRACEPARENT,
    )
    persisted = check_replies(replies, "chain-local-1")
    png = (chain_store / persisted["key"]).read_bytes()
    assert hashlib.sha256(png).hexdigest() == persisted["sha256"]
    assert Image.open(io.BytesIO(png)).size == (256, 256)
    record = json.loads((chain_store / persisted["keys"]["metadata"]).read_text())
    assert record["persisted"]["sha256"] == persisted["sha256"]
    assert record["request"]["seed"] == 7
    assert (chain_store / persisted["keys"]["thumbnail"]).is_file()
    assert persisted["url"] == f"https://img.example.com/{persisted['key']}"


def test_the_ledger_times_each_stage_from_what_the_stages_say(
    chain: dict[str, Any], tmp_path: Path
) -> None:
    """The replies' ``time`` attributes are another stage's (enhance's the request's, persist's
    the render's, so that a redelivery answers alike); the stages' own times are in their data,
    and the ledger's timeline and durations are read from them."""
    import time

    from imagegen.ledger import open_ledger

    request = {"prompt": "a quiet harbour", "width": 256, "height": 256, "seed": 3}
    sent = post_event(chain["enhance"], GENERATION_REQUESTED, request, subject="chain-timed-1")
    replies = [sent]
    for stage, kind in (("render", PROMPT_ENHANCED), ("persist", IMAGE_RENDERED)):
        time.sleep(0.3)  # stages apart, as a broker's hops and a queue make them
        replies.append(forward(chain[stage], replies[-1], kind))
    derived = forward(chain["derive"], replies[-1], IMAGE_PERSISTED)
    assert derived.status_code == 200, derived.text
    assert derived.headers["ce-type"] == IMAGE_DERIVED, derived.text  # a refusal is a 200 too
    replies.append(derived)
    ledger = InProcessFunction("ledger", {"IMAGEGEN_LEDGER_URL": str(tmp_path / "l.db")})
    with ledger:
        for reply in reversed(replies):  # in any order: the times are the stages' own
            headers = {k: v for k, v in reply.headers.items() if k.lower().startswith("ce-")}
            headers["content-type"] = "application/json"
            assert ledger.post("/", headers=headers, content=reply.content).status_code < 300
    store = open_ledger(str(tmp_path / "l.db"))
    try:
        found = store.get("chain-timed-1")
    finally:
        store.close()
    assert found is not None and found.status == "persisted"
    assert found.enhanced_at is not None and found.rendered_at is not None
    assert found.persisted_at is not None
    assert found.enhanced_at < found.rendered_at < found.persisted_at
    assert found.durations["render"] >= 0.3 and found.durations["persist"] >= 0.3
    assert found.durations["persist"] < 60


def test_generation_id_is_derived_from_the_request_event(chain: dict[str, Any]) -> None:
    send = partial(
        post_event,
        chain["enhance"],
        GENERATION_REQUESTED,
        {"prompt": "a cat"},
        source="/cron/dream",
    )
    reply, again, other = send(event_id="e-1"), send(event_id="e-1"), send(event_id="e-2")
    for sent in (reply, again, other):
        assert sent.status_code == 200, sent.text
        assert sent.headers["ce-type"] == PROMPT_ENHANCED, sent.text
    assert reply.headers["ce-subject"] == again.headers["ce-subject"] != other.headers["ce-subject"]
    assert reply.json()["generation_id"] == reply.headers["ce-subject"]


def test_every_event_delivered_twice_yields_one_image_and_the_same_replies(
    chain: dict[str, Any], chain_store: Path
) -> None:
    request = {"prompt": "two moons over a desert", "width": 256, "height": 256}
    attrs = {"subject": "redelivered-1", "event_id": "req-1", "time": "2026-11-24T09:00:00Z"}
    first = run_chain(chain, request, **attrs)
    second = run_chain(chain, request, **attrs)
    for a, b in zip(first, second, strict=True):
        assert a.json() == b.json()
        assert a.headers["ce-id"] == b.headers["ce-id"]
        assert a.headers["ce-time"] == b.headers["ce-time"]  # from the event, not the clock
    # The request again, days later, as a new event and as one without a time (which takes
    # the moment it arrives): the generation's first prompt and time, so the same keys.
    later = {**attrs, "event_id": "req-2", "time": "2026-11-27T23:59:59Z"}
    untimed = {k: v for k, v in attrs.items() if k != "time"}
    for again in (run_chain(chain, request, **later), run_chain(chain, request, **untimed)):
        assert [r.json() for r in again] == [r.json() for r in first]
    assert sorted(str(p.relative_to(chain_store)) for p in chain_store.rglob("redelivered-1*")) == [
        "2026/11/24/redelivered-1.derivatives.json",
        "2026/11/24/redelivered-1.json",
        "2026/11/24/redelivered-1.png",
        "2026/11/24/redelivered-1.thumb.webp",
        "2026/11/24/redelivered-1.w256.avif",
        "2026/11/24/redelivered-1.w256.webp",
        "prompts/redelivered-1.json",
        "renders/redelivered-1.json",
    ]


def test_chain_with_s3_storage(tmp_path: Path) -> None:
    with S3Server() as s3, ExitStack() as stack:
        s3.create_bucket("images")
        env = {**base_env(tmp_path / "unused"), **s3_env(s3, "s3://images/generated")}
        stages = ("enhance", "render", "persist", "derive")
        servers = {stage: stack.enter_context(InProcessFunction(stage, env)) for stage in stages}
        replies = run_chain(
            servers,
            {"prompt": "a red fox", "width": 256, "height": 320},
            subject="chain-s3-1",
            traceparent=TRACEPARENT,
        )
        persisted = check_replies(replies, "chain-s3-1")
        assert persisted["location"] == f"s3://images/generated/{persisted['key']}"
        body = (
            s3.client()
            .get_object(Bucket="images", Key=f"generated/{persisted['key']}")["Body"]
            .read()
        )
        assert hashlib.sha256(body).hexdigest() == persisted["sha256"]
        assert Image.open(io.BytesIO(body)).size == (256, 320)
        puts = [r for r in s3.requests if r.method == "PUT" and r.path.endswith(".png")]
        assert len(puts) == 1


@pytest.mark.parametrize("mode", ["structured"])
def test_structured_mode_request(chain: dict[str, Any], mode: str) -> None:
    event = {
        "specversion": "1.0",
        "type": GENERATION_REQUESTED,
        "source": "/tests",
        "id": "structured-1",
        "subject": "structured-1",
        "datacontenttype": "application/json",
        "data": {"prompt": "a paper boat", "width": 256, "height": 256},
    }
    reply = chain["enhance"].post(
        "/",
        headers={"content-type": "application/cloudevents+json"},
        content=json.dumps(event),
        timeout=60,
    )
    assert reply.status_code == 200, reply.text
    assert reply.headers["ce-type"] == PROMPT_ENHANCED
    assert reply.headers["ce-subject"] == "structured-1"
    assert reply.json()["original_prompt"] == "a paper boat"
