"""The ledger reads events as every stage does: a 400 or 415 naming what is wrong, nothing
recorded; only the dead-letter sink takes whatever comes."""

from __future__ import annotations

import base64
import json

import pytest

from imagegen.ledger import open_ledger
from tests.functions.clients import InProcessFunction
from tests.ledger.chain import binary, chain


def recorded(ledger_url: str) -> list[str]:
    ledger = open_ledger(ledger_url)
    try:
        return [event.id for event in ledger.events()]
    finally:
        ledger.close()


@pytest.mark.parametrize(
    ("change", "status", "field"),
    [
        ({"ce-specversion": "2.0"}, 400, "specversion"),
        ({"ce-id": ""}, 400, "id"),
        ({"ce-type": "com.example.other"}, 400, "type"),
        ({"content-type": "text/plain"}, 415, "datacontenttype"),
    ],
)
def test_an_event_the_chain_would_refuse_is_refused(
    function: InProcessFunction, ledger_url: str, change: dict[str, str], status: int, field: str
) -> None:
    request = binary(chain("gen-in")["requested"])
    request["headers"].update(change)
    reply = function.post("/", **request)
    assert reply.status_code == status, reply.text
    assert field in {e["field"] for e in reply.json()["errors"]}
    assert recorded(ledger_url) == []


@pytest.mark.parametrize("body", [b"{oops", b"\xff\xfe", b'{"a": NaN}', b"[1, 2]"])
def test_data_that_is_not_a_json_object_names_the_body(
    function: InProcessFunction, ledger_url: str, body: bytes
) -> None:
    request = binary(chain("gen-body")["requested"])
    del request["json"]
    reply = function.post("/", headers=request["headers"], content=body)
    assert reply.status_code == 400, reply.text
    assert {e["field"] for e in reply.json()["errors"]} == {"body"}
    assert recorded(ledger_url) == []


def test_a_structured_event_with_data_base64_is_recorded(
    function: InProcessFunction, ledger_url: str
) -> None:
    event = chain("gen-b64")["requested"]
    envelope = {
        "specversion": "1.0",
        "id": event.id,
        "source": event.source,
        "type": event.type,
        "subject": event.subject,
        "datacontenttype": "application/json",
        "data_base64": base64.b64encode(json.dumps(event.data).encode()).decode(),
    }
    headers = {"content-type": "application/cloudevents+json"}
    reply = function.post("/", headers=headers, json=envelope)
    assert reply.status_code == 202, reply.text
    assert recorded(ledger_url) == [event.id]


def test_text_postgresql_cannot_hold_is_recorded_and_found_by_nothing(
    function: InProcessFunction, ledger_url: str
) -> None:
    """A NUL in a prompt (a valid request: enhance takes it) and a lone surrogate, which
    JSON's escapes let through: recorded on either backend, never a 500 at each redelivery.
    A lookup by such an id finds nothing, on either backend."""
    event = chain("gen-nul")["requested"]
    request = binary(event)
    body = json.dumps({**event.data, "prompt": "a\x00b"})
    reply = function.post("/", headers=request["headers"], content=body.encode())
    assert reply.status_code == 202, reply.text
    found = function.get("/generations/gen-nul")
    assert found.status_code == 200 and found.json()["original_prompt"] in ("a\x00b", "a\ufffdb")
    odd = chain("gen-surrogate")["requested"]
    body = json.dumps({**odd.data, "metadata": {"\udfff": "v"}})
    reply = function.post("/", headers=binary(odd)["headers"], content=body.encode())
    assert reply.status_code == 202, reply.text
    assert sorted(recorded(ledger_url)) == sorted([event.id, odd.id])
    for path in ("/generations/a%00b", "/generations?model=%00"):
        reply = function.get(path)
        assert reply.status_code in (200, 404), reply.text
        assert reply.status_code == 404 or reply.json()["items"] == []


def test_an_id_longer_than_the_ledger_keeps_is_a_400_naming_it(
    function: InProcessFunction, ledger_url: str
) -> None:
    request = binary(chain("gen-long")["requested"])
    request["headers"]["ce-id"] = "x" * 2000
    reply = function.post("/", **request)
    assert reply.status_code == 400, reply.text
    assert {e["field"] for e in reply.json()["errors"]} == {"id"}
    assert recorded(ledger_url) == []
