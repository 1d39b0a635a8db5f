"""The ledger function, in this process through functions-framework's app, on both backends."""

from __future__ import annotations

from imagegen.ledger import open_ledger
from tests.functions.clients import InProcessFunction
from tests.ledger.chain import binary as _binary
from tests.ledger.chain import chain


def test_events_posted_by_the_broker_are_recorded_once(
    function: InProcessFunction, ledger_url: str
) -> None:
    events = chain("gen-f")
    for name in ("rendered", "requested", "enhanced", "persisted", "persisted"):
        reply = function.post("/", **_binary(events[name]))
        assert reply.status_code == 202, reply.text
        assert "ce-type" not in reply.headers  # nothing to route on
    ledger = open_ledger(ledger_url)
    try:
        found = ledger.get("gen-f")
        assert found is not None and found.status == "persisted"
        assert len(found.timeline) == 4
    finally:
        ledger.close()


def test_an_event_that_cannot_be_recorded_is_a_final_4xx_not_an_event(
    function: InProcessFunction, ledger_url: str
) -> None:
    # The ledger replies nothing, even to a failure: a generation.failed of its own would
    # report the generation a second time, beside the stage that consumes the same event.
    # A 400 is final for Knative (not retried) and goes to the dead-letter sink.
    event = chain("gen-f")["requested"].model_copy(update={"type": "com.example.other"})
    reply = function.post("/", **_binary(event))
    assert reply.status_code == 400 and "ce-type" not in reply.headers
    assert [e["field"] for e in reply.json()["errors"]] == ["type"]
    bad = chain("gen-f")["enhanced"].model_copy(update={"data": {"generation_id": "gen-f"}})
    reply = function.post("/", **_binary(bad))
    assert reply.status_code == 400 and "ce-type" not in reply.headers
    assert "prompt" in [e["field"] for e in reply.json()["errors"]]
    # Plain JSON without CloudEvents attributes: a 400 that names them.
    reply = function.post("/", json={"generation_id": "gen-f"})
    assert reply.status_code == 400
    assert [e["field"] for e in reply.json()["errors"]] == ["source", "id", "type"]
    ledger = open_ledger(ledger_url)
    try:
        assert ledger.get("gen-f") is None
    finally:
        ledger.close()
