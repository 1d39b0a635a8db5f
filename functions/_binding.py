"""The HTTP binding: a request's headers and body to a frozen :class:`Message`, and back.

Pure functions over bytes and mappings, in the shape of the CloudEvents SDK's
``core/bindings/http.py``: no Flask here, no I/O. The CloudEvents SDK parses and writes the
events; this module decides what a stage accepts and what each outcome answers.
"""

from __future__ import annotations

import base64
import contextlib
import json
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import cache
from types import MappingProxyType
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from cloudevents.conversion import to_binary
from cloudevents.exceptions import GenericException as CloudEventError
from cloudevents.http import CloudEvent, from_http
from pydantic import BaseModel

from imagegen.errors import ImageGenError, InvalidRequest, UnsupportedMediaType, first_line
from imagegen.events import (
    ATTRIBUTE_MAX_LENGTHS,
    GENERATION_FAILED,
    TEXT_ATTRIBUTES,
    failure_cause,
    header_value,
    is_final,
    reply_attributes,
    text_problem,
)
from imagegen.identity import event_time
from imagegen.models import ErrorInfo, GenerationFailed
from imagegen.validation import loads

if TYPE_CHECKING:
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

__all__ = [
    "DELIVERED_ERROR_BODY_MAX",
    "MAX_BODY_BYTES",
    "Message",
    "Reply",
    "error_reply",
    "event_reply",
    "fit_error_body",
    "is_delivery",
    "json_reply",
    "parse",
    "parse_leniently",
    "trace_carrier",
]

MAX_BODY_BYTES = 1024 * 1024
_QUOTED_PAIR = re.compile(r"\\(.)")
_EMPTY: Mapping[str, str] = MappingProxyType({})


@dataclass(frozen=True)
class Message:
    """One request as received: a CloudEvent (``attributes`` set) or a plain JSON body.

    Attributes:
        data: The event data or the body, parsed from JSON (text when it is not JSON, for
            the sink only).
        attributes: The CloudEvents attributes as strings; empty for plain JSON.
        headers: The HTTP headers, names lower-cased.
        raw: The body as received, where it could not be read as JSON, or gives a name twice
            in an object (the sink keeps it).
    """

    data: Any
    attributes: Mapping[str, str] = field(default_factory=lambda: _EMPTY)
    headers: Mapping[str, str] = field(default_factory=lambda: _EMPTY)
    raw: bytes | None = None

    @property
    def is_event(self) -> bool:
        return bool(self.attributes)

    def carrier(self) -> dict[str, str]:
        """Trace context: the CloudEvents tracing extension's where its ``traceparent`` is
        one, else the HTTP headers'; a ``tracestate`` goes with its own ``traceparent``.

        What the W3C propagator accepts, as it writes it: every reply passes this on, and a
        stage that answers before its span starts (a ``generation.failed``) must not echo a
        ``traceparent`` or ``tracestate`` the next one would refuse (:func:`_w3c_only`).
        """
        extension = _w3c_only(self.attributes)
        return extension if "traceparent" in extension else _w3c_only(self.headers)


@dataclass(frozen=True)
class Reply:
    """What to answer: a status, headers and a body (empty: nothing to say)."""

    status: int
    body: bytes = b""
    headers: Mapping[str, str] = field(default_factory=dict)


@cache
def _w3c() -> TraceContextTextMapPropagator:
    """W3C Trace Context's propagator, made on a request's first trace context: its module (and
    ``opentelemetry.propagators.textmap``) is no part of what a probe needs."""
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    return TraceContextTextMapPropagator()


def trace_carrier(headers: Mapping[str, str]) -> dict[str, str]:
    """The W3C trace context of a plain HTTP request's ``headers`` (a route's caller), as
    :meth:`Message.carrier` reads it: only what the W3C propagator accepts."""
    return _w3c_only(_lowered(headers))


