"""Who a webhook message goes to: one receiver however its URL spells the host and the port,
and whatever user-info it carries; sent one message at a time by every claim."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from imagegen.ledger import Ledger
from imagegen.ledger.outbox import Dispatcher
from imagegen.ledger.webhooks import WebhookSender, receiver
from tests.ledger.chain import chain
from tests.ledger.test_outbox import _raw_receiver
from tests.ledger.test_webhooks import LOOPBACK, OLD, answering


@pytest.mark.parametrize(
    ("url", "named"),
    [
        ("https://u:p@Hooks.Example/x?token=t#f", "https://hooks.example"),
        ("HTTPS://hooks.example./x", "https://hooks.example"),
        ("https://hooks.example:443/", "https://hooks.example"),
        ("http://hooks.example:80/", "http://hooks.example"),
        ("http://hooks.example:443/", "http://hooks.example:443"),
        ("https://hooks.example:8443/x", "https://hooks.example:8443"),
        ("http://u@[::1]:9000/x", "http://[::1]:9000"),
        ("http://[::1]:80/x", "http://[::1]"),
    ],
)
def test_a_receiver_is_its_scheme_host_and_port(url: str, named: str) -> None:
    assert receiver(url) == named


@pytest.mark.parametrize("url", ["http://[::1/x", "http://h:99999/", "mailto:a@b"])
def test_a_url_with_no_receiver_is_refused(url: str) -> None:
    with pytest.raises(ValueError):
        receiver(url)


def _ingest(ledger: Ledger, urls: dict[str, str]) -> None:
    for gid, url in urls.items():
        ledger.ingest(chain(gid, webhook=url, webhook_events=["started"])["requested"])


def test_user_info_and_a_host_spelled_otherwise_make_no_other_receiver(ledger: Ledger) -> None:
    _ingest(
        ledger,
        {
            "gen-u0": "http://u0@hooks.example/a",
            "gen-u1": "http://u1:secret@Hooks.Example/b",
            "gen-dot": "http://hooks.example./c",
            "gen-port": "http://hooks.example:80/d",
            "gen-tls": "https://hooks.example/e",  # another scheme: another receiver
            "gen-other": "http://other.example/",
        },
    )
    first = ledger.claim_deliveries(limit=10, lease=60)
    assert [d.generation_id for d in first] == ["gen-u0", "gen-tls", "gen-other"]
    sending = first[0]
    for gid in ("gen-u1", "gen-dot", "gen-port"):
        assert ledger.claim_deliveries(limit=10, lease=60) == []  # hooks.example is busy
        assert ledger.finish_delivery(
            sending.msg_id, delivered=True, retry_in=None, attempts=sending.attempts
        )
        [sending] = ledger.claim_deliveries(limit=10, lease=60)
        assert sending.generation_id == gid


def test_a_slow_receiver_named_many_ways_is_sent_one_message_at_a_time(ledger: Ledger) -> None:
    """User names and spellings of one host are one receiver: its messages go one at a time,
    and another receiver's message goes in the same round, however many it has waiting."""
    lock = threading.Lock()
    at_once: list[int] = [0, 0]  # now, most

    def slow(conn: socket.socket) -> None:
        with lock:
            at_once[0] += 1
            at_once[1] = max(at_once)
        time.sleep(0.3)
        with lock:
            at_once[0] -= 1
        conn.sendall(b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n")

    with _raw_receiver(slow) as url, answering(204) as (other, got):
        port = url.split(":")[2].split("/")[0]
        names = ["u0@localhost", "u1:pw@localhost", "localhost.", "u2@LOCALHOST"]
        _ingest(ledger, {f"gen-{n}": f"http://{name}:{port}/hook" for n, name in enumerate(names)})
        _ingest(ledger, {"gen-other": other})  # due last
        dispatcher = Dispatcher(ledger, WebhookSender([OLD], LOOPBACK, timeout=5), workers=4)
        try:
            assert dispatcher.run_once() == 2
            assert len(got) == 1, "the other receiver waited for the slow one"
            for _ in names[1:]:
                assert dispatcher.run_once() == 1
        finally:
            dispatcher.stop()
    assert at_once[1] == 1
    states = [ledger.delivery_states(f"gen-{n}")["started"]["state"] for n in range(4)]
    assert states == ["delivered"] * 4


def test_receivers_keyed_by_the_release_before_still_go_one_at_a_time(ledger: Ledger) -> None:
    """The release before keyed a receiver by its URL up to the path, user-info included: a
    message it marked as being sent holds its receiver still, and the keys it wrote on waiting
    messages strand none, nor hide another receiver's."""
    _ingest(
        ledger,
        {
            "gen-0": "http://u0@hooks.example/a",
            "gen-1": "http://u1@hooks.example/b",
            "gen-2": "http://u2@hooks.example/c",
            "gen-other": "http://other.example/",
        },
    )
    [sending] = ledger.claim_deliveries(limit=1, lease=60)
    assert sending.generation_id == "gen-0"
    with ledger.transaction() as db:  # the keys as the release before wrote them
        for gid, key in [
            ("gen-0", "http://u0@hooks.example/"),
            ("gen-1", "http://u1@hooks.example/"),
            ("gen-2", "http://u2@hooks.example/"),
        ]:
            db.run(
                "UPDATE webhook_deliveries SET receiver = :key WHERE generation_id = :gid",
                {"key": key, "gid": gid},
            )
    # One at a time: the receiver's waiting messages are passed over, the other's is taken.
    assert [d.generation_id for d in ledger.claim_deliveries(limit=1, lease=60)] == ["gen-other"]
    assert ledger.claim_deliveries(limit=10, lease=60) == []
    for gid in ("gen-1", "gen-2"):
        assert ledger.finish_delivery(
            sending.msg_id, delivered=True, retry_in=None, attempts=sending.attempts
        )
        [sending] = ledger.claim_deliveries(limit=10, lease=60)
        assert sending.generation_id == gid
    with ledger.transaction() as db:
        marked = db.query(
            "SELECT generation_id, receiver FROM webhook_deliveries "
            "WHERE sending_until IS NOT NULL ORDER BY generation_id",
            {},
        )
    assert marked == [
        {"generation_id": "gen-2", "receiver": "http://hooks.example/"},
        {"generation_id": "gen-other", "receiver": "http://other.example/"},
    ]
