"""One delivery to a subscriber, as both Knative broker classes make it (see ``brokers``).

What goes over the wire and what comes back: the transport, the statuses that are retried
(eventing ``pkg/kncloudevents/retries.go`` ``SelectiveRetry``; eventing-kafka-broker
``WebClientCloudEventSender.isRetryableStatusCode``), how a ``Retry-After`` is read (eventing
``retries.go`` ``parseRetryAfterDuration``) and the error extensions a dead-letter sink is
told (eventing ``pkg/kncloudevents/event_dispatcher.go``; eventing-kafka-broker
``RecordDispatcherImpl.java``), and how long a delivery may last before the in-memory
channel's synchronous fan-out gives up on it (eventing ``pkg/channel/fanout``).
"""

from __future__ import annotations

import base64
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx

from .cloudevents_http import Event, Message
from .routing import CHANNEL_BROKER, TriggerInfo

MAX_TTL = 255  # cmd/broker/ingress/main.go: MAX_TTL default
TTL = "knativebrokerttl"
ARRIVAL_TIME = "knativearrivaltime"  # pkg/broker/metrics.go: EventArrivalTime
KN_NAMESPACE = "kn-namespace"  # pkg/apis/http.go: KnNamespaceHeader
FANOUT_TIMEOUT = timedelta(minutes=15)
"""How long the in-memory channel's synchronous fan-out waits for a delivery to end (eventing
``pkg/channel/fanout/fanout_event_handler.go``: ``defaultTimeout``)."""
ASYNC_HANDLER_ANNOTATION = "messaging.knative.dev/async-handler"
"""On the Broker: its channel dispatches asynchronously (see :func:`async_handler`)."""
# Go's strconv.ParseBool.
_GO_TRUE = {"1", "t", "T", "TRUE", "true", "True"}


_INT32 = 2**31
_DIGITS = r"[0-9](?:_?[0-9])*"
_HEX_DIGITS = r"[0-9a-f](?:_?[0-9a-f])*"
# What Go's strconv.ParseFloat(v, 64) reads (src/strconv/atof.go, special and readFloat): a
# sign, then a decimal mantissa with an optional e exponent, or a 0x mantissa with a required
# p exponent; "_" only between digits (underscoreOK); "inf"/"infinity" with a sign, "nan"
# without; any case; nothing around it, not even a space (" 3" is no number to Go).
_GO_DECIMAL = re.compile(
    rf"[+-]?(?:{_DIGITS}(?:\.(?:{_DIGITS})?)?|\.{_DIGITS})(?:e[+-]?{_DIGITS})?", re.I | re.A
)
_GO_HEX = re.compile(
    rf"[+-]?0x(?:_?{_HEX_DIGITS}(?:\.(?:{_HEX_DIGITS})?)?|\.{_HEX_DIGITS})p[+-]?{_DIGITS}",
    re.I | re.A,
)
_GO_SPECIAL = re.compile(r"[+-]?inf(?:inity)?|nan", re.I | re.A)


def go_timestamp(at: datetime) -> str:
    """A time as sdk-go writes a Timestamp attribute (``v2/types/value.go`` ``FormatTime``:
    UTC, ``time.RFC3339Nano``, which drops a fraction's trailing zeros)."""
    at = at.astimezone(UTC)
    fraction = f".{at.microsecond:06d}".rstrip("0") if at.microsecond else ""
    return at.strftime("%Y-%m-%dT%H:%M:%S") + fraction + "Z"


def _go_int32(value: int) -> int:
    """``value`` wrapped into Go's int32, as Go's integer arithmetic wraps it."""
    return (value + _INT32) % (2 * _INT32) - _INT32


