"""The broker model follows each upstream rule, for both broker classes.

Subscribers here are scripted functions behind an in-process transport, so every rule is
checked in milliseconds; ``test_eventing_path.py`` drives the real function servers.
"""

from __future__ import annotations

import base64
import json
import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import yaml

from .brokers import Broker
from .cloudevents_http import MalformedEvent, Message, decode
from .conftest import KNATIVE
from .delivery import Delivery, NoResponse, RoutingLoop, ingress_url, retry_after_seconds
from .routing import CHANNEL_BROKER, KAFKA_BROKER, Routing, TriggerInfo
from .scripted import (
    Cluster,
    binary_reply,
    event,
    manifests,
    statuses,
    with_silent_subscriber,
)

CLASSES = (CHANNEL_BROKER, KAFKA_BROKER)
NOW = datetime(2026, 1, 7, 10, 0, 0, tzinfo=UTC)  # a Wednesday


def _without(docs: list[dict[str, Any]], *keys: str) -> list[dict[str, Any]]:
    """``docs`` with these fields taken out of the Trigger's ``delivery``."""
    for doc in docs:
        if doc["kind"] == "Trigger":
            for key in keys:
                del doc["spec"]["delivery"][key]
    return docs


# Filters.


@pytest.mark.parametrize(
    ("attributes", "channel", "kafka"),
    [
        ({"type": "ping", "source": "/s"}, True, True),
        ({"type": "ping", "source": ""}, False, True),
        ({"type": "ping"}, False, True),
        ({"type": "pong", "source": "/s"}, False, False),
    ],
)
def test_an_empty_filter_value_differs_by_broker(
    attributes: dict[str, str], channel: bool, kafka: bool
) -> None:
    [trigger] = Routing(manifests(filter={"type": "ping", "source": ""})).triggers
    assert trigger.matches(attributes, CHANNEL_BROKER) is channel
    assert trigger.matches(attributes, KAFKA_BROKER) is kafka


# Backoff.


def test_backoff_schedules() -> None:
    [trigger] = Routing(manifests(retry=3)).triggers
    assert trigger.backoff_schedule(CHANNEL_BROKER) == [timedelta(seconds=s) for s in (1, 2, 4)]
    assert trigger.backoff_schedule(KAFKA_BROKER) == [timedelta(seconds=s) for s in (2, 4, 8)]
    linear = TriggerInfo(**{**trigger.__dict__, "backoff_policy": "linear"})
    assert linear.backoff_schedule(CHANNEL_BROKER) == [timedelta(seconds=s) for s in (0, 1, 2)]
    assert linear.backoff_schedule(KAFKA_BROKER) == [timedelta(seconds=s) for s in (1, 2, 3)]


@pytest.mark.parametrize(
    ("missing", "channel", "kafka"),
    [
        # Channel: no Backoff of its own without both (retries.go); Kafka: the control plane's
        # default delay of 1 s, exponential by default (core/config/utils.go).
        (("backoffPolicy", "backoffDelay"), [0, 0], [2, 4]),
        (("backoffPolicy",), [0, 0], [2, 4]),
        (("backoffDelay",), [0, 0], [2, 4]),
    ],
)
def test_a_retry_without_its_backoff_takes_each_brokers_default(
    missing: tuple[str, ...], channel: list[float], kafka: list[float]
) -> None:
    [trigger] = Routing(_without(manifests(retry=2), *missing)).triggers
    assert trigger.backoff_schedule(CHANNEL_BROKER) == [timedelta(seconds=s) for s in channel]
    assert trigger.backoff_schedule(KAFKA_BROKER) == [timedelta(seconds=s) for s in kafka]


@pytest.mark.parametrize(
    ("broker_class", "waits"), [(CHANNEL_BROKER, [0.0, 0.0]), (KAFKA_BROKER, [2.0, 4.0])]
)
def test_a_retry_without_backoff_is_delivered_again(broker_class: str, waits: list[float]) -> None:
    docs = _without(manifests(retry=2), "backoffPolicy", "backoffDelay")
    cluster = Cluster(broker_class, docs)
    cluster.handlers["sub"] = lambda m: Delivery(503)
    broker = cluster.run(event())
    assert statuses(broker) == [503, 503, 503]
    assert cluster.waits == waits  # the channel broker's at once
    assert [letter.accepted for letter in broker.dead_letters] == [True]


