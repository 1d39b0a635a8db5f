"""Failures: final ones reach the platform, the dead-letter sink loses nothing, and a
misconfigured function answers 503 (retried) rather than refusing good events."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from imagegen.events import GENERATION_FAILED, GENERATION_REQUESTED
from tests.functions.conftest import StartServer, base_env
from tests.functions.servers import cloudevent_headers, post_event

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


class Sink:
    """A loopback HTTP endpoint standing in for the broker ingress (K_SINK)."""

    def __init__(self) -> None:
        self.received: list[tuple[dict[str, str], Any]] = []
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                sink.received.append(
                    ({k.lower(): v for k, v in self.headers.items()}, json.loads(body))
                )
                self.send_response(202)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"


@pytest.fixture
def sink() -> Iterator[Sink]:
    endpoint = Sink()
    yield endpoint
    endpoint.server.shutdown()


def test_a_final_failure_is_published_to_the_sink(
    start_server: StartServer, tmp_path: Path, sink: Sink
) -> None:
    env = {**base_env(tmp_path / "store"), "K_SINK": sink.url}
    enhance = start_server("enhance", env)
    reply = post_event(
        enhance.url,
        GENERATION_REQUESTED,
        {"width": 7},
        source="/tests",
        event_id="bad-1",
        traceparent=TRACEPARENT,
    )
    assert reply.status_code == 400
    assert reply.headers["ce-type"] == GENERATION_FAILED
    assert reply.headers["ce-traceparent"].split("-")[1] == TRACEPARENT.split("-")[1]
    [(headers, data)] = sink.received
    assert headers["ce-type"] == GENERATION_FAILED
    assert headers["ce-id"] == reply.headers["ce-id"]
    # No subject was given: the generation id is derived from the request event, as on success.
    assert headers["ce-subject"] == reply.headers["ce-subject"] == data["generation_id"]
    assert data["error"]["errors"][0]["field"] == "width"

    other = post_event(
        enhance.url, GENERATION_REQUESTED, {"width": 7}, source="/tests", event_id="bad-2"
    )
    assert other.headers["ce-id"] != reply.headers["ce-id"]


def test_retryable_failures_are_not_published(
    start_server: StartServer, tmp_path: Path, sink: Sink
) -> None:
    env = {**base_env(tmp_path / "store"), "K_SINK": sink.url, "IMAGEGEN_ENHANCE_FALLBACK": "false"}
    enhance = start_server("enhance", env)
    reply = post_event(enhance.url, GENERATION_REQUESTED, {"prompt": "x"}, subject="retry-1")
    assert reply.status_code == 503
    assert sink.received == []


@pytest.mark.parametrize(
    ("headers", "body"),
    [
        ({"ce-subject": "bad subject!"}, b'{"prompt": "x"}'),
        ({"content-type": "text/plain"}, b"hello"),
        ({}, b"{not json"),
        ({}, b'{"prompt": "' + b"x" * (1024 * 1024 + 100) + b'"}'),
    ],
    ids=["bad-subject", "not-json-type", "bad-json", "too-large"],
)
def test_the_dead_letter_sink_keeps_what_a_stage_refused(
    start_server: StartServer, tmp_path: Path, headers: dict[str, str], body: bytes
) -> None:
    store = tmp_path / "store"
    deadletter = start_server("deadletter", base_env(store))
    sent = {
        **cloudevent_headers(GENERATION_REQUESTED, source="/tests", knativeerrorcode="400"),
        **headers,
    }
    reply = httpx.post(deadletter.url, headers=sent, content=body, timeout=30)
    assert reply.status_code == 202, reply.text
    [record] = [json.loads(p.read_text()) for p in store.rglob("failures/**/*.json")]
    assert record["event_type"] == GENERATION_REQUESTED and record["error_code"] == "400"
    assert record["data"] is not None


def test_a_misconfigured_function_answers_503_not_400(
    start_server: StartServer, tmp_path: Path
) -> None:
    env = {**base_env(tmp_path / "store"), "IMAGEGEN_STORAGE_URL": "gs://not-supported"}
    enhance = start_server("enhance", env)
    assert httpx.get(enhance.url + "/healthz").status_code == 200
    ready = httpx.get(enhance.url + "/readyz")
    assert ready.status_code == 503 and ready.json()["status"] == "start-up failed"
    for _ in range(3):
        reply = post_event(enhance.url, GENERATION_REQUESTED, {"prompt": "fine"}, subject="cfg-1")
        assert reply.status_code == 503, reply.text
        assert "storage_url" in reply.json()["message"]
        assert int(reply.headers["retry-after"]) > 0
    logs = [r for r in enhance.log_records() if r.get("message", "").startswith("start-up failed")]
    assert len(logs) == 1