def _w3c_only(carrier: Mapping[str, str]) -> dict[str, str]:
    """``carrier``'s ``traceparent`` and ``tracestate``, read and written again by
    OpenTelemetry's W3C propagator: empty where the ``traceparent`` is none.

    The propagator drops what W3C Trace Context (Level 1) has a receiver drop: a
    ``traceparent`` of version ``ff``, with an all-zero ``trace-id`` or ``parent-id``, or with
    fields after version ``00``'s four ("traceparent Header Field Values"), and then its
    ``tracestate`` too ("Tracestate Header": a vendor that failed to parse ``traceparent``
    MUST NOT attempt to parse ``tracestate``); and a ``tracestate`` of more than 32
    list-members, or with a member it cannot parse ("tracestate Header Field Values"). A
    higher version is passed on as ``00`` ("Versioning of traceparent").
    """
    w3c = _w3c()
    context = w3c.extract({k: v for k, v in carrier.items() if k in w3c.fields and v})
    written: dict[str, str] = {}
    w3c.inject(written, context)
    return written


def _lowered(headers: Mapping[str, str]) -> Mapping[str, str]:
    return MappingProxyType({k.lower(): v for k, v in headers.items()})


def _content_type(headers: Mapping[str, str]) -> str:
    return headers.get("content-type", "").split(";")[0].strip().lower()


_REQUIRED = ("specversion", "id", "source", "type")
"""The attributes every CloudEvent has, each a non-empty string (CloudEvents 1.0, section 3.1)."""
_SPECVERSIONS = ("1.0",)
"""The versions read. The CloudEvents SDK reads 0.3 too (cloudevents/sdk/event: v03), but as
1.0, its ``datacontentencoding`` ignored: Base64 data would be refused as data of the wrong
kind. Knative's sources and broker send 1.0."""
_ATTRIBUTE_NAME = re.compile("[a-z0-9]+")
"""An attribute's name: lower-case ASCII letters and digits (CloudEvents 1.0.2, section 3.1.1:
"MUST")."""
_LATIN1_MARKER = "imagegenlatin1"
"""The sink's attribute naming the binary-mode attributes whose header bytes were no UTF-8,
kept each byte as its Latin-1 character."""


