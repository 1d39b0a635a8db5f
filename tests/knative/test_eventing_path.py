"""The eventing path for real: the functions as HTTP servers, events routed by the Triggers.

A small broker stands in for Knative Eventing: it delivers each event to whichever Service a
rendered Trigger's filter selects, retries as that Trigger's delivery spec says, sends what
finally fails to its dead-letter sink (with Knative's ``knativeerror*`` extensions), and
delivers every reply event again, until no Trigger matches. Nothing about the routing is
hard-coded here: it all comes from ``kubectl kustomize knative/overlays/dev``.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from imagegen.events import (
    GENERATION_FAILED,
    GENERATION_REQUESTED,
    IMAGE_DERIVED,
    IMAGE_PERSISTED,
)
from imagegen.ledger import open_ledger
from tests.fakes.s3_server import ACCESS_KEY_ID, SECRET_ACCESS_KEY, S3Server
from tests.functions.servers import FunctionServer, free_port

from .brokers import Broker as ModelledBroker
from .cloudevents_http import Event
from .conftest import TARGETS
from .delivery import error_extensions
from .routing import (
    CHANNEL_BROKER,
    KAFKA_BROKER,
    PING_EVENT_TYPE,
    Routing,
    ServiceInfo,
    TriggerInfo,
    render_kustomize,
)

# Knative's dispatcher retries these statuses (and network errors); others are final.
RETRIED = {404, 408, 409, 429}
BACKOFF_SCALE = 0.001  # the real delays, scaled down: seconds become milliseconds


@dataclass
class Delivery:
    trigger: str
    subscriber: str
    event_type: str
    attempts: list[int] = field(default_factory=list)
    dead_lettered: bool = False


@dataclass
class Broker:
    """Delivers events as the rendered Triggers say, to real function servers."""

    routing: Routing
    urls: dict[str, str]
    log: list[Delivery] = field(default_factory=list)
    outputs: list[tuple[dict[str, str], Any]] = field(default_factory=list)
    published: list[tuple[dict[str, str], Any]] = field(default_factory=list)

    def of_type(self, event_type: str) -> list[tuple[dict[str, str], Any]]:
        """The events of ``event_type`` the broker accepted (the ledger hears them all)."""
        return [(a, d) for a, d in self.published if a["type"] == event_type]

    def publish(self, attributes: dict[str, str], data: Any) -> None:
        queue = [(attributes, data)]
        while queue:
            attributes, data = queue.pop(0)
            self.published.append((attributes, data))
            triggers = self.routing.triggers_for(attributes["type"], attributes)
            if not triggers:
                self.outputs.append((attributes, data))
            for trigger in triggers:
                reply = self._deliver(trigger, attributes, data)
                if reply is not None:
                    queue.append(reply)

    def _deliver(
        self, trigger: TriggerInfo, attributes: dict[str, str], data: Any
    ) -> tuple[dict[str, str], Any] | None:
        record = Delivery(trigger.name, trigger.subscriber, attributes["type"])
        self.log.append(record)
        timeout = trigger.timeout.total_seconds() if trigger.timeout else 60.0
        waits = trigger.backoff_schedule()
        url = self.urls[trigger.subscriber]
        # The last attempt's error extensions, as the channel broker adds them (brokers.py
        # models the rules, citing eventing's event_dispatcher.go and filter_handler.go): the
        # subscriber's status and body; a 500 and "dispatch error: …" where it could not be
        # reached; none where it did not answer within the timeout.
        extensions: dict[str, str] = {}
        for attempt in range(1 + (trigger.retry or 0)):
            if attempt:
                time.sleep(waits[attempt - 1].total_seconds() * BACKOFF_SCALE)
            try:
                response = _post(url, attributes, data, timeout)
            except httpx.TimeoutException:
                record.attempts.append(0)
                extensions = {}
                continue
            except httpx.HTTPError as exc:
                record.attempts.append(0)
                extensions = _error_extensions(url, 500, f'dispatch error: Post "{url}": {exc}')
                continue
            record.attempts.append(response.status_code)
            if response.status_code < 300:
                return _reply_of(response)
            extensions = _error_extensions(url, response.status_code, response.content)
            if response.status_code < 500 and response.status_code not in RETRIED:
                break
        record.dead_lettered = True
        assert trigger.dead_letter is not None, f"{trigger.name} has no dead-letter sink"
        sink = _post(self.urls[trigger.dead_letter], {**attributes, **extensions}, data, 60)
        assert sink.status_code < 300, sink.text
        return None


def _error_extensions(url: str, status: int, body: bytes | str) -> dict[str, str]:
    data = body.encode() if isinstance(body, str) else body
    return error_extensions(url, status, data, kafka=False)


def _post(url: str, attributes: dict[str, str], data: Any, timeout: float) -> httpx.Response:
    headers = {f"ce-{k}": v for k, v in attributes.items()}
    headers["content-type"] = "application/json"
    return httpx.post(url, headers=headers, content=json.dumps(data), timeout=timeout)


def _reply_of(response: httpx.Response) -> tuple[dict[str, str], Any] | None:
    attributes = {k[3:]: v for k, v in response.headers.items() if k.lower().startswith("ce-")}
    if "type" not in attributes:
        return None  # no reply event (e.g. 202 from the dead-letter sink)
    return attributes, response.json()


def _environment(service: ServiceInfo, overrides: dict[str, str]) -> dict[str, str]:
    """The Service's own environment from the manifests, pointed at this machine's stand-ins."""
    env = {k: v for k, v in service.env.items() if k.startswith("IMAGEGEN_")}
    return {**env, **overrides}


@pytest.fixture(scope="module")
def cluster(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Routing, dict[str, FunctionServer], S3Server]]:
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
            # The ledger's Secret is not in the manifests: a SQLite file of this run.
            "IMAGEGEN_LEDGER_URL": f"sqlite:///{tmp_path_factory.mktemp('ledger') / 'ledger.db'}",
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


def _broker(routing: Routing, servers: dict[str, FunctionServer], **url_overrides: str) -> Broker:
    return Broker(routing, {name: url_overrides.get(name, s.url) for name, s in servers.items()})


def _request(event_type: str, subject: str | None = None) -> dict[str, str]:
    attributes = {
        "specversion": "1.0",
        "type": event_type,
        "source": "/tests/broker",
        "id": uuid.uuid4().hex,
        "time": "2026-11-24T10:00:00Z",
    }
    if subject:
        attributes["subject"] = subject
    return attributes


@pytest.mark.slow
def test_a_request_flows_through_the_triggers_to_a_stored_image(cluster: Any) -> None:
    routing, servers, s3 = cluster
    broker = _broker(routing, servers)
    broker.publish(
        _request(GENERATION_REQUESTED, "routed-1"),
        {"prompt": "a lantern", "width": 256, "height": 256},
    )

    assert [(d.event_type, d.subscriber) for d in _chain(broker.log)] == [
        (GENERATION_REQUESTED, "imagegen-enhance"),
        ("dev.orchestr8.imagegen.prompt.enhanced", "imagegen-render"),
        ("dev.orchestr8.imagegen.image.rendered", "imagegen-persist"),
        (IMAGE_PERSISTED, "imagegen-derive"),
    ]
    [(attributes, persisted)] = broker.of_type(IMAGE_PERSISTED)
    assert attributes["type"] == IMAGE_PERSISTED and attributes["subject"] == "routed-1"
    bucket, _, key = persisted["location"].removeprefix("s3://").partition("/")
    body = s3.client().get_object(Bucket=bucket, Key=key)["Body"].read()
    assert body[:8] == b"\x89PNG\r\n\x1a\n" and len(body) == persisted["size"]
    # The chain ends with the derivatives, stored beside the image and recorded.
    [(_, derived)] = broker.of_type(IMAGE_DERIVED)
    prefix = key.removesuffix(persisted["key"])
    for name in ("record", "avif:256", "webp:256"):
        s3.client().head_object(Bucket=bucket, Key=prefix + derived["keys"][name])


def test_the_scheduled_ping_dreams_an_image(cluster: Any) -> None:
    routing, servers, _ = cluster
    [pingsource] = [d for d in render_kustomize(TARGETS["dev"]) if d.get("kind") == "PingSource"]
    data = json.loads(pingsource["spec"].get("data") or "{}")
    broker = _broker(routing, servers)
    [source] = routing.ping_sources
    broker.publish({**_request(PING_EVENT_TYPE), "source": source}, data)
    [(attributes, persisted)] = broker.of_type(IMAGE_PERSISTED)
    assert attributes["type"] == IMAGE_PERSISTED
    assert persisted["prompt"]  # dreamed, since the ping carries no prompt


def test_a_failing_stage_is_retried_then_dead_lettered(cluster: Any, tmp_path: Path) -> None:
    routing, servers, s3 = cluster
    dead_port = free_port()  # nothing listens: every attempt fails
    # persist answers 503 for as long as its storage is down.
    broken_persist = FunctionServer(
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
    try:
        broker = _broker(routing, servers, **{"imagegen-persist": broken_persist.url})
        broker.publish(
            _request(GENERATION_REQUESTED, "dead-lettered-1"),
            {"prompt": "a kite", "width": 256, "height": 256},
        )
    finally:
        broken_persist.stop()

    persist_trigger = next(t for t in routing.triggers if t.subscriber == "imagegen-persist")
    [delivery] = [d for d in broker.log if d.subscriber == "imagegen-persist"]
    assert delivery.dead_lettered
    assert delivery.attempts == [503] * (1 + (persist_trigger.retry or 0))
    assert broker.of_type(IMAGE_PERSISTED) == []

    # The dead-letter sink recorded the event and the failing reply.
    records = [
        json.loads(s3.client().get_object(Bucket=o["Bucket"], Key=o["Key"])["Body"].read())
        for o in _objects(s3, "failures/")
    ]
    [record] = [r for r in records if r["subject"] == "dead-lettered-1"]
    assert record["event_type"] == "dev.orchestr8.imagegen.image.rendered"
    assert record["error_code"] == "503"
    assert record["error_body"]["retryable"] is True


def test_a_final_failure_reaches_the_platform_once(cluster: Any) -> None:
    routing, servers, s3 = cluster
    broker = _broker(routing, servers)
    broker.publish(_request(GENERATION_REQUESTED, "invalid-1"), {"width": 5})
    # The stage answers 2xx with generation.failed: not retried, not dead-lettered; the
    # broker publishes the failure, and its Trigger hands it to the dead-letter function.
    assert [
        (d.event_type, d.subscriber, d.attempts, d.dead_lettered) for d in _chain(broker.log)
    ] == [
        (GENERATION_REQUESTED, "imagegen-enhance", [200], False),
        (GENERATION_FAILED, "imagegen-deadletter", [202], False),
    ]
    records = [
        json.loads(s3.client().get_object(Bucket=o["Bucket"], Key=o["Key"])["Body"].read())
        for o in _objects(s3, "failures/")
    ]
    [record] = [r for r in records if r["subject"] == "invalid-1"]
    assert record["event_type"] == GENERATION_FAILED
    assert record["data"]["stage"] == "enhance"
    assert record["data"]["error"]["errors"][0]["field"] == "width"


def _chain(log: list[Delivery]) -> list[Delivery]:
    """The deliveries of the chain itself, without the ledger's (it hears every type)."""
    return [d for d in log if d.subscriber != "imagegen-ledger"]


