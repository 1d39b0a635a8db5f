"""The webhook outbox under misbehaving receivers and URLs: every claim ends, on time, once."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import pytest

from imagegen.ledger import Delivery, Ledger
from imagegen.ledger.outbox import Dispatcher
from imagegen.ledger.webhooks import AddressPolicy, WebhookFailed, WebhookSender
from imagegen.settings import Settings
from tests.ledger.chain import chain
from tests.ledger.receiver import Receiver, serve
from tests.ledger.test_webhooks import LOOPBACK, OLD, answering


@contextmanager
def _raw_receiver(answer: Callable[[socket.socket], None]) -> Iterator[str]:
    """A receiver on loopback below HTTP: ``answer`` writes the reply to each connection."""
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def one(conn: socket.socket) -> None:
        with conn:
            conn.recv(65536)
            with contextlib.suppress(OSError):  # the sender gave up
                answer(conn)

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=one, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}/hook"
    finally:
        stop.set()
        server.close()


def _trickle(reply: bytes, every: float) -> Callable[[socket.socket], None]:
    def answer(conn: socket.socket) -> None:
        for byte in reply:
            time.sleep(every)
            conn.sendall(bytes([byte]))

    return answer


def _silent(conn: socket.socket) -> None:
    time.sleep(30)


def _delivery(url: str, attempts: int = 1) -> Delivery:
    return Delivery(
        msg_id="msg_1",
        generation_id="gen-1",
        event="started",
        url=url,
        payload="{}",
        attempts=attempts,
        created_at=datetime.now(UTC),
    )


def test_a_reply_trickled_byte_by_byte_is_cut_off_at_the_timeout() -> None:
    # Each byte comes well within the timeout: only a deadline on the whole attempt ends it.
    status = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"
    with _raw_receiver(_trickle(status, 0.1)) as url:
        sender = WebhookSender([OLD], LOOPBACK, timeout=0.5)
        started = time.monotonic()
        with pytest.raises(WebhookFailed, match="no reply within"):
            sender.send(_delivery(url))
        assert time.monotonic() - started < 1.5


def test_a_slow_body_does_not_hold_the_attempt() -> None:
    # The status decides; the body is never read, however slowly it comes.
    def answer(conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 20\r\n\r\n")
        _trickle(b"x" * 20, 0.1)(conn)

    with _raw_receiver(answer) as url:
        sender = WebhookSender([OLD], LOOPBACK, timeout=1.0)
        started = time.monotonic()
        assert sender.send(_delivery(url)) == 200
        assert time.monotonic() - started < 1.0


def test_a_claims_tries_end_before_its_lease(ledger: Ledger) -> None:
    with _raw_receiver(_silent) as url:
        ledger.ingest(chain("gen-1", webhook=url)["requested"])
        # Three tries of 10 s would outlive the 3 s lease: another replica would send too.
        # The tries have 90 % of it; the rest (0.3 s) records the outcome, with room to spare
        # on a busy machine.
        sender = WebhookSender([OLD], LOOPBACK, timeout=10)
        dispatcher = Dispatcher(ledger, sender, quick_tries=3, lease=3.0, backoff=60)
        started = time.monotonic()
        assert dispatcher.run_once() == 1
        assert time.monotonic() - started < 3.0
        dispatcher.stop()
    state = ledger.delivery_states("gen-1")["started"]
    assert (state["state"], state["attempts"]) == ("pending", 1)
    assert "no reply within" in state["last_error"]


def test_an_outcome_is_recorded_only_on_the_claim_that_sent_it(ledger: Ledger) -> None:
    ledger.ingest(chain("gen-1", webhook="https://hooks.example/x")["requested"])
    [first] = ledger.claim_deliveries(lease=0)
    [second] = ledger.claim_deliveries(lease=60)  # the first claim's lease ran out
    assert (first.attempts, second.attempts) == (1, 2)
    # The first sender, late, failed; the second delivered. The late one changes nothing.
    assert ledger.finish_delivery(second.msg_id, delivered=True, retry_in=None, attempts=2)
    late = ledger.finish_delivery(
        first.msg_id, delivered=False, error="HTTP 503", retry_in=None, attempts=1
    )
    assert not late
    state = ledger.delivery_states("gen-1")["started"]
    assert (state["state"], state["last_error"]) == ("delivered", None)


class _Broken(WebhookSender):
    def send(self, delivery: Delivery, *, deadline: float | None = None) -> int:
        raise RuntimeError("a bug")


def test_a_send_that_raises_unexpectedly_ends_failed_after_max_attempts(ledger: Ledger) -> None:
    ledger.ingest(chain("gen-1", webhook="https://hooks.example/x")["requested"])
    dispatcher = Dispatcher(ledger, _Broken([OLD], AddressPolicy()), max_attempts=2, backoff=0)
    for _ in range(4):
        dispatcher.run_once()
    dispatcher.stop()
    state = ledger.delivery_states("gen-1")["started"]
    assert (state["state"], state["attempts"]) == ("failed", 2)
    assert state["last_error"] == "internal error: RuntimeError"


def test_a_url_with_a_host_dns_cannot_carry_ends_failed_at_once(ledger: Ledger) -> None:
    ledger.ingest(chain("gen-1", webhook="http://a..example.com/hook")["requested"])
    sender = WebhookSender([OLD], AddressPolicy())
    dispatcher = Dispatcher(ledger, sender, quick_tries=1, max_attempts=3, backoff=0, lease=0)
    assert dispatcher.run_once() == 1
    assert dispatcher.run_once() == 0  # not claimed again
    dispatcher.stop()
    state = ledger.delivery_states("gen-1")["started"]
    assert (state["state"], state["attempts"]) == ("failed", 1)
    assert "not a valid host name" in state["last_error"]


def test_a_silent_receiver_does_not_hold_up_the_others(ledger: Ledger) -> None:
    receiver = Receiver(OLD, fail_first=set(), slow_first=set(), slow=0)
    with _raw_receiver(_silent) as silent, serve(receiver):
        ledger.ingest(chain("gen-silent", webhook=silent)["requested"])
        sender = WebhookSender([OLD], LOOPBACK, timeout=5)
        dispatcher = Dispatcher(ledger, sender, quick_tries=1, workers=2)
        dispatcher.start(poll=0.05)
        try:
            time.sleep(0.3)  # the silent receiver's message is being sent
            ledger.ingest(chain("gen-fast", webhook=receiver.url + "/hook")["requested"])
            dispatcher.wake()
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline and not receiver.accepted:
                time.sleep(0.02)
            assert receiver.accepted, "the healthy receiver waited for the silent one"
        finally:
            dispatcher.stop()


def test_a_receiver_that_never_answers_holds_one_sender_however_many_messages_it_has(
    ledger: Ledger,
) -> None:
    """More messages to a silent receiver than there are senders: it is sent one at a time,
    and a message to another receiver goes while that one is still unanswered."""
    connections: list[float] = []

    def silent(conn: socket.socket) -> None:
        connections.append(time.monotonic())
        time.sleep(30)

    receiver = Receiver(OLD, fail_first=set(), slow_first=set(), slow=0)
    with _raw_receiver(silent) as url, serve(receiver):
        slow = [f"gen-slow-{n}" for n in range(4)]
        for gid in slow:
            ledger.ingest(chain(gid, webhook=url, webhook_events=["started"])["requested"])
        sender = WebhookSender([OLD], LOOPBACK, timeout=2)
        dispatcher = Dispatcher(ledger, sender, quick_tries=1, workers=2)
        dispatcher.start(poll=0.05)
        try:
            deadline = time.monotonic() + 10
            while not connections and time.monotonic() < deadline:
                time.sleep(0.02)
            assert connections, "the silent receiver was never sent to"
            fast = chain("gen-fast", webhook=receiver.url + "/hook", webhook_events=["started"])
            ledger.ingest(fast["requested"])
            dispatcher.wake()
            while not receiver.accepted and time.monotonic() < deadline:
                time.sleep(0.02)
            assert receiver.accepted, "the answering receiver was never sent its message"
            # Delivered while the silent receiver's first message is still unanswered: no
            # outcome of any of them recorded yet, and only one of them sent.
            outcomes = [ledger.delivery_states(gid)["started"]["last_error"] for gid in slow]
            assert outcomes == [None] * len(slow)
            assert len(connections) == 1
        finally:
            dispatcher.stop()
    assert ledger.delivery_states("gen-fast")["started"]["state"] == "delivered"


def test_a_claim_takes_one_message_a_receiver_and_none_of_a_receiver_being_sent_to(
    ledger: Ledger,
) -> None:
    for gid, url in [
        ("gen-a1", "https://a.example/hook"),
        ("gen-b1", "https://b.example:8443/hook"),
        ("gen-a2", "https://a.example/other?x=1"),
        ("gen-b2", "https://b.example/hook"),  # another port: another receiver
    ]:
        ledger.ingest(chain(gid, webhook=url, webhook_events=["started"])["requested"])
    first = ledger.claim_deliveries(limit=10, lease=60)
    assert [d.generation_id for d in first] == ["gen-a1", "gen-b1", "gen-b2"]
    assert ledger.claim_deliveries(limit=10, lease=60) == []  # each being sent to
    a1 = first[0]
    ledger.finish_delivery(a1.msg_id, delivered=False, error="HTTP 500", retry_in=60, attempts=1)
    assert [d.generation_id for d in ledger.claim_deliveries(limit=10, lease=60)] == ["gen-a2"]
    # A claim whose lease ran out, its outcome never recorded, no longer holds its receiver.
    ledger.ingest(
        chain("gen-c1", webhook="https://c.example/", webhook_events=["started"])["requested"]
    )
    ledger.ingest(
        chain("gen-c2", webhook="https://c.example/", webhook_events=["started"])["requested"]
    )
    assert [d.generation_id for d in ledger.claim_deliveries(lease=0)] == ["gen-c1"]
    assert [d.generation_id for d in ledger.claim_deliveries(lease=60)] == ["gen-c2"]


def test_claims_made_at_once_take_each_receiver_once(ledger: Ledger) -> None:
    """Claims of one ledger from several threads: none takes a receiver another has taken."""
    for n in range(60):
        url = f"https://r{n % 12}.example/hook"
        ledger.ingest(chain(f"gen-{n}", webhook=url, webhook_events=["started"])["requested"])
    start = threading.Barrier(4)
    claimed: list[Delivery] = []

    def claim() -> None:
        start.wait()
        for _ in range(3):
            claimed.extend(ledger.claim_deliveries(limit=3, lease=600))

    threads = [threading.Thread(target=claim) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    receivers = [d.url for d in claimed]
    assert len(receivers) == len(set(receivers)) == 12, sorted(receivers)


def _webhooks(ledger: Ledger, receivers: int, each: int) -> None:
    """``each`` messages due to each of ``receivers`` receivers (one generation a message)."""
    for n in range(receivers * each):
        url = f"https://r{n % receivers}.example/hook/{n}"
        ledger.ingest(chain(f"gen-{n}", webhook=url, webhook_events=["started"])["requested"])


def _receivers(claimed: list[Delivery]) -> list[str]:
    from imagegen.ledger._sql import _receiver

    return sorted(_receiver(d.url) for d in claimed)


def test_replicas_claiming_at_once_take_each_receiver_once(
    open_test_ledger: Callable[[], Ledger],
) -> None:
    """Two ledgers on one database (two replicas), claiming from several threads each: while
    a claim's lease lasts, no other claim, of either, takes its receiver."""
    replicas = [open_test_ledger(), open_test_ledger()]
    _webhooks(replicas[0], receivers=12, each=5)
    start = threading.Barrier(8)
    claimed: list[Delivery] = []

    def claim(ledger: Ledger) -> None:
        start.wait()
        for _ in range(4):
            claimed.extend(ledger.claim_deliveries(limit=2, lease=600))

    threads = [threading.Thread(target=claim, args=(replicas[n % 2],)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    taken = _receivers(claimed)
    assert len(taken) == len(set(taken)) == 12, taken


@pytest.mark.parametrize("ledger_url", ["postgres"], indirect=True)
@pytest.mark.parametrize(
    ("pause_at", "first", "second"),
    [
        # The other claim takes the receiver and commits after this one read the receivers
        # being sent to: this one's rows are picked after that commit.
        ("sending_until >", [], ["gen-0"]),
        # The other claim runs whole while this one has marked its message, not committed.
        ("sending_until = :lease_until", ["gen-0"], []),
    ],
)
def test_claims_of_two_replicas_at_once_take_a_receiver_once(
    open_test_ledger: Callable[[], Ledger],
    monkeypatch: pytest.MonkeyPatch,
    pause_at: str,
    first: list[str],
    second: list[str],
) -> None:
    """PostgreSQL runs claims at once (READ COMMITTED), each on rows the other has not locked:
    never two messages of one receiver. (SQLite runs claims one at a time.)"""
    one, other = open_test_ledger(), open_test_ledger()
    _webhooks(one, receivers=1, each=2)
    opened = one.transaction
    meanwhile: list[Delivery] = []
    ran: list[bool] = []

    @contextmanager
    def paused() -> Iterator[Any]:
        with opened() as db:
            read = db.query

            def query(sql: str, params: dict[str, Any]) -> list[dict[str, Any]]:
                rows = read(sql, params)
                if pause_at in sql and not ran:
                    ran.append(True)
                    meanwhile.extend(other.claim_deliveries(lease=60))
                return rows

            monkeypatch.setattr(db, "query", query)
            yield db

    monkeypatch.setattr(one, "transaction", paused)
    # limit=1: this claim's rows locked are the one it takes, the other's are free to select.
    assert [d.generation_id for d in one.claim_deliveries(limit=1, lease=60)] == first
    assert [d.generation_id for d in meanwhile] == second


def test_a_receiver_being_sent_to_by_one_replica_is_left_out_by_another_until_its_outcome(
    open_test_ledger: Callable[[], Ledger],
) -> None:
    one, other = open_test_ledger(), open_test_ledger()
    _webhooks(one, receivers=2, each=2)  # r0: gen-0, gen-2; r1: gen-1, gen-3
    first = one.claim_deliveries(limit=10, lease=60)
    assert [d.generation_id for d in first] == ["gen-0", "gen-1"]
    assert other.claim_deliveries(limit=10, lease=60) == []
    assert one.claim_deliveries(limit=10, lease=60) == []
    # An outcome frees its receiver, whichever it is, for either replica.
    sent, failed = first
    assert one.finish_delivery(sent.msg_id, delivered=True, retry_in=None, attempts=1)
    assert [d.generation_id for d in other.claim_deliveries(limit=10, lease=60)] == ["gen-2"]
    assert one.finish_delivery(
        failed.msg_id, delivered=False, error="HTTP 500", retry_in=600, attempts=1
    )
    assert [d.generation_id for d in other.claim_deliveries(limit=10, lease=60)] == ["gen-3"]


def test_a_lease_that_passed_frees_its_receiver_for_another_replica(
    open_test_ledger: Callable[[], Ledger],
) -> None:
    one, other = open_test_ledger(), open_test_ledger()
    _webhooks(one, receivers=1, each=3)
    [late] = one.claim_deliveries(lease=0.5)
    assert late.generation_id == "gen-0"
    assert other.claim_deliveries(lease=60) == []
    time.sleep(0.6)  # the lease passes, the outcome never recorded
    # Oldest due first: gen-1 was due before gen-0's lease ended.
    assert [d.generation_id for d in other.claim_deliveries(lease=60)] == ["gen-1"]
    assert one.claim_deliveries(lease=60) == []
    # The late outcome of the claim whose lease passed is recorded, and leaves the receiver
    # to the claim after it.
    assert one.finish_delivery(late.msg_id, delivered=False, error="late", retry_in=0, attempts=1)
    assert one.claim_deliveries(lease=60) == []


def test_messages_waiting_when_migration_0009_applies_go_one_at_a_time_a_receiver(
    ledger_url: str, open_test_ledger: Callable[[], Ledger]
) -> None:
    """Rows from before the migration (or inserted by a replica of the release before, during
    a rolling update) name no receiver: a claim reckons it from the URL, and holds it."""
    before = open_test_ledger()
    _webhooks(before, receivers=2, each=2)
    with before.transaction() as db:  # the ledger as 0008 left it, its messages pending
        db.run("DROP INDEX webhook_deliveries_sending", {})
        db.run("ALTER TABLE webhook_deliveries DROP COLUMN sending_until", {})
        db.run("ALTER TABLE webhook_deliveries DROP COLUMN receiver", {})
        db.run("DELETE FROM ledger_migrations WHERE version = 9", {})
    before.close()
    one, other = open_test_ledger(), open_test_ledger()
    with one.transaction() as db:
        rows = db.query("SELECT receiver, sending_until FROM webhook_deliveries", {})
    assert rows == [{"receiver": None, "sending_until": None}] * 4
    assert [d.generation_id for d in one.claim_deliveries(limit=10, lease=60)] == [
        "gen-0",
        "gen-1",
    ]
    assert other.claim_deliveries(limit=10, lease=60) == []
    with one.transaction() as db:
        marked = db.query(
            "SELECT generation_id, receiver FROM webhook_deliveries "
            "WHERE sending_until IS NOT NULL ORDER BY generation_id",
            {},
        )
    assert marked == [
        {"generation_id": "gen-0", "receiver": "https://r0.example/"},
        {"generation_id": "gen-1", "receiver": "https://r1.example/"},
    ]


def test_a_database_that_is_down_is_a_line_in_the_log_and_tried_again(
    ledger: Ledger, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from imagegen.errors import DependencyUnavailable

    claims = threading.Semaphore(0)

    def down(**_: object) -> list[Delivery]:
        claims.release()
        raise DependencyUnavailable("the ledger database is unavailable: refused")

    monkeypatch.setattr(ledger, "claim_deliveries", down)
    dispatcher = Dispatcher(ledger, WebhookSender(["whsec_" + "A" * 32], LOOPBACK))
    with caplog.at_level("WARNING", logger="imagegen.ledger"):
        dispatcher.start(poll=0.01)
        try:
            for _ in range(3):  # the loop goes on
                assert claims.acquire(timeout=10)
        finally:
            dispatcher.stop()
    failed = [r for r in caplog.records if r.getMessage().startswith("webhook dispatch failed")]
    assert failed and all(r.exc_info is None for r in failed), "one line each, no traceback"
    assert failed[0].getMessage().endswith("the ledger database is unavailable: refused")


def test_an_outcome_that_cannot_be_recorded_is_a_line_in_the_log(
    ledger: Ledger, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The send went, and the database is gone when its outcome is written: the sender's
    thread is the only one to know, so it says so (the message is sent again later)."""
    from imagegen.errors import DependencyUnavailable

    finished = threading.Event()

    def down(*_: object, **__: object) -> bool:
        finished.set()
        raise DependencyUnavailable("the ledger database is unavailable: refused")

    receiver = Receiver(OLD, fail_first=set(), slow_first=set(), slow=0)
    with serve(receiver):
        ledger.ingest(chain("gen-lost", webhook=receiver.url + "/hook")["requested"])
        monkeypatch.setattr(ledger, "finish_delivery", down)
        dispatcher = Dispatcher(ledger, WebhookSender([OLD], LOOPBACK), quick_tries=1)
        with caplog.at_level("ERROR", logger="imagegen.ledger"):
            dispatcher.start(poll=0.05)
            try:
                assert finished.wait(10)
                deadline = time.monotonic() + 5
                while time.monotonic() < deadline and not caplog.records:
                    time.sleep(0.02)
            finally:
                dispatcher.stop()
    assert receiver.accepted
    said = [r.getMessage() for r in caplog.records]
    assert said == [
        "webhook outcome not recorded: DependencyUnavailable: the ledger database is"
        " unavailable: refused; sent again after its lease"
    ]


def _due_in(ledger: Ledger, gid: str) -> float:
    """Seconds until ``gid``'s message is due again."""
    with ledger.transaction() as db:
        (row,) = db.query(
            "SELECT next_attempt_at FROM webhook_deliveries WHERE generation_id = :gid",
            {"gid": gid},
        )
    due: datetime = row["next_attempt_at"]
    return (due - datetime.now(UTC)).total_seconds()


def _in_two_minutes() -> str:
    return format_datetime(datetime.now(UTC) + timedelta(seconds=120), usegmt=True)


@pytest.mark.parametrize(
    ("status", "retry_after"), [(429, "120"), (503, "120"), (503, "http-date"), (302, "120")]
)
def test_a_receiver_that_asks_to_wait_gets_one_try_and_its_wait(
    ledger: Ledger, status: int, retry_after: str
) -> None:
    # Standard Webhooks: Retry-After "should be taken into consideration when scheduling the
    # next attempt"; quick tries would ignore it.
    if retry_after == "http-date":
        retry_after = _in_two_minutes()
    with answering(status, {"Retry-After": retry_after}) as (url, got):
        ledger.ingest(chain("gen-1", webhook=url)["requested"])
        sender = WebhookSender([OLD], LOOPBACK, timeout=2)
        dispatcher = Dispatcher(ledger, sender, quick_tries=3, backoff=0.01)
        assert dispatcher.run_once() == 1
        assert dispatcher.run_once() == 0  # not due before the wait asked for
        dispatcher.stop()
    assert len(got) == 1
    state = ledger.delivery_states("gen-1")["started"]
    assert (state["state"], state["attempts"]) == ("pending", 1)
    assert state["last_error"].startswith(f"HTTP {status}")
    assert "Retry-After 1" in state["last_error"]  # 120 s, or 119 of a date
    assert 110 < _due_in(ledger, "gen-1") <= 120


@pytest.mark.parametrize("status", [429, 502, 504])
def test_a_throttling_receiver_gets_one_try_a_round(ledger: Ledger, status: int) -> None:
    # Standard Webhooks: on 429, 502 and 504 "it's recommended to throttle".
    with answering(status) as (url, got):
        ledger.ingest(chain("gen-1", webhook=url)["requested"])
        sender = WebhookSender([OLD], LOOPBACK, timeout=2)
        dispatcher = Dispatcher(ledger, sender, quick_tries=3, backoff=60)
        assert dispatcher.run_once() == 1
        dispatcher.stop()
    assert len(got) == 1
    assert ledger.delivery_states("gen-1")["started"]["last_error"] == f"HTTP {status}"
    assert 45 < _due_in(ledger, "gen-1") <= 72  # the backoff's, ± 20 %


def test_a_retry_after_that_is_no_wait_is_ignored(ledger: Ledger) -> None:
    with answering(503, {"Retry-After": "soon"}) as (url, got):
        ledger.ingest(chain("gen-1", webhook=url)["requested"])
        sender = WebhookSender([OLD], LOOPBACK, timeout=2)
        dispatcher = Dispatcher(ledger, sender, quick_tries=2, backoff=60)
        assert dispatcher.run_once() == 1
        dispatcher.stop()
    assert len(got) == 2  # quick tries as for any 503
    assert ledger.delivery_states("gen-1")["started"]["last_error"] == "HTTP 503"
    assert 45 < _due_in(ledger, "gen-1") <= 72


def test_a_retry_after_is_heeded_up_to_backoff_max(ledger: Ledger) -> None:
    with answering(429, {"Retry-After": "86400"}) as (url, _):
        ledger.ingest(chain("gen-1", webhook=url)["requested"])
        sender = WebhookSender([OLD], LOOPBACK, timeout=2)
        dispatcher = Dispatcher(ledger, sender, backoff=1, backoff_max=30)
        assert dispatcher.run_once() == 1
        dispatcher.stop()
    assert 25 < _due_in(ledger, "gen-1") <= 30


def test_a_retry_after_sooner_than_the_backoff_does_not_hasten_the_next_round(
    ledger: Ledger,
) -> None:
    dispatcher = Dispatcher(ledger, WebhookSender([OLD], LOOPBACK), backoff=300)
    for _ in range(20):
        assert 240 <= (dispatcher.retry_in(1, retry_after=10) or 0) <= 360
    assert dispatcher.retry_in(dispatcher.max_attempts, retry_after=10) is None
    dispatcher.stop()


def test_a_receiver_gone_ends_the_message_at_once(ledger: Ledger) -> None:
    # Standard Webhooks: on 410 Gone the sender should "stop sending it messages".
    with answering(410) as (url, got):
        ledger.ingest(chain("gen-1", webhook=url)["requested"])
        sender = WebhookSender([OLD], LOOPBACK, timeout=2)
        dispatcher = Dispatcher(ledger, sender, quick_tries=3, max_attempts=3, backoff=0)
        assert dispatcher.run_once() == 1
        assert dispatcher.run_once() == 0  # not claimed again
        dispatcher.stop()
    assert len(got) == 1
    state = ledger.delivery_states("gen-1")["started"]
    assert (state["state"], state["attempts"]) == ("failed", 1)
    assert state["last_error"].startswith("HTTP 410: the receiver is gone")


def test_the_default_schedule_spans_about_a_day(
    ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Standard Webhooks recommends "a retry schedule spanning multiple days, with an
    # exponential backoff"; a receiver down overnight still gets its messages.
    monkeypatch.setattr("imagegen.ledger.outbox.random.uniform", lambda low, high: 1.0)
    rounds = Settings.model_fields["webhook_max_attempts"].default
    dispatcher = Dispatcher(ledger, WebhookSender([OLD], LOOPBACK), max_attempts=rounds)
    waits = [dispatcher.retry_in(n) for n in range(1, rounds)]
    assert dispatcher.retry_in(rounds) is None
    dispatcher.stop()
    assert all(w is not None for w in waits)
    hours = sum(w or 0 for w in waits) / 3600
    assert 20 < hours < 30
    assert waits[0] == 5 and (waits[-1] or 0) <= 12 * 3600


def _said(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str, dict[str, object]]]:
    """The outbox's lines: level, message, and what they name."""
    keys = ("msg_id", "generation_id", "receiver", "status", "attempts", "retry_in")
    return [
        (r.levelname, r.getMessage(), {k: getattr(r, k) for k in keys if hasattr(r, k)})
        for r in caplog.records
        if r.name == "imagegen.ledger"
    ]


def test_a_failed_claim_names_its_generation_and_receiver_and_giving_up_is_a_warning(
    ledger: Ledger, caplog: pytest.LogCaptureFixture
) -> None:
    with answering(503) as (url, got):
        # What the caller put in the URL (a user-info, a token in the query, the path) is
        # theirs: only scheme, host and port name the receiver in a line.
        port = url.split(":")[2].split("/")[0]
        secret = url.replace("://", "://hook-user:hook-pass@") + "?token=s3cret"
        ledger.ingest(chain("gen-1", webhook=secret, webhook_events=["started"])["requested"])
        sender = WebhookSender([OLD], LOOPBACK, timeout=2)
        dispatcher = Dispatcher(ledger, sender, quick_tries=1, max_attempts=2, backoff=0)
        with caplog.at_level("INFO", logger="imagegen.ledger"):
            assert dispatcher.run_once() == 1  # a routine retry
            assert dispatcher.run_once() == 1  # the last claim: given up
        dispatcher.stop()
    assert len(got) == 2
    said = _said(caplog)
    assert [(level, message) for level, message, _ in said] == [
        ("INFO", "webhook not delivered"),
        ("WARNING", "webhook given up"),
    ]
    for _, _, named in said:
        assert named["generation_id"] == "gen-1"
        assert named["receiver"] == f"http://127.0.0.1:{port}"
        assert named["status"] == 503
    assert [named["attempts"] for _, _, named in said] == [1, 2]
    everything = " ".join(str(vars(r)) for r in caplog.records)
    for kept_out in ("hook-user", "hook-pass", "s3cret", "/hook"):
        assert kept_out not in everything
    assert ledger.delivery_states("gen-1")["started"]["state"] == "failed"


def test_a_receiver_gone_is_a_warning_naming_generation_and_receiver(
    ledger: Ledger, caplog: pytest.LogCaptureFixture
) -> None:
    with answering(410) as (url, _):
        ledger.ingest(chain("gen-1", webhook=url, webhook_events=["started"])["requested"])
        dispatcher = Dispatcher(ledger, WebhookSender([OLD], LOOPBACK, timeout=2))
        with caplog.at_level("INFO", logger="imagegen.ledger"):
            assert dispatcher.run_once() == 1
        dispatcher.stop()
    [(level, message, named)] = _said(caplog)
    assert (level, message) == ("WARNING", "webhook refused")
    assert named["generation_id"] == "gen-1"
    assert named["receiver"] == url.removesuffix("/hook")


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("https://u:p@Hooks.Example/x?token=t#f", "https://hooks.example"),
        ("https://hooks.example:8443/x", "https://hooks.example:8443"),
        ("http://[::1]:9000/x", "http://[::1]:9000"),
        ("http://[::1/x", "***"),
    ],
)
def test_a_receiver_is_shown_by_scheme_host_and_port_only(url: str, shown: str) -> None:
    from imagegen.ledger.outbox import _receiver

    assert _receiver(url) == shown


def test_the_backlog_counts_the_messages_due_and_not_being_sent(ledger: Ledger) -> None:
    for gid in ("gen-a", "gen-b", "gen-c", "gen-d"):
        url = f"https://{gid}.example/hook"
        ledger.ingest(chain(gid, webhook=url, webhook_events=["started"])["requested"])
    dispatcher = Dispatcher(ledger, WebhookSender([OLD], LOOPBACK))
    assert dispatcher.backlog() == 4
    sending, later, delivered = ledger.claim_deliveries(limit=3, lease=60)
    ledger.finish_delivery(later.msg_id, delivered=False, retry_in=600, attempts=1)
    ledger.finish_delivery(delivered.msg_id, delivered=True, retry_in=None, attempts=1)
    # Being sent (leased), due later, delivered: none waits; the fourth does.
    assert dispatcher.backlog() == 1
    assert sending.generation_id != "gen-d"
    dispatcher.stop()
