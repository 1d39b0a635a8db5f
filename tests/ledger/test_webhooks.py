"""Webhooks: Standard Webhooks signatures, SSRF refusal, at-least-once delivery with retries."""

from __future__ import annotations

import base64
import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler
from typing import Any

import pytest
from pydantic import ValidationError
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from imagegen._retry_after import RETRY_AFTER_MAX, retry_after
from imagegen.errors import ConfigurationError, InvalidRequest
from imagegen.events import IMAGE_DERIVED, reply_id, source_for
from imagegen.ledger import Delivery, Ledger, LedgerEvent
from imagegen.ledger.fold import message_id
from imagegen.ledger.outbox import Dispatcher
from imagegen.ledger.webhooks import (
    AddressPolicy,
    WebhookFailed,
    WebhookGone,
    WebhookRefused,
    WebhookSender,
    sign,
)
from imagegen.settings import Settings
from tests.fakes.loopback import LoopbackServer
from tests.ledger.chain import chain
from tests.ledger.receiver import Receiver, serve, types_of

OLD = "whsec_" + base64.b64encode(b"old secret of thirty-two bytes!!").decode()
NEW = "whsec_" + base64.b64encode(b"new secret of thirty-two bytes!!").decode()
LOOPBACK = AddressPolicy(("127.0.0.0/8",))


def _delivery(url: str) -> Delivery:
    return Delivery(
        msg_id="msg_1",
        generation_id="gen-1",
        event="completed",
        url=url,
        payload='{"type":"generation.completed","data":{}}',
        attempts=1,
        created_at=datetime.now(UTC),
    )