@pytest.mark.parametrize("broker_class", [CHANNEL_BROKER, KAFKA_BROKER])
def test_a_chain_over_the_modelled_broker_records_every_event_in_the_ledger(
    cluster: Any, broker_class: str
) -> None:
    # The broker model of brokers.py (fan-out to every matching Trigger, replies published,
    # Kafka's unordered delivery) over real HTTP to the served functions.
    routing, servers, _ = cluster
    broker = ModelledBroker(
        routing,
        {name: s.url for name, s in servers.items()},
        broker_class=broker_class,
        seed=14,
    )
    gid = f"ledgered-{broker_class.lower()}"
    request = _request(GENERATION_REQUESTED, gid)
    try:
        broker.run(
            Event(request, json.dumps({"prompt": "a heron", "width": 256, "height": 256}).encode())
        )
    finally:
        broker.close()
    assert not broker.dead_letters and not broker.lost
    ledger_url = servers["imagegen-ledger"].url
    accepted = {(e["type"], e["id"]) for e in broker.accepted}
    delivered = {(a.event_type, a.event_id) for a in broker.attempts if a.target == ledger_url}
    assert delivered == accepted and len(accepted) == 5  # requested … derived, each once
    assert {a.status for a in broker.attempts if a.target == ledger_url} == {202}
    ledger = open_ledger(servers["imagegen-ledger"].env["IMAGEGEN_LEDGER_URL"])
    try:
        found = ledger.get(gid)
        recorded = {(e.type, e.id) for e in ledger.generation_events(gid)}
    finally:
        ledger.close()
    assert found is not None and found.status == "persisted" and found.url
    assert recorded == accepted


