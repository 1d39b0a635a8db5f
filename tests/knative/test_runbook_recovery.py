"""docs/runbook.md's "Repair a corrupt record" and "Recover dead-lettered generations", run:
the stages in this process, the modelled brokers of brokers.py routing by the rendered
overlays, the dead-letter sink writing its records to local storage, the runbook's jq read
from the page and run on those records."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from imagegen import ImageGenService, Settings
from imagegen.events import GENERATION_FAILED, IMAGE_DERIVED, IMAGE_PERSISTED, IMAGE_RENDERED
from imagegen.ledger import open_ledger
from imagegen.storage.base import GenerationKeys
from tests.fakes.images import gradient_png, store_rendered
from tests.functions.clients import InProcessFunction
from tests.functions.conftest import base_env

from .brokers import Broker
from .cloudevents_http import Event, Message, decode, encode_binary
from .delivery import Delivery, NoResponse, Transport
from .routing import CHANNEL_BROKER, KAFKA_BROKER, Routing

RoutingOf = Callable[[str], Routing]
RUNBOOK = Path(__file__).resolve().parents[2] / "docs" / "runbook.md"
NOW = datetime(2026, 11, 24, 18, 30, tzinfo=UTC)
STAGES = ("persist", "derive", "deadletter", "ledger")
UNREACHABLE = "http://unreachable.functions.test"  # a Service whose pods are gone


def _section(heading: str) -> str:
    return RUNBOOK.read_text().split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]


def _said(text: str) -> str:
    return " ".join(text.split())


class Cluster:
    """The stages after render, over one local store, and the transport a broker reaches them by."""

    def __init__(self, root: Path, stack: ExitStack) -> None:
        self.store = root / "store"
        self.ledger_url = f"sqlite:///{root / 'ledger.db'}"
        env = {**base_env(self.store), "IMAGEGEN_URL_SIGNING_SECRET": "k" * 32}
        self.functions = {
            f"imagegen-{stage}": stack.enter_context(
                InProcessFunction(
                    stage,
                    {**env, "IMAGEGEN_LEDGER_URL": self.ledger_url} if stage == "ledger" else env,
                )
            )
            for stage in STAGES
        }
        self._by_url = {f.url: f for f in self.functions.values()}

    def transport(self) -> Transport:
        def send(url: str, message: Message, timeout: float | None) -> Delivery:
            function = self._by_url.get(url)
            if function is None:
                raise NoResponse("ConnectError: [Errno 111] Connection refused")
            reply = function.post("/", headers=dict(message.headers), content=message.body)
            headers = {k.lower(): v for k, v in reply.headers.items()}
            return Delivery(reply.status_code, Message(headers, reply.content))

        return send

    def broker(self, r: Routing, broker_class: str, **urls: str) -> Broker:
        # Every Service of the overlay has an address; those not served here refuse connections.
        addresses = {name: UNREACHABLE for name in r.services}
        addresses.update({name: f.url for name, f in self.functions.items()})
        addresses.update(urls)
        return Broker(
            r, addresses, self.transport(), broker_class=broker_class, time_scale=0, workers=1
        )

    def records(self) -> list[Path]:
        return sorted(self.store.glob("failures/**/*.json"))


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    with ExitStack() as stack:
        yield Cluster(tmp_path, stack)


def _rendered(cluster: Cluster, gid: str) -> Event:
    """render's ``image.rendered`` for a PNG stored as render stores it."""

    async def store() -> Any:
        async with ImageGenService(Settings(storage_url=str(cluster.store))) as service:
            return await store_rendered(service.storage, gid, NOW, gradient_png(256, 256), "a kite")

    image = asyncio.run(store())
    attributes = {
        "specversion": "1.0",
        "type": IMAGE_RENDERED,
        "source": "/imagegen/render",
        "id": f"rendered-{gid}",
        "subject": gid,
        "time": NOW.isoformat(),
    }
    return Event(attributes, json.dumps(image.model_dump(mode="json")).encode())


