"""The eventing path for real: the functions as HTTP servers, behind both broker classes.

``brokers.Broker`` models the channel-based and the Kafka broker rule by rule (filters,
retries, backoff, reply handling, dead letters, concurrent and duplicate delivery); here it
delivers to the real function servers, configured from ``kubectl kustomize
knative/overlays/dev``. Nothing about the routing is hard-coded: it comes from the Triggers.
"""

from __future__ import annotations

import base64
import json
import uuid
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
from tests.fakes.s3_server import ACCESS_KEY_ID, SECRET_ACCESS_KEY, S3Server
from tests.functions.servers import FunctionServer, free_port

from .brokers import Broker, QueueProxy, http_transport
from .cloudevents_http import Event
from .conftest import TARGETS
from .routing import (
    CHANNEL_BROKER,
    KAFKA_BROKER,
    PING_EVENT_TYPE,
    Routing,
    ServiceInfo,
    render_kustomize,
)

CLASSES = (CHANNEL_BROKER, KAFKA_BROKER)
Cluster = tuple[Routing, dict[str, FunctionServer], S3Server]


def _environment(service: ServiceInfo, overrides: dict[str, str]) -> dict[str, str]:
    """The Service's own environment from the manifests, pointed at this machine's stand-ins."""
    env = {k: v for k, v in service.env.items() if k.startswith("IMAGEGEN_")}
    return {**env, **overrides}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    routing = Routing(render_kustomize(TARGETS["dev"]))
    logs = tmp_path_factory.mktemp("logs")
    with S3Server() as s3:
        bucket = next(iter(s.env["IMAGEGEN_STORAGE_URL"] for s in routing.services.values()))
        s3.create_bucket(bucket.removeprefix("s3://").split("/")[0])
        overrides = {
            "IMAGEGEN_S3_ENDPOINT_URL": s3.endpoint,
            "IMAGEGEN_S3_ACCESS_KEY_ID": ACCESS_KEY_ID,
            "IMAGEGEN_S3_SECRET_ACCESS_KEY": SECRET_ACCESS_KEY,
            "IMAGEGEN_OLLAMA_HOST": f"http://127.0.0.1:{free_port()}",  # no Ollama: fallback
            "IMAGEGEN_OLLAMA_RETRIES": "0",
            "IMAGEGEN_MODEL_CACHE_DIR": str(tmp_path_factory.mktemp("models")),
            "HF_HUB_OFFLINE": "1",
        }
        servers = {
            name: FunctionServer(
                str(service.function), _environment(service, overrides), log_dir=logs
            )
            for name, service in routing.services.items()
        }
        for server in servers.values():
            server.start(wait=False)
        try:
            for server in servers.values():
                server.wait("/readyz", timeout=180)
            yield routing, servers, s3
        finally:
            for server in servers.values():
                server.stop()


def _broker(cluster: Cluster, broker_class: str, **options: Any) -> Broker:
    routing, servers, _ = cluster
    overrides = options.pop("urls", {})
    urls = {name: overrides.get(name, server.url) for name, server in servers.items()}
    # Knative Serving's queue-proxy holds what exceeds containerConcurrency.
    serving = QueueProxy(http_transport(), routing, urls)
    return Broker(routing, urls, serving, broker_class=broker_class, **options)


def _request(event_type: str, data: Any, subject: str | None = None, **extra: str) -> Event:
    attributes = {
        "specversion": "1.0",
        "type": event_type,
        "source": "/tests/broker",
        "id": uuid.uuid4().hex,
        "time": "2026-11-24T10:00:00Z",
        "datacontenttype": "application/json",
        **extra,
    }
    if subject:
        attributes["subject"] = subject
    return Event(attributes, json.dumps(data).encode())


def _run(broker: Broker, *events: Event) -> Broker:
    try:
        broker.run(*events, timeout=240)
    finally:
        broker.close()
    # The rule for every function: a 2xx answer is empty or a valid CloudEvent.
    assert not broker.refused_replies, broker.refused_replies
    return broker


def _deliveries(broker: Broker, url: str) -> list[tuple[str, int | None]]:
    return [(a.event_type, a.status) for a in broker.attempts if a.target == url]


def _records(s3: S3Server, subject: str) -> list[dict[str, Any]]:
    """The dead-letter function's records about one generation."""
    client = s3.client()
    records = []
    for bucket in client.list_buckets()["Buckets"]:
        for obj in client.list_objects_v2(Bucket=bucket["Name"]).get("Contents", []):
            if "failures/" in obj["Key"]:
                body = client.get_object(Bucket=bucket["Name"], Key=obj["Key"])["Body"].read()
                record = json.loads(body)
                if record.get("subject") == subject:
                    records.append(record)
    return records


def _png(s3: S3Server, location: str) -> bytes:
    bucket, _, key = location.removeprefix("s3://").partition("/")
    body: bytes = s3.client().get_object(Bucket=bucket, Key=key)["Body"].read()
    return body


