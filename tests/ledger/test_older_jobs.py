"""Jobs recorded before a job's contributions were bounded: still recorded, still replayed.

An event the ledger once took (or one in flight while the chain is upgraded) may carry more
contributions, or more data in one, than :data:`imagegen.models.MAX_CONTRIBUTIONS` and its kin
now allow. The ledger keeps none of a job's contributions, and they change nothing of the
image, so such a job is read without them rather than refused.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from imagegen.errors import InvalidRequest
from imagegen.events import GENERATION_FAILED, IMAGE_PERSISTED, IMAGE_RENDERED, PROMPT_ENHANCED
from imagegen.ledger import LedgerEvent, open_ledger
from imagegen.ledger.replay import replay_job
from imagegen.models import (
    MAX_CONTRIBUTION_DATA_BYTES,
    MAX_CONTRIBUTIONS,
    GenerationFailed,
    PersistedImage,
    RenderedImage,
)
from imagegen.validation import parse_model

_MANY = [{"plugin": f"p{i}", "text": "", "data": {}} for i in range(MAX_CONTRIBUTIONS + 8)]
_BULKY = [{"plugin": "big", "text": "", "data": {"pad": "a" * MAX_CONTRIBUTION_DATA_BYTES}}]


def _job(contributions: list[dict[str, Any]], **more: Any) -> dict[str, Any]:
    return {
        "generation_id": "older-1",
        "prompt": "a fox at dusk",
        "enhancer": "template",
        "model": "tiny",
        "width": 256,
        "height": 256,
        "steps": 2,
        "guidance": 1.0,
        "seed": 7,
        "requested_at": "2026-12-01T10:00:00Z",
        "contributions": contributions,
        **more,
    }


# What image.rendered and image.persisted both say of the image.
_IMAGE: dict[str, Any] = {
    "generation_id": "older-1",
    "key": "2026/12/01/older-1.png",
    "location": "file:///out/2026/12/01/older-1.png",
    "size": 10,
    "sha256": "0" * 64,
    "width": 256,
    "height": 256,
    "seed": 7,
    "model": "tiny",
}


def _rendered(job: dict[str, Any]) -> dict[str, Any]:
    return {
        **_IMAGE,
        "steps": 2,
        "guidance": 1.0,
        "prompt": job,
    }


@pytest.mark.parametrize("contributions", [_MANY, _BULKY], ids=["many", "bulky"])
@pytest.mark.parametrize("event_type", [PROMPT_ENHANCED, IMAGE_RENDERED])
def test_a_job_recorded_before_the_bounds_is_recorded_and_replayed_without_its_contributions(
    tmp_path: Path, contributions: list[dict[str, Any]], event_type: str
) -> None:
    job = _job(contributions)
    data = job if event_type == PROMPT_ENHANCED else _rendered(job)
    ledger = open_ledger(str(tmp_path / "ledger.db"))
    try:
        event = LedgerEvent(
            source="/imagegen/older",
            id="e1",
            type=event_type,
            subject="older-1",
            time=datetime.now(UTC),
            data=data,
        )
        recorded = ledger.ingest(event)
        assert recorded.status == ("enhanced" if event_type == PROMPT_ENHANCED else "rendered")
        found = ledger.get("older-1")
        assert found is not None and found.prompt == "a fox at dusk"
        replayed = replay_job(ledger, "older-1")
    finally:
        ledger.close()
    assert replayed.replay_of == "older-1" and replayed.contributions == []
    assert (replayed.prompt, replayed.seed, replayed.model) == ("a fox at dusk", 7, "tiny")


def _ingest(tmp_path: Path, event_type: str, data: dict[str, Any]) -> None:
    ledger = open_ledger(str(tmp_path / "ledger.db"))
    try:
        ledger.ingest(
            LedgerEvent(
                source="/imagegen/older",
                id="e1",
                type=event_type,
                subject="older-1",
                time=datetime.now(UTC),
                data=data,
            )
        )
    finally:
        ledger.close()


def _persisted() -> dict[str, Any]:
    return {
        **_IMAGE,
        "prompt": "a fox at dusk",
        "keys": {"image": "2026/12/01/older-1.png"},
        "metadata_location": "file:///out/2026/12/01/older-1.json",
        "created_at": "2026-12-01T10:00:05Z",
    }


def _failed() -> dict[str, Any]:
    return {
        "generation_id": "older-1",
        "stage": "render",
        "error": {"code": "render_failed", "message": "out of memory", "retryable": False},
    }


@pytest.mark.parametrize(
    ("event_type", "data"),
    [
        (IMAGE_RENDERED, _rendered(_job([]))),
        (IMAGE_PERSISTED, _persisted()),
        (GENERATION_FAILED, _failed()),
    ],
    ids=["rendered", "persisted", "failed"],
)
def test_a_contributions_key_on_data_that_has_none_is_refused(
    tmp_path: Path, event_type: str, data: dict[str, Any]
) -> None:
    """As its stage refuses it: only a job's contributions are read without their bounds."""
    model = {IMAGE_RENDERED: RenderedImage, IMAGE_PERSISTED: PersistedImage}.get(
        event_type, GenerationFailed
    )
    parse_model(model, data)  # valid without the key
    with pytest.raises(InvalidRequest) as refused:
        _ingest(tmp_path, event_type, {**data, "contributions": _MANY})
    assert [e["field"] for e in refused.value.errors] == ["contributions"]


@pytest.mark.parametrize(
    "contributions",
    [None, "notes", [{"plugin": 5}], [{"plugin": "p", "data": "a"}]],
    ids=["null", "a-string", "a-number-for-a-name", "a-string-for-data"],
)
@pytest.mark.parametrize("event_type", [PROMPT_ENHANCED, IMAGE_RENDERED])
def test_contributions_of_the_wrong_type_are_refused(
    tmp_path: Path, contributions: Any, event_type: str
) -> None:
    """No older job had them: they are no bound added since, but a job render refuses."""
    job = _job(contributions)
    data = job if event_type == PROMPT_ENHANCED else _rendered(job)
    with pytest.raises(InvalidRequest) as refused:
        _ingest(tmp_path, event_type, data)
    assert refused.value.errors
    assert all(
        e["field"].removeprefix("prompt.").startswith("contributions") for e in refused.value.errors
    )
