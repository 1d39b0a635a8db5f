"""A failure the generation made good since: answered as resolved, its timeline in real order."""

from __future__ import annotations

from typing import Any

from imagegen.events import GENERATION_FAILED, IMAGE_DERIVED, reply_id, source_for
from imagegen.ledger import Ledger, LedgerEvent
from tests.ledger.chain import chain


def _derive_events(gid: str) -> dict[str, LedgerEvent]:
    """derive's ``image.derived`` and ``generation.failed`` for ``gid``, as derive sends them:
    each carries the persisted image's times."""
    persisted = chain(gid)["persisted"]
    image = {"generation_id": gid, "key": persisted.data["key"]}
    derived: dict[str, Any] = {
        **image,
        "sha256": persisted.data["sha256"],
        "keys": {"record": f"{gid}.derivatives.json", "thumbnail": f"{gid}.thumb.webp"},
        "created_at": persisted.data["created_at"],
        "persisted_at": persisted.data["persisted_at"],
    }
    failed = {
        "generation_id": gid,
        "stage": "derive",
        "error": {"code": "internal", "message": "cannot write the thumbnail", "retryable": True},
        "failed_at": persisted.data["created_at"],
    }
    return {
        name: LedgerEvent(
            source=source_for("derive"),
            id=reply_id(gid, event_type),
            type=event_type,
            subject=gid,
            time=persisted.time,
            data=data,
        )
        for name, event_type, data in (
            ("derived", IMAGE_DERIVED, derived),
            ("failed", GENERATION_FAILED, failed),
        )
    }


def _kinds(ledger: Ledger, gid: str) -> list[str]:
    found = ledger.get(gid)
    assert found is not None
    return [entry.type.rsplit(".", 1)[-1] for entry in found.timeline]


def test_a_derive_failure_repeated_with_success_is_no_error_and_comes_before_it(
    ledger: Ledger,
) -> None:
    events, derive = chain("gen-1"), _derive_events("gen-1")
    for name in ("requested", "enhanced", "rendered", "persisted"):
        ledger.ingest(events[name])
    ledger.ingest(derive["failed"])
    # The image is stored, its derivatives are not: said until they are.
    found = ledger.get("gen-1")
    assert found is not None and found.status == "persisted"
    assert found.failed_stage == "derive" and found.error is not None
    [listed] = ledger.history().items
    assert listed.error is not None and listed.failed_stage == "derive"

    ledger.ingest(derive["derived"])  # derive repeated: the derivatives are made
    found = ledger.get("gen-1")
    assert found is not None and found.status == "persisted"
    assert (found.failed_stage, found.error, found.failed_at) == (None, None, None)
    [listed] = ledger.history().items
    assert (listed.failed_stage, listed.error, listed.failed_at) == (None, None, None)
    # The failure stays in the timeline, before the repeat that made it good.
    kinds = [entry.type.rsplit(".", 1)[-1] for entry in found.timeline]
    assert kinds == ["requested", "enhanced", "rendered", "persisted", "failed", "derived"]
    failed, derived = found.timeline[-2:]
    assert derived.time >= failed.time > found.timeline[-3].time
    assert derived.seconds_since_previous is not None and derived.seconds_since_previous >= 0
    assert all(
        entry.seconds_since_previous is None or entry.seconds_since_previous >= 0
        for entry in found.timeline
    )


def test_derivatives_recorded_before_a_derive_failure_make_it_good_in_the_order_recorded(
    ledger: Ledger,
) -> None:
    """A later delivery of derive failed where an earlier one made the derivatives: they are
    there all the same, and each event keeps its place."""
    events, derive = chain("gen-1"), _derive_events("gen-1")
    for name in ("requested", "enhanced", "rendered", "persisted"):
        ledger.ingest(events[name])
    ledger.ingest(derive["derived"])
    ledger.ingest(derive["failed"])
    found = ledger.get("gen-1")
    assert found is not None and found.error is None and found.failed_stage is None
    assert _kinds(ledger, "gen-1")[-3:] == ["persisted", "derived", "failed"]
    assert found.timeline[-2].time == found.persisted_at  # image.derived's own time, kept


def test_a_failure_before_the_image_was_stored_is_no_error_of_the_stored_generation(
    ledger: Ledger,
) -> None:
    """A render reported failed, then rendered and stored by a redelivery: the generation
    succeeded, and says no error; the failure stays in its timeline."""
    events = chain("gen-1")
    for name in ("requested", "enhanced", "failed", "rendered", "persisted"):
        ledger.ingest(events[name])
    found = ledger.get("gen-1")
    assert found is not None and found.status == "persisted"
    assert (found.failed_stage, found.error, found.failed_at) == (None, None, None)
    assert "failed" in _kinds(ledger, "gen-1")
    [listed] = ledger.history().items
    assert listed.error is None


def test_a_failed_generation_keeps_its_error(ledger: Ledger) -> None:
    events = chain("gen-1")
    for name in ("requested", "enhanced", "failed", "rendered"):  # a late rendered, no image
        ledger.ingest(events[name])
    found = ledger.get("gen-1")
    assert found is not None and found.status == "failed"
    assert found.failed_stage == "render" and found.error is not None
    [listed] = ledger.history().items
    assert listed.failed_stage == "render" and listed.error is not None


def test_the_completed_message_leaves_out_a_failure_made_good(ledger: Ledger) -> None:
    """The ``completed`` webhook sends the generation as the status and the history show it:
    derive's failure, made good by the derivatives recorded before persist's event came
    (a broker keeps no order), is no error of it."""
    import json

    gid = "gen-hook"
    events = chain(gid, webhook="https://hooks.example.com/x", webhook_events=["completed"])
    derive = _derive_events(gid)
    for name in ("requested", "enhanced", "rendered"):
        ledger.ingest(events[name])
    ledger.ingest(derive["failed"])
    ledger.ingest(derive["derived"])
    ledger.ingest(events["persisted"])
    found = ledger.get(gid)
    assert found is not None and (found.status, found.error) == ("persisted", None)
    [completed] = ledger.claim_deliveries(lease=60)
    assert completed.event == "completed"
    data = json.loads(completed.payload)["data"]
    assert (data["status"], data["failed_stage"], data["error"]) == ("persisted", None, None)