def _run(broker: Broker, event: Event) -> Broker:
    try:
        broker.run(event)
    finally:
        broker.close()
    return broker


def _statuses(broker: Broker, cluster: Cluster, service: str) -> list[int | None]:
    """The answers of ``service`` to the broker's attempts (the dead letters' not among them)."""
    url = cluster.functions[service].url
    return [a.status for a in broker.attempts if a.target == url]


def _accepted(broker: Broker, event_type: str) -> list[Event]:
    return [e for e in broker.accepted if e["type"] == event_type]


def _picked(jq: str, records: list[Path]) -> list[Path]:
    """The records the runbook's step 2 picks for re-sending, its own jq run on them."""
    section = _section("Recover dead-lettered generations")
    [program] = re.findall(r"jq -r '(.*?)' records/", section, flags=re.S)
    if not records:
        return []
    out = subprocess.run(
        [jq, "-r", program, *map(str, records)], check=True, capture_output=True, text=True
    ).stdout
    return [Path(line) for line in out.splitlines()]


def _resent(jq: str, record: Path) -> Event:
    """The event the runbook's step 3 sends for ``record``."""
    section = _section("Recover dead-lettered generations")
    [program] = re.findall(r"jq -c '(.*?)' \"\$RECORD\"", section, flags=re.S)
    sent = subprocess.run([jq, "-c", program, str(record)], check=True, capture_output=True)
    event = decode(Message({"content-type": "application/cloudevents+json"}, sent.stdout))
    assert event is not None
    return event


def _told_backoff() -> dict[str, int]:
    """The seconds of backoff after which the runbook says a corrupt record's event is
    dead-lettered, by broker class."""
    said = _said(_section("Repair a corrupt record"))
    found = re.search(
        r"after (\d+) s of backoff on prod's Kafka broker \((\d+) s on dev's channel-based", said
    )
    assert found, "the runbook says when the event is dead-lettered"
    return {KAFKA_BROKER: int(found[1]), CHANNEL_BROKER: int(found[2])}


@pytest.mark.parametrize(
    ("overlay", "broker_class"), [("prod", KAFKA_BROKER), ("dev", CHANNEL_BROKER)]
)
def test_a_corrupt_record_dead_letters_its_event_which_is_resent_once_repaired(
    cluster: Cluster, routing: RoutingOf, jq: str, overlay: str, broker_class: str
) -> None:
    """derive answers a corrupt metadata record 503 with ``Retry-After: 60``; the broker does
    not wait for a repair but retries on its own backoff and dead-letters the event. Repaired
    (the previous version restored), the record the runbook picks, re-sent, goes on."""
    r = routing(overlay)
    gid = f"corrupt-{overlay}"
    rendered = _rendered(cluster, gid)
    persisted = cluster.functions["imagegen-persist"].post(
        "/", headers=dict(encode_binary(rendered).headers), content=rendered.data
    )
    assert persisted.status_code == 200, persisted.text
    event = decode(Message({k.lower(): v for k, v in persisted.headers.items()}, persisted.content))
    assert event is not None and event["type"] == IMAGE_PERSISTED
    record = cluster.store / GenerationKeys(gid, NOW).metadata
    first = record.read_bytes()
    record.write_bytes(b'{"persisted": ')

    broker = _run(cluster.broker(r, broker_class), event)
    url = cluster.functions["imagegen-derive"].url
    tries = [a for a in broker.attempts if a.target == url]
    [derive] = [t for t in r.triggers if t.name == "imagegen-derive"]
    assert [a.status for a in tries] == [503] * (1 + (derive.retry or 0))
    assert round(tries[-1].at) == _told_backoff()[broker_class]  # Retry-After: 60 unread
    assert [d.trigger for d in broker.dead_letters if d.accepted] == ["imagegen-derive"]
    assert _accepted(broker, IMAGE_DERIVED) == []
    [letter] = cluster.records()
    failure = json.loads(letter.read_text())
    assert failure["error_code"] == "503" and "is corrupt" in failure["error_body"]["message"]

    record.write_bytes(first)  # the previous version, restored
    assert _picked(jq, cluster.records()) == [letter]
    again = _run(cluster.broker(r, broker_class), _resent(jq, letter))
    assert _statuses(again, cluster, "imagegen-derive") == [200]
    [derived] = _accepted(again, IMAGE_DERIVED)
    assert derived["subject"] == gid


