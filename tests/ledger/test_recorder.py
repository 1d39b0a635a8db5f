"""The in-process chain's recorder, on both backends: its events read as the functions' would."""

from __future__ import annotations

import logging
from datetime import UTC, datetime

import pytest

from imagegen.errors import DependencyUnavailable
from imagegen.events import (
    GENERATION_FAILED,
    GENERATION_REQUESTED,
    IMAGE_PERSISTED,
    IMAGE_RENDERED,
    PROMPT_ENHANCED,
    reply_id,
)
from imagegen.ledger import Ledger, LedgerEvent
from imagegen.ledger.recorder import HistoryCutShort, Recorder
from imagegen.models import GenerationRequest
from tests.ledger.chain import T0, chain


async def test_a_request_is_recorded_at_the_time_its_call_was_given(ledger: Ledger) -> None:
    """A request that names no time was dated by the ledger when the recorder wrote it: later
    than the call's time, which the job carries and which dates its storage keys."""
    recorder = Recorder(ledger)
    when = datetime(2026, 5, 31, 23, 59, 59, 999_000, tzinfo=UTC)  # its day's last moment
    await recorder.requested("recorded-1", GenerationRequest(prompt="a kite"), when)
    found = ledger.get("recorded-1")
    assert found is not None and found.requested_at == when
    [event] = list(ledger.generation_events("recorded-1"))
    assert datetime.fromisoformat(event.data["requested_at"]) == when

    # A request that names its time is recorded at it, as before.
    named = GenerationRequest(prompt="a kite", requested_at=T0)
    await recorder.requested("recorded-2", named)
    found = ledger.get("recorded-2")
    assert found is not None and found.requested_at == T0