def parse(headers: Mapping[str, str], body: bytes, *, consumes: tuple[str, ...]) -> Message:
    """A CloudEvent (binary or structured mode) of a type in ``consumes``, or plain JSON.

    The data, or the plain body, must be a JSON object: a JSON string is refused, never read
    again as JSON. Header values are as WSGI gives them, each byte a Latin-1 character (PEP
    3333); a ``ce-*`` value's bytes are read as UTF-8.

    Raises:
        InvalidRequest: naming the field at fault (an attribute such as ``id``, ``type``,
            ``data``, ``data_base64``, ``event``, ``body``).
        UnsupportedMediaType: neither JSON nor a CloudEvent, or a body in a content coding.
    """
    lowered = _lowered(headers)
    content_type = _content_type(lowered)
    coding = lowered.get("content-encoding", "identity").strip().lower()
    if coding not in ("", "identity"):
        raise UnsupportedMediaType(
            f"bodies in a content coding are not accepted, got {coding[:40]!r}",
            errors=[{"field": "content-encoding", "message": "send the body uncoded"}],
        )
    if content_type == "application/cloudevents-batch+json":
        # HTTP binding, section 3.3: a batch is no event of its own, and a ce-* header beside
        # it names none either; each stage takes one event per request.
        raise UnsupportedMediaType(
            "batched mode is not supported: send each event on its own, in binary or"
            " structured mode",
            errors=[{"field": "content-type", "message": "batched mode is not supported"}],
        )
    structured = content_type == "application/cloudevents+json"
    # Binary mode: ce-specversion, or any required attribute's header (then the event is
    # refused for its missing specversion, rather than its data taken as a plain body).
    binary = not structured and any(f"ce-{name}" in lowered for name in _REQUIRED)
    if structured or binary:
        if binary and content_type not in ("", "application/json"):
            raise UnsupportedMediaType(
                f"event data must be application/json, got {content_type!r}",
                errors=[{"field": "datacontenttype", "message": "must be application/json"}],
            )
        if structured:
            # Bounded before the SDK parses it: UTF-8, depth, no NaN (a 400 naming "event").
            envelope = loads(body, field="event")
            if not isinstance(envelope, dict):
                raise _invalid("event", "must be a JSON object")
            _check_attributes(envelope.get)
            _check_envelope(envelope)
            _check_data_base64(envelope)
            # A structured message may carry binary mode's headers too (HTTP binding, section
            # 3.2.3); the envelope is the event, and the SDK would take the headers for it.
            sdk_headers = {k: v for k, v in lowered.items() if not k.startswith("ce-")}
        else:
            # Binary mode's datacontenttype is Content-Type, checked above, and no ce- header
            # (HTTP binding, sections 3.1.1 and 3.1.3.1). The SDK's reader would take a
            # ce-datacontenttype too, the later header winning (cloudevents/sdk/event/base.py:
            # UnmarshalBinary), and its writer never sends one (MarshalBinary): dropped, so
            # the event's datacontenttype is the Content-Type that was checked.
            sdk_headers = {
                k: v
                for k, v in {**lowered, **_binary_attributes(lowered)}.items()
                if k != "ce-datacontenttype"
            }
            _check_attributes(lambda name: sdk_headers.get(f"ce-{name}"))
        try:
            # Binary-mode data stays bytes here and is parsed below, bounded, like any body.
            event = from_http(sdk_headers, body, data_unmarshaller=lambda data: data)
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
        # Binary mode's data is the body (bytes here); structured mode's is "data", which the
        # SDK hands over as JSON text (cloudevents/sdk/event/base.py: UnmarshalJSON), or
        # "data_base64", decoded to bytes. Each is parsed once: a JSON string stays a string.
        where = "data" if structured else "body"
        if structured and "data" in envelope and envelope["data"] is None:
            # JSON event format, section 3.1.1 (cloudevents/spec, formats/json-format.md):
            # "the `data` member MAY have a value of `null`, representing an explicit `null`
            # payload as distinct from the absence of the `data` member". Data, and no object,
            # as binary mode's body `null` is; an envelope without `data` is an event without
            # data, as binary mode's empty body is.
            raise _invalid("data", "must be a JSON object, not null")
        data = event.get_data()
        if isinstance(data, str):
            data = loads(data, field="data")
        elif isinstance(data, bytes):  # an empty body is no data; "null" is data, and no object
            field = "data_base64" if where == "data" else "body"
            data = _an_object(loads(data, field=field), field) if data else {}
        attributes = {k: str(v) for k, v in event.get_attributes().items() if v is not None}
        sent_time = "time" in envelope if structured else "ce-time" in sdk_headers
        if not sent_time:
            # The SDK's CloudEvent gives an event without a time the clock's (cloudevents/
            # http/event.py, __init__): no time was sent, and each delivery would differ.
            attributes.pop("time", None)
        return Message(
            _an_object({} if data is None else data, where), MappingProxyType(attributes), lowered
        )
    if content_type != "application/json":
        raise UnsupportedMediaType(
            "send a CloudEvent, or JSON with Content-Type: application/json",
            errors=[
                {"field": "content-type", "message": f"unsupported {content_type or 'none'!r}"}
            ],
        )
    return Message(_an_object(loads(body or b"{}", field="body"), "body"), _EMPTY, lowered)