def test_a_removed_persist_record_is_written_anew_and_the_ledger_keeps_the_first(
    cluster: Cluster, routing: RoutingOf, jq: str
) -> None:
    """The runbook's persist bullet: removed, the record comes back with a new persisted_at
    and newly signed URLs, in a reply of the first one's id that the ledger does not take;
    the previous version restored, the re-sent event is answered with the first record."""
    said = _said(_section("Repair a corrupt record"))
    [bullet] = [b for b in said.split(" - ") if b.startswith("**persist's metadata record")]
    assert "the same record" not in bullet.replace("does not bring the same record back", "")
    for told in ("a new `persisted_at`", "URLs signed anew", "first one's `source` and `id`"):
        assert told in bullet, told

    r = routing("prod")
    gid = "removed-record"
    rendered = _rendered(cluster, gid)
    broker = _run(cluster.broker(r, KAFKA_BROKER), rendered)
    [first] = _accepted(broker, IMAGE_PERSISTED)
    assert _accepted(broker, IMAGE_DERIVED)
    record = cluster.store / GenerationKeys(gid, NOW).metadata
    original = record.read_bytes()

    record.write_bytes(b"")
    corrupt = _run(cluster.broker(r, KAFKA_BROKER), rendered)  # a redelivery
    assert [d.trigger for d in corrupt.dead_letters if d.accepted] == ["imagegen-persist"]
    [letter] = _picked(jq, cluster.records())

    time.sleep(1.05)  # signed URLs count whole seconds
    record.unlink()
    again = _run(cluster.broker(r, KAFKA_BROKER), _resent(jq, letter))
    [second] = _accepted(again, IMAGE_PERSISTED)
    assert (second["source"], second["id"]) == (first["source"], first["id"])
    old, new = first.json(), second.json()
    assert isinstance(old, dict) and isinstance(new, dict)
    assert new["persisted_at"] != old["persisted_at"] and new["urls"] != old["urls"]
    assert json.loads(record.read_text())["persisted"] == new
    # derive made the derivatives from the first: it answers from their record.
    [derived] = _accepted(again, IMAGE_DERIVED)
    assert _statuses(again, cluster, "imagegen-derive") == [200]
    assert derived.json()["persisted_at"] == old["persisted_at"]  # type: ignore[index]
    ledger = open_ledger(cluster.ledger_url)
    try:
        kept = ledger.get(gid)
    finally:
        ledger.close()
    assert kept is not None and kept.urls == old["urls"]
    assert kept.persisted_at == datetime.fromisoformat(old["persisted_at"])

    record.write_bytes(original)  # the previous version, restored instead
    restored = _run(cluster.broker(r, KAFKA_BROKER), _resent(jq, letter))
    [answered] = _accepted(restored, IMAGE_PERSISTED)
    assert answered.json() == old


