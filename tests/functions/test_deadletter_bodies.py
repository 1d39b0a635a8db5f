"""What the dead-letter sink keeps of a body too large or not JSON: the bytes once, and of a
structured envelope cut at 1 MiB, the attributes that name the event."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest

from functions._binding import MAX_BODY_BYTES
from imagegen.events import GENERATION_REQUESTED
from imagegen.identity import derive_generation_id
from imagegen.stages.deadletter import TEXT_PREVIEW
from tests.functions.clients import InProcessFunction
from tests.functions.conftest import base_env
from tests.functions.servers import cloudevent_headers

STRUCTURED = {"content-type": "application/cloudevents+json"}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bodies")


@pytest.fixture(scope="module")
def sink(store: Path) -> InProcessFunction:
    return InProcessFunction("deadletter", base_env(store))


def _record(store: Path, event_id: str) -> tuple[Path, dict[str, Any]]:
    found = [(p, json.loads(p.read_text())) for p in store.rglob("failures/**/*.json")]
    [(path, record)] = [(p, r) for p, r in found if r["event_id"] == event_id]
    return path, record


def test_a_binary_body_is_stored_once_not_again_as_its_text(
    sink: InProcessFunction, store: Path
) -> None:
    # No UTF-8 at all: each byte was a U+FFFD in the text, six bytes of JSON ("\ufffd").
    body = bytes(0x80 + i % 128 for i in range(MAX_BODY_BYTES))
    headers = {
        **cloudevent_headers(GENERATION_REQUESTED, event_id="binary-1MiB"),
        "content-type": "application/octet-stream",
    }
    assert sink.post(headers=headers, content=body).status_code == 202
    path, record = _record(store, "binary-1MiB")
    assert base64.b64decode(record["body_base64"]) == body
    assert record["data"] == body.decode("utf-8", "replace")[:TEXT_PREVIEW]
    encoded = len(base64.b64encode(body))
    assert path.stat().st_size < encoded + 16 * 1024, path.stat().st_size


def test_a_short_body_that_is_not_json_is_kept_whole_as_text_too(
    sink: InProcessFunction, store: Path
) -> None:
    headers = {
        **cloudevent_headers(GENERATION_REQUESTED, event_id="not-json"),
        "content-type": "text/plain",
    }
    assert sink.post(headers=headers, content=b"hello, not json").status_code == 202
    _, record = _record(store, "not-json")
    assert record["data"] == "hello, not json"
    assert base64.b64decode(record["body_base64"]) == b"hello, not json"


def test_a_structured_event_cut_at_1_mib_keeps_the_attributes_before_its_data(
    sink: InProcessFunction, store: Path
) -> None:
    envelope = {
        "specversion": "1.0",
        "type": GENERATION_REQUESTED,
        "source": "/tests/large",
        "id": "structured-2MiB",
        "time": "2026-11-24T10:00:00Z",
        "subject": "g-large",
        "knativeerrorcode": 500,
        "retried": True,
        "data": {"prompt": "x" * (2 * MAX_BODY_BYTES)},
    }
    body = json.dumps(envelope).encode()
    assert sink.post(headers=STRUCTURED, content=body).status_code == 202
    path, record = _record(store, "structured-2MiB")
    # Dated and named by the event, as a whole envelope would be: found by the runbook.
    name = derive_generation_id("/tests/large", "structured-2MiB")
    assert path.relative_to(store).as_posix() == f"failures/2026/11/24/{name}.json"
    assert (record["event_type"], record["source"], record["subject"]) == (
        GENERATION_REQUESTED,
        "/tests/large",
        "g-large",
    )
    assert record["attributes"]["knativeerrorcode"] == "500"
    assert record["attributes"]["retried"] == "true"
    assert record["attributes"]["imagegentruncated"] == "true"
    assert "data" not in record["attributes"]
    assert base64.b64decode(record["body_base64"]) == body[:MAX_BODY_BYTES]


@pytest.mark.parametrize(
    ("body", "attributes"),
    [
        # Cut inside a value: the members before it are kept.
        (b'{"id": "cut-1", "source": "/t", "type": "t", "subject": "abc', {"id", "source", "type"}),
        # An object before the data is never parsed (no nesting followed): reading stops.
        (b'{"id": "cut-2", "ext": {"a": ' + b"[" * 100_000, {"id"}),
        # Not an envelope at all.
        (b"[1, 2, ", set()),
    ],
    ids=["cut-in-a-value", "nested", "array"],
)
def test_an_envelope_that_does_not_parse_keeps_what_precedes_the_cut(
    body: bytes, attributes: set[str]
) -> None:
    from functions._binding import parse_leniently

    message = parse_leniently(STRUCTURED, body, truncated=False)
    assert set(message.attributes) == attributes
    assert message.raw == body


@pytest.mark.parametrize(
    ("headers", "body", "event_id"),
    [
        # Plain JSON: no attributes, the record named by the body's digest.
        (
            {"content-type": "application/json"},
            b'{"generation_id":"first","generation_id":"second"}',
            None,
        ),
        # Binary mode: a name given twice in an object of the data, however deep.
        (
            cloudevent_headers(GENERATION_REQUESTED, event_id="repeated-binary"),
            b'{"generation_id": "g-1", "metadata": {"team": "a", "team": "b"}}',
            "repeated-binary",
        ),
        # Structured mode: in the envelope itself, and in data_base64's JSON.
        (
            STRUCTURED,
            b'{"specversion": "1.0", "type": "t", "source": "/t", "id": "repeated-envelope",'
            b' "subject": "a", "subject": "b", "data": {"generation_id": "g-2"}}',
            "repeated-envelope",
        ),
        (
            STRUCTURED,
            json.dumps(
                {
                    "specversion": "1.0",
                    "type": "t",
                    "source": "/t",
                    "id": "repeated-base64",
                    "data_base64": base64.b64encode(b'{"a": 1, "a": 2}').decode(),
                }
            ).encode(),
            "repeated-base64",
        ),
    ],
    ids=["plain", "binary", "envelope", "data_base64"],
)
def test_a_body_that_names_a_member_twice_is_kept_byte_for_byte(
    sink: InProcessFunction, store: Path, headers: dict[str, str], body: bytes, event_id: str | None
) -> None:
    """RFC 8259, section 4: names within an object SHOULD be unique, and what a parser makes
    of a name given twice is undefined. Parsed, the last is kept: the bytes keep the first."""
    assert sink.post(headers=headers, content=body).status_code == 202
    if event_id is None:
        found = [json.loads(p.read_text()) for p in store.rglob("failures/**/*.json")]
        [record] = [
            r for r in found if r["body_base64"] and base64.b64decode(r["body_base64"]) == body
        ]
        assert record["data"] == {"generation_id": "second"}
        return
    _, record = _record(store, event_id)
    kept = base64.b64decode(record["body_base64"])
    if event_id == "repeated-base64":  # as a body that is not JSON: its data's bytes
        assert kept == b'{"a": 1, "a": 2}' and record["data"] == {"a": 2}
    else:
        assert kept == body
        assert record["data"]["generation_id"] in ("g-1", "g-2")
