"""Replay judges and sends a recorded event as it came, not as the ledger stores its text: a NUL
or a lone surrogate is stored as U+FFFD, and a request enhance refused for one stays refused."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from typing import Any

import pytest

from imagegen.events import GENERATION_REQUESTED
from imagegen.ledger import Ledger, LedgerEvent
from imagegen.ledger.replay import NotReplayable, replay_job, replay_request
from tests.fakes.loopback import broker_ingress
from tests.functions.clients import InProcessFunction
from tests.ledger.chain import binary, chain

# What enhance refuses in a prompt, and what the ledger stores in its place.
REFUSED = [("\ud800", "\ufffd"), ("a\x00b", "a\ufffdb")]


def _request(gid: str, source: str = "/platform/caller", **data: Any) -> LedgerEvent:
    return LedgerEvent(
        source=source,
        id=f"req-{gid}-{source.strip('/')}",
        type=GENERATION_REQUESTED,
        subject=gid,
        data={"generation_id": gid, **data},
    )


@pytest.mark.parametrize(("prompt", "stored"), REFUSED)
def test_a_request_refused_for_its_text_is_not_replayed_as_stored(
    ledger: Ledger, prompt: str, stored: str
) -> None:
    ledger.ingest(_request("gen-text", prompt=prompt))
    [event] = ledger.generation_events("gen-text")
    assert event.data["prompt"] == stored  # what both databases can hold
    assert event.received is not None and event.received["prompt"] == prompt
    with pytest.raises(NotReplayable) as caught:
        replay_request(ledger, "gen-text")
    assert [e["field"] for e in caught.value.errors] == ["prompt"]


@pytest.mark.parametrize(("prompt", "stored"), REFUSED)
def test_a_job_holding_text_render_refuses_is_not_replayed_as_stored(
    ledger: Ledger, prompt: str, stored: str
) -> None:
    events = chain("gen-job")
    ledger.ingest(events["requested"])
    job = events["enhanced"]
    ledger.ingest(job.model_copy(update={"data": {**job.data, "prompt": prompt}}))
    assert ledger.get("gen-job").prompt == stored  # type: ignore[union-attr]
    with pytest.raises(NotReplayable) as caught:
        replay_job(ledger, "gen-job")
    assert [e["field"] for e in caught.value.errors] == ["prompt"]


@pytest.mark.parametrize(("prompt", "stored"), REFUSED)
def test_a_request_valid_only_as_stored_does_not_take_the_generation(
    ledger: Ledger, prompt: str, stored: str
) -> None:
    """A request enhance refused, then a valid one naming the generation (another source):
    the valid one is the generation's request, which the row describes and replay sends."""
    ledger.ingest(_request("gen-two", prompt=prompt, seed=1))
    ledger.ingest(_request("gen-two", source="/retry", prompt="a red fox", seed=2))
    found = ledger.get("gen-two")
    assert found is not None and (found.original_prompt, found.seed) == ("a red fox", 2)
    request = replay_request(ledger, "gen-two")
    assert (request.prompt, request.seed) == ("a red fox", 2)


def test_a_valid_request_with_a_nul_is_replayed_as_it_came(ledger: Ledger) -> None:
    """A NUL where a request may hold one (its metadata): valid as it came, stored as U+FFFD,
    replayed with the NUL its caller sent."""
    ledger.ingest(_request("gen-nul", prompt="a fox", metadata={"note": "a\x00b"}))
    [event] = ledger.generation_events("gen-nul")
    assert event.data["metadata"] == {"note": "a\ufffdb"}
    assert replay_request(ledger, "gen-nul").metadata == {"note": "a\x00b"}


@pytest.mark.parametrize(("prompt", "stored"), REFUSED)
def test_an_export_writes_the_data_as_it_came(ledger: Ledger, prompt: str, stored: str) -> None:
    """An exported line sent again is the event its producer sent, refused as it was: not a
    valid request for the U+FFFD the ledger stores in its place."""
    ledger.ingest(_request("gen-export", prompt=prompt))
    out = io.StringIO()
    assert ledger.export_jsonl(out) == 1
    line = out.getvalue()
    line.encode()  # UTF-8 text, a lone surrogate too (JSON's escape)
    assert json.loads(line)["data"]["prompt"] == prompt != stored


def test_an_event_with_nothing_replaced_keeps_no_second_copy(ledger: Ledger) -> None:
    ledger.ingest(_request("gen-plain", prompt="a fox \ufffd"))
    [event] = ledger.generation_events("gen-plain")
    assert event.received is None
    assert replay_request(ledger, "gen-plain").prompt == "a fox \ufffd"


@pytest.mark.parametrize(("prompt", "stored"), REFUSED)
def test_replaying_a_request_refused_for_its_text_is_a_409_naming_the_prompt(
    serve_ledger: Callable[..., InProcessFunction], prompt: str, stored: str
) -> None:
    refused = _request("gen-bad", prompt=prompt)
    with broker_ingress() as (sink, received):
        function = serve_ledger(K_SINK=sink)
        sent = binary(refused)
        # JSON's escapes, as a caller writes a lone surrogate: no UTF-8 holds one.
        sent["content"] = json.dumps(sent.pop("json")).encode()
        assert function.post("/", **sent).status_code == 202
        reply = function.client.post("/generations/gen-bad/replay", params={"from": "requested"})
        assert reply.status_code == 409, reply.text
        body = reply.json()
        assert body["error"] == "not_replayable"
        assert [e["field"] for e in body["errors"]] == ["prompt"]
        assert received == []
