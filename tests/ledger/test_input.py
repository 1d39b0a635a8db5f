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
    """A NUL in a request's metadata (a valid request) or in its prompt (one enhance refuses,
    which is part of the generation's history all the same), and a lone surrogate, which
    JSON's escapes let through: recorded on either backend, as U+FFFD where PostgreSQL must,
    never a 500 at each redelivery. A lookup by such an id finds nothing, on either backend."""
    event = chain("gen-nul")["requested"]
    body = json.dumps({**event.data, "metadata": {"note": "a\x00b"}})
    reply = function.post("/", headers=binary(event)["headers"], content=body.encode())
    assert reply.status_code == 202, reply.text
    found = function.get("/generations/gen-nul")
    assert found.status_code == 200 and found.json()["original_prompt"] == event.data["prompt"]
    refused = chain("gen-nul-prompt")["requested"]
    body = json.dumps({**refused.data, "prompt": "a\x00b"})
    reply = function.post("/", headers=binary(refused)["headers"], content=body.encode())
    assert reply.status_code == 202, reply.text
    found = function.get("/generations/gen-nul-prompt")
    assert found.status_code == 200 and found.json()["original_prompt"] is None
    odd = chain("gen-surrogate")["requested"]
    body = json.dumps({**odd.data, "metadata": {"\udfff": "v"}})
    reply = function.post("/", headers=binary(odd)["headers"], content=body.encode())
    assert reply.status_code == 202, reply.text
    assert sorted(recorded(ledger_url)) == sorted([event.id, refused.id, odd.id])
    ledger = open_ledger(ledger_url)
    try:
        # As PostgreSQL must store them, so SQLite stores them too: both answer alike.
        stored = {each.id: each.data for each in ledger.events()}
    finally:
        ledger.close()
    assert stored[event.id]["metadata"] == {"note": "a\ufffdb"}
    assert stored[refused.id]["prompt"] == "a\ufffdb"
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


def test_a_lone_surrogate_in_any_text_the_ledger_stores_is_recorded_as_u_fffd(
    function: InProcessFunction, ledger_url: str
) -> None:
    """A lone surrogate (JSON's ``\\udfff`` escape) in data the row keeps (image.persisted's
    prompt, URL, location; image.rendered's key) is recorded as U+FFFD on both backends, as
    PostgreSQL must: never a 500 at each redelivery. In an attribute (the subject), where no
    CloudEvents String may hold one, it is a 400 naming it, as at every stage."""
    events = chain("gen-odd")
    request = binary(events["requested"])
    request["headers"]["ce-subject"] = "gen-odd"
    reply = function.post("/", **request)
    assert reply.status_code == 202, reply.text
    odd = "\udfff"
    changes = {
        "rendered": {"key": f"2026/06/01/gen-odd{odd}.png", "location": f"s3://b/{odd}"},
        "persisted": {"prompt": f"fox {odd}", "url": f"https://x.example/{odd}", "model": odd},
    }
    for name, change in changes.items():
        event = binary(events[name])
        body = json.dumps({**events[name].data, **change})
        for _ in range(2):  # and its redelivery
            reply = function.post("/", headers=event["headers"], content=body.encode())
            assert reply.status_code == 202, reply.text
    envelope = {
        "specversion": "1.0",
        "id": "req-odd",
        "source": "/caller",
        "type": events["requested"].type,
        "subject": f"gen-odd2{odd}",
        "datacontenttype": "application/json",
        "data": {"prompt": "a fox"},
    }
    headers = {"content-type": "application/cloudevents+json"}
    reply = function.post("/", headers=headers, content=json.dumps(envelope).encode())
    assert reply.status_code == 400, reply.text
    assert {e["field"] for e in reply.json()["errors"]} == {"subject"}
    found = function.get("/generations/gen-odd").json()
    assert (found["prompt"], found["url"], found["model"]) == (
        "fox \ufffd",
        "https://x.example/\ufffd",
        "\ufffd",
    )
    assert function.get("/generations").status_code == 200
    assert "req-odd" not in recorded(ledger_url)


@pytest.mark.parametrize("odd", ["\x00", "\ud800"])
@pytest.mark.parametrize("attribute", ["id", "source"])
def test_an_id_or_source_holding_a_nul_or_a_lone_surrogate_is_refused_naming_it(
    function: InProcessFunction, ledger_url: str, attribute: str, odd: str
) -> None:
    """Neither database holds a NUL or a lone surrogate, which U+FFFD stood for: a lone
    surrogate was refused in pydantic's words ("unable to parse raw data as a unicode
    string"), and an id with a NUL was recorded as the id with U+FFFD there, so the event that
    has that id was then taken for its redelivery and never recorded, its webhook lost. Refused
    as every stage refuses it, naming the attribute; the other event is recorded."""
    event = chain("gen-key")["requested"]
    envelope = {
        "specversion": "1.0",
        "id": "key-1",
        "source": "/caller",
        "type": event.type,
        "datacontenttype": "application/json",
        "data": event.data,
    }
    headers = {"content-type": "application/cloudevents+json"}
    refused = {**envelope, attribute: envelope[attribute] + odd}
    reply = function.post("/", headers=headers, content=json.dumps(refused).encode())
    assert reply.status_code == 400, reply.text
    error = reply.json()
    assert error["message"].startswith("not a valid CloudEvent: ")
    assert [e["field"] for e in error["errors"]] == [attribute]
    assert f"U+{ord(odd):04X}" in error["errors"][0]["message"]
    assert "unicode" not in reply.text
    assert recorded(ledger_url) == []
    kept = {**envelope, attribute: envelope[attribute] + "\ufffd"}
    reply = function.post("/", headers=headers, content=json.dumps(kept).encode())
    assert reply.status_code == 202, reply.text
    assert recorded(ledger_url) == [kept["id"]]
    assert function.get("/generations/gen-key").status_code == 200


def test_an_id_and_source_of_1024_characters_each_are_recorded_whatever_their_bytes(
    function: InProcessFunction, ledger_url: str
) -> None:
    """1,024 characters is what the ledger takes of an id and a source; in UTF-8 those of CJK
    are 3 KiB, over PostgreSQL's B-tree row (2,704 bytes), which once made such an event a 503
    at every redelivery. Recorded once on both backends; the redelivery is a duplicate."""
    event = chain("gen-cjk")["requested"]
    wide = "".join(chr(0x4E00 + n) for n in range(1024))
    envelope = {
        "specversion": "1.0",
        "id": wide,
        "source": "/" + wide[1:],
        "type": event.type,
        "datacontenttype": "application/json",
        "data": event.data,
    }
    headers = {"content-type": "application/cloudevents+json"}
    for _ in range(2):
        reply = function.post("/", headers=headers, json=envelope)
        assert reply.status_code == 202, reply.text
    assert recorded(ledger_url) == [wide]
    other = {**envelope, "id": wide[:-1] + "\u9fff"}  # one character apart: another event
    assert function.post("/", headers=headers, json=other).status_code == 202
    assert sorted(recorded(ledger_url)) == sorted([wide, other["id"]])
