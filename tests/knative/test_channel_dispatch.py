"""The channel-based broker's dispatcher: its fan-out timeout, its headers, its dead letters.

Each rule is the upstream one that ``brokers.py`` cites: the in-memory channel's 15-minute
fan-out (eventing ``pkg/channel/fanout/fanout_event_handler.go``), the headers the ingress,
the channel and the filter add, and the retry settings a dead letter is sent with
(``pkg/kncloudevents/event_dispatcher.go``).
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable
from concurrent.futures import Future
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from .brokers import Broker
from .cloudevents_http import Message
from .delivery import (
    ARRIVAL_TIME,
    FANOUT_TIMEOUT,
    Delivery,
    NoResponse,
    async_handler,
    attempts_window,
    go_timestamp,
    ingress_url,
    longest_delivery,
)
from .routing import CHANNEL_BROKER, KAFKA_BROKER, Routing
from .scripted import Cluster, binary_reply, event, manifests, statuses

NOW = datetime(2026, 1, 7, 10, 0, 0, 120000, tzinfo=UTC)
# What each delivery on a synchronous channel must leave of the fan-out's 15 minutes.
MARGIN = timedelta(minutes=1)


def _always(answer: Delivery) -> Callable[[Message], Delivery]:
    return lambda message: answer


def _times_out(message: Message) -> Delivery:
    raise NoResponse("ReadTimeout: timed out", timed_out=True)


# 1. The synchronous fan-out gives up after 15 minutes.


@pytest.mark.parametrize("asynchronous", [False, True])
def test_a_delivery_still_retrying_after_15_minutes_is_dropped_by_a_synchronous_channel(
    asynchronous: bool,
) -> None:
    # 10 retries from 1 s: the last waits until 1023 s, past the fan-out's 900.
    cluster = Cluster(CHANNEL_BROKER, manifests(retry=10), async_handler=asynchronous)
    cluster.handlers["sub"] = _always(Delivery(503))
    broker = cluster.run(event())
    at = [a.at for a in broker.attempts if a.target == "http://sub"]
    if asynchronous:
        assert at[-1] == pytest.approx(1023, abs=1) and len(at) == 11
        assert [letter.accepted for letter in broker.dead_letters] == [True]
        assert not broker.lost and not broker.timed_out
    else:
        # go-retryablehttp's wait ends with the request's context: no retry, no dead letter.
        assert at[-1] == pytest.approx(511, abs=1) and len(at) == 10
        assert not broker.dead_letters and not cluster.received["dls"]
        assert [name for name, _ in broker.lost] == broker.timed_out == ["t"]


@pytest.mark.parametrize("asynchronous", [False, True])
def test_a_dead_letter_answered_after_15_minutes_never_reaches_the_broker(
    asynchronous: bool,
) -> None:
    # Three attempts of 4 minutes each (720 s), then a sink that takes 200 s to answer.
    docs = manifests(retry=2, timeout="PT4M")
    cluster = Cluster(CHANNEL_BROKER, docs, async_handler=asynchronous)
    cluster.handlers["sub"] = _times_out
    cluster.handlers["dls"] = _always(Delivery(202, elapsed=200.0))
    broker = cluster.run(event())
    assert [a.at for a in broker.attempts] == pytest.approx([0, 241, 483, 723], abs=0.5)
    [letter] = broker.dead_letters
    assert len(cluster.received["dls"]) == 1  # the sink did get it, and wrote it down
    assert letter.accepted is asynchronous
    assert statuses(broker, "http://dls") == ([202] if asynchronous else [None])
    assert broker.timed_out == ([] if asynchronous else ["t"])


def test_the_kafka_broker_has_no_fan_out_to_time_out() -> None:
    cluster = Cluster(KAFKA_BROKER, manifests(retry=10))
    cluster.handlers["sub"] = _always(Delivery(503))
    broker = cluster.run(event())
    assert len(statuses(broker)) == 11 and broker.dead_letters and not broker.timed_out


@pytest.mark.parametrize(
    ("retry_after_max", "longest"),
    [
        # (1 + retry) x timeout + backoff, for the subscriber and for the sink.
        (None, 2 * (3 * 60 + 1 + 2)),
        # A 429 or 503 may ask for up to retryAfterMax before each retry.
        ("PT10S", 2 * (3 * 60 + 10 + 10)),
    ],
)
def test_the_model_spends_what_the_longest_delivery_counts(
    retry_after_max: str | None, longest: float
) -> None:
    docs = manifests(retry=2, timeout="PT1M")
    if retry_after_max is not None:
        docs[-1]["spec"]["delivery"]["retryAfterMax"] = retry_after_max
    [trigger] = Routing(docs).triggers
    cluster = Cluster(CHANNEL_BROKER, docs, async_handler=True)
    # Every attempt runs into the timeout and asks for a long wait.
    slow = Delivery(503, Message({"retry-after": "3600"}), elapsed=60.0)
    cluster.handlers["sub"] = cluster.handlers["dls"] = _always(slow)
    broker = cluster.run(event())
    ended = broker.attempts[-1].at + 60.0
    assert ended == pytest.approx(longest, abs=0.5)
    window = attempts_window(trigger)
    assert window is not None and 2 * window.total_seconds() == longest
    # Upstream also forwards a reply with the same settings: a third round of attempts.
    assert longest_delivery(trigger) == 3 * window


def test_a_trigger_without_a_timeout_has_no_longest_delivery() -> None:
    [trigger] = Routing(manifests()).triggers
    assert attempts_window(trigger) is None and longest_delivery(trigger) is None


@pytest.mark.parametrize(
    ("value", "asynchronous"),
    [("true", True), ("True", True), ("1", True), ("false", False), ("yes", False), (None, False)],
)
def test_the_channel_is_asynchronous_as_go_parses_the_annotation(
    value: str | None, asynchronous: bool
) -> None:
    docs = manifests()
    if value is not None:
        docs[0]["metadata"]["annotations"] = {"messaging.knative.dev/async-handler": value}
    assert async_handler(docs) is asynchronous


def test_no_dev_delivery_is_cut_short_by_the_channel(
    render: Callable[[str], list[dict[str, Any]]],
) -> None:
    """Every delivery of dev's channel-based broker ends as its Trigger says: within the
    fan-out's 15 minutes, with a margin, or on a channel that dispatches asynchronously."""
    docs = render("dev")
    r = Routing(docs)
    assert r.broker_class == CHANNEL_BROKER
    longest = {t.name: longest_delivery(t) for t in r.triggers}
    beyond = {
        name: None if d is None else d.total_seconds()
        for name, d in longest.items()
        if d is None or d > FANOUT_TIMEOUT - MARGIN
    }
    assert not beyond or async_handler(docs), f"cut off after 15 minutes: {beyond}"


