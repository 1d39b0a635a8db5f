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

A write that storage refuses (:class:`~imagegen.errors.DependencyUnavailable`: a connection
refused or reset fails in a fraction of a second) is tried again, with backoff, for up to
:data:`RETRY_FOR` seconds of the sink's :data:`BUDGET` before the sink answers 503; a write
that stalls is answered 503 at the budget, 60 s. The broker
sends a dead letter with the failing Trigger's own ``retry`` and backoff, and drops it once those
are spent (eventing ``pkg/kncloudevents/event_dispatcher.go``: ``send`` passes
``config.retryConfig`` to the ``executeRequest`` of the dead-letter sink too); answered in a
tenth of a second, its attempts would last little more than the Trigger's backoff (62 s at
``retry: 5`` from 2 s); each attempt now rides out up to :data:`RETRY_FOR` seconds of outage.
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
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_before_delay,
    wait_exponential_jitter,
)

from imagegen.auth.callers import BROKER
from imagegen.errors import DependencyUnavailable, InvalidRequest
from imagegen.events import GENERATION_FAILED
from imagegen.identity import derive_generation_id, event_time
from imagegen.stages import Call, Stage
from imagegen.validation import loads

if TYPE_CHECKING:
    from imagegen.service import ImageGenService

log = logging.getLogger("imagegen.deadletter")

# Never written to storage: a record is read by people who may not hold the caller's rights.
_CREDENTIALS = frozenset({"authorization", "proxy-authorization", "cookie"})

BUDGET = 60.0
"""Seconds one delivery may take before the sink answers 503: below the Service's
``timeoutSeconds`` (90, knative/base/deadletter.yaml), itself below every Trigger's ``timeout``."""
RETRY_FOR = 50.0
"""Seconds from a delivery's first write within which a failed write is tried again. The last
try begins before then: a write storage refuses (a connection refused or reset, a 5xx) ends the
delivery with storage's own 503 at about 50 s. A write that stalls is not answered by storage
within :data:`BUDGET` (against an S3 store that accepts and never answers, botocore waits 30 s
for a reply, 3 times): the delivery ends at 60 s with the 503 ``deadletter took longer than
60s``, its one write still unanswered."""
TEXT_PREVIEW = 1000
"""Characters of a non-JSON body's text kept in ``data``, for reading: the bytes are in
``body_base64``. The whole text, each undecodable byte a U+FFFD that JSON writes as ``\\ufffd``
(6 bytes), made a 1 MiB body a 7.7 MB record."""


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
    data: Any = Field(
        default=None,
        description="The event's data; where the body is not JSON, the first"
        f" {TEXT_PREVIEW} characters of its text as far as it decodes (body_base64 has it all).",
    )
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
        data=data[:TEXT_PREVIEW] if call.raw is not None and isinstance(data, str) else data,
        body_base64=base64.b64encode(call.raw).decode() if call.raw is not None else None,
        recorded_at=now,
    )
    # First writer wins: a redelivery (another day, another replica) keeps the first record.
    created = await _create(service, key, _written(record))
    kind = "generation failed" if record.event_type == GENERATION_FAILED else "delivery failed"
    extra = {"event_type": record.event_type, "generation_id": gid, "key": key}
    log.warning(kind if created else f"{kind} (already recorded)", extra=extra)


# The fields that hold what came as it came (parsed JSON, text, attribute names): written by
# json, not pydantic, which fails on a lone surrogate (JSON's "\ud800") in a key and writes
# one in a dict[str, str]'s key as U+FFFD.
_AS_RECEIVED = frozenset({"attributes", "data", "error_body"})


def _written(record: FailureRecord) -> bytes:
    """``record`` as JSON escaped to ASCII: a lone surrogate, in a key or a value, is kept as
    the escape it came as."""
    dumped = record.model_dump(mode="json", exclude=set(_AS_RECEIVED))
    fields = {
        name: getattr(record, name) if name in _AS_RECEIVED else dumped[name]
        for name in FailureRecord.model_fields
    }
    return json.dumps(fields, indent=2).encode()


async def _create(service: ImageGenService, key: str, body: bytes) -> bool:
    """``storage.create``, tried again while storage is unavailable, for :data:`RETRY_FOR` s.

    Jittered: the dead letters of one outage, retried together, reach the store spread out as it
    comes back.
    """

    def waiting(state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome is not None else None
        wait = state.next_action.sleep if state.next_action is not None else 0.0
        log.warning(
            "cannot record yet, trying again in %.1fs: %s",
            wait,
            getattr(error, "message", error),
            extra={"key": key, "attempt": state.attempt_number},
        )

    retrying = AsyncRetrying(
        stop=stop_before_delay(RETRY_FOR),
        wait=wait_exponential_jitter(multiplier=0.5, max=5.0, jitter=0.5),
        retry=retry_if_exception_type(DependencyUnavailable),
        before_sleep=waiting,
        reraise=True,
    )
    async for attempt in retrying:
        with attempt:
            return await service.storage.create(key, body, content_type="application/json")
    raise AssertionError("unreachable: tenacity re-raises the last error")


STAGE = Stage(
    name="deadletter",
    summary="Record an event whose delivery failed, or a generation.failed event.",
    consumes=(),
    emits=None,
    input_model=None,
    output_model=None,
    handler=_record,
    timeout=lambda settings: BUDGET,
    callers=BROKER,
)