@pytest.mark.parametrize(
    ("broker_class", "waits"), [(CHANNEL_BROKER, [1.0, 2.0, 4.0]), (KAFKA_BROKER, [2.0, 4.0, 8.0])]
)
def test_failures_are_retried_with_the_brokers_backoff(
    broker_class: str, waits: list[float]
) -> None:
    cluster = Cluster(broker_class, manifests(retry=3))
    cluster.handlers["sub"] = lambda m: Delivery(503, Message({}, b"busy"))
    broker = cluster.run(event())
    assert statuses(broker) == [503] * 4
    # The dead-letter sink answered at once: every wait is the subscriber's.
    assert cluster.waits == waits
    [letter] = broker.dead_letters
    assert letter.accepted and letter.event["knativeerrorcode"] == "503"
    assert base64.b64decode(letter.event["knativeerrordata"]) == b"busy"
    assert letter.event["knativeerrordest"] == "http://sub"


@pytest.mark.parametrize("broker_class", CLASSES)
@pytest.mark.parametrize("status", [400, 403, 413, 422])
def test_other_client_errors_are_final(broker_class: str, status: int) -> None:
    cluster = Cluster(broker_class, manifests())
    cluster.handlers["sub"] = lambda m: Delivery(status, Message({}, b'{"error": "bad"}'))
    broker = cluster.run(event())
    assert statuses(broker) == [status]
    [letter] = broker.dead_letters
    assert letter.event["knativeerrorcode"] == str(status)


@pytest.mark.parametrize("status", [404, 408, 409, 429, 500, 502, 504])
def test_retryable_statuses(status: int) -> None:
    cluster = Cluster(CHANNEL_BROKER, manifests(retry=1))
    cluster.handlers["sub"] = lambda m: Delivery(status)
    assert statuses(cluster.run(event())) == [status, status]


@pytest.mark.parametrize(
    ("broker_class", "delivery", "waits"),
    [
        (CHANNEL_BROKER, {}, [1.0]),  # Retry-After is ignored without retryAfterMax
        (CHANNEL_BROKER, {"retryAfterMax": "PT30S"}, [20.0]),
        (CHANNEL_BROKER, {"retryAfterMax": "PT5S"}, [5.0]),
        (KAFKA_BROKER, {"retryAfterMax": "PT30S"}, [2.0]),  # the Kafka broker never reads it
    ],
)
def test_retry_after(broker_class: str, delivery: dict[str, str], waits: list[float]) -> None:
    cluster = Cluster(broker_class, manifests(retry=1, **delivery))
    answers = iter([Delivery(429, Message({"retry-after": "20"})), Delivery(202)])
    cluster.handlers["sub"] = lambda m: next(answers)
    broker = cluster.run(event())
    assert statuses(broker) == [429, 202] and cluster.waits == waits


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("20", 20.0),
        ("+20", 20.0),  # strconv.ParseInt takes a sign
        ("-5", -5.0),  # less than any backoff: the backoff is waited
        (" 20\t", 20.0),  # net/textproto trims a header's value
        ("20.5", None),
        ("\uff12\uff10", None),  # digits, but not ASCII ones: not for ParseInt
        ("soon", None),
        ("", None),
        ("9223372037", -9223372036709551616 / 10**9),  # Duration's int64 ns wrap around
        # http.ParseTime's three layouts (net/http/header.go).
        ("Wed, 07 Jan 2026 10:00:20 GMT", 20.0),
        ("wed, 07 JAN 2026 10:00:20 GMT", 20.0),
        ("Wed, 07 Jan 2026 10:00:20.5 GMT", 20.5),
        ("Wed, 07 Jan 2026 09:59:00 GMT", -60.0),
        ("Wednesday, 07-Jan-26 10:00:20 GMT", 20.0),
        ("Wednesday, 07-Jan-26 10:00:20 CET", 20.0),  # unknown to the dispatcher: offset 0
        ("Wednesday, 07-Jan-26 10:00:20 GMT+3", 20.0),  # the zone labels it, never moves it
        ("Wed Jan  7 10:00:20 2026", 20.0),
        ("Wed Jan 7 10:00:20 2026", 20.0),
        ("Wed,  07 Jan 2026 10:00:20 GMT", 20.0),  # a layout's space: a run of spaces
        ("Wed, 07 Jan 2026 10:00:20 UTC", None),  # TimeFormat says GMT
        ("Wed, 7 Jan 2026 10:00:20 GMT", None),  # "02": two digits
        ("Wed, 32 Jan 2026 10:00:20 GMT", None),
        ("Wednesday, 07-Jan-26 10:00:20 GMT+24", None),
    ],
)
def test_retry_after_is_read_as_the_channel_broker_reads_it(
    value: str, seconds: float | None
) -> None:
    assert retry_after_seconds(value, now=NOW) == seconds


