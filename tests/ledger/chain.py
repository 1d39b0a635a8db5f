"""The events one generation produces, with valid data, as the functions emit them."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from imagegen.events import (
    GENERATION_FAILED,
    GENERATION_REQUESTED,
    IMAGE_PERSISTED,
    IMAGE_RENDERED,
    PROMPT_ENHANCED,
    reply_id,
    source_for,
)
from imagegen.ledger import LedgerEvent, open_ledger

T0 = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


def job(
    gid: str,
    *,
    model: str = "tiny",
    prompt: str = "a red fox, oil painting",
    enhanced_at: datetime | None = None,
) -> dict[str, Any]:
    written = {"enhanced_at": enhanced_at.isoformat()} if enhanced_at else {}
    return written | {
        "generation_id": gid,
        "prompt": prompt,
        "original_prompt": "a red fox",
        "enhancer": "template",
        "model": model,
        "width": 256,
        "height": 256,
        "steps": 2,
        "guidance": 0.0,
        "seed": 42,
        "requested_at": T0.isoformat(),
    }


def chain(
    gid: str,
    *,
    start: datetime = T0,
    model: str = "tiny",
    webhook: str | None = None,
    webhook_events: list[str] | None = None,
) -> dict[str, LedgerEvent]:
    """``requested``, ``enhanced``, ``rendered``, ``persisted`` and ``failed`` events of ``gid``.

    Timed as the stages time them: enhance took 1 s, render 3 s, persist 2 s; each event's
    ``time`` is the one its stage gives it (enhance's and a render failure's the request's,
    persist's the render's), the stages' own times in their data.
    """
    at = {name: start + timedelta(seconds=s) for name, s in (("enhanced", 1), ("rendered", 4))}
    enhanced_job = job(gid, model=model, enhanced_at=at["enhanced"])
    sha = hashlib.sha256(gid.encode()).hexdigest()
    key = f"2026/06/01/{gid}.png"
    request: dict[str, Any] = {"generation_id": gid, "prompt": "a red fox", "model": model}
    if webhook:
        request["webhook"] = webhook
    if webhook_events is not None:
        request["webhook_events"] = webhook_events
    image = {  # the stored PNG, as render and persist both describe it
        "generation_id": gid,
        "key": key,
        "location": f"file:///out/{key}",
        "size": 100,
        "sha256": sha,
        "width": 256,
        "height": 256,
        "seed": 42,
        "model": model,
    }
    rendered = {
        **image,
        "steps": 2,
        "guidance": 0.0,
        "prompt": enhanced_job,
        "rendered_at": at["rendered"].isoformat(),
    }
    persisted = {
        **image,
        "url": f"https://images.example/{key}",
        "keys": {"image": key, "thumbnail": key + ".thumb.png", "metadata": key + ".json"},
        "urls": {"image": f"https://images.example/{key}"},
        "metadata_location": f"file:///out/{key}.json",
        "prompt": "a red fox, oil painting",
        "created_at": at["rendered"].isoformat(),
        "persisted_at": (start + timedelta(seconds=6)).isoformat(),
    }
    failed = {
        "generation_id": gid,
        "stage": "render",
        "error": {"code": "internal", "message": "out of memory", "retryable": False},
        "failed_at": start.isoformat(),  # the failing prompt.enhanced's time
    }
    specs = {
        "requested": (GENERATION_REQUESTED, "/platform/caller", request, 0),
        "enhanced": (PROMPT_ENHANCED, source_for("enhance"), enhanced_job, 0),
        "rendered": (IMAGE_RENDERED, source_for("render"), rendered, 4),
        "persisted": (IMAGE_PERSISTED, source_for("persist"), persisted, 4),
        "failed": (GENERATION_FAILED, source_for("render"), failed, 0),
    }
    return {
        name: LedgerEvent(
            source=source,
            id=reply_id(gid, event_type) if name != "requested" else f"req-{gid}",
            type=event_type,
            subject=gid,
            time=start + timedelta(seconds=offset),
            data=data,
        )
        for name, (event_type, source, data, offset) in specs.items()
    }


def binary(event: LedgerEvent) -> dict[str, Any]:
    """``event`` as the broker POSTs it (binary mode): keyword arguments of ``client.post``."""
    headers = {
        "ce-specversion": "1.0",
        "ce-id": event.id,
        "ce-source": event.source,
        "ce-type": event.type,
        "content-type": "application/json",
    }
    if event.subject:
        headers["ce-subject"] = event.subject
    if event.time:
        headers["ce-time"] = event.time.isoformat()
    return {"headers": headers, "json": event.data}


def recorded_file(ledger_url: str) -> Path:
    """The file of the SQLite ledger at ``ledger_url``, one generation recorded in it (asked
    for, with a webhook, and enhanced), closed."""
    ledger = open_ledger(ledger_url)
    events = chain("gen-1", webhook="https://hooks.example/x")
    ledger.ingest(events["requested"])
    ledger.ingest(events["enhanced"])
    ledger.close()
    return Path(ledger_url.removeprefix("sqlite:///"))
