"""The in-process chain's recorder, on both backends: its events read as the functions' would."""

from __future__ import annotations

from datetime import UTC, datetime

from imagegen.ledger import Ledger
from imagegen.ledger.recorder import Recorder
from imagegen.models import GenerationRequest
from tests.ledger.chain import T0


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