def _check_attributes(attribute: Callable[[str], object]) -> None:
    """Refuse an event whose required attributes are missing, empty or not strings, or whose
    attributes the ledger could not keep as they came: longer than its bounds
    (:data:`~imagegen.events.ATTRIBUTE_MAX_LENGTHS`), or holding a character no CloudEvents
    String may (:data:`~imagegen.events.TEXT_ATTRIBUTES`). A stage that took such an event
    would run it while the ledger refused it, or kept it as another event. Every attribute at
    fault is named.

    ``attribute`` gives an attribute's value by its name (None where it is absent).
    """
    found = {name: attribute(name) for name in _REQUIRED}
    missing = [name for name, value in found.items() if value is None]
    if missing:
        raise InvalidRequest(
            f"not a valid CloudEvent: missing {', '.join(missing)}",
            errors=[{"field": name, "message": "required"} for name in missing],
        )
    bad = [name for name, value in found.items() if not isinstance(value, str) or not value]
    if bad:
        must = "must be a non-empty string" if len(bad) == 1 else "must be non-empty strings"
        raise InvalidRequest(
            f"not a valid CloudEvent: {', '.join(bad)} {must}",
            errors=[{"field": name, "message": "must be a non-empty string"} for name in bad],
        )
    if found["specversion"] not in _SPECVERSIONS:
        raise _invalid("specversion", f"not one of {', '.join(_SPECVERSIONS)}")
    # (name, what the message says, what the field's entry says), every one found.
    problems = [
        (name, f"longer than {most} characters", f"at most {most} characters")
        for name, most in ATTRIBUTE_MAX_LENGTHS.items()
        if len(str(found.get(name, ""))) > most
    ]
    for name in TEXT_ATTRIBUTES:
        value = found[name] if name in found else attribute(name)
        # Not a string: a structured attribute of another type, refused by its own check.
        if isinstance(value, str) and (problem := text_problem(value)):
            problems.append((name, problem, problem))
    if problems:
        raise InvalidRequest(
            "not a valid CloudEvent: "
            + ", ".join(f"{name} {summary}" for name, summary, _ in problems),
            errors=[{"field": name, "message": message} for name, _, message in problems],
        )


_STRINGS = ("datacontenttype", "dataschema", "subject", "time")
"""The optional attributes of type String, URI-reference, URI or Timestamp: JSON strings in
structured mode (CloudEvents 1.0, section 3.1.1; JSON event format, section 2.2)."""


def _check_envelope(envelope: Mapping[str, Any]) -> None:
    """Structured mode's other attributes: of their types, and data that is JSON.

    The binary-mode header of ``datacontenttype`` is ``Content-Type``, refused unless JSON;
    the envelope's own says the same of ``data``. An extension attribute is a string, a
    number or a boolean: the JSON event format has no object or array attribute.
    """
    for name, value in envelope.items():
        if name in ("data", "data_base64"):
            continue
        # sdk-go refuses such a name whatever its value (v2/event/event_unmarshal.go: every
        # other member through EventContextV1.SetExtension, v2/event/extensions.go:
        # validateExtensionName), though it takes upper-case letters and lower-cases them; the
        # JSON format's member names are the attributes' own, and the spec's MUST stands.
        if not _ATTRIBUTE_NAME.fullmatch(name):
            raise _invalid(name, "an attribute name is lower-case letters (a-z) and digits")
        if value is None or name in _REQUIRED:
            continue
        if name in _STRINGS and not isinstance(value, str):
            raise _invalid(name, "must be a string")
        if not isinstance(value, str | int | float | bool):
            raise _invalid(
                name, f"an attribute is a string, a number or a boolean, not {_json_kind(value)}"
            )
    given = envelope.get("datacontenttype")
    if isinstance(given, str) and given.split(";")[0].strip().lower() not in (
        "",
        "application/json",
    ):
        raise UnsupportedMediaType(
            f"event data must be application/json, got {given[:60]!r}",
            errors=[{"field": "datacontenttype", "message": "must be application/json"}],
        )


