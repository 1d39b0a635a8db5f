"""deadletter: records each event whose delivery finally failed, and each ``generation.failed``.

It is the dead-letter sink of every Trigger and the subscriber of ``generation.failed``, fed by
the broker alone: it takes the broker's OIDC token, never an API key. It must lose nothing, so
it takes whatever arrives: any event type, any attributes, plain JSON without CloudEvents
attributes, and a body that is not JSON at all (kept byte for byte, with the HTTP headers,
credentials left out). Knative adds ``knativeerrorcode``, ``knativeerrordest``
and ``knativeerrordata`` to a dead-lettered event; the last is the failing reply, base64, cut at
1,024 bytes, so it is decoded as far as it goes and never relied on.

One record per event and failed destination, at ``failures/YYYY/MM/DD/<name>.json``: the date
is the event's ``time`` (UTC), the name derives from its ``source`` and ``id`` (or, without
them, from the body) and, for a dead-lettered event, from ``knativeerrordest``; the record is
written only if absent. Every redelivery of an event, on any day and at any replica, finds its
first record and leaves it as it is, while one event that failed at two subscribers (render and
the ledger both hear ``prompt.enhanced``; the ledger's Trigger dead-letters a
``generation.failed`` this sink also hears directly) leaves a record of each failure. An event
without a usable ``time`` is recorded under ``failures/undated/``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, Field

from imagegen.auth.callers import BROKER
from imagegen.errors import InvalidRequest
from imagegen.events import GENERATION_FAILED
from imagegen.identity import derive_generation_id, event_time
from imagegen.stages import Call, Stage
from imagegen.validation import loads

if TYPE_CHECKING:
    from imagegen.service import ImageGenService

log = logging.getLogger("imagegen.deadletter")

# Never written to storage: a record is read by people who may not hold the caller's rights.
_CREDENTIALS = frozenset({"authorization", "proxy-authorization", "cookie"})


class FailureRecord(BaseModel):
    """What is known about one failed delivery or generation."""

    key: str
    location: str
    event_type: str | None = None
    event_id: str | None = None
    source: str | None = None
    subject: str | None = None
    generation_id: str | None = None
    error_code: str | None = None
    error_destination: str | None = None
    error_body: Any = None
    attributes: dict[str, str]
    headers: dict[str, str] = {}
    data: Any = None
    body_base64: str | None = Field(
        default=None, description="The body as received, where it is not JSON."
    )
    recorded_at: datetime


def _decode(value: str | None) -> Any:
    """``knativeerrordata`` as far as it decodes: its JSON, else its text; never an error.

    Parsed as any untrusted JSON is (:func:`imagegen.validation.loads`): the reply, cut at
    1,024 bytes, may nest past the interpreter's recursion limit (``[[[…``) or past what the
    record's serializer writes, or hold NaN, which no JSON record may; such a reply is kept as
    its text, and the record is written all the same.
    """
    if not value:
        return None
    try:
        text = base64.b64decode(value, validate=True).decode("utf-8", "replace")
    except (binascii.Error, ValueError):
        text = value
    try:
        return loads(text, field="knativeerrordata")
    except InvalidRequest:
        return text[:2000]


def record_key(attributes: dict[str, str], data: Any, raw: bytes | None) -> str:
    """The key of the record of one event: a function of the event alone, never of the clock.

    A dead-lettered event's key also names the subscriber it failed at (``knativeerrordest``,
    the same in every redelivery of that dead-lettering; its ``knativeerrorcode`` is not):
    ``<name>.<digest of the destination>.json`` beside the event's own ``<name>.json``.

    Args:
        attributes: The event's attributes, as they came (none for plain JSON).
        data: The body, parsed.
        raw: The body as received, where it did not parse.
    """
    if "source" in attributes and "id" in attributes:
        name = derive_generation_id(attributes["source"], attributes["id"])
    else:  # no event: the same body lands on the same record
        body = raw if raw is not None else json.dumps(data, sort_keys=True).encode()
        name = hashlib.sha256(body).hexdigest()
    destination = attributes.get("knativeerrordest")
    if destination:
        digest = hashlib.sha256(destination.encode("utf-8", "surrogatepass")).hexdigest()
        name = f"{name}.{digest[:16]}"
    try:
        when = event_time(attributes)
    except InvalidRequest:  # kept as it came; it names no day
        when = None
    day = f"{when.astimezone(UTC):%Y/%m/%d}" if when is not None else "undated"
    return f"failures/{day}/{name}.json"


async def _record(service: ImageGenService, data: Any, call: Call) -> None:
    attributes = dict(call.attributes)
    now = datetime.now(UTC)
    key = record_key(attributes, data, call.raw)
    gid = attributes.get("subject") or (
        data.get("generation_id") if isinstance(data, dict) else None
    )
    record = FailureRecord(
        key=key,
        location=service.storage.location(key),
        event_type=attributes.get("type"),
        event_id=attributes.get("id"),
        source=attributes.get("source"),
        subject=attributes.get("subject"),
        generation_id=str(gid) if gid is not None else None,
        error_code=attributes.get("knativeerrorcode"),
        error_destination=attributes.get("knativeerrordest"),
        error_body=_decode(attributes.get("knativeerrordata")),
        attributes=attributes,
        headers={k: v for k, v in call.headers.items() if k not in _CREDENTIALS},
        data=data,
        body_base64=base64.b64encode(call.raw).decode() if call.raw is not None else None,
        recorded_at=now,
    )
    # First writer wins: a redelivery (another day, another replica) keeps the first record.
    # Written by json, escaped to ASCII: a lone surrogate in the data (JSON's "\ud800", which
    # pydantic refuses to write as UTF-8) is kept as it came.
    body = json.dumps(record.model_dump(mode="json"), indent=2).encode()
    created = await service.storage.create(key, body, content_type="application/json")
    kind = "generation failed" if record.event_type == GENERATION_FAILED else "delivery failed"
    extra = {"event_type": record.event_type, "generation_id": gid, "key": key}
    log.warning(kind if created else f"{kind} (already recorded)", extra=extra)


STAGE = Stage(
    name="deadletter",
    summary="Record an event whose delivery failed, or a generation.failed event.",
    consumes=(),
    emits=None,
    input_model=None,
    output_model=None,
    handler=_record,
    timeout=lambda settings: 60.0,
    callers=BROKER,
)