# 2. Headers and attributes.


@pytest.mark.parametrize("oidc", [True, False])
def test_the_channel_broker_says_prefer_reply_and_kn_namespace(oidc: bool) -> None:
    docs = manifests(retry=0)
    for doc in docs:
        doc["metadata"]["namespace"] = "imagegen-test"
    cluster = Cluster(CHANNEL_BROKER, docs, clock=lambda: NOW, oidc=oidc)
    seen: dict[str, dict[str, str]] = {}

    def record(name: str, answer: Delivery) -> Callable[[Message], Delivery]:
        def handler(message: Message) -> Delivery:
            seen[name] = dict(message.headers)
            return answer

        return handler

    cluster.handlers["sub"] = record("sub", Delivery(500))
    cluster.handlers["dls"] = record("dls", Delivery(202))
    cluster.run(event())
    assert seen["sub"]["prefer"] == "reply"
    assert seen["sub"]["kn-namespace"] == seen["dls"]["kn-namespace"] == "imagegen-test"
    assert seen["sub"][f"ce-{ARRIVAL_TIME}"] == "2026-01-07T10:00:00.12Z"
    # Direct from the channel a dead letter has no Prefer; the filter's /dls path adds it.
    assert seen["dls"].get("prefer") == ("reply" if oidc else None)


def test_the_kafka_broker_adds_none_of_the_channel_brokers_headers() -> None:
    cluster = Cluster(KAFKA_BROKER, manifests(retry=0))
    headers: list[dict[str, str]] = []

    def record(message: Message) -> Delivery:
        headers.append(dict(message.headers))
        return Delivery(202)

    cluster.handlers["sub"] = record
    cluster.run(event())
    assert not {"prefer", "kn-namespace", f"ce-{ARRIVAL_TIME}"} & set(headers[0])