def _binary_attributes(headers: Mapping[str, str]) -> dict[str, str]:
    """Binary mode's ``ce-*`` headers, their values decoded (:func:`_header_text`).

    A header name's case is no part of it (RFC 9110, section 5.1): ``headers`` are lower-cased,
    and the rest of the name must be an attribute's. sdk-go (Knative's broker) reads a name as
    much, lower-casing it, and refuses one with other characters (v2/protocol/http/message.go:
    ReadBinary; v2/event/extensions.go: validateExtensionName). gunicorn drops a header whose
    name has ``_`` before the function sees it (its ``header_map``, ``drop`` by default).

    Raises:
        InvalidRequest: naming the attribute whose name is none, or whose value is no UTF-8.
    """
    decoded = {}
    for key, value in headers.items():
        if not key.startswith("ce-"):
            continue
        name = key[3:]
        if not _ATTRIBUTE_NAME.fullmatch(name):
            raise _invalid(name, "an attribute name is lower-case letters (a-z) and digits")
        text = _utf8(value)
        if text is None:
            raise _invalid(name, "header bytes that are not UTF-8")
        try:
            decoded[key] = _header_text(text)
        except UnicodeDecodeError:
            raise _invalid(name, "percent-encoded bytes that are not UTF-8") from None
    return decoded


def _utf8(value: str) -> str | None:
    """A header value's bytes, as WSGI gives them (each a Latin-1 character, PEP 3333), read
    as UTF-8; None where they are not UTF-8.

    sdk-go writes and reads ``ce-*`` values as they are, never percent-encoded
    (v2/protocol/http/write_request.go: SetAttribute, SetExtension; message.go: ReadBinary;
    cloudevents/sdk-go#1331, cloudevents/spec#1397), and Go's net/http sends bytes from 0x80
    as they are: a source ``/café`` from Knative's broker arrives as its UTF-8 bytes.
    """
    try:
        return value.encode("latin-1").decode("utf-8")
    except UnicodeError:  # a character past U+00FF: no bytes a server gave
        return None


def _header_text(value: str) -> str:
    """A ``ce-*`` header's text as the HTTP binding has it decoded (section 3.1.3.2): unquoted
    if quoted (RFC 7230, section 3.2.6), then percent-decoded once as UTF-8; what senders must
    percent-encode is a space, ``"``, ``%`` and everything outside printable ASCII, so a
    character sent as it is stays itself. A ``%`` not followed by two hex digits is kept.

    Raises:
        UnicodeDecodeError: the percent-encoded bytes are not UTF-8.
    """
    if len(value) >= 2 and value[0] == value[-1] == '"':
        value = _QUOTED_PAIR.sub(r"\1", value[1:-1])
    if "%" in value:
        # unquote decodes the ASCII runs only: a non-ASCII character is kept as it is.
        value = unquote(value, errors="strict")
    return value


def _check_data_base64(envelope: Mapping[str, Any]) -> None:
    """Structured mode's ``data_base64``: alone, and Base64 (the SDK drops what is not)."""
    if "data_base64" not in envelope:
        return
    if "data" in envelope:
        raise _invalid("data_base64", "an event has data or data_base64, not both")
    value = envelope["data_base64"]
    try:
        if not isinstance(value, str):
            raise ValueError
        base64.b64decode(value, validate=True)
    except ValueError:  # binascii.Error is one
        raise _invalid("data_base64", "not Base64") from None