def ingress_ttl(raw: str | None) -> int:
    """The ``knativebrokerttl`` the channel-based broker's ingress gives an event that came
    with ``raw`` (None: none); it refuses the event when this is 0 or less.

    knative/eventing knative-v1.22.2: ``pkg/broker/ingress/ingress_handler.go`` ``receive``
    runs the ``TTLDefaulter`` of ``pkg/broker/ttl.go`` (wired in
    ``cmd/broker/ingress/main.go`` with ``MAX_TTL``, 255) before it checks the TTL: a missing
    TTL, or one ``cetypes.ToInteger`` cannot read, becomes 255; any other is reduced by one in
    int32, floored at 0. ``ToInteger`` is cloudevents/sdk-go v2.16.1 ``v2/types/value.go``
    ``ParseInteger``: ``strconv.ParseFloat``, an error outside int32's range, else the value
    truncated toward zero by ``int32(f)`` ("3.0" and "+3" are 3, "1.9" is 1, "0x1p2" is 4).
    """
    if raw is None:
        return MAX_TTL
    if _GO_SPECIAL.fullmatch(raw):
        value = float(raw)
    elif _GO_DECIMAL.fullmatch(raw):
        value = float(raw)  # Python reads "_" between digits as Go does
    elif _GO_HEX.fullmatch(raw):
        try:
            value = float.fromhex(raw.replace("_", ""))
        except OverflowError:  # ParseFloat: ±Inf and ErrRange
            return MAX_TTL
    else:
        return MAX_TTL
    if value > _INT32 - 1 or value < -_INT32:  # never true of NaN, as in Go
        return MAX_TTL
    # int32(NaN) is left to the platform by the Go spec; on amd64 (CVTTSD2SL) it is -2**31.
    ttl = -_INT32 if math.isnan(value) else math.trunc(value)
    return max(_go_int32(ttl - 1), 0)


ERROR_DATA_MAX = (
    1024  # eventing: KnativeErrorDataExtensionMaxLength; kafka: KN_ERROR_DATA_MAX_BYTES
)


def ingress_url(namespace: str, broker: str) -> str:
    """The channel-based Broker's address: where its Triggers' replies go, and what a dead
    letter names when one could not be forwarded (eventing ``pkg/reconciler/broker/broker.go``:
    ``broker-ingress`` in the system namespace, path ``/<namespace>/<broker>``)."""
    return f"http://broker-ingress.knative-eventing.svc.cluster.local/{namespace}/{broker}"


class NoResponse(Exception):
    """The subscriber could not be reached, or did not answer within the attempt timeout.

    Args:
        reason: What failed, as the HTTP client says it.
        timed_out: Nothing came back within the attempt timeout (otherwise the connection
            failed: refused, reset, no such host).
    """

    def __init__(self, reason: str, *, timed_out: bool = False) -> None:
        super().__init__(reason)
        self.timed_out = timed_out


class RoutingLoop(RuntimeError):
    """More events than ``max_events`` were accepted: a loop the Kafka broker never ends."""


@dataclass(frozen=True)
class Delivery:
    """What came back from one HTTP request: the status and the response message.

    ``elapsed``: the seconds the answer took, where a transport scripts it (None: as long as
    the call took here).
    """

    status: int
    message: Message = field(default_factory=Message)
    elapsed: float | None = None


Transport = Callable[[str, Message, float | None], Delivery]
"""POST a message to a URL within a timeout; raises NoResponse when nothing came back."""


def http_transport(client: httpx.Client | None = None) -> Transport:
    """A transport over real HTTP (httpx)."""
    http = client or httpx.Client()

    def send(url: str, message: Message, timeout: float | None) -> Delivery:
        try:
            response = http.post(
                url, headers=dict(message.headers), content=message.body, timeout=timeout
            )
        except httpx.TimeoutException as exc:
            raise NoResponse(f"{type(exc).__name__}: {exc}", timed_out=True) from exc
        except httpx.HTTPError as exc:
            raise NoResponse(f"{type(exc).__name__}: {exc}") from exc
        headers = {k.lower(): v for k, v in response.headers.items()}
        return Delivery(response.status_code, Message(headers, response.content))

    return send


@dataclass(frozen=True)
class Attempt:
    """One delivery attempt to a subscriber (status None: no response).

    ``at``: when it was sent, in seconds since the delivery began, as the broker counts them
    (each backoff wait, each answer's time; an attempt that timed out, its timeout).
    """

    trigger: str
    target: str
    event_type: str
    event_id: str
    status: int | None
    at: float = 0.0


@dataclass(frozen=True)
class DeadLetter:
    """An event handed to a Trigger's dead-letter sink, as the sink received it."""

    trigger: str
    event: Event
    accepted: bool


def retryable(status: int | None) -> bool:
    """eventing retries.go SelectiveRetry = WebClientCloudEventSender.isRetryableStatusCode."""
    return status is None or status >= 500 or status in {404, 408, 409, 429}


class DispatcherPanic(Exception):
    """The channel dispatcher's process ends: what it was delivering is neither delivered nor
    dead-lettered."""