def test_a_retry_after_date_is_waited_until() -> None:
    cluster = Cluster(CHANNEL_BROKER, manifests(retry=1, retryAfterMax="PT30S"), clock=lambda: NOW)
    answers = iter(
        [Delivery(503, Message({"retry-after": "Wed, 07 Jan 2026 10:00:20 GMT"})), Delivery(202)]
    )
    cluster.handlers["sub"] = lambda m: next(answers)
    broker = cluster.run(event())
    assert statuses(broker) == [503, 202] and cluster.waits == [20.0]


# Replies.


@pytest.mark.parametrize("broker_class", CLASSES)
def test_an_empty_2xx_is_no_reply(broker_class: str) -> None:
    cluster = Cluster(broker_class, manifests())
    cluster.handlers["sub"] = lambda m: Delivery(202)
    broker = cluster.run(event())
    assert statuses(broker) == [202]
    assert not broker.dead_letters and not broker.refused_replies
    assert len(broker.accepted) == 1


def test_a_2xx_body_that_is_no_event_is_a_502_then_dead_lettered_on_the_channel_broker() -> None:
    cluster = Cluster(CHANNEL_BROKER, manifests(retry=2))
    cluster.handlers["sub"] = lambda m: Delivery(
        202, Message({"content-type": "application/json"}, b'{"ok": true}')
    )
    broker = cluster.run(event())
    assert statuses(broker) == [202, 202, 202]  # each 502 from the filter is retried
    assert len(broker.refused_replies) == 3
    [letter] = broker.dead_letters
    # The filter's 502 carries no body: the dead-letter sink learns nothing about why.
    assert not any(k.startswith("knativeerror") for k in letter.event.attributes)


def test_a_2xx_body_that_is_no_event_is_dead_lettered_at_once_by_kafka() -> None:
    cluster = Cluster(KAFKA_BROKER, manifests(retry=2))
    cluster.handlers["sub"] = lambda m: Delivery(200, Message({}, b"done"))
    broker = cluster.run(event())
    assert statuses(broker) == [200]
    [letter] = broker.dead_letters
    errors = {k: v for k, v in letter.event.attributes.items() if k.startswith("knativeerror")}
    assert errors == {"knativeerrordest": "http://sub"}


@pytest.mark.parametrize("broker_class", CLASSES)
def test_a_malformed_event_reply_is_refused(broker_class: str) -> None:
    cluster = Cluster(broker_class, manifests(retry=1))
    headers = {"ce-specversion": "1.0", "ce-type": "pong", "content-type": "application/json"}
    cluster.handlers["sub"] = lambda m: Delivery(200, Message(headers, b"{}"))  # no id, source
    broker = cluster.run(event())
    assert (
        broker.refused_replies
        and "missing required attributes: id, source" in broker.refused_replies[0][1]
    )
    assert len(broker.dead_letters) == 1 and len(broker.accepted) == 1


@pytest.mark.parametrize("broker_class", CLASSES)
@pytest.mark.parametrize("mode", ["binary", "structured"])
def test_a_reply_event_is_published(broker_class: str, mode: str) -> None:
    cluster = Cluster(broker_class, manifests())
    if mode == "binary":
        cluster.handlers["sub"] = lambda m: binary_reply("pong")
    else:
        body = {
            "specversion": "1.0",
            "id": "r1",
            "source": "/sub",
            "type": "pong",
            "data": {"a": 1},
        }
        headers = {"content-type": "application/cloudevents+json; charset=utf-8"}
        cluster.handlers["sub"] = lambda m: Delivery(
            200, Message(headers, json.dumps(body).encode())
        )
    broker = cluster.run(event())
    [reply] = broker.outputs  # no Trigger takes "pong"
    assert reply["type"] == "pong" and reply["id"] == "r1"
    assert not broker.dead_letters


# Fan-out.


