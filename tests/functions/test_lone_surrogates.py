"""JSON's ``\\ud800`` escape through the functions: valid JSON that no UTF-8 can hold.

A stage refuses it naming the field, wherever it is: in the data (a 400, or a
``generation.failed`` reply to an event), or in an attribute such as ``source`` or ``id``,
which no CloudEvents String may hold it in (a 400 before the data is read). The dead-letter
sink keeps it, in a key as in a value, and answers 202.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from imagegen.events import (
    GENERATION_FAILED,
    GENERATION_REQUESTED,
    IMAGE_PERSISTED,
    IMAGE_RENDERED,
    PROMPT_ENHANCED,
)
from tests.functions.clients import InProcessFunction
from tests.functions.conftest import base_env
from tests.functions.servers import cloudevent_headers

STRUCTURED = {"content-type": "application/cloudevents+json"}
PLAIN = {"content-type": "application/json"}
CONSUMES = {
    "enhance": GENERATION_REQUESTED,
    "render": PROMPT_ENHANCED,
    "persist": IMAGE_RENDERED,
    "derive": IMAGE_PERSISTED,
}
JOB: dict[str, Any] = {
    "generation_id": "sur-job",
    "prompt": "a red door",
    "enhancer": "template",
    "model": "tiny",
    "width": 256,
    "height": 256,
    "steps": 1,
    "guidance": 1.0,
    "seed": 3,
    "requested_at": "2026-05-01T12:00:00Z",
}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("surrogates")


@pytest.fixture(scope="module")
def functions(store: Path) -> Iterator[dict[str, InProcessFunction]]:
    started = {
        stage: InProcessFunction(stage, base_env(store)) for stage in (*CONSUMES, "deadletter")
    }
    yield started
    for function in started.values():
        function.close()


def _fields(failure: dict[str, Any]) -> set[str]:
    return {error["field"] for error in failure["errors"]}


def _records(store: Path) -> list[dict[str, Any]]:
    return [json.loads(path.read_text()) for path in store.rglob("failures/**/*.json")]


@pytest.mark.parametrize(
    ("body", "headers", "data"),
    [
        (
            b'{"generation_id": "g1", "metadata": {"x\\ud800": 1}}',
            PLAIN,
            {"generation_id": "g1", "metadata": {"x\ud800": 1}},
        ),
        (
            b'{"\\ud800": 1}',
            cloudevent_headers(GENERATION_FAILED, event_id="dl-key-1"),
            {"\ud800": 1},
        ),
        (
            b'{"specversion": "1.0", "type": "t", "source": "/s", "id": "dl-key-2",'
            b' "x\\udfff": "kept", "data": {"k\\udc00": ["v\\ud800"]}}',
            STRUCTURED,
            {"k\udc00": ["v\ud800"]},
        ),
    ],
    ids=["plain", "binary-event", "structured-attribute"],
)
def test_the_sink_keeps_a_key_holding_a_lone_surrogate(
    functions: dict[str, InProcessFunction],
    store: Path,
    body: bytes,
    headers: dict[str, str],
    data: Any,
) -> None:
    """A lone surrogate in a value was kept; one in a key was a 500 to every redelivery, and
    the failure lost. Both are kept as the escapes they came as."""
    marker = {"x-case": body.hex()[:32]}
    reply = functions["deadletter"].post(headers={**headers, **marker}, content=body)
    assert reply.status_code == 202 and reply.content == b"", reply.text
    [record] = [r for r in _records(store) if r["headers"].get("x-case") == marker["x-case"]]
    assert record["data"] == data
    if headers is STRUCTURED:  # an attribute's name, not made U+FFFD
        assert record["attributes"]["x\udfff"] == "kept"


@pytest.mark.parametrize("attribute", ["source", "id"])
@pytest.mark.parametrize("stage", sorted(CONSUMES))
def test_an_event_whose_source_or_id_holds_a_lone_surrogate_is_refused_naming_it(
    functions: dict[str, InProcessFunction], stage: str, attribute: str
) -> None:
    """A lone surrogate is no character of a CloudEvents String, and the ledger, which keeps an
    event under its ``source`` and ``id``, cannot store one: every stage refuses the event with
    a 400 naming the attribute (final for Knative, which dead-letters it), whatever its data."""
    for odd, data in (("\ud800", {"width": "x"}), ("\udc00", JOB)):
        envelope = {
            "specversion": "1.0",
            "type": CONSUMES[stage],
            "source": "/tests",
            "id": "sur-1",
            "data": data,
        }
        envelope[attribute] += odd
        reply = functions[stage].post(headers=STRUCTURED, content=json.dumps(envelope).encode())
        assert reply.status_code == 400, reply.text[:300]
        assert "ce-type" not in reply.headers
        assert _fields(reply.json()) == {attribute}


@pytest.mark.parametrize("field", ["model", "enhancer"])
def test_render_refuses_a_model_or_enhancer_holding_a_lone_surrogate(
    functions: dict[str, InProcessFunction], field: str
) -> None:
    """Both were taken as they came, and the job's fingerprint could not be written: a 500."""
    render = functions["render"]
    plain = {"prompt": "a red door", "width": 256, "height": 256, "steps": 1}
    body = json.dumps({**plain, field: "\ud800"}).encode()
    refused = render.post(headers=PLAIN, content=body)
    assert refused.status_code == 400, refused.text
    assert _fields(refused.json()) == {field}
    event = cloudevent_headers(PROMPT_ENHANCED, event_id=f"sur-{field}")
    failed = render.post(headers=event, content=json.dumps({**JOB, field: "\udfff"}).encode())
    assert failed.status_code == 200 and failed.headers["ce-type"] == GENERATION_FAILED
    assert _fields(failed.json()["error"]) == {field}


@pytest.mark.parametrize(("field", "longest"), [("enhancer", 256), ("model", 200)])
def test_render_refuses_a_model_or_enhancer_too_long_before_rendering(
    functions: dict[str, InProcessFunction], store: Path, field: str, longest: int
) -> None:
    """A near-megabyte enhancer was rendered and stored; persist then refused the reply carrying it
    (413). It is refused before anything is rendered, naming the field."""
    render = functions["render"]
    before = set(store.rglob("*.png"))
    plain = {"prompt": "a red door", "width": 256, "height": 256, "steps": 1, "seed": 5}
    refused = render.post(json={**plain, field: "e" * 1_000_000})  # under 1 MiB
    assert refused.status_code == 400, refused.text[:300]
    assert _fields(refused.json()) == {field}
    event = cloudevent_headers(PROMPT_ENHANCED, event_id=f"long-{field}")
    long_job = json.dumps({**JOB, field: "e" * (longest + 1)}).encode()
    failed = render.post(headers=event, content=long_job)
    assert failed.status_code == 200 and failed.headers["ce-type"] == GENERATION_FAILED
    assert _fields(failed.json()["error"]) == {field}
    assert set(store.rglob("*.png")) == before  # nothing rendered