def error_extensions(
    destination: str, status: int | None, body: bytes | None, *, kafka: bool
) -> dict[str, str]:
    """The extensions a dead letter carries of a failed delivery whose answer was ``body``.

    Raises:
        DispatcherPanic: on the channel-based broker, a body longer than 768 bytes. Its
            ``dispatchExecutionInfoTransformers`` (pkg/kncloudevents/event_dispatcher.go) makes
            a buffer of ``min(EncodedLen(len(body)), 1024)`` bytes and base64-encodes the whole
            body into it: ``base64.StdEncoding.Encode`` writes past the end and panics ("index
            out of range [1024] with length 1024", knative-extensions/eventing-natss#434), in
            the dispatch's goroutine, so the process ends. Kafka cuts the body first
            (RecordDispatcherImpl.java, ``KN_ERROR_DATA_MAX_BYTES``).
    """
    extensions = {"knativeerrordest": destination}
    if status is None or body is None:
        return extensions
    if kafka:
        data = base64.b64encode(body[:ERROR_DATA_MAX]).decode()
    elif len(base64.b64encode(body)) > ERROR_DATA_MAX:
        raise DispatcherPanic(f"index out of range [{ERROR_DATA_MAX}] with length {ERROR_DATA_MAX}")
    else:
        data = base64.b64encode(body).decode()
    return {**extensions, "knativeerrorcode": str(status), "knativeerrordata": data}


# Go's strconv.ParseInt(s, 10, 64): an optional sign, then ASCII digits, within int64.
_GO_INT = re.compile(r"[+-]?[0-9]+")
_INT64 = 2**63
# Go's time.Parse of http.ParseTime's layouts (net/http/header.go, timeFormats): names of days
# and months in any case, a space of the layout matching a run of spaces (time/format.go
# skip), "15" one or two digits, "05" optionally followed by a fraction.
_SHORT_DAY = r"(?i:sun|mon|tue|wed|thu|fri|sat)"
_LONG_DAY = r"(?i:sunday|monday|tuesday|wednesday|thursday|friday|saturday)"
_MONTH = r"(?P<month>(?i:jan|feb|mar|apr|may|jun|jul|aug|sep|oct|nov|dec))"
_CLOCK = r"(?P<hour>[0-9]{1,2}):(?P<minute>[0-9]{2}):(?P<second>[0-9]{2})(?P<fraction>[.,][0-9]+)?"
# time/format.go parseTimeZone: GMT with an optional signed hour (at most 23), or three to
# five upper-case letters, four or five only ending in T (and WITA, ChST, MeST).
_ZONE = r"(?P<zone>GMT(?:[+-][0-9]+)?|ChST|MeST|WITA|[A-Z]{3,4}T|[A-Z]{3})"
_HTTP_DATES = (
    # http.TimeFormat, "Mon, 02 Jan 2006 15:04:05 GMT"
    re.compile(
        rf"{_SHORT_DAY}, +(?P<day>[0-9]{{2}}) +{_MONTH} +(?P<year>[0-9]{{4}}) +{_CLOCK} +GMT"
    ),
    # time.RFC850, "Monday, 02-Jan-06 15:04:05 MST"
    re.compile(
        rf"{_LONG_DAY}, +(?P<day>[0-9]{{2}})-{_MONTH}-(?P<yy>[0-9]{{2}}) +{_CLOCK} +{_ZONE}"
    ),
    # time.ANSIC, "Mon Jan _2 15:04:05 2006": "_2", a day padded with a space or not
    re.compile(rf"{_SHORT_DAY} +{_MONTH} +(?P<day>[0-9]{{1,2}}) +{_CLOCK} +(?P<year>[0-9]{{4}})"),
)
_MONTHS = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")


