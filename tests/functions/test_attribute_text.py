"""What a CloudEvents String must not hold, refused in an event's attributes by every stage alike.

CloudEvents 1.0.2 (cloudevents/spec.md, "Type System": String) rules out the control characters
U+0000-U+001F and U+007F-U+009F, surrogates not in a pair and Unicode's noncharacters. The
ledger keeps an event under its ``source`` and ``id``, and its databases can hold neither a
NUL nor a lone surrogate: a stage that took such an event ran the generation while the ledger
refused it (a lone surrogate, in pydantic's words), or kept it as another event (a NUL as
U+FFFD, then the event whose id has U+FFFD there dropped as its redelivery), so the request's
webhook was lost either way. Every stage refuses one with a 400 naming the attribute, in
binary and structured mode alike; the dead-letter sink keeps it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from imagegen.events import (
    GENERATION_REQUESTED,
    IMAGE_RENDERED,
    PROMPT_ENHANCED,
    text_problem,
)
from tests.functions.clients import InProcessFunction
from tests.functions.conftest import base_env

STRUCTURED = {"content-type": "application/cloudevents+json"}
REQUEST = {"prompt": "a lighthouse", "width": 256, "height": 256, "enhance": False}
CONSUMES = {
    "enhance": GENERATION_REQUESTED,
    "render": PROMPT_ENHANCED,
    "persist": IMAGE_RENDERED,
    "ledger": GENERATION_REQUESTED,
}
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("store")


@pytest.fixture(scope="module")
def functions(store: Path) -> Iterator[dict[str, InProcessFunction]]:
    env = {**base_env(store), "IMAGEGEN_LEDGER_URL": str(store / "ledger.db")}
    started = {stage: InProcessFunction(stage, env) for stage in (*CONSUMES, "deadletter")}
    yield started
    for function in started.values():
        function.close()


def structured(
    function: InProcessFunction, attributes: dict[str, Any], data: Any
) -> httpx.Response:
    """POST one structured-mode event, its JSON escaped to ASCII as ``json.dumps`` writes it: a
    lone surrogate travels as JSON's ``\\ud800`` escape, a NUL as ``\\u0000``."""
    event = {"specversion": "1.0", "type": GENERATION_REQUESTED, "source": "/tests"}
    body = json.dumps({**event, **attributes, "data": data}).encode()
    return function.post(headers=STRUCTURED, content=body)


def binary(function: InProcessFunction, attributes: dict[str, str], data: Any) -> httpx.Response:
    """POST one binary-mode event, its header values percent-encoded (HTTP binding, section
    3.1.3.2): ``%00`` is a NUL once decoded."""
    event = {"specversion": "1.0", "type": GENERATION_REQUESTED, "source": "/tests"}
    headers = {f"ce-{k}": quote(v, safe="/:") for k, v in {**event, **attributes}.items()}
    return function.post(headers={**headers, "content-type": "application/json"}, json=data)


def refused_naming(reply: httpx.Response) -> dict[str, str]:
    """The fields a 400 names, each with its message; never an event in reply."""
    assert reply.status_code == 400, reply.text[:300]
    assert "ce-type" not in reply.headers
    error = reply.json()
    assert error["message"].startswith("not a valid CloudEvent: "), error
    return {e["field"]: e["message"] for e in error["errors"]}


@pytest.mark.parametrize(("odd", "named"), [("\ud800", "U+D800"), ("\x00", "U+0000")])
@pytest.mark.parametrize("attribute", ["id", "source"])
@pytest.mark.parametrize("stage", sorted(CONSUMES))
def test_a_lone_surrogate_or_a_nul_in_id_or_source_is_refused_naming_it(
    functions: dict[str, InProcessFunction], stage: str, attribute: str, odd: str, named: str
) -> None:
    """enhance ran such an event (200, its ``prompt.enhanced``) while the ledger refused it or
    kept it as another: every stage now answers 400 naming the attribute and the character."""
    attributes = {"type": CONSUMES[stage], "id": "text-1", "source": "/tests"}
    attributes[attribute] += odd
    fields = refused_naming(structured(functions[stage], attributes, REQUEST))
    assert set(fields) == {attribute}
    assert named in fields[attribute] and "CloudEvents String" in fields[attribute]
    if odd == "\x00":  # binary mode's headers carry no lone surrogate: its bytes are no UTF-8
        assert set(refused_naming(binary(functions[stage], attributes, REQUEST))) == {attribute}


def test_the_ledger_records_nothing_of_a_refused_event_and_no_event_collides_with_it(
    functions: dict[str, InProcessFunction],
) -> None:
    """``c-\\u0000`` was kept as ``c-\\ufffd``, and the event ``c-\\ufffd`` of the same source
    then answered 202 as its redelivery and never recorded: its request, and its webhook, lost."""
    ledger = functions["ledger"]
    for odd, generation in (("\x00", "text-nul"), ("\ud800", "text-sur")):
        data = {**REQUEST, "generation_id": generation, "webhook": "https://hooks.example.com/a"}
        assert set(refused_naming(structured(ledger, {"id": f"c-{odd}"}, data))) == {"id"}
        assert ledger.get(f"/generations/{generation}").status_code == 404
    data = {**REQUEST, "generation_id": "text-fffd", "webhook": "https://hooks.example.com/b"}
    recorded = structured(ledger, {"id": "c-\ufffd"}, data)
    assert recorded.status_code == 202, recorded.text
    detail = ledger.get("/generations/text-fffd")
    assert detail.status_code == 200, detail.text
    assert [e["id"] for e in detail.json()["timeline"]] == ["c-\ufffd"]