def test_the_dead_letter_functions_reply_passes_the_filters_dls_check(cluster: Any) -> None:
    # With OIDC (as knative/cluster sets it) the channel broker sends dead letters through the
    # filter's /dls path, which fails a 2xx reply that is neither empty nor a CloudEvent
    # (brokers.py): the dead-letter function's own reply must pass it.
    routing, servers, _ = cluster
    unreachable = "http://127.0.0.1:9"  # discard's port, closed: enhance's attempts fail
    broker = ModelledBroker(
        routing,
        {**{name: s.url for name, s in servers.items()}, "imagegen-enhance": unreachable},
        broker_class=CHANNEL_BROKER,
    )
    assert broker.oidc
    try:
        broker.run(
            Event(
                _request(GENERATION_REQUESTED, "oidc-dls-1"),
                json.dumps({"prompt": "a moth", "width": 256, "height": 256}).encode(),
            )
        )
    finally:
        broker.close()
    sink = servers["imagegen-deadletter"].url
    [letter] = broker.dead_letters
    assert letter.event["type"] == GENERATION_REQUESTED
    assert letter.event["knativeerrordest"] == unreachable
    assert letter.accepted and not broker.lost and not broker.refused_replies
    assert [a.status for a in broker.attempts if a.target == sink] == [202]


def _objects(s3: S3Server, prefix: str) -> list[dict[str, str]]:
    client = s3.client()
    out = []
    for bucket in client.list_buckets()["Buckets"]:
        for obj in client.list_objects_v2(Bucket=bucket["Name"]).get("Contents", []):
            if prefix in obj["Key"]:
                out.append({"Bucket": bucket["Name"], "Key": obj["Key"]})
    return out