@pytest.mark.parametrize("ledger_url", ["postgres"], indirect=True)
async def test_a_connection_the_server_cuts_mid_generation_loses_none_of_its_history(
    ledger: Ledger, postgres_url: str
) -> None:
    """The server ends the ledger's connection (a restart, a failover) between two events of
    a generation: the event that met the cut and the later ones are kept, then written once
    the generation ends, through the pool that has connected again; its history is whole, and
    the one generation after it is recorded as ever."""
    import psycopg

    from imagegen.events import IMAGE_DERIVED
    from imagegen.models import DerivedImage, EnhancedPrompt, PersistedImage, RenderedImage

    said: list[Exception] = []
    recorder = Recorder(ledger, on_failure=said.append)
    events = chain("cut-1")
    await recorder.requested("cut-1", GenerationRequest(prompt="a red fox"), T0)
    await recorder.emitted("enhance", EnhancedPrompt.model_validate(events["enhanced"].data))

    with ledger.statement() as db:  # the pool's one connection (min_size 1)
        [row] = db.query("SELECT pg_backend_pid() AS pid", {})
    with psycopg.connect(postgres_url, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", [row["pid"]])

    await recorder.emitted("render", RenderedImage.model_validate(events["rendered"].data))
    persisted = PersistedImage.model_validate(events["persisted"].data)
    await recorder.emitted("persist", persisted)
    before = ledger.get("cut-1")  # the rest kept, not written while the image is made
    assert before is not None and before.status == "enhanced"
    derived = DerivedImage(
        generation_id="cut-1",
        key=persisted.key,
        sha256=persisted.sha256,
        keys={"record": persisted.key + ".derived.json"},
        created_at=persisted.created_at,
    )
    await recorder.emitted("derive", derived)

    [cut] = said
    assert isinstance(cut, HistoryCutShort) and not cut.final
    assert str(cut) == (
        "the history of generation cut-1 is recorded up to 'enhanced' only: the ledger "
        "database is unavailable: it cannot be reached; the rest is written once the image "
        "is made"
    )
    found = ledger.get("cut-1")
    assert found is not None and found.status == "persisted"
    types = [entry.type for entry in found.timeline]
    assert types == [GENERATION_REQUESTED, PROMPT_ENHANCED, IMAGE_RENDERED, IMAGE_PERSISTED,
                     IMAGE_DERIVED]  # fmt: skip
    # Each once: an event is recorded by source and id, a second write of it changes nothing.
    assert len(list(ledger.generation_events("cut-1"))) == 5

    await recorder.requested("cut-2", GenerationRequest(prompt="a red fox"), T0)
    assert ledger.get("cut-2") is not None and said == [cut]


def _cut_connection(ledger: Ledger, postgres_url: str) -> None:
    """The server ends the connection of ``ledger``'s pool of one, and it is gone on return
    (pg_terminate_backend's timeout, PostgreSQL 14+): the next statement meets the cut."""
    import psycopg

    with ledger.statement() as db:
        [row] = db.query("SELECT pg_backend_pid() AS pid", {})
    with psycopg.connect(postgres_url, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s, 5000)", [row["pid"]])


class _CutAfter:
    """``ledger``, whose server ends its connection again once it wrote an event of
    ``event_type``: the next write fails."""

    def __init__(self, ledger: Ledger, postgres_url: str, event_type: str) -> None:
        self.ledger, self.postgres_url, self.event_type = ledger, postgres_url, event_type
        self.where = ledger.where

    def ingest(self, event: LedgerEvent) -> None:
        self.ledger.ingest(event)
        if event.type == self.event_type:
            _cut_connection(self.ledger, self.postgres_url)


@pytest.mark.parametrize("ledger_url", ["postgres"], indirect=True)
async def test_a_catch_up_cut_short_says_the_last_event_it_wrote(
    ledger_url: str, postgres_url: str
) -> None:
    """The connection is cut at 'rendered', then again as the generation's end writes what was
    kept, once 'rendered' is written: the history was said to be recorded up to 'enhanced'
    only, the last event written before the generation's end."""
    from imagegen.ledger.postgres import PostgresLedger
    from imagegen.models import DerivedImage, EnhancedPrompt, PersistedImage, RenderedImage

    ledger = PostgresLedger(ledger_url, max_size=1)  # one connection: the one cut
    try:
        said: list[Exception] = []
        recorder = Recorder(
            _CutAfter(ledger, postgres_url, IMAGE_RENDERED),  # type: ignore[arg-type]
            on_failure=said.append,
        )
        events = chain("cut-3")
        await recorder.requested("cut-3", GenerationRequest(prompt="a red fox"), T0)
        await recorder.emitted("enhance", EnhancedPrompt.model_validate(events["enhanced"].data))
        _cut_connection(ledger, postgres_url)
        await recorder.emitted("render", RenderedImage.model_validate(events["rendered"].data))
        persisted = PersistedImage.model_validate(events["persisted"].data)
        await recorder.emitted("persist", persisted)
        derived = DerivedImage(
            generation_id="cut-3",
            key=persisted.key,
            sha256=persisted.sha256,
            keys={"record": persisted.key + ".derived.json"},
            created_at=persisted.created_at,
        )
        await recorder.emitted("derive", derived)

        cut, last = said
        assert isinstance(cut, HistoryCutShort) and cut.recorded == "enhanced" and not cut.final
        assert isinstance(last, HistoryCutShort) and last.final and last.recorded == "rendered"
        assert str(last) == (
            "the history of generation cut-3 is recorded up to 'rendered' only: the ledger "
            "database is unavailable: it cannot be reached"
        )
        found = ledger.get("cut-3")
        assert found is not None and found.status == "rendered"
        types = [entry.type for entry in found.timeline]
        assert types == [GENERATION_REQUESTED, PROMPT_ENHANCED, IMAGE_RENDERED]
    finally:
        ledger.close()


class _UnreachableOnce:
    """``ledger``, whose first write finds its server unreachable: the generation's events are
    kept, and written once it ends."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger, self.where, self.tries = ledger, ledger.where, 0

    def ingest(self, event: LedgerEvent) -> None:
        self.tries += 1
        if self.tries == 1:
            raise DependencyUnavailable("the ledger database is unavailable: it cannot be reached")
        self.ledger.ingest(event)


async def _failed_while_unreachable(ledger: Ledger, gid: str) -> None:
    """A generation requested while the ledger is unreachable, then failed at render with no
    span current (the CLI's failures are recorded after their stage's span)."""
    recorder = Recorder(_UnreachableOnce(ledger))  # type: ignore[arg-type]
    await recorder.requested(gid, GenerationRequest(prompt="a red fox"), T0)
    await recorder.failed("render", gid, RuntimeError("the GPU fell over"))


async def test_the_lines_of_an_event_not_recorded_name_its_generation_and_event(
    ledger: Ledger, caplog: pytest.LogCaptureFixture
) -> None:
    """Each line about an event the ledger could not take, or that waits for it, names the
    generation and the event: a failure's line carries no span to name them."""
    with caplog.at_level(logging.INFO, logger="imagegen.ledger"):
        await _failed_while_unreachable(ledger, "unnamed-1")
    said = {
        (r.levelname, r.getMessage().split(":")[0]): r
        for r in caplog.records
        if r.name == "imagegen.ledger"
    }
    could_not = said["WARNING", f"could not record {GENERATION_REQUESTED} in the ledger"]
    not_yet = said["INFO", f"not recording {GENERATION_FAILED} yet"]
    assert vars(could_not)["generation_id"] == "unnamed-1"
    assert vars(could_not)["event_id"] == reply_id("unnamed-1", GENERATION_REQUESTED)
    assert vars(not_yet)["generation_id"] == "unnamed-1"
    assert vars(not_yet)["event_id"] == reply_id("unnamed-1", GENERATION_FAILED)


async def test_a_history_written_once_the_generation_ends_says_so(
    ledger: Ledger, caplog: pytest.LogCaptureFixture
) -> None:
    """The warning that a generation's events were kept is answered by a line once they are
    written: the generation, and how many of its events were kept."""
    with caplog.at_level(logging.INFO, logger="imagegen.ledger"):
        await _failed_while_unreachable(ledger, "caught-up-1")
    found = ledger.get("caught-up-1")
    assert found is not None and found.status == "failed"
    [written] = [r for r in caplog.records if r.getMessage().startswith("recorded generation")]
    assert written.levelname == "INFO"
    assert written.getMessage() == (
        "recorded generation caught-up-1 in the ledger after all: 2 kept events written"
    )
    assert vars(written)["generation_id"] == "caught-up-1" and vars(written)["events"] == 2
