"""deadletter: records events whose delivery finally failed, and ``generation.failed`` events.

It is the dead-letter sink of every Trigger. Knative adds ``knativeerrorcode``,
``knativeerrordest`` and ``knativeerrordata`` (the failing reply, base64) to a dead-lettered
event; they are decoded into the record. Records go to ``failures/YYYY/MM/DD/<id>.json`` in the
image storage, one per event (a redelivered event overwrites its own record).
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from datetime import UTC, datetime
from typing import Any

import flask
from _runtime import Incoming, Runtime, Stage, serve
from pydantic import BaseModel

from imagegen import ImageGenService
from imagegen.errors import InvalidRequest
from imagegen.events import GENERATION_FAILED
from imagegen.models import derive_generation_id

log = logging.getLogger("imagegen.deadletter")


class FailureRecord(BaseModel):
    """What is known about one failed delivery or generation."""

    key: str
    location: str
    event_type: str
    event_id: str
    source: str
    subject: str | None = None
    generation_id: str | None = None
    error_code: str | None = None
    error_destination: str | None = None
    error_body: Any = None
    data: Any = None
    recorded_at: datetime


def _decode(value: Any) -> Any:
    if not value:
        return None
    try:
        text = base64.b64decode(str(value), validate=True).decode("utf-8", "replace")
    except (binascii.Error, ValueError):
        text = str(value)
    try:
        return json.loads(text)
    except ValueError:
        return text[:2000]


async def _record(service: ImageGenService, data: Any, incoming: Incoming) -> FailureRecord:
    if incoming.event is None:
        raise InvalidRequest(
            "deadletter accepts CloudEvents only",
            errors=[{"field": "ce-specversion", "message": "missing CloudEvents attributes"}],
        )
    event_type = str(incoming.attribute("type"))
    source, event_id = str(incoming.attribute("source")), str(incoming.attribute("id"))
    now = datetime.now(UTC)
    gid = incoming.attribute("subject") or (
        data.get("generation_id") if isinstance(data, dict) else None
    )
    key = f"failures/{now:%Y/%m/%d}/{derive_generation_id(source, event_id)}.json"
    record = FailureRecord(
        key=key,
        location=service.storage.location(key),
        event_type=event_type,
        event_id=event_id,
        source=source,
        subject=incoming.attribute("subject"),
        generation_id=gid,
        error_code=incoming.attribute("knativeerrorcode"),
        error_destination=incoming.attribute("knativeerrordest"),
        error_body=_decode(incoming.attribute("knativeerrordata")),
        data=data,
        recorded_at=now,
    )
    await service.storage.put(
        key, record.model_dump_json(indent=2).encode(), content_type="application/json"
    )
    kind = "generation failed" if event_type == GENERATION_FAILED else "delivery failed"
    log.warning(kind, extra={"event_type": event_type, "generation_id": gid, "key": key})
    return record


runtime = Runtime(
    Stage(
        name="deadletter",
        consumes=None,
        emits=None,
        input_model=None,
        handle=_record,
        timeout=lambda settings: 60.0,
        sink=True,
    )
)


def deadletter(request: flask.Request) -> flask.Response:
    """HTTP entry point (functions-framework target ``deadletter``)."""
    return serve(request, runtime)
