"""The dead-letter sink keeps a delivery's HTTP headers, and never its credentials: a record is
read by people who may not hold the caller's rights."""

from __future__ import annotations

import json
from pathlib import Path

from imagegen.events import GENERATION_REQUESTED
from tests.functions.clients import InProcessFunction
from tests.functions.conftest import base_env
from tests.functions.servers import cloudevent_headers

CREDENTIALS = {
    "Authorization": "Bearer token-never-stored",
    "Proxy-Authorization": "Basic cHJveHktbmV2ZXItc3RvcmVk",
    "Cookie": "session=cookie-never-stored",
}


def test_a_dead_letter_record_keeps_the_headers_but_no_credential(tmp_path: Path) -> None:
    store = tmp_path / "store"
    # Authentication off (base_env sets none), as in test_failures.py: the headers arrive as
    # a client or a misconfigured sender might send them, and the sink takes the event.
    headers = {
        **cloudevent_headers(GENERATION_REQUESTED, source="/tests", knativeerrorcode="400"),
        **CREDENTIALS,
        "X-Other": "kept",
    }
    with InProcessFunction("deadletter", base_env(store)) as deadletter:
        reply = deadletter.post(headers=headers, content=b'{"prompt": "x"}')
    assert reply.status_code == 202, reply.text
    [path] = list(store.rglob("failures/**/*.json"))
    record = json.loads(path.read_text())
    stored = {name.lower(): value for name, value in record["headers"].items()}
    assert stored["x-other"] == "kept"
    assert not {name.lower() for name in CREDENTIALS} & set(stored)
    # Nor anywhere else in the record, under another name.
    assert not [value for value in CREDENTIALS.values() if value in path.read_text()]
