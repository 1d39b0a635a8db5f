"""Inputs that once answered 500, each kept as a case: a 4xx naming the field, or kept whole.

The stages answer each with a 400 (or, for a readable event, a ``generation.failed`` reply)
that names what was wrong; the dead-letter sink stores every one of them, bytes and headers
when nothing in it parses, and answers 202 with an empty body.
"""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import pytest

from imagegen.events import GENERATION_FAILED
from tests.functions.clients import InProcessFunction
from tests.fuzz.conftest import check
from tests.fuzz.inputs import STRUCTURED, VALID, Request, binary, plain, structured

DEEP = b"[" * 1000 + b"]" * 1000  # 2 KB, past the JSON parser's own recursion guard


def _valid(stage: str, **changes: object) -> bytes:
    return json.dumps({**VALID[stage], **changes}).encode()


def _metadata_300_deep(stage: str) -> bytes:
    deep = b'{"a":' * 300 + b"1" + b"}" * 300  # 1.8 KB: under the 4 KiB cap, past 8 levels
    return _valid(stage, metadata={}).replace(b'"metadata": {}', b'"metadata": ' + deep)


# (input, the fields a refusal may name)
CASES = {
    "deep JSON, binary": (lambda s: binary(s, DEEP), {"body"}),
    "deep JSON, plain": (lambda s: plain(DEEP), {"body"}),
    "deep JSON, structured": (lambda s: structured(s, DEEP), {"event"}),
    "structured, not UTF-8": (lambda s: Request(b"\xff", {"content-type": STRUCTURED}), {"event"}),
    "metadata 300 deep": (lambda s: binary(s, _metadata_300_deep(s)), {"metadata", "body"}),
    "metadata NaN": (
        lambda s: binary(s, _valid(s, metadata={"x": 1}).replace(b'"x": 1', b'"x": NaN')),
        {"body"},
    ),
    "specversion 2.0": (
        lambda s: binary(s, _valid(s), **{"ce-specversion": "2.0"}),
        {"specversion"},
    ),
    "generation_id 5": (lambda s: binary(s, b'{"generation_id": 5}'), {"generation_id"}),
    "structured, specversion 2.0": (
        lambda s: Request(
            structured(s, _valid(s)).body.replace(b'"1.0"', b'"2.0"'), {"content-type": STRUCTURED}
        ),
        {"specversion"},
    ),
}


# A request's time is read by the stage that starts generations (render and persist take
# theirs from the data): out of range, it is a generation.failed naming "time".
EVENT_TIMES = ["1969-12-31T23:59:59Z", "0001-01-01T00:00:00Z", "9999-12-31T23:59:59-23:59"]


def _fields(reply: dict) -> set[str]:
    error = reply["error"] if isinstance(reply["error"], dict) else reply
    return {e["field"] for e in error.get("errors", [])}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("stage", ["enhance", "render", "persist", "derive"])
def test_each_stage_refuses_it_naming_the_field(
    functions: dict[str, InProcessFunction], stage: str, case: str
) -> None:
    make, fields = CASES[case]
    request = make(stage)
    reply = functions[stage].post(headers=request.headers, content=request.body)
    check(stage, reply)
    if reply.status_code == 200:  # a readable event that can never succeed
        assert reply.headers["ce-type"] == GENERATION_FAILED
    else:
        assert reply.status_code == 400, reply.text
    named = _fields(reply.json())
    assert named & fields, f"{case}: {reply.text[:300]}"


@pytest.mark.parametrize("value", EVENT_TIMES)
def test_an_event_time_out_of_range_is_refused_naming_it(
    functions: dict[str, InProcessFunction], value: str
) -> None:
    request = binary("enhance", _valid("enhance"), **{"ce-time": value})
    reply = functions["enhance"].post(headers=request.headers, content=request.body)
    assert reply.status_code == 200 and reply.headers["ce-type"] == GENERATION_FAILED
    assert _fields(reply.json()) == {"time"}
    # The same value in the data: refused alike.
    data = _valid("enhance", requested_at=value)
    refused = functions["enhance"].post(json=json.loads(data))
    assert refused.status_code == 400 and _fields(refused.json()) == {"requested_at"}


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_sink_keeps_it_whole(
    functions: dict[str, InProcessFunction], fuzz_store: Path, case: str
) -> None:
    make, _ = CASES[case]
    request = make("deadletter")
    marker = f"known-{sorted(CASES).index(case)}"
    # The cases share event ids, and the sink keeps the first record of an event: start bare.
    shutil.rmtree(fuzz_store / "failures", ignore_errors=True)
    headers = {**request.headers, "x-case": marker}
    reply = functions["deadletter"].post(headers=headers, content=request.body)
    assert reply.status_code == 202 and reply.content == b"", reply.text
    records = [json.loads(p.read_text()) for p in fuzz_store.rglob("failures/**/*.json")]
    [record] = [r for r in records if r["headers"].get("x-case") == marker]
    if record["body_base64"] is not None:  # nothing parsed: the bytes as they came
        assert base64.b64decode(record["body_base64"]) == request.body
    else:
        sent = json.loads(request.body)
        structured_event = headers["content-type"] == STRUCTURED
        assert record["data"] == (sent["data"] if structured_event else sent)
        if structured_event:
            assert record["attributes"]["specversion"] == sent["specversion"]
    if "ce-specversion" in headers:
        assert record["attributes"]["specversion"] == headers["ce-specversion"]
    assert record["headers"]["content-type"] == headers["content-type"]