def test_signatures_verify_with_either_secret_during_rotation() -> None:
    now = int(time.time())
    body = '{"type":"generation.completed"}'
    headers = {
        "webhook-id": "msg_1",
        "webhook-timestamp": str(now),
        "webhook-signature": sign([OLD, NEW], "msg_1", now, body),
    }
    assert Webhook(OLD).verify(body, headers) == {"type": "generation.completed"}
    assert Webhook(NEW).verify(body, headers) == {"type": "generation.completed"}
    other = "whsec_" + base64.b64encode(b"x" * 32).decode()
    with pytest.raises(WebhookVerificationError):
        Webhook(other).verify(body, headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(OLD).verify(body + " ", headers)


def test_a_secret_that_is_not_whsec_base64_is_refused() -> None:
    with pytest.raises(InvalidRequest) as caught:
        WebhookSender(["whsec_%%%"], LOOPBACK)
    assert caught.value.fields == ["webhook_secrets"]


@pytest.mark.parametrize(
    ("url", "allowed"),
    [
        ("http://127.0.0.1:9/hook", ()),
        ("http://[::1]/hook", ()),
        ("http://169.254.169.254/latest/meta-data/", ()),
        ("http://10.1.2.3/hook", ()),
        ("http://100.100.100.200/", ()),
        ("http://localhost/hook", ()),
        ("http://8.8.8.8/hook", ("hooks.example.com",)),
        ("http://8.8.8.8/hook", ("10.0.0.0/8",)),  # an allow-list: a network alone too
        ("http://127.0.0.1/hook", ("localhost",)),
        ("ftp://8.8.8.8/hook", ()),
        # IPv6 forms that reach an IPv4 address are judged by that address.
        ("http://[64:ff9b::10.0.0.1]/hook", ()),  # NAT64, RFC 6052
        ("http://[64:ff9b::169.254.169.254]/latest/meta-data/", ()),
        ("http://[64:ff9b::127.0.0.1]/", ()),
        ("http://[64:ff9b:1::a00:1]/", ()),  # local-use NAT64, RFC 8215
        ("http://[2002:a00:1::]/", ()),  # 6to4 of 10.0.0.1
        ("http://[2002:a9fe:a9fe::]/", ()),  # 6to4 of 169.254.169.254
        ("http://[::10.0.0.1]/", ()),  # IPv4-compatible
        ("http://[::ffff:0:7f00:1]/", ()),  # IPv4-translated (SIIT)
        ("http://[::ffff:127.0.0.1]/", ()),  # IPv4-mapped
        ("http://[64:ff9b::8.8.8.8]/hook", ("hooks.example.com",)),
        ("http://224.0.0.1/", ()),  # multicast
    ],
)
def test_unsafe_webhook_addresses_are_refused(url: str, allowed: tuple[str, ...]) -> None:
    with pytest.raises(WebhookRefused):
        AddressPolicy(allowed).vet(url)


@pytest.mark.parametrize(
    ("url", "allowed"),
    [
        ("http://8.8.8.8/hook", ()),
        ("https://8.8.8.8/hook", ("8.8.8.0/24",)),
        ("http://10.1.2.3/hook", ("10.0.0.0/8",)),
        ("http://127.0.0.1:8080/hook", ("127.0.0.0/8",)),
        ("http://[64:ff9b::808:808]/hook", ()),  # NAT64 of 8.8.8.8
        ("http://[2002:808:808::1]/hook", ()),  # 6to4 of 8.8.8.8
        ("http://[64:ff9b::a01:203]/hook", ("10.0.0.0/8",)),  # the IPv4 network is allowed
        ("http://[::ffff:a01:203]/hook", ("10.0.0.0/8",)),
    ],
)
def test_public_or_allowed_addresses_pass(url: str, allowed: tuple[str, ...]) -> None:
    _, addresses = AddressPolicy(allowed).vet(url)
    assert [str(a) in url for a in addresses] == [True]


@pytest.mark.parametrize(
    "host", ["a..example.com", "a" * 64 + ".example.com", "a" * 300, ".".join(["a" * 63] * 4)]
)
def test_a_host_name_dns_cannot_carry_is_refused(host: str) -> None:
    # pydantic's AnyHttpUrl (GenerationRequest.webhook) lets these through.
    with pytest.raises(WebhookRefused, match="not a valid host name"):
        AddressPolicy().vet(f"http://{host}/hook")


def _secret(size: int) -> str:
    return "whsec_" + base64.b64encode(b"k" * size).decode()


@pytest.mark.parametrize(
    "secret",
    ["whsec_", "whsec_AA==", "abcd", _secret(32).removeprefix("whsec_"), _secret(23), _secret(65)],
)
def test_a_secret_without_whsec_or_of_the_wrong_size_is_refused(secret: str) -> None:
    # Standard Webhooks (spec/standard-webhooks.md): whsec_ + base64 of 24 to 64 bytes.
    with pytest.raises(InvalidRequest) as caught:
        WebhookSender([secret], LOOPBACK)
    assert caught.value.fields == ["webhook_secrets"]
    with pytest.raises(ValidationError) as invalid:
        Settings(webhook_secrets=f"{OLD},{secret}")
    assert "IMAGEGEN_WEBHOOK_SECRETS: secret 2 of 2" in str(invalid.value)
    if len(secret) > 8:
        assert secret not in str(invalid.value) and OLD not in str(invalid.value)
    reason = ConfigurationError.of("", invalid.value, name=Settings.variable).message
    assert reason.startswith("invalid settings: IMAGEGEN_WEBHOOK_SECRETS")


@pytest.mark.parametrize("size", [24, 64])
def test_secrets_of_24_to_64_bytes_are_taken(size: int) -> None:
    WebhookSender([_secret(size)], LOOPBACK).close()
    assert len(Settings(webhook_secrets=_secret(size)).webhook_secrets) == 1


@pytest.mark.parametrize("value", ["", " ", " , "])
def test_an_empty_secrets_variable_is_refused_not_taken_for_none(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    """A command that failed to make a secret left it empty: the dispatcher did not start and
    every message waited in the outbox, without a word."""
    monkeypatch.setenv("IMAGEGEN_WEBHOOK_SECRETS", value)
    with pytest.raises(ValidationError) as invalid:
        Settings()
    reason = ConfigurationError.of("", invalid.value, name=Settings.variable).message
    assert reason == "invalid settings: IMAGEGEN_WEBHOOK_SECRETS"
    [error] = invalid.value.errors()
    assert error["msg"] == "Value error, empty: give one or more whsec_ secrets, or leave it unset"
    monkeypatch.delenv("IMAGEGEN_WEBHOOK_SECRETS")
    assert Settings().webhook_secrets == []  # unset: no webhooks, as documented


@pytest.mark.parametrize(
    "entry",
    ["10.0.0.0/33", "not a host/99", "hooks.example.com/24", "hooks.example.com:8443", "a..b"],
)
def test_an_allowed_entry_that_is_no_network_address_or_host_is_refused(entry: str) -> None:
    """It was taken for a host name no URL has: ``10.0.0.0/33`` allowed nothing, silently."""
    with pytest.raises(ValidationError) as invalid:
        Settings(webhook_allowed=f"127.0.0.0/8,{entry}")
    reason = ConfigurationError.of("", invalid.value, name=Settings.variable).message
    assert reason == "invalid settings: IMAGEGEN_WEBHOOK_ALLOWED"
    [error] = invalid.value.errors()
    assert error["msg"] == (
        "Value error, entry 2 of 2 is neither a network (10.0.0.0/8), an address nor a host name"
    )
    assert entry not in str(invalid.value)


def test_allowed_networks_addresses_and_hosts_are_taken_as_the_policy_reads_them() -> None:
    entries = [
        "10.0.0.0/8",
        "192.168.1.7",
        "fd00::/8",
        "::1",
        "hooks.example.com",
        "b\u00fccher.de.",
    ]
    settings = Settings(webhook_allowed=",".join(entries))
    assert settings.webhook_allowed == entries
    policy = AddressPolicy(tuple(settings.webhook_allowed))
    assert len(policy.networks) == 4
    assert policy.hosts == {"hooks.example.com", "b\u00fccher.de"}


def test_redirects_are_not_followed() -> None:
    receiver = Receiver(OLD, fail_first=set(), slow_first=set(), slow=0)
    with serve(receiver):
        sender = WebhookSender([OLD], LOOPBACK, timeout=2)
        with pytest.raises(Exception, match="redirect not followed"):
            sender.send(_delivery(receiver.url + "/redirect"))
        sender.close()
    assert receiver.paths == {"/redirect": 1}


@contextmanager
def answering(
    status: int, headers: dict[str, str] | None = None
) -> Iterator[tuple[str, list[str]]]:
    """A receiver on loopback answering every message ``status`` with ``headers``; yields its
    URL and the ``webhook-id`` of each message it got, in order."""
    got: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("content-length", 0)))
            got.append(self.headers["webhook-id"])
            self.send_response(status)
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    with LoopbackServer(Handler, name="webhook-receiver") as server:
        yield server.url + "/hook", got


NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("120", 120.0),
        (" 7 ", 7.0),
        ("0", 0.0),
        ("9" * 400, RETRY_AFTER_MAX),  # more than a day asks for a day
        # RFC 9110, section 5.6.7: IMF-fixdate, and the obsolete forms a recipient reads too.
        ("Mon, 01 Jun 2026 12:01:30 GMT", 90.0),
        ("Monday, 01-Jun-26 12:01:30 GMT", 90.0),
        ("Mon Jun  1 12:01:30 2026", 90.0),
        ("Mon, 01 Jun 2026 11:00:00 GMT", 0.0),  # already past: no wait
        ("Tue, 01 Jun 2027 12:00:00 GMT", RETRY_AFTER_MAX),
    ],
)
def test_retry_after_is_delay_seconds_or_an_http_date(value: str, seconds: float) -> None:
    assert retry_after(value, now=NOW) == seconds


@pytest.mark.parametrize(
    "value", [None, "", "soon", "-5", "1.5", "120s", "\u0661\u0662", "2026-06-01"]
)
def test_a_retry_after_that_is_neither_is_ignored(value: str | None) -> None:
    assert retry_after(value, now=NOW) is None


def test_a_failed_reply_carries_its_status_and_retry_after() -> None:
    sender = WebhookSender([OLD], LOOPBACK, timeout=2)
    later = format_datetime(datetime.now(UTC) + timedelta(seconds=600), usegmt=True)
    with answering(503, {"Retry-After": later}) as (url, _), pytest.raises(WebhookFailed) as caught:
        sender.send(_delivery(url))
    assert caught.value.status_code == 503
    assert 590 <= (caught.value.retry_after or 0) <= 600
    assert caught.value.throttled
    assert caught.value.message.startswith("HTTP 503, Retry-After ")
    with answering(500) as (url, _), pytest.raises(WebhookFailed) as caught:
        sender.send(_delivery(url))
    assert (caught.value.status_code, caught.value.retry_after) == (500, None)
    assert not caught.value.throttled
    assert caught.value.message == "HTTP 500"


