"""CloudEvents over HTTP as the brokers read and write them (binary and structured modes).

The brokers decide what a reply is with the CloudEvents SDKs: sdk-go ``binding`` in the
channel-based broker (``cehttp.NewMessage(...).ReadEncoding()``, then ``binding.ToEvent``),
sdk-java ``VertxMessageFactory.createReader(response).toEvent()`` in the Kafka broker. Both
look at the ``content-type`` first, for an event format, then at ``ce-specversion``, and refuse
an event that lacks a required attribute (``id``, ``source``, ``specversion``, ``type``:
CloudEvents 1.0 spec). :func:`decode` follows sdk-go v2.16.1 to the letter; sdk-java reads an
unknown ``ce-specversion`` as an error rather than as no event, which is not modelled.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = ["Event", "MalformedEvent", "Message", "decode", "encode_binary"]

REQUIRED = ("id", "source", "specversion", "type")
# sdk-go v2/binding/format/format.go: the only formats registered (init: JSON, JSONBatch).
_STRUCTURED = "application/cloudevents+json"
_BATCH = "application/cloudevents-batch+json"
# sdk-go v2/binding/spec/spec.go WithPrefix: the versions a ce-specversion header may name.
_SPEC_VERSIONS = ("0.3", "1.0")


class MalformedEvent(ValueError):
    """A message that claims to be a CloudEvent but is not a valid one."""


@dataclass(frozen=True)
class Message:
    """An HTTP request or response: lower-case headers and the body."""

    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())


@dataclass(frozen=True)
class Event:
    """A CloudEvent as a broker carries it: string attributes (extensions too) and data."""

    attributes: Mapping[str, str]
    data: bytes = b""

    def __getitem__(self, name: str) -> str:
        return self.attributes[name]

    def get(self, name: str) -> str | None:
        return self.attributes.get(name)

    def json(self) -> object:
        return json.loads(self.data) if self.data else None

    def with_attributes(self, **changes: str | None) -> Event:
        """A copy with attributes set (a value of None removes one)."""
        attributes = {**self.attributes, **changes}
        return Event({k: v for k, v in attributes.items() if v is not None}, self.data)


def encode_binary(event: Event) -> Message:
    """The binary-mode HTTP message of an event (``ce-`` headers, data as the body)."""
    headers = {f"ce-{k}": v for k, v in event.attributes.items() if k != "datacontenttype"}
    headers["content-type"] = event.get("datacontenttype") or "application/json"
    return Message(headers, event.data)


# What Go's time.Parse(time.RFC3339Nano, v) takes: an upper-case "T" and "Z" (the layout's
# literals), any fraction, seconds below 60 (Go has no leap second).
_GO_RFC3339 = re.compile(
    r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:(?P<second>\d{2})(\.\d+)?(Z|[+-]\d{2}:\d{2})", re.ASCII
)


def _check(attributes: Mapping[str, str]) -> None:
    missing = [name for name in REQUIRED if not attributes.get(name)]
    if missing:
        raise MalformedEvent(f"missing required attributes: {', '.join(missing)}")
    if attributes["specversion"] not in _SPEC_VERSIONS:
        raise MalformedEvent(f"unsupported specversion {attributes['specversion']!r}")
    # sdk-go reads "time" as a Timestamp (v2/types/value.go, ToTime/ParseTime:
    # time.Parse(time.RFC3339Nano, v)); binding.ToEvent fails on one it cannot read.
    if "time" in attributes:
        found = _GO_RFC3339.fullmatch(attributes["time"])
        if found is None or int(found["second"]) > 59:
            raise MalformedEvent(f"time {attributes['time']!r} is not RFC 3339 as Go reads it")


def decode(message: Message) -> Event | None:
    """The event a message carries; None when it is not an event at all.

    sdk-go v2.16.1 ``v2/protocol/http/message.go`` ``NewMessage`` and ``ReadEncoding``: the
    message is structured when ``format.Lookup`` knows its ``content-type`` (lower-cased, its
    parameters and surrounding spaces dropped, then an exact match: ``application/
    cloudevents+json`` or the batch type, which ``binding.ToEvent`` cannot read), else binary
    when ``ce-specversion`` names a version ``spec.Versions`` knows (0.3 or 1.0), else no event:
    ``application/cloudevents`` alone, ``+xml``, or ``ce-specversion: 0.9`` are none.

    Raises:
        MalformedEvent: The message is in binary or structured mode but is no valid event.
    """
    raw_type = message.header("content-type") or ""
    content_type = raw_type.split(";")[0].strip().lower()
    if content_type == _BATCH:
        # binding.ToEvent: jsonBatchFmt.Unmarshal, "not supported for batch events".
        raise MalformedEvent("a batch of events is no single event")
    if content_type == _STRUCTURED:
        try:
            envelope = json.loads(message.body)
        except ValueError as exc:
            raise MalformedEvent(f"structured event is not JSON: {exc}") from exc
        if not isinstance(envelope, dict):
            raise MalformedEvent("structured event is not a JSON object")
        attributes = {
            k: v if isinstance(v, str) else json.dumps(v)
            for k, v in envelope.items()
            if k not in {"data", "data_base64"}
        }
        _check(attributes)
        if "data_base64" in envelope:
            data = base64.b64decode(envelope["data_base64"])
        elif "data" in envelope:
            value = envelope["data"]
            data = value.encode() if isinstance(value, str) else json.dumps(value).encode()
        else:
            data = b""
        return Event(attributes, data)
    if message.header("ce-specversion") in _SPEC_VERSIONS:
        attributes = {k[3:]: v for k, v in message.headers.items() if k.startswith("ce-")}
        if raw_type:
            attributes["datacontenttype"] = raw_type
        _check(attributes)
        return Event(attributes, message.body)
    return None
