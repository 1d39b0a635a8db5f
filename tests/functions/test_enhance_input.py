"""What enhance takes from a request and from its own memos, over HTTP: a prompt by the prompt
rule, a ``requested_at`` by RFC 3339, an extension's kind named, a memo it cannot read a 503,
and a reply of Ollama's that holds no prompt answered even without the fallback."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from imagegen.events import GENERATION_FAILED, GENERATION_REQUESTED, PROMPT_ENHANCED
from tests.fakes.ollama_server import FakeOllama
from tests.functions.clients import InProcessFunction
from tests.functions.conftest import base_env
from tests.functions.servers import cloudevent_headers

STRUCTURED = {"content-type": "application/cloudevents+json"}
SENT_AT = "2026-01-02T03:04:05Z"
ASK = {"prompt": "a paper boat", "width": 256, "height": 256}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("store")


@pytest.fixture(scope="module")
def enhance(store: Path) -> Iterator[InProcessFunction]:
    with InProcessFunction("enhance", base_env(store)) as function:
        yield function


def send(function: InProcessFunction, data: Any, **attributes: str) -> httpx.Response:
    headers = cloudevent_headers(GENERATION_REQUESTED, **{"time": SENT_AT, **attributes})
    return function.post("/", headers=headers, content=json.dumps(data).encode())


def failed_fields(reply: httpx.Response) -> set[str]:
    assert reply.status_code == 200, reply.text
    assert reply.headers["ce-type"] == GENERATION_FAILED
    return {e["field"] for e in reply.json()["error"]["errors"]}


# 1. The prompt rule


@pytest.mark.parametrize(
    "prompt",
    ["a \x1b[31mred\x1b[0m fox", "a fox \u202eeulb", "a\x00fox", "a fox\x85", "a \u2066fox\u2069"],
)
def test_a_prompt_with_a_control_character_is_refused_naming_it(
    enhance: InProcessFunction, prompt: str
) -> None:
    plain = enhance.post("/", json={**ASK, "prompt": prompt})
    assert plain.status_code == 400 and "ce-type" not in plain.headers, plain.text
    assert {e["field"] for e in plain.json()["errors"]} == {"prompt"}
    assert failed_fields(send(enhance, {**ASK, "prompt": prompt})) == {"prompt"}


def test_an_empty_model_is_refused_naming_it_not_taken_as_the_default(
    enhance: InProcessFunction,
) -> None:
    # Absent or null is the default model; an empty name is a mistake, as "nope" is.
    plain = enhance.post("/", json={**ASK, "model": ""})
    assert plain.status_code == 400, plain.text
    assert {e["field"] for e in plain.json()["errors"]} == {"model"}
    assert enhance.post("/", json={**ASK, "model": None}).status_code == 200


def test_tabs_and_line_breaks_in_a_prompt_are_spaces(enhance: InProcessFunction) -> None:
    reply = enhance.post(
        "/", json={**ASK, "prompt": "a paper\tboat\r\non a pond\n", "enhance": False}
    )
    assert reply.status_code == 200, reply.text
    job = reply.json()
    assert job["original_prompt"] == "a paper boat  on a pond"
    assert not any(c in job["prompt"] for c in "\t\r\n")


# 2. requested_at, by the time attribute's rule


@pytest.mark.parametrize(
    "value", ["2026-01-01", "2026-01-01T00:00:00", "2026-01-01 00:00:00Z", "2026-01-01T00:00Z"]
)
def test_a_requested_at_that_is_no_rfc_3339_timestamp_is_refused(
    enhance: InProcessFunction, value: str
) -> None:
    plain = enhance.post("/", json={**ASK, "requested_at": value})
    assert plain.status_code == 400, plain.text
    assert {e["field"] for e in plain.json()["errors"]} == {"requested_at"}
    assert failed_fields(send(enhance, {**ASK, "requested_at": value})) == {"requested_at"}


@pytest.mark.parametrize(
    ("value", "taken"),
    [
        ("2016-12-31T23:59:60Z", "2016-12-31T23:59:59.999999Z"),
        ("2026-01-01T05:00:00+05:00", "2026-01-01T05:00:00+05:00"),
        ("2026-01-01t00:00:00.5z", "2026-01-01T00:00:00.500000Z"),
    ],
)
def test_an_rfc_3339_requested_at_is_taken(
    enhance: InProcessFunction, value: str, taken: str
) -> None:
    reply = send(enhance, {**ASK, "enhance": False, "requested_at": value})
    assert reply.headers["ce-type"] == PROMPT_ENHANCED, reply.text
    from imagegen.identity import parse_rfc3339

    assert parse_rfc3339(reply.json()["requested_at"]) == parse_rfc3339(taken)


def _ahead(minutes: int) -> str:
    return (datetime.now(UTC) + timedelta(minutes=minutes)).isoformat()


# Minutes ahead, made into a time when the test runs: a time in the test's id would differ
# between the processes that collect the suite.
@pytest.mark.parametrize("ahead", [10, "2999-12-31T23:59:59Z"])
def test_a_request_time_ahead_of_the_clock_is_refused_naming_it(
    enhance: InProcessFunction, ahead: int | str
) -> None:
    """It would name the storage day and head the history and the gallery for good."""
    value = _ahead(ahead) if isinstance(ahead, int) else ahead
    plain = enhance.post("/", json={**ASK, "requested_at": value})
    assert plain.status_code == 400 and "ce-type" not in plain.headers, plain.text
    assert {e["field"] for e in plain.json()["errors"]} == {"requested_at"}
    assert failed_fields(send(enhance, {**ASK, "requested_at": value})) == {"requested_at"}
    assert failed_fields(send(enhance, ASK, time=value)) == {"time"}


def test_a_request_time_a_little_ahead_of_the_clock_is_taken(enhance: InProcessFunction) -> None:
    # A caller's clock a few minutes fast: within imagegen.identity.MAX_AHEAD.
    value = _ahead(4)
    reply = send(enhance, {**ASK, "enhance": False}, time=value)
    assert reply.headers["ce-type"] == PROMPT_ENHANCED, reply.text
    assert datetime.fromisoformat(reply.json()["requested_at"]) == datetime.fromisoformat(value)


# 3. A structured event's extension of another kind


@pytest.mark.parametrize(("value", "kind"), [({"a": 1}, "an object"), (["a"], "an array")])
def test_an_extension_of_another_kind_is_named_by_its_kind(
    enhance: InProcessFunction, value: Any, kind: str
) -> None:
    event = {
        "specversion": "1.0",
        "type": GENERATION_REQUESTED,
        "source": "/tests",
        "id": "kind-1",
        "datacontenttype": "application/json",
        "data": {**ASK, "enhance": False},
        "myextension": value,
    }
    reply = enhance.post("/", headers=STRUCTURED, json=event)
    assert reply.status_code == 400, reply.text
    assert reply.json()["errors"] == [
        {
            "field": "myextension",
            "message": f"an attribute is a string, a number or a boolean, not {kind}",
        }
    ]


# 4. Memos


def kept(enhance: InProcessFunction, store: Path, generation_id: str) -> dict[str, Any]:
    reply = send(enhance, {**ASK, "enhance": False}, subject=generation_id)
    assert reply.headers["ce-type"] == PROMPT_ENHANCED, reply.text
    memo: dict[str, Any] = json.loads((store / "prompts" / f"{generation_id}.json").read_text())
    return memo


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda memo: json.dumps({"prompt": memo["prompt"]}),  # no request digest
        lambda memo: json.dumps({"request": memo["request"], "prompt": {}}),
        lambda memo: json.dumps({"request": 7, "prompt": memo["prompt"]}),
        lambda memo: json.dumps([memo]),
        lambda memo: json.dumps(
            {"request": memo["request"], "prompt": {**memo["prompt"], "width": "wide"}}
        ),
        lambda memo: json.dumps(memo)[:40],  # cut short
        lambda memo: "",
        lambda memo: "[" * 100_000,  # deeper than the JSON reader goes
        # Another generation's memo, copied under this one's key: its prompt is not this one's.
        lambda memo: json.dumps(
            {**memo, "prompt": {**memo["prompt"], "generation_id": "memo-elsewhere"}}
        ),
    ],
    ids=[
        "no-request",
        "empty-prompt",
        "digest-no-string",
        "no-object",
        "invalid-prompt",
        "cut-short",
        "empty",
        "too-deep",
        "another-generation-s",
    ],
)
def test_a_memo_that_is_no_memo_is_a_503_with_retry_after_naming_its_key(
    enhance: InProcessFunction, store: Path, corrupt: Any, request: pytest.FixtureRequest
) -> None:
    gid = f"memo-{request.node.callspec.id}"
    memo = kept(enhance, store, gid)
    (store / "prompts" / f"{gid}.json").write_text(corrupt(memo))
    reply = send(enhance, {**ASK, "enhance": False}, subject=gid)
    assert reply.status_code == 503, reply.text
    assert reply.headers["retry-after"] == "60"  # an operator's repair, not an outage's
    # Not an outage: the message says which object to repair or remove.
    message = reply.json()["message"]
    assert f"the prompt memo 'prompts/{gid}.json' is corrupt (" in message, message
    # Removed, the next delivery enhances again and keeps a new memo.
    (store / "prompts" / f"{gid}.json").unlink()
    again = send(enhance, {**ASK, "enhance": False}, subject=gid)
    assert again.headers["ce-type"] == PROMPT_ENHANCED, again.text
    assert again.json()["generation_id"] == gid


def test_a_memo_a_newer_release_wrote_is_read_and_its_prompt_kept(
    enhance: InProcessFunction, store: Path
) -> None:
    memo = kept(enhance, store, "memo-newer")
    newer = {
        **memo,
        "prompt": {
            **memo["prompt"],
            "prompt": "the first writer's prompt",
            "negative_prompt": "blurry",
            "contributions": [{"plugin": "x", "text": "y", "weight": 2}],
        },
        "written_by": "imagegen 9",
    }
    (store / "prompts" / "memo-newer.json").write_text(json.dumps(newer))
    reply = send(enhance, {**ASK, "enhance": False}, subject="memo-newer")
    assert reply.headers["ce-type"] == PROMPT_ENHANCED, reply.text
    job = reply.json()
    assert job["prompt"] == "the first writer's prompt" and "negative_prompt" not in job
    assert job["contributions"] == [{"plugin": "x", "text": "y", "data": {}, "loras": []}]
    # The same id for other parameters is still told apart.
    other = send(enhance, {**ASK, "enhance": False, "width": 512}, subject="memo-newer")
    assert failed_fields(other) == {"generation_id"}


# 5. A reply that holds no prompt, without the fallback


def test_a_refusal_without_the_fallback_is_answered_with_the_template(
    tmp_path: Path,
) -> None:
    """IMAGEGEN_ENHANCE_FALLBACK=false makes Ollama's absence a 503; a refusal is Ollama's
    answer, which every redelivery (the same seeds) would get again: the template answers."""
    with FakeOllama() as fake:
        fake.reply_with({"prompt": "I'm sorry, but I can't help with that request."})
        env = {
            **base_env(tmp_path),
            "IMAGEGEN_OLLAMA_HOST": fake.url,
            "IMAGEGEN_OLLAMA_RETRIES": "1",
            "IMAGEGEN_ENHANCE_FALLBACK": "false",
        }
        with InProcessFunction("enhance", env) as function:
            reply = send(function, ASK, subject="refused")
            assert reply.status_code == 200, reply.text
            assert reply.headers["ce-type"] == PROMPT_ENHANCED
            job = reply.json()
            assert (job["enhancer"], job["fallback"]) == ("template", True)
            assert job["prompt"].startswith("a paper boat")
            assert len(fake.chat_requests) == 2  # retried once with the next seed
            fake.stop()  # down, now: that is still a 503
            down = send(function, ASK, subject="down")
            assert down.status_code == 503 and "retry-after" in down.headers
