"""The dead-letter sink rides out a short storage outage instead of answering 503 at once.

The broker sends a dead letter with the failing Trigger's own retries and drops it when they
are spent (eventing pkg/kncloudevents/event_dispatcher.go, ``send``); a store that refuses
connections fails a write in a tenth of a second, so without retries of its own the sink lost
every dead letter of an outage longer than the Trigger's backoff.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from imagegen.events import GENERATION_FAILED
from imagegen.stages import deadletter
from tests.fakes.s3_server import S3Server
from tests.functions.clients import InProcessFunction
from tests.functions.conftest import base_env, s3_env
from tests.functions.servers import cloudevent_headers

BUCKET = "failures-bucket"


@pytest.fixture
def s3() -> Iterator[S3Server]:
    with S3Server() as server:
        server.create_bucket(BUCKET)
        yield server


@pytest.fixture
def sink(s3: S3Server, tmp_path: Path) -> Iterator[InProcessFunction]:
    env = {**base_env(tmp_path / "unused"), **s3_env(s3, f"s3://{BUCKET}")}
    with InProcessFunction("deadletter", env) as function:
        yield function


def _records(s3: S3Server) -> list[str]:
    listed = s3.client().list_objects_v2(Bucket=BUCKET, Prefix="failures/")
    return [entry["Key"] for entry in listed.get("Contents", [])]


def _failed(event_id: str) -> dict[str, str]:
    return cloudevent_headers(
        GENERATION_FAILED, event_id=event_id, time="2026-11-25T00:00:00Z", subject="g-outage"
    )


def test_a_dead_letter_sent_while_storage_refuses_connections_is_recorded_once_it_is_back(
    s3: S3Server, sink: InProcessFunction
) -> None:
    s3.down()  # connections refused: each write fails in a fraction of a second
    back = threading.Timer(3.0, s3.up)
    back.start()
    try:
        started = time.monotonic()
        reply = sink.post(headers=_failed("outage-1"), content=b'{"generation_id": "g-outage"}')
        took = time.monotonic() - started
    finally:
        back.cancel()
        s3.up()
    assert reply.status_code == 202, reply.text
    assert took >= 2.5  # answered once storage came back, not before
    kept = [s3.client().get_object(Bucket=BUCKET, Key=key)["Body"].read() for key in _records(s3)]
    assert [r for r in kept if b'"event_id": "outage-1"' in r]


def test_the_sink_answers_503_once_its_retries_are_spent(
    s3: S3Server, sink: InProcessFunction, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(deadletter, "RETRY_FOR", 2.0)
    # A first record: the store's conditional writes are checked once, before it.
    assert sink.post(headers=_failed("before-outage"), content=b"{}").status_code == 202
    recorded = _records(s3)
    s3.clear()
    with s3.outage(status=500):  # every write answered InternalError, retried by botocore too
        started = time.monotonic()
        reply = sink.post(headers=_failed("outage-2"), content=b"{}")
        took = time.monotonic() - started
        writes = [r for r in s3.requests if r.method == "PUT" and "/failures/" in r.path]
    assert reply.status_code == 503, reply.text
    assert reply.json()["retryable"] is True and int(reply.headers["retry-after"]) > 0
    assert took < deadletter.RETRY_FOR + 5  # spent, not waiting out the budget of 60 s
    # More writes than botocore's own 3 attempts of one call: the sink tried the call again.
    assert len(writes) > 3, len(writes)
    assert _records(s3) == recorded