def test_410_gone_is_final() -> None:
    # Standard Webhooks: the receiver is "no longer interested"; a retry cannot help.
    sender = WebhookSender([OLD], LOOPBACK, timeout=2)
    with answering(410) as (url, got), pytest.raises(WebhookGone, match="gone") as caught:
        sender.send(_delivery(url))
    assert isinstance(caught.value, WebhookRefused)
    assert len(got) == 1


def test_a_host_whose_first_address_refuses_is_sent_to_at_the_next(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A name with several addresses (an AAAA first on a pod without IPv6, one server of a
    pool down): each is tried in the resolver's order until one connects."""
    sender = WebhookSender([OLD], LOOPBACK, timeout=5)
    with answering(204) as (url, got):
        port = int(url.split(":")[2].split("/")[0])
        resolved = [  # 127.0.0.2: loopback, but nothing listens there
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.2", port)),
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port)),
        ]
        monkeypatch.setattr(socket, "getaddrinfo", lambda *_, **__: resolved)
        assert sender.send(_delivery(f"http://hooks.test:{port}/hook")) == 204
        assert len(got) == 1
        monkeypatch.setattr(socket, "getaddrinfo", lambda *_, **__: resolved[:1])
        with pytest.raises(WebhookFailed, match="ConnectError"):
            sender.send(_delivery(f"http://hooks.test:{port}/hook"))


@contextmanager
def dropping_syns(port: int) -> Iterator[None]:
    """127.0.0.2:``port`` as a host that drops SYNs (a firewall, a dead route): a listener
    that never accepts, its queue full, so Linux drops each new SYN and the connect hangs."""
    hole = socket.socket()
    fillers: list[socket.socket] = []
    try:
        hole.bind(("127.0.0.2", port))
        hole.listen(0)
        for _ in range(4):
            filler = socket.socket()
            filler.setblocking(False)
            fillers.append(filler)
            filler.connect_ex(("127.0.0.2", port))
        time.sleep(0.2)  # the handshakes that fit the queue complete
        yield
    finally:
        for filler in fillers:
            filler.close()
        hole.close()