@pytest.mark.parametrize("attribute", ["type", "subject"])
@pytest.mark.parametrize(
    "odd", ["\n", "\x1f", "\x7f", "\x85", "\ufdd0", "\uffff", "\U0010fffe", "\udfff"]
)
def test_every_string_attribute_a_stage_reads_is_held_to_the_rule(
    functions: dict[str, InProcessFunction], attribute: str, odd: str
) -> None:
    """C0 and C1 control characters, noncharacters of the first and last planes, a lone low
    surrogate: each named, wherever it is in the attribute."""
    good = {"type": GENERATION_REQUESTED, "subject": "text-ok", "traceparent": TRACEPARENT}
    value = {**good, "tracestate": "k=v"}.get(attribute, "")
    attributes = {**good, "id": f"rule-{attribute}-{ord(odd)}", attribute: value + odd}
    fields = refused_naming(structured(functions["enhance"], attributes, REQUEST))
    assert set(fields) == {attribute}
    assert f"U+{ord(odd):04X} at {len(value)}" in fields[attribute]


@pytest.mark.parametrize(
    ("attribute", "value"),
    [
        ("traceparent", TRACEPARENT + "\n"),
        ("traceparent", TRACEPARENT[:-2] + "\x00\x01"),
        ("tracestate", "a=1,\tb=2"),  # W3C's optional whitespace around a list member
        ("tracestate", "k=\uffff"),
    ],
)
def test_trace_context_that_cannot_be_read_is_ignored_not_refused(
    functions: dict[str, InProcessFunction], attribute: str, value: str
) -> None:
    """W3C Trace Context (sections 3.2.2, 3.3): a receiver ignores a ``traceparent`` or
    ``tracestate`` it cannot parse, and a broker's 400 would lose the generation over it."""
    attributes = {"id": f"trace-{attribute}-{len(value)}", attribute: value}
    reply = structured(functions["enhance"], attributes, REQUEST)
    assert reply.status_code == 200, reply.text[:300]
    assert reply.headers["ce-type"] == PROMPT_ENHANCED
    # In binary mode too, its header percent-encoded (``%00``, ``%09``).
    sent = binary(functions["enhance"], {**attributes, "id": attributes["id"] + "-b"}, REQUEST)
    assert sent.status_code == 200, sent.text[:300]
    assert sent.headers["ce-type"] == PROMPT_ENHANCED, sent.text[:300]


def test_every_attribute_at_fault_is_named_with_every_bound(
    functions: dict[str, InProcessFunction],
) -> None:
    attributes = {"id": "a\x00", "source": "/s\ud800", "subject": "x\x1b", "type": "t" * 257}
    fields = refused_naming(structured(functions["ledger"], attributes, REQUEST))
    assert set(fields) == {"id", "source", "subject", "type"}
    assert fields["type"] == "at most 256 characters"


@pytest.mark.parametrize(
    "value",
    ["\U0001f600", "\ufffd", "caf\u00e9", "\u00a0", "\ufdcf\ufdf0", "\ufffd\U0001fffd", "a b"],
)
def test_what_a_string_may_hold_is_taken(
    functions: dict[str, InProcessFunction], value: str
) -> None:
    """A surrogate pair (JSON's ``\\ud83d\\ude00``, one character), U+FFFD, the characters
    just outside the noncharacters' ranges: taken at enhance, recorded by the ledger."""
    attributes = {"id": f"ok-{value}", "source": f"/tests/{value}"}
    enhanced = structured(functions["enhance"], attributes, REQUEST)
    assert enhanced.status_code == 200, enhanced.text[:300]
    assert enhanced.headers["ce-type"] == PROMPT_ENHANCED, enhanced.text[:300]
    assert structured(functions["ledger"], attributes, REQUEST).status_code == 202
    assert text_problem(value) is None


def test_the_dead_letter_sink_keeps_an_event_every_stage_refused(
    functions: dict[str, InProcessFunction], store: Path
) -> None:
    """What the stages refuse is dead-lettered: the sink records it, its attributes as they
    came, in either mode, and answers 202."""
    deadletter = functions["deadletter"]
    sent = [
        structured(deadletter, {"id": "dl-\ud800", "source": "/dl\x00"}, REQUEST),
        structured(deadletter, {"id": "dl-\x00", "subject": "dl\x85"}, REQUEST),
        binary(deadletter, {"id": "dl-bin-\x00", "source": "/dl\x01"}, REQUEST),
    ]
    assert [reply.status_code for reply in sent] == [202, 202, 202], [r.text for r in sent]
    records = [json.loads(path.read_text()) for path in store.rglob("failures/**/*.json")]
    kept = {record["event_id"]: record for record in records}
    assert {"dl-\ud800", "dl-\x00", "dl-bin-\x00"} <= set(kept)
    assert kept["dl-\ud800"]["source"] == "/dl\x00"
    assert kept["dl-\x00"]["subject"] == "dl\x85"
    assert kept["dl-bin-\x00"]["source"] == "/dl\x01"
    assert kept["dl-bin-\x00"]["data"] == REQUEST
