"""The HTTP binding of the functions: parsing CloudEvents and JSON bodies, writing replies.

Pure request/response code over Flask and the CloudEvents SDK; the only place where errors
become status codes. :mod:`_runtime` runs the stages.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import flask
import httpx
from cloudevents.conversion import to_binary
from cloudevents.exceptions import GenericException as CloudEventError
from cloudevents.http import CloudEvent, from_http
from pydantic import BaseModel

from imagegen.errors import ImageGenError, InvalidRequest
from imagegen.events import GENERATION_FAILED, dataschema, reply_id, source_for
from imagegen.models import GENERATION_ID_PATTERN, ErrorInfo, GenerationFailed

__all__ = [
    "MAX_BODY_BYTES",
    "Incoming",
    "MethodNotAllowed",
    "PayloadTooLarge",
    "RouteNotFound",
    "UnsupportedMediaType",
    "error_response",
    "event_response",
    "is_final",
    "json_response",
    "make_event",
    "parse_anything",
    "parse_request",
    "publish_failure",
    "valid_generation_id",
]

MAX_BODY_BYTES = 1024 * 1024

log = logging.getLogger("imagegen.functions")


class PayloadTooLarge(InvalidRequest):
    status = 413
    code = "payload_too_large"


class UnsupportedMediaType(InvalidRequest):
    status = 415
    code = "unsupported_media_type"


class MethodNotAllowed(InvalidRequest):
    status = 405
    code = "method_not_allowed"


class RouteNotFound(InvalidRequest):
    status = 404
    code = "not_found"


@dataclass
class Incoming:
    """A parsed request: a CloudEvent (``event`` set) or a plain JSON body."""

    data: Any
    event: CloudEvent | None = None
    headers: Mapping[str, str] = field(default_factory=dict)

    @property
    def is_event(self) -> bool:
        return self.event is not None

    def attribute(self, name: str) -> Any:
        return self.event.get(name) if self.event is not None else None

    def carrier(self) -> dict[str, str]:
        """Trace context: HTTP headers, overridden by the CloudEvents tracing extension."""
        carrier = {
            k.lower(): v
            for k, v in self.headers.items()
            if k.lower() in ("traceparent", "tracestate")
        }
        for name in ("traceparent", "tracestate"):
            value = self.attribute(name)
            if value:
                carrier[name] = str(value)
        return carrier


# -- requests ------------------------------------------------------------------------------


def _read_body(request: flask.Request) -> bytes:
    length = request.content_length
    if length is not None and length > MAX_BODY_BYTES:
        raise PayloadTooLarge(f"body is {length} bytes; the limit is {MAX_BODY_BYTES}")
    body = request.stream.read(MAX_BODY_BYTES + 1)
    if len(body) > MAX_BODY_BYTES:
        raise PayloadTooLarge(f"body is larger than {MAX_BODY_BYTES} bytes")
    return body


def parse_anything(request: flask.Request) -> Incoming:
    """Whatever arrives, as an event if it looks like one: for a sink that must lose nothing.

    A dead-letter sink receives the events a stage refused: bad attributes, data that is not
    JSON, bodies past the limit. Refusing them again would drop them, so nothing is refused
    here: attributes are taken as they come, data that is not JSON is kept as text, and a body
    past :data:`MAX_BODY_BYTES` is cut there (``truncated`` says so).
    """
    body = request.stream.read(MAX_BODY_BYTES + 1)
    truncated = len(body) > MAX_BODY_BYTES
    body = body[:MAX_BODY_BYTES]
    headers = {k: v for k, v in request.headers.items()}
    lowered = {k.lower(): v for k, v in headers.items()}
    content_type = lowered.get("content-type", "").split(";")[0].strip().lower()
    attributes: dict[str, Any] = {k[3:]: v for k, v in lowered.items() if k.startswith("ce-")}
    data: Any = body.decode("utf-8", "replace")
    with contextlib.suppress(ValueError):
        data = json.loads(body) if body else None
    if content_type == "application/cloudevents+json" and isinstance(data, dict):
        attributes = {k: v for k, v in data.items() if k not in ("data", "data_base64")}
        data = data.get("data", data.get("data_base64"))
    if not attributes:
        return Incoming(data=data, headers=headers)
    attributes.setdefault("type", "unknown")
    attributes.setdefault("source", "unknown")
    if truncated:
        attributes["truncated"] = "true"
    attributes = {k: str(v) for k, v in attributes.items() if re.fullmatch(r"[a-z0-9]{1,20}", k)}
    return Incoming(data=data, event=CloudEvent(attributes, data), headers=headers)


def parse_request(
    request: flask.Request, *, stage: str, consumes: tuple[str, ...] | None
) -> Incoming:
    """A CloudEvent (binary or structured mode) or a plain JSON body; 4xx errors otherwise."""
    body = _read_body(request)
    headers = {k: v for k, v in request.headers.items()}
    lowered = {k.lower(): v for k, v in headers.items()}
    content_type = lowered.get("content-type", "").split(";")[0].strip().lower()
    binary = "ce-specversion" in lowered
    structured = content_type == "application/cloudevents+json"

    if binary or structured:
        if binary and content_type not in ("", "application/json"):
            raise UnsupportedMediaType(
                f"event data must be application/json, got {content_type!r}",
                errors=[{"field": "datacontenttype", "message": "must be application/json"}],
            )
        try:
            event = from_http(headers, body)
        except CloudEventError as exc:
            raise InvalidRequest(
                f"not a valid CloudEvent: {_first_line(exc)}",
                errors=[{"field": "event", "message": _first_line(exc)}],
            ) from None
        if consumes is not None and event["type"] not in consumes:
            expected = " or ".join(consumes)
            raise InvalidRequest(
                f"{stage} consumes {expected}, not {event['type']}",
                errors=[{"field": "type", "message": f"expected {expected}"}],
            )
        data = event.get_data()
        if isinstance(data, bytes | str):
            data = _json(data)
        return Incoming(data=data if data is not None else {}, event=event, headers=headers)

    if content_type != "application/json":
        raise UnsupportedMediaType(
            "send a CloudEvent, or JSON with Content-Type: application/json",
            errors=[
                {"field": "content-type", "message": f"unsupported {content_type or 'none'!r}"}
            ],
        )
    return Incoming(data=_json(body), headers=headers)


def _json(body: bytes | str) -> Any:
    try:
        return json.loads(body or b"{}")
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequest(
            "body is not valid JSON", errors=[{"field": "body", "message": _first_line(exc)}]
        ) from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


# -- responses -----------------------------------------------------------------------------


def json_response(
    body: Any, status: int, headers: Mapping[str, str] | None = None
) -> flask.Response:
    return flask.Response(
        json.dumps(body, separators=(",", ":"), default=str),
        status=status,
        headers=dict(headers or {}),
        mimetype="application/json",
    )


def make_event(
    stage: str,
    event_type: str,
    data: BaseModel,
    generation_id: str | None,
    extensions: Mapping[str, str],
    *,
    cause: str | None = None,
) -> CloudEvent:
    """A reply event; its id is stable for the generation (or ``cause``) and the type."""
    attributes: dict[str, Any] = {
        "type": event_type,
        "source": source_for(stage),
        "id": reply_id(generation_id or cause or "unknown", event_type),
        "time": datetime.now(UTC).isoformat(),
        "datacontenttype": "application/json",
        "dataschema": dataschema(event_type),
    }
    if generation_id:
        attributes["subject"] = generation_id
    attributes.update({k: v for k, v in extensions.items() if v})
    return CloudEvent(attributes, data.model_dump(mode="json"))


def event_response(
    event: CloudEvent, status: int, extra: Mapping[str, str] | None = None
) -> flask.Response:
    headers, body = to_binary(event)
    headers = {**headers, **(extra or {})}
    return flask.Response(body, status=status, headers=headers)


def error_response(
    exc: ImageGenError, *, stage: str, replies: bool, incoming: Incoming | None, gid: str | None
) -> flask.Response:
    """The JSON error, or for an event that will not be retried a ``generation.failed`` event.

    Args:
        replies: Whether the stage answers events with events (not the dead-letter sink).
    """
    headers: dict[str, str] = {}
    if exc.retry_after is not None:
        headers["Retry-After"] = str(max(1, round(exc.retry_after)))
    if gid is not None and not valid_generation_id(gid):
        gid = None
    if incoming is not None and incoming.is_event and replies and is_final(exc.status):
        # A failure that will not be retried: tell the platform with a generation.failed event.
        failed = GenerationFailed(
            generation_id=gid,
            stage=stage,  # type: ignore[arg-type]
            error=ErrorInfo(
                code=exc.code,
                message=exc.message,
                retryable=exc.retryable,
                errors=getattr(exc, "errors", []),
            ),
            failed_at=datetime.now(UTC),
        )
        cause = f"{incoming.attribute('source')}#{incoming.attribute('id')}"
        event = make_event(stage, GENERATION_FAILED, failed, gid, incoming.carrier(), cause=cause)
        publish_failure(event)
        return event_response(event, exc.status, headers)
    return json_response(exc.to_dict(), exc.status, headers)


# Knative's dispatcher retries these statuses (and every 5xx); any other 4xx is final.
RETRIED_BY_KNATIVE = frozenset({404, 408, 409, 429})


def is_final(status: int) -> bool:
    """Whether Knative gives up on a delivery answered with ``status`` (no retry)."""
    return 400 <= status < 500 and status not in RETRIED_BY_KNATIVE


def publish_failure(event: CloudEvent) -> None:
    """Send ``generation.failed`` to ``K_SINK`` (the broker, bound by a SinkBinding).

    Knative publishes a reply only from a 2xx answer, so the failure event in a 4xx body
    reaches nobody but the caller; with a sink bound, the platform hears about it. Best
    effort: a sink that cannot be reached is logged and the reply goes out anyway.
    """
    sink = os.environ.get("K_SINK")
    if not sink:
        return
    headers, body = to_binary(event)
    try:
        response = httpx.post(sink, headers=headers, content=body, timeout=5.0)
        response.raise_for_status()
    except httpx.HTTPError as exc:
        log.warning(
            "could not publish generation.failed: %s",
            type(exc).__name__,
            extra={"generation_id": event.get("subject")},
        )


def valid_generation_id(gid: str) -> bool:
    return re.fullmatch(GENERATION_ID_PATTERN, gid) is not None
