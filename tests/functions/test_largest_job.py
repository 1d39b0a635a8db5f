"""What render takes, persist, derive and the ledger take too: a job as large as the models
allow is rendered, persisted and recorded at every hop; a larger one is refused at render,
before an image is stored that no later stage could record."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from imagegen.events import (
    GENERATION_FAILED,
    IMAGE_DERIVED,
    IMAGE_PERSISTED,
    IMAGE_RENDERED,
    PROMPT_ENHANCED,
)
from imagegen.ledger import open_ledger
from imagegen.models import MAX_CONTRIBUTIONS_BYTES
from tests.core.test_job_size import largest_job
from tests.functions.clients import InProcessFunction
from tests.functions.servers import post_event


def _job(generation_id: str) -> dict[str, Any]:
    """The largest job, but for what the tiny model renders (its name, a small image in few
    steps) and the LoRAs it applies (none: it takes none)."""
    return largest_job() | {
        "generation_id": generation_id,
        "loras": [],
        "model": "tiny",
        "width": 256,
        "height": 256,
        "steps": 2,
        "guidance": 1.0,
    }


def _headers(reply: httpx.Response) -> dict[str, str]:
    headers = {k: v for k, v in reply.headers.items() if k.lower().startswith("ce-")}
    return headers | {"content-type": "application/json"}


def test_a_job_at_every_bound_is_rendered_persisted_derived_and_recorded(
    chain: dict[str, Any], tmp_path: Path
) -> None:
    replies = [post_event(chain["render"], PROMPT_ENHANCED, _job("largest-1"))]
    for stage, kind in (("persist", IMAGE_RENDERED), ("derive", IMAGE_PERSISTED)):
        reply = replies[-1]
        assert (reply.status_code, reply.headers["ce-type"]) == (200, kind), reply.text[:300]
        replies.append(chain[stage].post("/", headers=_headers(reply), content=reply.content))
    assert (replies[-1].status_code, replies[-1].headers["ce-type"]) == (200, IMAGE_DERIVED)
    # Render's reply carries the job whole, its contributions at their most.
    assert len(replies[0].content) > 3 * MAX_CONTRIBUTIONS_BYTES
    with InProcessFunction("ledger", {"IMAGEGEN_LEDGER_URL": str(tmp_path / "l.db")}) as ledger:
        for reply in replies:
            answer = ledger.post("/", headers=_headers(reply), content=reply.content)
            assert answer.status_code == 202, answer.text[:300]
    store = open_ledger(str(tmp_path / "l.db"))
    try:
        found = store.get("largest-1")
    finally:
        store.close()
    assert found is not None and found.status == "persisted"


def test_a_job_whose_contributions_are_larger_is_refused_before_it_renders(
    chain: dict[str, Any], chain_store: Path
) -> None:
    # Within the body render reads, its reply not within the one persist and the ledger read.
    job = {
        "generation_id": "larger-1",
        "prompt": "a fox",
        "enhancer": "template",
        "model": "tiny",
        "width": 256,
        "height": 256,
        "steps": 2,
        "guidance": 1.0,
        "seed": 1,
        "requested_at": "2026-12-06T10:00:00Z",
        "contributions": [{"plugin": "p", "text": "", "data": {"pad": "a" * 1_048_000}}],
    }
    reply = post_event(chain["render"], PROMPT_ENHANCED, job)
    assert (reply.status_code, reply.headers["ce-type"]) == (200, GENERATION_FAILED)
    error = reply.json()["error"]
    assert error["code"] == "invalid_request" and not error["retryable"]
    assert [e["field"] for e in error["errors"]] == ["contributions.0.data"]
    assert not list(chain_store.rglob("larger-1*"))