@pytest.mark.parametrize("broker_class", CLASSES)
def test_every_matching_trigger_gets_the_event_independently(broker_class: str) -> None:
    # A replying consumer and a silent one (the ledger's shape) on the same type: each gets
    # the event once, the reply is published once, and one's failure is not the other's.
    cluster = Cluster(broker_class, with_silent_subscriber(manifests(retry=1)))
    cluster.handlers["sub"] = lambda m: binary_reply("pong")
    broker = cluster.run(event())
    assert [e["id"] for e in cluster.received["sub"]] == ["e1"]
    assert [e["id"] for e in cluster.received["log"]] == ["e1"]
    assert [e["type"] for e in broker.outputs] == ["pong"]  # published once, by `sub` only

    cluster = Cluster(broker_class, with_silent_subscriber(manifests(retry=1)))
    cluster.handlers["sub"] = lambda m: Delivery(503)
    broker = cluster.run(event())
    assert statuses(broker, "http://sub") == [503, 503]
    assert statuses(broker, "http://log") == [202]
    assert [letter.trigger for letter in broker.dead_letters] == ["t"]


# Loops and TTL.


def test_the_channel_broker_ends_a_routing_loop_with_its_ttl() -> None:
    cluster = Cluster(CHANNEL_BROKER, manifests(), max_events=1000)
    cluster.handlers["sub"] = lambda m: binary_reply("ping")  # replies what it consumes
    broker = cluster.run(event())
    # The subscriber never sees the TTL; the 255th reply is refused by the ingress.
    assert all("knativebrokerttl" not in e.attributes for e in cluster.received["sub"])
    assert len(cluster.received["sub"]) == 255
    [letter] = broker.dead_letters
    assert letter.event["knativeerrordest"] == ingress_url("default", "bus")
    assert letter.event["knativeerrorcode"] == "400"


def test_the_kafka_broker_has_no_ttl() -> None:
    cluster = Cluster(KAFKA_BROKER, manifests(), max_events=300)
    cluster.handlers["sub"] = lambda m: binary_reply("ping")
    with pytest.raises(RoutingLoop):
        cluster.run(event())
    assert len(cluster.received["sub"]) >= 300


# Dead letters.


@pytest.mark.parametrize("broker_class", CLASSES)
def test_the_dead_letter_sink_is_retried_like_the_subscriber(broker_class: str) -> None:
    cluster = Cluster(broker_class, manifests(retry=2))
    cluster.handlers["sub"] = lambda m: Delivery(500)
    answers = iter([Delivery(503), Delivery(503), Delivery(202)])
    cluster.handlers["dls"] = lambda m: next(answers)
    broker = cluster.run(event())
    assert statuses(broker, "http://dls") == [503, 503, 202]
    assert [letter.accepted for letter in broker.dead_letters] == [True]


def test_kafka_cuts_error_data_at_1024_bytes() -> None:
    cluster = Cluster(KAFKA_BROKER, manifests(retry=0))
    cluster.handlers["sub"] = lambda m: Delivery(400, Message({}, b"x" * 5000))
    [letter] = cluster.run(event()).dead_letters
    assert len(letter.event["knativeerrordata"]) == 1368  # base64 of 1,024 bytes


@pytest.mark.parametrize(("size", "kept"), [(768, True), (769, False)])
def test_the_channel_dispatcher_keeps_768_bytes_of_error_data_and_panics_past_them(
    size: int, kept: bool
) -> None:
    cluster = Cluster(CHANNEL_BROKER, manifests(retry=0))
    cluster.handlers["sub"] = lambda m: Delivery(400, Message({}, b"x" * size))
    broker = cluster.run(event())
    if kept:
        [letter] = broker.dead_letters
        assert len(letter.event["knativeerrordata"]) == 1024 and not broker.lost
    else:  # the buffer of 1,024 characters overrun: no dead letter, the event lost
        assert broker.dead_letters == [] and len(broker.lost) == 1 and broker.panics


def test_kafka_publishes_the_dead_letter_sinks_reply_and_refuses_a_bad_one() -> None:
    cluster = Cluster(KAFKA_BROKER, manifests(retry=0))
    cluster.handlers["sub"] = lambda m: Delivery(400)
    cluster.handlers["dls"] = lambda m: binary_reply("failure.recorded", 202)
    broker = cluster.run(event())
    assert [e["type"] for e in broker.outputs] == ["failure.recorded"]

    cluster = Cluster(KAFKA_BROKER, manifests(retry=0))
    cluster.handlers["sub"] = lambda m: Delivery(400)
    cluster.handlers["dls"] = lambda m: Delivery(202, Message({}, b'{"recorded": true}'))
    broker = cluster.run(event())
    assert [letter.accepted for letter in broker.dead_letters] == [False]
    assert len(broker.lost) == 1


