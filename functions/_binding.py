"""The HTTP binding: a request's headers and body to a frozen :class:`Message`, and back.

Pure functions over bytes and mappings, in the shape of the CloudEvents SDK's
``core/bindings/http.py``: no Flask here, no I/O. The CloudEvents SDK parses and writes the
events; this module decides what a stage accepts and what each outcome answers.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any

from cloudevents.conversion import to_binary
from cloudevents.exceptions import GenericException as CloudEventError
from cloudevents.http import CloudEvent, from_http
from pydantic import BaseModel

from imagegen.errors import ImageGenError, InvalidRequest, UnsupportedMediaType, first_line
from imagegen.events import GENERATION_FAILED, is_final, reply_attributes
from imagegen.identity import event_time
from imagegen.models import ErrorInfo, GenerationFailed
from imagegen.validation import loads

__all__ = [
    "MAX_BODY_BYTES",
    "Message",
    "Reply",
    "error_reply",
    "event_reply",
    "json_reply",
    "parse",
    "parse_leniently",
]

MAX_BODY_BYTES = 1024 * 1024
_EMPTY: Mapping[str, str] = MappingProxyType({})


@dataclass(frozen=True)
class Message:
    """One request as received: a CloudEvent (``attributes`` set) or a plain JSON body.

    Attributes:
        data: The event data or the body, parsed from JSON (text when it is not JSON, for
            the sink only).
        attributes: The CloudEvents attributes as strings; empty for plain JSON.
        headers: The HTTP headers, names lower-cased.
        raw: The body as received, where it could not be read as JSON (the sink keeps it).
    """

    data: Any
    attributes: Mapping[str, str] = field(default_factory=lambda: _EMPTY)
    headers: Mapping[str, str] = field(default_factory=lambda: _EMPTY)
    raw: bytes | None = None

    @property
    def is_event(self) -> bool:
        return bool(self.attributes)

    def carrier(self) -> dict[str, str]:
        """Trace context: the HTTP headers, overridden by the CloudEvents tracing extension."""
        names = ("traceparent", "tracestate")
        headers = {k: v for k, v in self.headers.items() if k in names}
        return headers | {k: v for k, v in self.attributes.items() if k in names and v}


@dataclass(frozen=True)
class Reply:
    """What to answer: a status, headers and a body (empty: nothing to say)."""

    status: int
    body: bytes = b""
    headers: Mapping[str, str] = field(default_factory=dict)


def _lowered(headers: Mapping[str, str]) -> Mapping[str, str]:
    return MappingProxyType({k.lower(): v for k, v in headers.items()})


def _content_type(headers: Mapping[str, str]) -> str:
    return headers.get("content-type", "").split(";")[0].strip().lower()


def parse(headers: Mapping[str, str], body: bytes, *, consumes: tuple[str, ...]) -> Message:
    """A CloudEvent (binary or structured mode) of a type in ``consumes``, or plain JSON.

    Raises:
        InvalidRequest: naming the field at fault (``event``, ``type``, ``body``).
        UnsupportedMediaType: neither JSON nor a CloudEvent.
    """
    lowered = _lowered(headers)
    content_type = _content_type(lowered)
    if "ce-specversion" in lowered or content_type == "application/cloudevents+json":
        if "ce-specversion" in lowered and content_type not in ("", "application/json"):
            raise UnsupportedMediaType(
                f"event data must be application/json, got {content_type!r}",
                errors=[{"field": "datacontenttype", "message": "must be application/json"}],
            )
        if content_type == "application/cloudevents+json":
            # Bounded before the SDK parses it: UTF-8, depth, no NaN (a 400 naming "event").
            loads(body, field="event")
        try:
            # Binary-mode data stays bytes here and is parsed below, bounded, like any body.
            event = from_http(dict(lowered), body, data_unmarshaller=lambda data: data)
        except (CloudEventError, ValueError) as exc:
            reason = first_line(exc)
            raise InvalidRequest(
                f"not a valid CloudEvent: {reason}", errors=[{"field": "event", "message": reason}]
            ) from None
        if consumes and event["type"] not in consumes:
            expected = " or ".join(consumes)
            raise InvalidRequest(
                f"this function consumes {expected}, not {event['type']}",
                errors=[{"field": "type", "message": f"expected {expected}"}],
            )
        data = event.get_data()
        if isinstance(data, bytes | str):
            data = loads(data or b"{}", field="body")
        attributes = {k: str(v) for k, v in event.get_attributes().items() if v is not None}
        return Message({} if data is None else data, MappingProxyType(attributes), lowered)
    if content_type != "application/json":
        raise UnsupportedMediaType(
            "send a CloudEvent, or JSON with Content-Type: application/json",
            errors=[
                {"field": "content-type", "message": f"unsupported {content_type or 'none'!r}"}
            ],
        )
    return Message(loads(body or b"{}", field="body"), _EMPTY, lowered)


def parse_leniently(headers: Mapping[str, str], body: bytes, *, truncated: bool) -> Message:
    """Whatever arrived, as an event if it looks like one; for a sink that must lose nothing.

    Attributes are taken as they come (every ``ce-*`` header, or the structured envelope),
    a body that is not JSON is kept as it came (``raw``; ``data`` is then its text, as far as
    it decodes), and ``truncated`` is recorded as an attribute.
    """
    lowered = _lowered(headers)
    data: Any = None
    raw: bytes | None = None
    if body:
        try:
            data = loads(body)
        except InvalidRequest:
            data, raw = body.decode("utf-8", "replace"), body
    attributes = {k[3:]: v for k, v in lowered.items() if k.startswith("ce-")}
    if _content_type(lowered) == "application/cloudevents+json" and isinstance(data, dict):
        attributes = {k: str(v) for k, v in data.items() if k not in ("data", "data_base64")}
        data = data.get("data", data.get("data_base64"))
    if truncated:
        attributes["imagegentruncated"] = "true"
    return Message(data, MappingProxyType(attributes) if attributes else _EMPTY, lowered, raw)


# -- replies -------------------------------------------------------------------------------


def json_reply(body: Any, status: int, headers: Mapping[str, str] | None = None) -> Reply:
    return Reply(
        status,
        json.dumps(body, separators=(",", ":"), default=str).encode(),
        {"Content-Type": "application/json", **(headers or {})},
    )


def event_reply(attributes: Mapping[str, str], data: BaseModel) -> Reply:
    """A 200 carrying the next event (binary mode)."""
    headers, body = to_binary(CloudEvent(dict(attributes), data.model_dump(mode="json")))
    return Reply(200, body, headers)


def error_reply(
    exc: ImageGenError, *, stage: str, message: Message | None, generation_id: str | None
) -> Reply:
    """The answer to a failure: for an event that cannot succeed, a ``generation.failed`` event.

    A permanent failure of a delivered event is answered 200 with ``generation.failed``: the
    broker publishes a 2xx reply and nothing else, so the platform hears of it exactly once,
    and the delivery is not retried. Every other failure is a JSON error with its status: a
    retryable one (5xx, 429) is redelivered; a plain-HTTP caller reads which field was wrong.
    """
    if message is not None and message.is_event and is_final(exc.status):
        failed_at = None  # the event's time, unless what failed is that it has none
        with contextlib.suppress(InvalidRequest):
            failed_at = event_time(message.attributes)
        failed = GenerationFailed(
            generation_id=generation_id,
            stage=stage,
            error=ErrorInfo.of(exc),
            failed_at=failed_at or datetime.now(UTC),
        )
        cause = f"{message.attributes.get('source')}#{message.attributes.get('id')}"
        attributes = reply_attributes(
            stage, GENERATION_FAILED, failed, generation_id, message.carrier(), cause=cause
        )
        return event_reply(attributes, failed)
    headers = {}
    if exc.retry_after is not None:
        headers["Retry-After"] = str(max(1, round(exc.retry_after)))
    if challenge := getattr(exc, "challenge", None):  # a 401 or 403 (RFC 6750)
        headers["WWW-Authenticate"] = challenge
    return json_reply(exc.to_dict(), exc.status, headers)