def test_the_ingress_stamps_each_event_it_takes_again() -> None:
    ticks = itertools.count()
    cluster = Cluster(
        CHANNEL_BROKER,
        manifests(filter={}),
        clock=lambda: NOW + timedelta(seconds=next(ticks)),
    )
    # The reply comes back with the arrival time of the event it answers.
    reply = binary_reply("pong")
    stale = {**reply.message.headers, f"ce-{ARRIVAL_TIME}": "2026-01-07T10:00:00.12Z"}
    answers = iter([Delivery(200, Message(stale, reply.message.body)), Delivery(202)])
    cluster.handlers["sub"] = lambda m: next(answers)
    broker = cluster.run(event())
    assert [e[ARRIVAL_TIME] for e in broker.accepted] == [
        "2026-01-07T10:00:00.12Z",
        "2026-01-07T10:00:01.12Z",
    ]


@pytest.mark.parametrize(
    ("at", "written"),
    [
        (datetime(2026, 1, 7, 10, 0, 0, tzinfo=UTC), "2026-01-07T10:00:00Z"),
        (datetime(2026, 1, 7, 10, 0, 0, 500, tzinfo=UTC), "2026-01-07T10:00:00.0005Z"),
        (datetime(2026, 1, 7, 11, 0, 0, tzinfo=UTC).astimezone(), "2026-01-07T11:00:00Z"),
    ],
)
def test_a_timestamp_is_written_as_sdk_go_writes_it(at: datetime, written: str) -> None:
    assert go_timestamp(at) == written


def test_a_reply_the_ingress_refuses_names_the_brokers_address() -> None:
    docs = manifests(retry=0)
    for doc in docs:
        doc["metadata"]["namespace"] = "imagegen-test"
    cluster = Cluster(CHANNEL_BROKER, docs)
    cluster.handlers["sub"] = lambda m: binary_reply("pong")
    broker = cluster.run(event(knativebrokerttl="2"))  # 1 here, 0 on its reply: refused
    [letter] = broker.dead_letters
    assert letter.event["knativeerrordest"] == ingress_url("imagegen-test", "bus")
    assert ingress_url("imagegen-test", "bus").endswith("/imagegen-test/bus")


# 3. Dead letters are retried with the Trigger's settings, Retry-After included.


def test_a_dead_letter_retry_waits_as_long_as_retry_after_asks() -> None:
    docs = manifests(retry=2, retryAfterMax="PT60S")
    cluster = Cluster(CHANNEL_BROKER, docs)
    cluster.handlers["sub"] = _always(Delivery(429, Message({"retry-after": "30"})))
    answers = iter([Delivery(503, Message({"retry-after": "40"})), Delivery(202)])
    cluster.handlers["dls"] = lambda m: next(answers)
    broker = cluster.run(event())
    assert statuses(broker, "http://dls") == [503, 202]
    # max(backoff 1 s, 2 s; Retry-After 30 s) for the subscriber, max(1 s; 40 s) for the sink.
    assert cluster.waits == [30.0, 30.0, 40.0]


# 4. The broker's own bookkeeping.


class _AtOnce:
    """An executor that runs each delivery before ``submit`` returns."""

    def submit(self, fn: Callable[..., None], *args: Any) -> Future[None]:
        future: Future[None] = Future()
        try:
            fn(*args)
            future.set_result(None)
        except BaseException as exc:  # handed to the broker, as a pool would
            future.set_exception(exc)
        return future

    def shutdown(self, wait: bool = True) -> None:
        pass


@pytest.mark.parametrize("fails", [False, True])
def test_a_delivery_that_ended_before_run_looks_at_it_is_counted(fails: bool) -> None:
    broker = Broker(
        Routing(manifests()),
        {"sub": "http://sub", "dls": "http://dls"},
        lambda url, message, timeout: Delivery(202),
        time_scale=0,
    )
    broker._pool = _AtOnce()  # type: ignore[assignment]
    if fails:
        broker.urls.pop("sub")  # a KeyError inside the delivery
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            broker.run(event(), timeout=5)
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    runner = threading.Thread(target=run, daemon=True)
    runner.start()
    runner.join(10)
    assert not runner.is_alive(), "run() never returned"
    assert (type(outcome[0]) if fails else outcome[0]) is (KeyError if fails else None)