def retry_after_seconds(value: str | None, *, now: datetime) -> float | None:
    """The wait a ``Retry-After`` value asks for, as the channel-based broker reads it.

    eventing ``pkg/kncloudevents/retries.go`` ``parseRetryAfterDuration`` (knative/eventing
    main at 8cf4c4b, as in v1.22): ``strconv.ParseInt(value, 10, 64)`` seconds, else
    ``http.ParseTime(value)`` (an HTTP-date in any of its three layouts) less now
    (``time.Until``: in the past, negative). Go's own details are kept: a header value is
    trimmed (net/textproto), seconds past ``time.Duration``'s range wrap around as its int64
    nanoseconds do, and the clock is read as UTC whatever zone follows it: ``time.Parse``
    labels the time with a zone unknown to the dispatcher (whose local zone is UTC), even
    ``GMT+3``, without moving it. Checked against Go 1.19's net/http and strconv on the
    cases of ``test_brokers.py``.

    Returns:
        Seconds, possibly negative; None where the value is absent or unreadable (upstream:
        0, which no backoff is shorter than, so it changes nothing either).
    """
    if value is None:
        return None
    value = value.strip(" \t")
    if _GO_INT.fullmatch(value) and -_INT64 <= int(value) < _INT64:
        nanoseconds = (int(value) * 10**9 + _INT64) % 2**64 - _INT64  # Duration * time.Second
        return nanoseconds / 10**9
    for layout in _HTTP_DATES:
        found = layout.fullmatch(value)
        if found is None:
            continue
        fields = found.groupdict()
        year = int(fields["year"]) if fields.get("year") else None
        if year is None:  # "06": 69-99 are 1969-1999, the rest 2000-2068 (time/format.go)
            yy = int(fields["yy"])
            year = yy + (1900 if yy >= 69 else 2000)
        zone = fields.get("zone") or ""
        if zone.startswith("GMT") and len(zone) > 3 and abs(int(zone[3:])) > 23:
            return None  # parseSignedOffset refuses it: no zone, no match
        try:
            at = datetime(
                year,
                _MONTHS.index(fields["month"].lower()) + 1,
                int(fields["day"]),
                int(fields["hour"]),
                int(fields["minute"]),
                int(fields["second"]),
                tzinfo=UTC,
            )
        except ValueError:  # a day, hour, minute or second out of range
            return None
        fraction = float("0." + fields["fraction"][1:]) if fields["fraction"] else 0.0
        at += timedelta(seconds=fraction)
        return (at - now).total_seconds()
    return None


@dataclass
class Outcome:
    status: int | None
    reply: Event | None = None
    # What the dead-letter sink is told (None: the broker adds no error extensions).
    errors: dict[str, str] | None = None
    refusal: str | None = None  # why a 2xx reply was refused
    retry_after: float | None = None  # the Retry-After header, in seconds


def async_handler(documents: Iterable[Mapping[str, Any]]) -> bool:
    """Whether the channel of a rendered overlay's channel-based Broker dispatches
    asynchronously.

    The Broker reconciler copies the Broker's ``messaging.knative.dev/*`` annotations to its
    channel (eventing ``pkg/reconciler/broker/broker.go``, ``reconcileKind``), and the
    in-memory channel's dispatcher reads ``messaging.knative.dev/async-handler`` with Go's
    ``strconv.ParseBool``; anything else leaves it synchronous
    (``pkg/reconciler/inmemorychannel/dispatcher/inmemorychannel.go``,
    ``newConfigForInMemoryChannel``). It reads it when it first makes the channel's handler:
    a change reaches a running dispatcher only once it restarts.
    """
    [broker] = [d for d in documents if d.get("kind") == "Broker"]
    annotations = broker["metadata"].get("annotations") or {}
    return annotations.get(ASYNC_HANDLER_ANNOTATION) in _GO_TRUE


def attempts_window(trigger: TriggerInfo) -> timedelta | None:
    """The longest one round of a Trigger's attempts lasts on the channel-based broker.

    Every attempt running into the Trigger's ``timeout`` (``RetryConfig.RequestTimeout``, the
    HTTP client's timeout in ``pkg/kncloudevents/event_dispatcher.go`` ``DoWithRetries``), and
    before each retry its backoff, or the ``Retry-After`` a 429 or 503 asks for, up to
    ``retryAfterMax`` where the Trigger sets one (``retries.go`` ``generateBackoffFn``).

    Returns:
        None where the Trigger sets no ``timeout``: an attempt then has no bound at all.
    """
    if trigger.timeout is None:
        return None
    ceiling = trigger.retry_after_max or timedelta(0)
    waits = [max(wait, ceiling) for wait in trigger.backoff_schedule(CHANNEL_BROKER)]
    return (1 + (trigger.retry or 0)) * trigger.timeout + sum(waits, timedelta(0))


def longest_delivery(trigger: TriggerInfo) -> timedelta | None:
    """The longest one event's delivery to a Trigger lasts on the channel-based broker.

    ``event_dispatcher.go`` ``send`` makes up to three rounds of attempts, each with the
    Trigger's own retry settings (:func:`attempts_window`): to the subscriber, whose last
    attempt may succeed at its timeout; then its reply to the broker, whose forwarding may
    fail as long; then, with a dead-letter sink, the original event to the sink.
    """
    window = attempts_window(trigger)
    if window is None:
        return None
    return (3 if trigger.dead_letter else 2) * window