@pytest.mark.parametrize("broker_class", CLASSES)
def test_a_request_flows_through_the_triggers_to_a_stored_image(
    cluster: Cluster, broker_class: str
) -> None:
    s3 = cluster[2]
    subject = f"routed-{broker_class}"
    broker = _run(
        _broker(cluster, broker_class),
        _request(
            GENERATION_REQUESTED, {"prompt": "a lantern", "width": 256, "height": 256}, subject
        ),
    )
    assert [(a.event_type, a.status) for a in broker.attempts] == [
        (GENERATION_REQUESTED, 200),
        (PROMPT_ENHANCED, 200),
        (IMAGE_RENDERED, 200),
    ]
    [output] = broker.outputs
    assert output["type"] == IMAGE_PERSISTED and output["subject"] == subject
    persisted = output.json()
    assert isinstance(persisted, dict)
    body = _png(s3, persisted["location"])
    assert body[:8] == b"\x89PNG\r\n\x1a\n" and len(body) == persisted["size"]
    assert not broker.dead_letters


def test_the_scheduled_ping_dreams_an_image(cluster: Cluster) -> None:
    routing, _, _ = cluster
    [pingsource] = [d for d in render_kustomize(TARGETS["dev"]) if d.get("kind") == "PingSource"]
    data = json.loads(pingsource["spec"].get("data") or "{}")
    [source] = routing.ping_sources
    broker = _run(_broker(cluster, CHANNEL_BROKER), _request(PING_EVENT_TYPE, data, source=source))
    [output] = broker.outputs
    assert output["type"] == IMAGE_PERSISTED
    persisted = output.json()
    assert isinstance(persisted, dict) and persisted["prompt"]  # dreamed: the ping has none


@pytest.mark.parametrize("broker_class", CLASSES)
def test_a_failing_stage_is_retried_then_dead_lettered_once(
    cluster: Cluster, broker_class: str, tmp_path: Path
) -> None:
    routing, _, s3 = cluster
    dead_port = free_port()  # nothing listens: every storage call fails
    # persist answers 503 for as long as its storage is down.
    broken = FunctionServer(
        "persist",
        _environment(
            routing.services["imagegen-persist"],
            {
                "IMAGEGEN_S3_ENDPOINT_URL": f"http://127.0.0.1:{dead_port}",
                "IMAGEGEN_S3_ACCESS_KEY_ID": ACCESS_KEY_ID,
                "IMAGEGEN_S3_SECRET_ACCESS_KEY": SECRET_ACCESS_KEY,
            },
        ),
        log_dir=tmp_path,
    ).start()
    subject = f"dead-lettered-{broker_class}"
    try:
        broker = _run(
            _broker(cluster, broker_class, urls={"imagegen-persist": broken.url}),
            _request(
                GENERATION_REQUESTED, {"prompt": "a kite", "width": 256, "height": 256}, subject
            ),
        )
    finally:
        broken.stop()

    trigger = next(t for t in routing.triggers if t.subscriber == "imagegen-persist")
    assert _deliveries(broker, broken.url) == [(IMAGE_RENDERED, 503)] * (1 + (trigger.retry or 0))
    assert broker.outputs == []
    [letter] = broker.dead_letters
    assert letter.accepted and letter.trigger == trigger.name
    assert letter.event["knativeerrorcode"] == "503"
    assert json.loads(base64.b64decode(letter.event["knativeerrordata"]))["retryable"] is True
    # Recorded once, with the failing answer.
    [record] = _records(s3, subject)
    assert record["event_type"] == IMAGE_RENDERED
    assert record["error_code"] == "503"
    assert record["error_body"]["retryable"] is True


@pytest.mark.parametrize("broker_class", CLASSES)
def test_a_final_failure_is_published_and_recorded_once(
    cluster: Cluster, broker_class: str
) -> None:
    s3 = cluster[2]
    subject = f"invalid-{broker_class}"
    broker = _run(
        _broker(cluster, broker_class), _request(GENERATION_REQUESTED, {"width": 5}, subject)
    )
    # The stage answers 200 with generation.failed: not retried, not dead-lettered; the broker
    # publishes it and its Trigger hands it to the dead-letter function, which answers empty.
    assert [(a.event_type, a.status) for a in broker.attempts] == [
        (GENERATION_REQUESTED, 200),
        (GENERATION_FAILED, 202),
    ]
    assert not broker.dead_letters
    [record] = _records(s3, subject)
    assert record["event_type"] == GENERATION_FAILED
    assert record["data"]["stage"] == "enhance"
    assert record["data"]["error"]["errors"][0]["field"] == "width"


def test_redelivered_and_reordered_events_make_one_image_each(cluster: Cluster) -> None:
    # Kafka after a rebalance: every record delivered twice at once, in shuffled order.
    _, _, s3 = cluster
    requests = [
        _request(
            GENERATION_REQUESTED,
            {"prompt": f"a boat {n}", "width": 256, "height": 256},
            f"twice-{n}",
        )
        for n in range(2)
    ]
    broker = _run(_broker(cluster, KAFKA_BROKER, redeliveries=1, seed=5), *requests)
    assert not broker.dead_letters
    by_subject: dict[str, list[dict[str, Any]]] = {}
    for output in broker.outputs:
        assert output["type"] == IMAGE_PERSISTED
        data = output.json()
        assert isinstance(data, dict)
        by_subject.setdefault(output["subject"], []).append(data)
    assert sorted(by_subject) == ["twice-0", "twice-1"]
    for subject, replies in by_subject.items():
        assert len(replies) >= 2, subject  # the duplicates were delivered...
        assert all(r == replies[0] for r in replies), subject  # ...and answered alike
        assert _png(s3, replies[0]["location"])[:8] == b"\x89PNG\r\n\x1a\n"