def test_a_host_whose_first_address_drops_the_connect_is_sent_to_at_the_next(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An address that never answers the connect (SYNs dropped) takes only its share of the
    attempt's time, then the next address is tried, as after a refused connect; the attempt
    keeps its overall limit."""
    sender = WebhookSender([OLD], LOOPBACK, timeout=3)
    with answering(204) as (url, got):
        port = int(url.split(":")[2].split("/")[0])
        resolved = [
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.2", port)),
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port)),
        ]
        monkeypatch.setattr(socket, "getaddrinfo", lambda *_, **__: resolved)
        with dropping_syns(port):
            started = time.monotonic()
            assert sender.send(_delivery(f"http://hooks.test:{port}/hook")) == 204
            assert time.monotonic() - started < 3 and len(got) == 1
            monkeypatch.setattr(socket, "getaddrinfo", lambda *_, **__: resolved[:1])
            started = time.monotonic()
            with pytest.raises(WebhookFailed, match=r"within 3 s"):  # the overall limit
                sender.send(_delivery(f"http://hooks.test:{port}/hook"))
            assert time.monotonic() - started < 4


def test_a_name_server_that_does_not_answer_ends_the_attempt_in_its_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The lookup is part of the attempt: one that hangs (a name server that drops queries)
    ends it within the attempt's time, so no claim outlives its lease."""
    release = threading.Event()

    def hanging(*_: object, **__: object) -> list[object]:
        release.wait(30)
        raise socket.gaierror("gave up")

    monkeypatch.setattr(socket, "getaddrinfo", hanging)
    sender = WebhookSender([OLD], LOOPBACK, timeout=0.3)
    started = time.monotonic()
    try:
        with pytest.raises(WebhookFailed, match=r"did not resolve within 0\.3 s"):
            sender.send(_delivery("http://hooks.test/hook"))
    finally:
        release.set()
    assert time.monotonic() - started < 2


def _dispatch_until_settled(dispatcher: Dispatcher, ledger: Ledger, gids: list[str]) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        dispatcher.run_once()
        states = [s["state"] for g in gids for s in ledger.delivery_states(g).values()]
        if states and all(s != "pending" for s in states):
            return
        time.sleep(0.02)
    raise AssertionError(f"deliveries still pending: {states}")


def test_every_notification_arrives_signed_despite_failing_and_slow_receivers(
    ledger: Ledger,
) -> None:
    wants = {
        "gen-a": ["started", "completed", "failed"],
        "gen-b": ["completed"],
        "gen-c": ["failed"],
        "gen-d": ["started", "failed"],
    }
    ends = {"gen-a": "persisted", "gen-b": "persisted", "gen-c": "failed", "gen-d": "failed"}
    expected = {
        message_id(gid, kind): f"generation.{kind}"
        for gid, kinds in wants.items()
        for kind in kinds
        if kind == "started" or (kind == "completed") == (ends[gid] == "persisted")
    }
    ids = sorted(expected)
    receiver = Receiver(NEW, fail_first=set(ids[::2]), slow_first={ids[1], ids[3]}, slow=1.0)
    with serve(receiver):
        for gid, kinds in wants.items():
            events = chain(gid, webhook=receiver.url + "/hook", webhook_events=kinds)
            # The end first: a webhook owed before its request was seen is still sent.
            ledger.ingest(events[ends[gid]])
            ledger.ingest(events["requested"])
            ledger.ingest(events["requested"])  # redelivered: no second message
        sender = WebhookSender([OLD, NEW], LOOPBACK, timeout=0.5)
        dispatcher = Dispatcher(ledger, sender, quick_tries=2, backoff=0.05, workers=4)
        _dispatch_until_settled(dispatcher, ledger, list(wants))
        dispatcher.stop()

    assert receiver.rejected == []
    assert set(receiver.accepted) == set(expected)
    for msg_id, kind in expected.items():
        assert types_of(receiver.accepted[msg_id]) == {kind}
    # The failed and the timed-out first attempts were tried again.
    assert all(receiver.attempts[m] >= 2 for m in {*ids[::2], ids[1], ids[3]})
    completed = receiver.accepted[message_id("gen-a", "completed")][0]
    assert completed["data"]["status"] == "persisted"
    assert completed["data"]["url"].startswith("https://images.example/")
    states = ledger.delivery_states("gen-a")
    assert {s["state"] for s in states.values()} == {"delivered"}


def test_refused_urls_and_exhausted_retries_end_failed(ledger: Ledger) -> None:
    receiver = Receiver(OLD, fail_first=set(), slow_first=set(), slow=0)
    with serve(receiver):
        ledger.ingest(chain("gen-refused", webhook=receiver.url + "/hook")["requested"])
        strict = WebhookSender([OLD], AddressPolicy(), timeout=0.5)
        # Only the refusal is final at once; the loopback receiver is off limits by default.
        Dispatcher(ledger, strict, quick_tries=1, backoff=0).run_once()
        refused = ledger.delivery_states("gen-refused")["started"]
        assert refused["state"] == "failed"
        assert "non-public address" in refused["last_error"]
        assert receiver.paths["/hook"] == 0

        ledger.ingest(chain("gen-down", webhook=receiver.url + "/down")["requested"])
        sender = WebhookSender([OLD], LOOPBACK, timeout=0.5)
        dispatcher = Dispatcher(ledger, sender, quick_tries=2, max_attempts=3, backoff=0.01)
        _dispatch_until_settled(dispatcher, ledger, ["gen-down"])
        dispatcher.stop()
    down = ledger.delivery_states("gen-down")["started"]
    assert (down["state"], down["attempts"], down["last_error"]) == ("failed", 3, "HTTP 503")
    assert receiver.paths["/down"] == 6  # three claims of two quick tries each


def _derived(persisted: LedgerEvent) -> LedgerEvent:
    """derive's answer to ``persisted``: it may reach the ledger before ``persisted`` does."""
    gid = persisted.data["generation_id"]
    return LedgerEvent(
        source=source_for("derive"),
        id=reply_id(gid, IMAGE_DERIVED),
        type=IMAGE_DERIVED,
        subject=gid,
        time=persisted.time,
        data={
            "generation_id": gid,
            "key": persisted.data["key"],
            "sha256": persisted.data["sha256"],
            "keys": {"record": persisted.data["key"] + ".derivatives.json"},
            "created_at": persisted.data["created_at"],
        },
    )


def test_completed_waits_for_the_persisted_image_itself(ledger: Ledger) -> None:
    """image.derived proves the image persisted, but says nothing of it: "completed" is owed
    once image.persisted is recorded, and then carries the image's URL, keys and checksum."""
    events = chain("gen-w", webhook="https://hooks.example/x", webhook_events=["completed"])
    ledger.ingest(events["requested"])
    assert ledger.ingest(_derived(events["persisted"])).status == "persisted"
    assert "completed" not in ledger.delivery_states("gen-w")
    ledger.ingest(events["persisted"])
    [completed] = ledger.claim_deliveries(lease=60)
    data = json.loads(completed.payload)["data"]
    assert data["url"] == events["persisted"].data["url"]
    assert data["keys"]["metadata"] and data["sha256"] == events["persisted"].data["sha256"]


def test_a_failure_not_yet_told_is_not_told_once_the_image_is_persisted(ledger: Ledger) -> None:
    """A stored image outranks a failure report (a failed render whose redelivery succeeded):
    the failed message still pending is cancelled; the caller hears "completed" alone."""
    kinds = ["completed", "failed"]
    events = chain("gen-f", webhook="https://hooks.example/x", webhook_events=kinds)
    for name in ("requested", "failed"):
        ledger.ingest(events[name])
    assert ledger.delivery_states("gen-f")["failed"]["state"] == "pending"
    ledger.ingest(events["persisted"])
    states = ledger.delivery_states("gen-f")
    assert states["failed"]["state"] == "cancelled"
    assert [d.event for d in ledger.claim_deliveries(lease=60)] == ["completed"]


def test_a_failure_being_told_when_the_image_is_persisted_is_recorded_as_told(
    ledger: Ledger,
) -> None:
    """Only a message not yet sent is cancelled: one a dispatcher is sending when the image is
    persisted reaches its receiver, and its delivery is recorded, followed by "completed"; one
    whose send fails stays cancelled (never told)."""
    kinds = ["completed", "failed"]
    for gid, delivered in (("gen-told", True), ("gen-untold", False)):
        # A receiver each: the first's "completed" stays claimed, and a receiver being sent
        # to is sent nothing else meanwhile.
        events = chain(gid, webhook=f"https://{gid}.example/x", webhook_events=kinds)
        for name in ("requested", "failed"):
            ledger.ingest(events[name])
        [sending] = ledger.claim_deliveries(lease=60)
        assert sending.event == "failed"
        ledger.ingest(events["persisted"])  # while the failed message is being sent
        assert (
            ledger.finish_delivery(
                sending.msg_id,
                delivered=delivered,
                error=None if delivered else "HTTP 500",
                retry_in=None if delivered else 5.0,
                attempts=sending.attempts,
            )
            is delivered
        )
        states = ledger.delivery_states(gid)
        assert states["failed"]["state"] == ("delivered" if delivered else "cancelled")
        [completed] = ledger.claim_deliveries(lease=60)
        assert (completed.generation_id, completed.event) == (gid, "completed")


def _invalid_request(gid: str, **request: Any) -> dict[str, LedgerEvent]:
    """``gid``'s request with ``request`` in its data and a width no model draws, and the
    ``generation.failed`` enhance answers it with (under the same id)."""
    events = chain(gid)
    data = {**events["requested"].data, "width": 100000, **request}
    refused = {
        **events["failed"].data,
        "stage": "enhance",
        "error": {"code": "invalid_request", "message": "invalid width", "retryable": False},
    }
    return {
        "requested": events["requested"].model_copy(update={"data": data}),
        "failed": events["failed"].model_copy(
            update={"source": source_for("enhance"), "data": refused}
        ),
    }


def test_a_request_enhance_refuses_still_tells_its_caller_it_started_and_failed(
    ledger: Ledger,
) -> None:
    receiver = Receiver(NEW, fail_first=set(), slow_first=set(), slow=0)
    with serve(receiver):
        events = _invalid_request("gen-invalid", webhook=receiver.url + "/hook")
        ledger.ingest(events["requested"])
        assert ledger.ingest(events["failed"]).status == "failed"
        dispatcher = Dispatcher(ledger, WebhookSender([NEW], LOOPBACK, timeout=0.5), backoff=0)
        _dispatch_until_settled(dispatcher, ledger, ["gen-invalid"])
        dispatcher.stop()
    assert receiver.rejected == []
    started = receiver.accepted[message_id("gen-invalid", "started")]
    failed = receiver.accepted[message_id("gen-invalid", "failed")]
    assert (types_of(started), types_of(failed)) == ({"generation.started"}, {"generation.failed"})
    told = failed[0]["data"]
    assert (told["status"], told["failed_stage"]) == ("failed", "enhance")
    assert told["error"]["code"] == "invalid_request"
    assert set(receiver.accepted) == {
        message_id("gen-invalid", "started"),
        message_id("gen-invalid", "failed"),
    }


def test_an_invalid_request_tells_only_the_events_it_asked_for(ledger: Ledger) -> None:
    events = _invalid_request(
        "gen-asked", webhook="https://hooks.example/x", webhook_events=["failed"]
    )
    ledger.ingest(events["requested"])
    assert ledger.delivery_states("gen-asked") == {}
    ledger.ingest(events["failed"])
    assert list(ledger.delivery_states("gen-asked")) == ["failed"]
    [message] = ledger.claim_deliveries(lease=60)
    assert message.url == "https://hooks.example/x"


def test_the_webhook_of_an_invalid_request_meets_the_senders_address_rules(
    ledger: Ledger,
) -> None:
    receiver = Receiver(OLD, fail_first=set(), slow_first=set(), slow=0)
    with serve(receiver):
        events = _invalid_request("gen-local", webhook=receiver.url + "/hook")
        ledger.ingest(events["requested"])
        # The loopback receiver is off limits by default, for this request as for a valid one.
        strict = WebhookSender([OLD], AddressPolicy(), timeout=0.5)
        Dispatcher(ledger, strict, quick_tries=1, backoff=0).run_once()
    refused = ledger.delivery_states("gen-local")["started"]
    assert refused["state"] == "failed" and "non-public address" in refused["last_error"]
    assert receiver.paths["/hook"] == 0


@pytest.mark.parametrize(
    "request_webhook",
    [
        {"webhook": "not a url"},
        {"webhook": "ftp://hooks.example/x"},
        {"webhook": "https://hooks.example/x", "webhook_events": ["finished"]},
        {"webhook": "https://hooks.example/x", "webhook_events": "failed"},
        {"webhook": "https://hooks.example/x", "webhook_events": ["failed"] * 4},
        {"webhook": 42},
    ],
)
def test_an_invalid_request_whose_webhook_is_invalid_too_tells_nobody(
    ledger: Ledger, request_webhook: dict[str, Any]
) -> None:
    events = _invalid_request("gen-mute", **request_webhook)
    ledger.ingest(events["requested"])
    assert ledger.ingest(events["failed"]).status == "failed"
    assert ledger.delivery_states("gen-mute") == {}
    assert ledger.claim_deliveries(lease=60) == []


def test_a_message_timestamp_is_utc_written_as_the_api_writes_times(ledger: Ledger) -> None:
    ledger.ingest(chain("gen-z", webhook="https://hooks.example/x")["requested"])
    [started] = ledger.claim_deliveries(lease=60)
    body = json.loads(started.payload)
    # The message is due when its event is recorded: the generation's updated_at, to the
    # microsecond and written alike.
    assert body["timestamp"].endswith("Z") and "+" not in body["timestamp"]
    assert body["timestamp"] == body["data"]["updated_at"]
    recorded = datetime.fromisoformat(body["timestamp"])
    assert recorded.utcoffset() == timedelta(0)
    assert abs(datetime.now(UTC) - recorded) < timedelta(minutes=1)
