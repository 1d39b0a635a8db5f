"""The event sinks, the ledger's ``POST /`` and the dead-letter sink's, take the broker's OIDC
token only: an API key, accepted by every stage, may query the ledger and replay from it, never
write an event (a webhook named for another's generation, a forged image URL)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest

from imagegen.auth import ANY_CALLER, BROKER, new_api_key
from imagegen.ledger import LedgerEvent
from imagegen.stages import all_stages
from tests.fakes.loopback import LoopbackServer
from tests.fakes.oidc_issuer import Issuer
from tests.functions.clients import InProcessFunction
from tests.functions.conftest import auth_env, base_env
from tests.ledger.chain import binary, chain

API_KEY, API_KEY_HASH = new_api_key()
KEY = {"Authorization": f"Bearer {API_KEY}"}


class _Ingress(BaseHTTPRequestHandler):
    """A broker's ingress taking every event: 202, as knative/eventing answers an accepted one
    (pkg/broker/ingress/ingress_handler.go)."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.send_response(202)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("sinks")


@pytest.fixture(scope="module")
def sinks(issuer: Issuer, store: Path) -> Iterator[dict[str, InProcessFunction]]:
    """The ledger (SQLite) and the dead-letter sink, authentication on, a broker to replay to."""
    from imagegen.stages import ledger as ledger_stage

    url = f"sqlite:///{store / 'ledger.db'}"
    with LoopbackServer(_Ingress, name="broker-ingress") as broker:
        env = {
            **base_env(store / "objects"),
            **auth_env(issuer.url, API_KEY_HASH),
            "IMAGEGEN_LEDGER_URL": url,
            "K_SINK": broker.url,
        }
        functions = {name: InProcessFunction(name, env) for name in ("ledger", "deadletter")}
        yield functions
        # The ledger's warm-up opens it in the background: let it end before closing it.
        deadline = time.monotonic() + 60
        while not functions["ledger"].get("/readyz").json()["warm"]:
            if time.monotonic() > deadline:
                break
            time.sleep(0.02)  # polling the probe
        for function in functions.values():
            function.close()
        opened, _ = ledger_stage._opened.pop(url, (None, None))
        if opened is not None:
            opened.close()


def _sent(event: LedgerEvent, credential: str) -> dict[str, Any]:
    """``event`` as the broker POSTs it, under ``credential``."""
    sent = binary(event)
    sent["headers"]["Authorization"] = f"Bearer {credential}"
    return sent


def test_every_event_sink_takes_the_brokers_token_only() -> None:
    for stage in all_stages():
        assert stage.callers == (BROKER if stage.emits is None else ANY_CALLER), stage.name
        assert all(route.callers == ANY_CALLER for route in stage.routes), stage.name


def test_an_api_key_may_not_write_an_event_into_the_ledger(
    sinks: dict[str, InProcessFunction],
) -> None:
    ledger = sinks["ledger"]
    events = chain("gen-keyed", webhook="https://attacker.example/hook")
    for name in ("requested", "persisted"):
        reply = ledger.post("/", **_sent(events[name], API_KEY))
        assert reply.status_code == 403, reply.text
        assert reply.headers["WWW-Authenticate"].endswith('error="insufficient_scope"')
        body = reply.json()
        assert body["error"] == "forbidden" and not body["retryable"]
        said = "API keys may call the stages and the ledger's query and replay API"
        assert said in body["message"]
        assert API_KEY not in reply.text
    assert ledger.client.get("/generations/gen-keyed", headers=KEY).status_code == 404


def test_the_brokers_token_writes_and_an_api_key_reads_and_replays(
    sinks: dict[str, InProcessFunction], issuer: Issuer
) -> None:
    ledger, token = sinks["ledger"], issuer.sign({}, audience="imagegen-ledger")
    events = chain("gen-brokered")
    for name in ("requested", "enhanced"):
        reply = ledger.post("/", **_sent(events[name], token))
        assert reply.status_code == 202, reply.text
    detail = ledger.client.get("/generations/gen-brokered", headers=KEY)
    assert detail.status_code == 200 and detail.json()["status"] == "enhanced"
    page = ledger.client.get("/generations", headers=KEY)
    assert page.status_code == 200
    assert "gen-brokered" in [g["generation_id"] for g in page.json()["items"]]
    replay = ledger.client.post("/generations/gen-brokered/replay", headers=KEY)
    assert replay.status_code == 202, replay.text
    assert replay.json()["replay_of"] == "gen-brokered"
    # The routes take the broker's token as well; a token for another function, nowhere.
    bearer = {"Authorization": f"Bearer {token}"}
    assert ledger.client.get("/generations/gen-brokered", headers=bearer).status_code == 200
    other = issuer.sign({}, audience="imagegen-enhance")
    assert ledger.post("/", **_sent(events["rendered"], other)).status_code == 401


def test_an_api_key_may_not_write_a_failure_record(
    sinks: dict[str, InProcessFunction], issuer: Issuer, store: Path
) -> None:
    deadletter, failed = sinks["deadletter"], chain("gen-dead")["failed"]
    reply = deadletter.post("/", **_sent(failed, API_KEY))
    assert reply.status_code == 403, reply.text
    assert "not write events" in reply.json()["message"]
    assert not list((store / "objects").rglob("failures/**/*.json"))
    token = issuer.sign({}, audience="imagegen-deadletter")
    assert deadletter.post("/", **_sent(failed, token)).status_code == 202
    assert len(list((store / "objects").rglob("failures/**/*.json"))) == 1


def test_an_api_key_is_refused_before_the_event_is_read(
    sinks: dict[str, InProcessFunction],
) -> None:
    # Refused as the caller is: no megabyte read, no event parsed, for one who may send none.
    ledger = sinks["ledger"]
    big = {**KEY, "content-type": "application/json"}
    assert ledger.post("/", headers=big, content=b"{" + b" " * (2 << 20)).status_code == 403