def _an_object(data: Any, field: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise _invalid(field, f"must be a JSON object, not {_json_kind(data)}")
    return data


def _json_kind(value: Any) -> str:
    kinds = {
        str: "a string",
        list: "an array",
        dict: "an object",
        bool: "a boolean",
        int: "a number",
    }
    return "null" if value is None else kinds.get(type(value), "a number")


def _invalid(field: str, message: str) -> InvalidRequest:
    return InvalidRequest(f"{field}: {message}", errors=[{"field": field, "message": message}])


def parse_leniently(headers: Mapping[str, str], body: bytes, *, truncated: bool) -> Message:
    """Whatever arrived, as an event if it looks like one; for a sink that must lose nothing.

    Attributes are taken as they come (every ``ce-*`` header, or the structured envelope; of
    an envelope that does not parse, cut at ``MAX_BODY_BYTES`` say, the members before its data:
    :func:`_leading_attributes`), a body that is not JSON is kept as it came (``raw``; ``data``
    is then its text, as far as it decodes), and so is one that gives a name twice in an
    object (``data`` then as parsed, the last value of each name), and ``truncated`` is
    recorded as an attribute. A
    ``ce-*`` value is decoded as :func:`parse` decodes it, where it can be: one whose
    percent-encoded bytes are no UTF-8 is kept as it came; one whose bytes are no UTF-8, each
    byte as its Latin-1 character (the bytes again, read back as Latin-1), its name then listed
    in the ``imagegenlatin1`` attribute.
    """
    lowered = _lowered(headers)
    data: Any = None
    raw: bytes | None = None
    if body:
        repeated: list[str] = []
        try:
            data = loads(body, repeated=repeated)
        except InvalidRequest:
            data, raw = body.decode("utf-8", "replace"), body
        if repeated:
            # A name given twice in an object: parsed, the last value is kept and the others
            # lost (RFC 8259, section 4, leaves which counts undefined). The bytes keep all.
            raw = body
    if _content_type(lowered) == "application/cloudevents+json" and isinstance(data, dict):
        envelope = data
        attributes = {
            k: _canonical(v)
            for k, v in envelope.items()
            if k not in ("data", "data_base64") and v is not None
        }
        data = envelope.get("data")
        if "data_base64" in envelope and data is None:
            data, decoded = _base64_data(envelope["data_base64"])
            raw = raw if raw is not None else decoded  # the whole body, where it is kept
    elif _content_type(lowered) == "application/cloudevents+json" and (
        recovered := _leading_attributes(raw) if raw is not None else {}
    ):
        # An envelope cut short (at MAX_BODY_BYTES) never parses whole: its attributes that
        # precede "data" still name the event, its day and the record it belongs in.
        attributes = recovered
    else:
        attributes, latin1 = {}, list[str]()
        for key, value in lowered.items():
            if not key.startswith("ce-"):
                continue
            text = _utf8(value)
            if text is None:  # kept as it came, and said so: the sink loses nothing
                attributes[key[3:]] = value
                latin1.append(key[3:])
                continue
            with contextlib.suppress(UnicodeDecodeError):
                text = _header_text(text)
            attributes[key[3:]] = text
        if latin1:
            attributes[_LATIN1_MARKER] = ",".join(latin1)
    if truncated:
        attributes["imagegentruncated"] = "true"
    return Message(data, MappingProxyType(attributes) if attributes else _EMPTY, lowered, raw)


_ENVELOPE_PREFIX = 64 * 1024
"""Bytes of an envelope that does not parse read for the attributes before its data."""


def _leading_attributes(body: bytes) -> dict[str, str]:
    """The top-level members of a structured envelope that precede ``data`` (or
    ``data_base64``), read one by one from the first :data:`_ENVELOPE_PREFIX` bytes of a body
    that does not parse whole; a string, number or boolean is kept as :func:`_canonical`
    writes it. Reading stops at the data, at an object or array (never parsed, so no nesting
    is ever followed), at anything that is not JSON, and at the end of the prefix."""
    text = body[:_ENVELOPE_PREFIX].decode("utf-8", "replace")
    decoder = json.JSONDecoder()
    found: dict[str, str] = {}
    at = _after_space(text, 0)
    if not text.startswith("{", at):
        return found
    at += 1
    while True:
        at = _after_space(text, at)
        if not text.startswith('"', at):
            break
        try:
            name, at = decoder.raw_decode(text, at)
        except ValueError:
            break
        at = _after_space(text, at)
        if not text.startswith(":", at):
            break
        at = _after_space(text, at + 1)
        if name in ("data", "data_base64") or text[at : at + 1] in ("{", "[", ""):
            break
        try:
            value, at = decoder.raw_decode(text, at)
        except ValueError:  # cut inside it, or not JSON
            break
        if value is not None and not (isinstance(value, float) and not math.isfinite(value)):
            found[name] = _canonical(value)
        at = _after_space(text, at)
        if not text.startswith(",", at):
            break
        at += 1
    return found


def _after_space(text: str, at: int) -> int:
    """The index of the first character from ``at`` on that is no JSON whitespace."""
    while text[at : at + 1] in (" ", "\t", "\n", "\r"):
        at += 1
    return at


def _canonical(value: Any) -> str:
    """An attribute's canonical string (CloudEvents 1.0, section 3.1.1): ``true``, not
    ``True``; what is no attribute type at all (an object, an array) as its JSON."""
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _base64_data(value: Any) -> tuple[Any, bytes | None]:
    """Structured ``data_base64`` for the sink: its bytes as JSON where they are, else as
    text with the bytes kept; the bytes kept too where the JSON gives a name twice in an
    object; what is not Base64 at all, as it came."""
    try:
        decoded = base64.b64decode(value, validate=True)
    except (TypeError, ValueError):
        return value, None
    repeated: list[str] = []
    try:
        data = loads(decoded, repeated=repeated)
    except InvalidRequest:
        return decoded.decode("utf-8", "replace"), decoded
    return data, decoded if repeated else None


# -- replies -------------------------------------------------------------------------------


def json_reply(body: Any, status: int, headers: Mapping[str, str] | None = None) -> Reply:
    return Reply(
        status,
        json.dumps(body, separators=(",", ":"), default=str).encode(),
        {"Content-Type": "application/json", **(headers or {})},
    )


DELIVERED_ERROR_BODY_MAX = 768
"""The most bytes of an error's body answered to a broker's delivery. Knative's dispatcher keeps
a failed delivery's body as the ``knativeerrordata`` extension, base64 in at most 1,024
characters, and encodes it into a buffer of that size: a longer body runs past the buffer
(knative/eventing pkg/kncloudevents/event_dispatcher.go, ``dispatchExecutionInfoTransformers``:
``base64.StdEncoding.Encode(encodedBuf, httpResponseBody)`` with ``encodedBuf`` cut to
``KnativeErrorDataExtensionMaxLength``), which panics the channel-based broker's dispatcher
and loses the event instead of dead-lettering it. 768 bytes encode to exactly 1,024."""


_FITTED_MESSAGE_CHARS = 240
"""What a delivered error's message keeps, before any field it names is left out."""


def is_delivery(header_names: Iterable[str], content_type: str | None) -> bool:
    """Whether a request is a CloudEvent as a broker delivers it (binary or structured mode)."""
    structured = (content_type or "").lower().startswith("application/cloudevents")
    return structured or any(name.lower() == "ce-specversion" for name in header_names)


_NOT_LISTED = re.compile(r"(\d+) more, not listed")
"""The message of the entry that ends a list of errors cut short where it was made
(:class:`imagegen.errors.ImageGenError`): how many fields it stands for."""


def _stands_for(entry: object) -> int:
    """How many offending fields a listed error entry stands for: one, or the count the entry
    ending a list cut short says."""
    if isinstance(entry, dict) and entry.get("field") == "…":
        said = _NOT_LISTED.fullmatch(str(entry.get("message", "")))
        if said is not None:
            return int(said.group(1))
    return 1


def fit_error_body(body: bytes, limit: int = DELIVERED_ERROR_BODY_MAX) -> bytes:
    """A JSON error body of at most ``limit`` bytes, still JSON naming what was wrong: its
    message and each field's message cut short first (they quote what was sent), then the
    fields named cut from the end (``errors_left_out`` says how many fields are not named,
    those an entry ``N more, not listed`` stood for among them), then the message cut
    further. Returned as it is when it fits or is no JSON object."""
    if len(body) <= limit:
        return body
    try:
        error = json.loads(body)
    except ValueError:
        return body[:limit]
    if not isinstance(error, dict):
        return body[:limit]

    def encoded(value: dict[str, Any]) -> bytes:
        return json.dumps(value, separators=(",", ":"), default=str).encode()

    def cut(value: object, chars: int) -> str:
        text = str(value)
        return text if len(text) <= chars else text[:chars] + "..."

    error["message"] = cut(error.get("message", ""), _FITTED_MESSAGE_CHARS)
    if isinstance(error.get("errors"), list):
        error["errors"] = [
            {**e, "message": cut(e.get("message", ""), 80)} if isinstance(e, dict) else e
            for e in error["errors"]
        ]
    errors, left_out = list(error.get("errors") or []), 0
    while errors and len(encoded(error)) > limit:
        left_out += _stands_for(errors.pop())
        error = {**error, "errors": errors, "errors_left_out": left_out}
    while len(encoded(error)) > limit and len(error["message"]) > 3:
        over = len(encoded(error)) - limit
        error = {
            **error,
            "message": cut(error["message"][:-3], max(0, len(error["message"]) - 3 - over)),
        }
    if len(encoded(error)) > limit:  # a code or other field no one should make this long
        error = {"error": cut(error.get("error"), 64), "retryable": error.get("retryable")}
    return encoded(error)


def event_reply(attributes: Mapping[str, str], data: BaseModel) -> Reply:
    """A 200 carrying the next event (binary mode)."""
    event = CloudEvent(dict(attributes), data.model_dump(mode="json"))
    if "time" not in attributes:
        del event["time"]  # the SDK's default, the clock's: a redelivery would differ in it
    headers, body = to_binary(event)
    for name, value in headers.items():
        if name.startswith("ce-"):
            headers[name] = header_value(value)
    return Reply(200, body, headers)


def error_reply(
    exc: ImageGenError,
    *,
    stage: str,
    message: Message | None,
    generation_id: str | None,
    carrier: dict[str, str] | None = None,
) -> Reply:
    """The answer to a failure: for an event that cannot succeed, a ``generation.failed`` event.

    A permanent failure of a delivered event is answered 200 with ``generation.failed``: the
    broker publishes a 2xx reply and nothing else, so the platform hears of it exactly once,
    and the delivery is not retried. Every other failure is a JSON error with its status: a
    retryable one (5xx, 429) is redelivered; a plain-HTTP caller reads which field was wrong.
    ``carrier`` is the trace context the event goes on in (the span that failed); by default,
    the message's own.
    """
    if message is not None and message.is_event and is_final(exc.status):
        # The event's time, none where it has none (or what failed is its time): every
        # delivery of one event is answered alike, never with the clock's time.
        failed_at = None
        with contextlib.suppress(InvalidRequest):
            failed_at = event_time(message.attributes)
        failed = GenerationFailed(
            generation_id=generation_id, stage=stage, error=ErrorInfo.of(exc), failed_at=failed_at
        )
        cause = failure_cause(
            message.attributes.get("source", ""), message.attributes.get("id", "")
        )
        attributes = reply_attributes(
            stage,
            GENERATION_FAILED,
            failed,
            generation_id,
            carrier or message.carrier(),
            cause=cause,
        )
        return event_reply(attributes, failed)
    return json_reply(exc.to_dict(), exc.status, error_headers(exc))


def error_headers(exc: ImageGenError) -> dict[str, str]:
    """The headers an error's JSON answer carries: when to retry, how to authenticate, which
    methods a path allows."""
    headers = {}
    if exc.retry_after is not None:
        # Up, never down: a caller back before the wait is over meets the same refusal.
        headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
    if challenge := getattr(exc, "challenge", None):  # a 401 or 403 (RFC 6750)
        headers["WWW-Authenticate"] = challenge
    if allowed := getattr(exc, "allowed", None):  # a 405 (RFC 9110, section 15.5.6)
        headers["Allow"] = ", ".join(allowed)
    return headers