def _dead_lettered(reply: Delivery) -> tuple[Cluster, Broker]:
    """A channel-broker delivery its subscriber fails (500), dead-lettered to a sink that
    answers ``reply``."""
    cluster = Cluster(CHANNEL_BROKER, manifests(retry=2))
    cluster.handlers["sub"] = lambda m: Delivery(500)
    cluster.handlers["dls"] = lambda m: reply
    return cluster, cluster.run(event())


_NO_EVENT = Delivery(202, Message({"content-type": "application/json"}, b'{"recorded": true}'))
_MALFORMED = Delivery(202, Message({"ce-specversion": "1.0", "ce-type": "x"}, b"{}"))


@pytest.mark.parametrize("reply", [_NO_EVENT, _MALFORMED], ids=["no-event", "malformed"])
def test_with_oidc_the_filter_fails_a_dead_letter_sinks_reply_that_is_no_event(
    reply: Delivery,
) -> None:
    # filter_handler.go handleDispatchToDLSRequest -> writeResponse: 502, which the channel
    # dispatcher retries and then gives up on: the event is lost.
    cluster, broker = _dead_lettered(reply)
    assert statuses(broker, "http://dls") == [202, 202, 202]  # every try reached the sink
    assert [letter.accepted for letter in broker.dead_letters] == [False]
    assert [trigger for trigger, _ in broker.lost] == ["t"]
    assert [trigger for trigger, _ in broker.refused_replies] == ["t"] * 3
    assert cluster.waits[-2:] == [1.0, 2.0]  # the dead letter's own backoff


@pytest.mark.parametrize(
    "reply",
    [Delivery(202), binary_reply("failure.recorded", 200)],
    ids=["empty", "event"],
)
def test_with_oidc_an_empty_or_event_reply_of_the_dead_letter_sink_is_accepted(
    reply: Delivery,
) -> None:
    _, broker = _dead_lettered(reply)
    assert statuses(broker, "http://dls") == [reply.status]
    assert [letter.accepted for letter in broker.dead_letters] == [True]
    # The dispatcher discards the filter's answer: nothing is published, nothing refused.
    assert not broker.lost and not broker.refused_replies
    assert [e["type"] for e in broker.accepted] == ["ping"]


def test_without_oidc_the_channel_dispatcher_takes_any_2xx_of_the_dead_letter_sink() -> None:
    # event_dispatcher.go executeRequest: a 2xx with no event encoding is discarded.
    cluster = Cluster(CHANNEL_BROKER, manifests(retry=2), oidc=False)
    cluster.handlers["sub"] = lambda m: Delivery(500)
    cluster.handlers["dls"] = lambda m: _NO_EVENT
    broker = cluster.run(event())
    assert statuses(broker, "http://dls") == [202]
    assert [letter.accepted for letter in broker.dead_letters] == [True]
    assert not broker.lost and not broker.refused_replies


def test_the_broker_model_assumes_oidc_as_the_cluster_sets_it() -> None:
    features_file = KNATIVE / "cluster" / "eventing-config-features.yaml"
    (features,) = [d for d in yaml.safe_load_all(features_file.read_text()) if d]
    enabled = features["data"].get("authentication-oidc") == "enabled"
    broker = Broker(Routing(manifests()), {}, lambda url, message, timeout: Delivery(202))
    broker.close()
    assert broker.oidc is enabled