def test_the_runbook_picks_a_delivery_that_got_no_answer_and_not_what_would_fail_again(
    cluster: Cluster, routing: RoutingOf, jq: str
) -> None:
    """On the Kafka broker a delivery that never got an answer is dead-lettered with only
    ``knativeerrordest``: no code, no body. The runbook's step 2 picks it; not a 4xx, nor a
    ``generation.failed`` a stage reported."""
    r = routing("prod")
    gid = "unanswered"
    rendered = _rendered(cluster, gid)
    broker = _run(cluster.broker(r, KAFKA_BROKER, **{"imagegen-persist": UNREACHABLE}), rendered)
    [letter] = cluster.records()
    unanswered = json.loads(letter.read_text())
    assert (unanswered["error_code"], unanswered["error_body"]) == (None, None)
    assert unanswered["error_destination"] == UNREACHABLE
    # Its key is relative to the storage prefix, as the runbook's archive command takes it.
    assert letter == cluster.store / unanswered["key"]
    assert broker.lost == []

    # What would fail again: a refusal (4xx), its body JSON or text, and a reported failure.
    sink = cluster.functions["imagegen-deadletter"]
    refusals = {
        "400": b'{"error": "invalid_request", "retryable": false}',
        "413": b"request entity too large",
    }
    for code, body in refusals.items():
        headers = {
            **encode_binary(rendered.with_attributes(id=f"refused-{code}")).headers,
            "ce-knativeerrordest": "http://imagegen-persist.imagegen.svc.cluster.local",
            "ce-knativeerrorcode": code,
            "ce-knativeerrordata": base64.b64encode(body).decode(),
        }
        assert sink.post("/", headers=headers, content=rendered.data).status_code == 202
    failed = {"specversion": "1.0", "type": GENERATION_FAILED, "source": "/imagegen/derive"}
    headers = {f"ce-{k}": v for k, v in {**failed, "id": "f-1", "subject": gid}.items()}
    reply = sink.post(
        "/",
        headers={**headers, "content-type": "application/json"},
        content=json.dumps({"generation_id": gid, "stage": "derive"}).encode(),
    )
    assert reply.status_code == 202
    assert len(cluster.records()) == 4

    assert _picked(jq, cluster.records()) == [letter]
    again = _run(cluster.broker(r, KAFKA_BROKER), _resent(jq, letter))  # persist back
    assert _statuses(again, cluster, "imagegen-persist") == [200]
    assert _accepted(again, IMAGE_PERSISTED)


def _sh_lines(section: str, *starts: str) -> str:
    """The one line of ``section``'s ``sh`` blocks that begins with each of ``starts``."""
    blocks = re.findall(r"```sh\n(.*?)```", _section(section), flags=re.S)
    lines = [line.strip() for block in blocks for line in block.splitlines()]
    found = []
    for start in starts:
        [line] = [line for line in lines if line.startswith(start)]
        found.append(line)
    return "\n".join(found)


def _aws_said(script: str, **env: str) -> list[str]:
    """The ``aws`` commands ``script`` runs in bash, with ``env``: each its words."""
    stub = 'aws() { echo "$*"; }\n'
    done = subprocess.run(
        ["bash", "-euc", stub + script],
        env={"PATH": os.environ["PATH"], **env},
        check=True,
        capture_output=True,
        text=True,
    )
    return done.stdout.splitlines()


@pytest.mark.usefixtures("jq")  # the recovery commands read the record's key with jq
@pytest.mark.parametrize(("prefix", "root"), [("", "s3://b"), ("images", "s3://b/images")])
def test_the_runbooks_store_addresses_hold_with_or_without_a_prefix(
    tmp_path: Path, prefix: str, root: str
) -> None:
    """``IMAGEGEN_STORAGE_URL`` may be ``s3://BUCKET`` alone: the runbook's commands then
    address ``s3://BUCKET/failures/…``, not ``s3://BUCKET//failures/…``."""
    record = tmp_path / "record.json"
    record.write_text(json.dumps({"key": "failures/2026/12/07/persist-1.json"}))
    recover = _sh_lines(
        "Recover dead-lettered generations",
        "ROOT=",
        "DAY=",
        "aws s3 cp --recursive",
        "aws s3 mv",
    )
    assert _aws_said(recover, BUCKET="b", PREFIX=prefix, RECORD=str(record)) == [
        f"s3 cp --recursive {root}/failures/2026/12/07/ records/2026/12/07/",
        f"s3 mv {root}/failures/2026/12/07/persist-1.json"
        f" {root}/archive/failures/2026/12/07/persist-1.json",
    ]

    key = GenerationKeys("gen-1", NOW).metadata
    repair = _sh_lines("Repair a corrupt record", "aws s3 cp record.json")
    assert _aws_said(repair, BUCKET="b", PREFIX=prefix, KEY=key) == [
        f"s3 cp record.json {root}/{key} --content-type application/json"
    ]
