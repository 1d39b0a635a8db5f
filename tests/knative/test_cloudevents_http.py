"""What a reply is, as the channel-based broker reads it with sdk-go v2.16.1.

``cehttp.NewMessage`` takes a message as structured only for a ``content-type`` that
``format.Lookup`` knows, as binary only for a ``ce-specversion`` that ``spec.Versions`` knows
(``ReadEncoding``); anything else is no event, which the filter passes on when its body is
empty and answers with a 502 otherwise (``filter_handler.go`` ``writeResponse``).
"""

from __future__ import annotations

import json

import pytest

from .cloudevents_http import Event, MalformedEvent, Message, decode

ENVELOPE = json.dumps({"specversion": "1.0", "id": "r1", "source": "/f", "type": "t.reply"})
BINARY = {"ce-id": "r", "ce-source": "/f", "ce-type": "t"}


@pytest.mark.parametrize(
    "content_type",
    [
        "application/cloudevents+json",
        "Application/CloudEvents+JSON",  # Lookup lower-cases it
        " application/cloudevents+json ; charset=utf-8",  # and drops what follows ";"
    ],
)
def test_a_structured_event_is_the_json_format_alone(content_type: str) -> None:
    found = decode(Message({"content-type": content_type}, ENVELOPE.encode()))
    assert found is not None and found["id"] == "r1"


@pytest.mark.parametrize(
    "content_type", ["application/cloudevents", "application/cloudevents+yaml"]
)
def test_a_cloudevents_type_of_no_known_format_is_no_event(content_type: str) -> None:
    assert decode(Message({"content-type": content_type}, ENVELOPE.encode())) is None


def test_a_batch_is_no_single_event() -> None:
    batch = Message(
        {"content-type": "application/cloudevents-batch+json"}, f"[{ENVELOPE}]".encode()
    )
    with pytest.raises(MalformedEvent, match="batch"):
        decode(batch)


def test_an_unknown_format_with_binary_headers_is_a_binary_event() -> None:
    headers = {"content-type": "application/cloudevents+xml", "ce-specversion": "1.0", **BINARY}
    found = decode(Message(headers, b"<x/>"))
    assert found == Event(
        {"specversion": "1.0", **{k[3:]: v for k, v in BINARY.items()}}
        | {"datacontenttype": "application/cloudevents+xml"},
        b"<x/>",
    )


def test_a_0_3_event_is_an_event() -> None:
    headers = {"content-type": "application/json", "ce-specversion": "0.3", **BINARY}
    found = decode(Message(headers, b"{}"))
    assert found is not None and found["specversion"] == "0.3"
    structured = json.dumps({"specversion": "0.3", "id": "r1", "source": "/f", "type": "t"})
    found = decode(Message({"content-type": "application/cloudevents+json"}, structured.encode()))
    assert found is not None and found["specversion"] == "0.3"


@pytest.mark.parametrize("body", [b"", b"{}"])
def test_an_unknown_specversion_header_is_no_event(body: bytes) -> None:
    assert decode(Message({"ce-specversion": "0.9", **BINARY}, body)) is None


def test_an_unknown_specversion_in_a_structured_event_is_malformed() -> None:
    structured = json.dumps({"specversion": "0.9", "id": "r1", "source": "/f", "type": "t"})
    with pytest.raises(MalformedEvent, match="specversion"):
        decode(Message({"content-type": "application/cloudevents+json"}, structured.encode()))


def test_a_known_specversion_still_needs_every_required_attribute() -> None:
    with pytest.raises(MalformedEvent, match="id, source, type"):
        decode(Message({"ce-specversion": "1.0"}, b""))
