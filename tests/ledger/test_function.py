"""The ledger function, in this process through functions-framework's app, on both backends."""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

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


def test_the_ledger_is_opened_in_the_background_once_ready(
    function: InProcessFunction, ledger_url: str
) -> None:
    from imagegen.stages import ledger as ledger_stage

    deadline = time.monotonic() + 60
    while not function.get("/readyz").json()["warm"]:
        assert time.monotonic() < deadline, "the warm-up did not end"
        time.sleep(0.02)  # polling the probe
    # Opened (connected, migrated) before any event came.
    assert ledger_url in ledger_stage._opened


def test_opening_the_ledger_never_holds_the_event_loop(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A database that keeps the opening waiting (down: up to the pool's timeout) stalls only
    the requests that need it, never the loop every request of the process runs on."""
    import asyncio
    import threading

    import imagegen.ledger
    from imagegen.settings import Settings
    from imagegen.stages import ledger as ledger_stage

    entered, release = threading.Event(), threading.Event()
    real = imagegen.ledger.open_ledger

    def slow_open(url: str | None = None) -> Any:
        entered.set()
        assert release.wait(30)
        return real(url)

    monkeypatch.setattr(imagegen.ledger, "open_ledger", slow_open)
    monkeypatch.setattr(ledger_stage, "_opened", {})
    service = SimpleNamespace(settings=Settings(ledger_url=str(tmp_path / "ledger.db")))

    async def run() -> None:
        opening = asyncio.create_task(ledger_stage._ledger(service))  # type: ignore[arg-type]
        assert await asyncio.to_thread(entered.wait, 30)
        await asyncio.sleep(0.05)  # the loop runs other work meanwhile
        assert not opening.done()
        release.set()
        ledger, dispatcher = await opening
        assert dispatcher is None
        assert await ledger_stage._ledger(service) == (ledger, None), "opened once"
        ledger.close()

    asyncio.run(run())