@pytest.mark.parametrize(
    ("broker_class", "told"),
    [
        # executeRequest's 500 and "dispatch error", handed on by the filter
        (CHANNEL_BROKER, {"code": "500", "data": 'dispatch error: Post "http://sub": refused'}),
        (KAFKA_BROKER, {}),  # RecordDispatcherImpl: the destination alone
    ],
)
def test_no_response_is_retried_and_dead_lettered(broker_class: str, told: dict[str, str]) -> None:
    cluster = Cluster(broker_class, manifests(retry=2))

    def unreachable(message: Message) -> Delivery:
        raise NoResponse("refused")

    cluster.handlers["sub"] = unreachable
    broker = cluster.run(event())
    assert statuses(broker) == [None, None, None]
    [letter] = broker.dead_letters
    errors = {k: v for k, v in letter.event.attributes.items() if k.startswith("knativeerror")}
    assert errors.pop("knativeerrordest") == "http://sub"
    if "knativeerrordata" in errors:
        errors["knativeerrordata"] = base64.b64decode(errors["knativeerrordata"]).decode()
    assert errors == {f"knativeerror{k}": v for k, v in told.items()}


@pytest.mark.parametrize(
    ("broker_class", "told"), [(CHANNEL_BROKER, set()), (KAFKA_BROKER, {"knativeerrordest"})]
)
def test_a_subscriber_past_the_timeout_is_dead_lettered(broker_class: str, told: set[str]) -> None:
    """The channel dispatcher's own request times out, to the filter: nothing to unwrap."""
    cluster = Cluster(broker_class, manifests(retry=1, timeout="PT1S"))

    def silent(message: Message) -> Delivery:
        raise NoResponse("ReadTimeout: timed out", timed_out=True)

    cluster.handlers["sub"] = silent
    broker = cluster.run(event())
    assert statuses(broker) == [None, None]
    [letter] = broker.dead_letters
    assert {k for k in letter.event.attributes if k.startswith("knativeerror")} == told


# Concurrency, duplicates and order.


@pytest.mark.parametrize("broker_class", CLASSES)
def test_deliveries_run_concurrently_and_redeliveries_duplicate(broker_class: str) -> None:
    cluster = Cluster(broker_class, manifests(), redeliveries=1)
    together = threading.Barrier(2, timeout=10)

    def both_at_once(message: Message) -> Delivery:
        together.wait()  # breaks (and fails the delivery) unless both copies are in flight
        return Delivery(202)

    cluster.handlers["sub"] = both_at_once
    broker = cluster.run(event())
    assert statuses(broker) == [202, 202]
    assert [e["id"] for e in cluster.received["sub"]] == ["e1", "e1"]


def test_a_seed_reorders_deliveries() -> None:
    events = [event().with_attributes(id=f"e{n}") for n in range(12)]
    orders = []
    for seed in (None, 7):
        cluster = Cluster(KAFKA_BROKER, manifests(), seed=seed, workers=1)
        cluster.handlers["sub"] = lambda m: Delivery(202)
        cluster.run(*events)
        orders.append([e["id"] for e in cluster.received["sub"]])
    assert orders[0] == [e["id"] for e in events]
    assert sorted(orders[1]) == sorted(orders[0]) and orders[1] != orders[0]


# The reply's time, as sdk-go reads it.


@pytest.mark.parametrize(
    ("value", "read"),
    [
        ("2026-01-07T10:00:00Z", True),
        ("2026-01-07T10:00:00.123456789+05:30", True),
        ("2026-01-07t10:00:00z", False),  # RFC 3339 allows it; Go's layout does not
        ("2016-12-31T23:59:60Z", False),  # a leap second: Go has none
        ("2026-01-07T10:00:00", False),
        ("2026-01-07T10:00:00+05:30:15", False),
    ],
)
def test_a_reply_time_is_read_as_sdk_go_reads_it(value: str, read: bool) -> None:
    headers = {"ce-specversion": "1.0", "ce-id": "1", "ce-source": "/s", "ce-type": "t"}
    message = Message({**headers, "ce-time": value, "content-type": "application/json"}, b"{}")
    if read:
        assert decode(message) is not None
    else:
        with pytest.raises(MalformedEvent, match="time"):
            decode(message)


@pytest.mark.parametrize(
    ("broker_class", "timeout"), [(CHANNEL_BROKER, None), (KAFKA_BROKER, 600.0)]
)
def test_a_trigger_without_a_timeout_waits_as_its_broker_does(
    broker_class: str, timeout: float | None
) -> None:
    # Channel: no timeout at all (pkg/kncloudevents/http_client.go); Kafka: 600 s
    # (WebClientCloudEventSender.java, DEFAULT_TIMEOUT_MS).
    cluster = Cluster(broker_class, manifests(retry=0))
    cluster.handlers["sub"] = lambda m: Delivery(202)
    cluster.run(event())
    assert cluster.timeouts == [timeout]
