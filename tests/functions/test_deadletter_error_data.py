"""The dead-letter sink records a delivery whatever ``knativeerrordata`` holds: the failing
reply, base64, cut at 1,024 bytes, as Knative's dispatcher adds it to a dead-lettered event;
it may be anything the subscriber answered."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest

from imagegen.events import PROMPT_ENHANCED
from tests.functions.clients import InProcessFunction
from tests.functions.conftest import base_env
from tests.functions.servers import cloudevent_headers

REPLIES = {
    # Past the interpreter's recursion limit as JSON's parser counts it.
    "unclosed-arrays": b"[" * 1024,
    # Parses, but nests deeper than the record's serializer writes.
    "nested-arrays": b"[" * 300 + b"]" * 300,
    # Python's JSON reads it; no JSON record may hold it.
    "nan": b'{"error": NaN}',
    "json": b'{"error": "internal"}',
}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("error-data")


@pytest.fixture(scope="module")
def sink(store: Path) -> InProcessFunction:
    return InProcessFunction("deadletter", base_env(store))


def _record(store: Path, event_id: str) -> dict[str, Any]:
    records = [json.loads(path.read_text()) for path in store.rglob("failures/**/*.json")]
    [record] = [r for r in records if r["event_id"] == event_id]
    return record


@pytest.mark.parametrize("name", list(REPLIES))
def test_any_failing_reply_is_recorded(sink: InProcessFunction, store: Path, name: str) -> None:
    reply = REPLIES[name]
    headers = cloudevent_headers(
        PROMPT_ENHANCED,
        event_id=f"error-data-{name}",
        knativeerrorcode="500",
        knativeerrordest="http://imagegen-render.imagegen.svc.cluster.local",
        knativeerrordata=base64.b64encode(reply).decode(),
    )
    answer = sink.post(headers=headers, content=b'{"prompt": "x"}')
    assert answer.status_code == 202, answer.text
    record = _record(store, f"error-data-{name}")
    assert record["error_code"] == "500"
    # JSON where it is JSON a record can hold; else the text, as it came.
    expected = json.loads(reply) if name == "json" else reply.decode()
    assert record["error_body"] == expected
