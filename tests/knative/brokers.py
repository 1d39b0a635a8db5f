"""The two Knative broker classes, modelled rule by rule, delivering over a real transport.

A ``Broker`` takes the Triggers of a rendered overlay (``routing.Routing``) and the URL of
each Knative Service, accepts events at its ingress, and delivers them to every matching
Trigger's subscriber: concurrently, retrying, dead-lettering and publishing replies exactly as
the upstream data planes do. Each rule cites the file it comes from:

Both classes fan out: every Trigger whose filter matches gets its own copy of the event, and
delivers, retries, dead-letters and publishes replies independently of the others. Channel-based:
each Trigger is one Subscription of the broker's channel (eventing
``pkg/reconciler/broker/trigger/trigger.go``, ``subscribeToBrokerChannel``: subscriber
``broker-filter/triggers/<namespace>/<name>/<uid>``, reply the broker's ingress), and the
channel dispatcher sends each event to every Subscription concurrently
(``pkg/channel/fanout/fanout_event_handler.go``, ``dispatch``: one goroutine per subscription);
the filter then applies that one Trigger's filter. Kafka: each Trigger is its own consumer group
on the broker's topic (eventing-kafka-broker ``control-plane/pkg/apis/config/features.go``,
``DefaultTriggersConsumerGroupTemplate`` ``knative-trigger-{{ .Namespace }}-{{ .Name }}``), so
each reads every record and commits its own offsets. ``publish`` below queues one delivery per
matching Trigger.

Channel-based broker (``MTChannelBasedBroker``; knative/eventing v1.22):

- ingress ``pkg/broker/ingress/ingress_handler.go`` with ``pkg/broker/ttl.go``
  (``TTLDefaulter``: ``knativebrokerttl`` set to 255 on a new event, decremented on every
  reply; an event with TTL <= 0 is refused with 400: the loop protection); ``receive`` stamps
  every event it takes with ``knativearrivaltime``.
- channel ``pkg/channel/fanout/fanout_event_handler.go``, the in-memory channel's dispatcher
  (``pkg/reconciler/inmemorychannel/dispatcher/inmemorychannel.go``): without
  ``messaging.knative.dev/async-handler`` (``delivery.async_handler``) it answers the ingress
  only once every delivery of the event has ended, and gives up ``defaultTimeout`` (15
  minutes) after the last one that ended. Its answer ends the request whose context every
  delivery runs on (``pkg/channel/event_receiver.go`` ``ServeHTTP``), so a retry's wait or an
  attempt in flight stops there, and the dead-letter attempts then fail at once ("unable to
  complete request to either …"): the event is neither delivered nor dead-lettered. The
  model reckons the 15 minutes from each delivery's start, which is upstream's clock where
  the event's other deliveries end at once (every Trigger whose filter rejects it does; with
  two slow ones, upstream gives the later up to 15 minutes past the earlier's end), and does
  not nest a reply's deliveries in the delivery that forwards it, as the synchronous channel
  does. With the annotation the deliveries run on a context of their own, and the timeout
  only logs.
- delivery ``pkg/kncloudevents/event_dispatcher.go`` (``send``, ``executeRequest``) and
  ``retries.go`` (``SelectiveRetry``: 5xx, 404, 408, 409, 429 and no response are retried;
  backoff, none without both ``backoffPolicy`` and ``backoffDelay``; ``Retry-After``, seconds
  or an HTTP-date (``parseRetryAfterDuration``), only with ``retryAfterMax``, which needs the
  ``delivery-retryafter`` feature); the dead-letter sink gets the original event with
  ``knativeerrordest``, ``knativeerrorcode`` and ``knativeerrordata`` (base64 of a body of at
  most 768 bytes: a longer one panics the dispatcher, and the event is lost), is retried like
  the subscriber, and its reply is discarded; a reply that cannot be published to the ingress
  dead-letters the original event, naming the Broker's address as ``knativeerrordest``
  (``delivery.ingress_url``). Every request to the subscriber says ``Prefer: reply``
  (``send``), and every one the channel or the filter makes says ``Kn-Namespace``
  (``fanout_event_handler.go`` ``dispatch``; ``filter_handler.go`` ``send``). With
  ``authentication-oidc`` on (``oidc``, as
  ``knative/cluster/eventing-config-features.yaml`` sets it), dead letters go through the
  filter's ``/dls`` path (below), which judges the sink's 2xx reply as it does a subscriber's.
  A subscriber that cannot be reached is a 500 whose body is ``dispatch error: …``
  (``executeRequest``), which the filter hands on (below); one that does not answer within
  the timeout leaves no error extensions.
- filter ``pkg/broker/filter/filter_handler.go``: the TTL is removed before the subscriber sees
  the event and put back on its reply; a 2xx reply that is neither empty nor a CloudEvent, or
  a malformed CloudEvent, becomes a 502 ("The response MUST be either empty or a valid
  CloudEvent"), which is retried and finally dead-lettered without error extensions. A failed
  request to the subscriber is answered with its status (500 where nothing came back) and an
  ``ErrExtensionInfo`` body (``pkg/broker/err_extension.go``: the subscriber's URL and its
  body), which the dispatcher unwraps into the error extensions
  (``event_dispatcher.go`` ``dispatchExecutionInfoTransformers``). With OIDC the Trigger's
  Subscription names ``broker-filter/triggers/<namespace>/<name>/<uid>/dls`` as its
  dead-letter sink (``pkg/reconciler/broker/trigger/trigger.go``
  ``subscribeToBrokerChannel``), and ``handleDispatchToDLSRequest`` forwards the dead letter
  to the real sink through the same ``send`` and ``writeResponse``: a non-empty 2xx reply
  that is not a CloudEvent, or a malformed one, is a 502 to the dispatcher, which retries it
  and, once out of retries, drops the event ("unable to complete request to either …").

Kafka broker (knative-extensions/eventing-kafka-broker, ``data-plane/dispatcher``):

- ``impl/http/WebClientCloudEventSender.java``: the same retryable statuses; every failure
  without a response is retried; the wait before retry n (from 0) is ``delay * 2**(n+1)``;
  ``Retry-After`` is never read.
- ``impl/BaseResponseHandler.java``: a 2xx reply is an event, or empty; anything else fails
  the record *without a retry*; ``impl/ResponseToKafkaTopicHandler.java`` publishes a reply
  to the broker's topic. No TTL: a routing loop never ends (this model stops it at
  ``max_events``, its own guard, and says so).
- ``impl/RecordDispatcherImpl.java``: the dead-letter sink gets ``knativeerrordest`` always,
  ``knativeerrorcode`` and ``knativeerrordata`` (the body cut to 1,024 *bytes*, then base64)
  when there was a response; its reply goes through the same response handler.
- Delivery is at least once and unordered by default: ``redeliveries`` sends every record that
  many extra times at once (a consumer-group rebalance before the offset was committed), and
  ``seed`` shuffles the order in which pending deliveries start.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from .cloudevents_http import Event, MalformedEvent, Message, decode, encode_binary
from .delivery import (
    ARRIVAL_TIME,
    FANOUT_TIMEOUT,
    KN_NAMESPACE,
    TTL,
    Attempt,
    DeadLetter,
    Delivery,
    DispatcherPanic,
    NoResponse,
    Outcome,
    RoutingLoop,
    Transport,
    error_extensions,
    go_timestamp,
    http_transport,
    ingress_ttl,
    ingress_url,
    retry_after_seconds,
    retryable,
)
from .routing import CHANNEL_BROKER, KAFKA_BROKER, Routing, TriggerInfo

__all__ = ["Broker"]


@dataclass
class _Elapsed:
    """Seconds since one delivery began, as the broker counts them (``Attempt.at``)."""

    seconds: float = 0.0


class Broker:
    """One broker of ``routing.broker_class`` (or ``broker_class``), delivering via ``transport``.

    Args:
        routing: The Triggers and Services of a rendered overlay.
        urls: The URL of each Knative Service by name.
        transport: How a message reaches a URL (default: real HTTP).
        broker_class: ``MTChannelBasedBroker`` or ``Kafka`` (default: the overlay's).
        time_scale: Backoff waits are multiplied by this (1.0: real time).
        redeliveries: Extra copies of every delivery, sent at once (at-least-once delivery).
        seed: Shuffle the order in which pending deliveries start.
        max_events: Accept at most this many events (a Kafka routing loop never ends).
        workers: Deliveries in flight at once.
        clock: The time an HTTP-date ``Retry-After`` is reckoned from (default: now, UTC).
        oidc: Eventing's ``authentication-oidc`` feature (default: on, as
            ``knative/cluster/eventing-config-features.yaml`` sets it); on the channel-based
            broker it routes dead letters through the filter (module docstring).
        async_handler: The channel-based broker's channel dispatches asynchronously
            (``delivery.async_handler`` of the rendered overlay); otherwise a delivery still
            going after ``FANOUT_TIMEOUT`` is dropped (module docstring).
        namespace: The Broker's namespace (default: its Services', else ``default``).
    """

    def __init__(
        self,
        routing: Routing,
        urls: Mapping[str, str],
        transport: Transport | None = None,
        *,
        broker_class: str | None = None,
        time_scale: float = 0.001,
        redeliveries: int = 0,
        seed: int | None = None,
        max_events: int = 200,
        workers: int = 8,
        clock: Callable[[], datetime] | None = None,
        oidc: bool = True,
        async_handler: bool = False,
        namespace: str | None = None,
    ) -> None:
        self.routing = routing
        self.urls = dict(urls)
        self.transport = transport or http_transport()
        self.broker_class = broker_class or routing.broker_class
        if self.broker_class not in {CHANNEL_BROKER, KAFKA_BROKER}:
            raise ValueError(f"unknown broker class {self.broker_class!r}")
        self.time_scale = time_scale
        self.redeliveries = redeliveries
        self.random = random.Random(seed) if seed is not None else None
        self.max_events = max_events
        self.clock = clock or (lambda: datetime.now(UTC))
        self.oidc = oidc
        # Kafka has no fan-out to wait on: each Trigger consumes the topic on its own.
        self.limit = None if self.kafka or async_handler else FANOUT_TIMEOUT.total_seconds()
        namespaces = {s.manifest["metadata"].get("namespace") for s in routing.services.values()}
        self.namespace = namespace or next(iter(namespaces - {None}), None) or "default"
        self.attempts: list[Attempt] = []
        self.dead_letters: list[DeadLetter] = []
        self.accepted: list[Event] = []
        self.outputs: list[Event] = []  # accepted events no Trigger wanted
        self.refused_replies: list[tuple[str, str]] = []  # (trigger, reason)
        self.lost: list[tuple[str, Event]] = []  # neither delivered nor dead-lettered
        self.panics: list[str] = []  # Triggers whose delivery ended the channel dispatcher
        self.timed_out: list[str] = []  # Triggers whose delivery the channel's fan-out gave up
        # Reentrant: run() holds it when a delivery that has already ended calls _done.
        self._lock = threading.RLock()
        self._idle = threading.Condition(self._lock)
        self._pending: list[tuple[TriggerInfo, Event]] = []
        self._running = 0
        self._errors: list[BaseException] = []
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="broker")

    @property
    def kafka(self) -> bool:
        return self.broker_class == KAFKA_BROKER

    @property
    def _via_filter(self) -> bool:
        """Dead letters go through the filter's ``/dls`` path (channel-based broker, OIDC)."""
        return self.oidc and not self.kafka

    # Ingress.

    def publish(self, event: Event) -> int:
        """Send an event to the broker's ingress; returns its HTTP status (202 or 400)."""
        if not self.kafka:
            ttl = ingress_ttl(event.get(TTL))
            arrived = go_timestamp(self.clock())
            event = event.with_attributes(**{TTL: str(ttl), ARRIVAL_TIME: arrived})
            if ttl <= 0:
                return 400
        triggers = self.routing.triggers_for(event["type"], dict(event.attributes))
        with self._lock:
            if len(self.accepted) >= self.max_events:
                self._errors.append(RoutingLoop(f"more than {self.max_events} events accepted"))
                self._idle.notify_all()
                return 500
            self.accepted.append(event)
            if not triggers:
                self.outputs.append(event)
            # Fan-out: one independent delivery per matching Trigger (module docstring).
            for trigger in triggers:
                for _ in range(1 + self.redeliveries):
                    self._pending.append((trigger, event))
            self._idle.notify_all()
        return 202

    def run(self, *events: Event, timeout: float = 300.0) -> None:
        """Publish ``events`` and deliver until nothing is left in flight."""
        for event in events:
            status = self.publish(event)
            assert status == 202, f"the ingress refused {event.get('id')}: {status}"
        deadline = time.monotonic() + timeout
        with self._lock:
            while (self._pending or self._running) and not self._errors:
                while self._pending:
                    index = self.random.randrange(len(self._pending)) if self.random else 0
                    trigger, event = self._pending.pop(index)
                    self._running += 1
                    future = self._pool.submit(self._deliver, trigger, event)
                    # A delivery that has already ended runs _done here and now.
                    future.add_done_callback(self._done)
                if self._pending or self._errors or not self._running:
                    continue
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("deliveries still in flight")
                self._idle.wait(left)
            if self._errors:
                raise self._errors[0]

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def _done(self, future: Future[None]) -> None:
        with self._lock:
            self._running -= 1
            if future.exception() is not None:
                self._errors.append(future.exception())  # type: ignore[arg-type]
            self._idle.notify_all()

    # Delivery to one Trigger.

    def _deliver(self, trigger: TriggerInfo, event: Event) -> None:
        waits = trigger.backoff_schedule(self.broker_class)
        clock = _Elapsed()
        outcome = Outcome(status=None)
        for attempt in range(1 + (trigger.retry or 0)):
            if attempt and not self._wait(clock, self._backoff(trigger, waits, attempt, outcome)):
                return self._give_up(trigger, event)
            try:
                outcome = self._attempt(trigger, event, clock)
            except DispatcherPanic:
                with self._lock:
                    self.lost.append((trigger.name, event))
                    self.panics.append(trigger.name)
                return
            if self._past_limit(clock):
                return self._give_up(trigger, event)
            if outcome.refusal is not None:
                with self._lock:
                    self.refused_replies.append((trigger.name, outcome.refusal))
                if self.kafka:
                    break  # BaseResponseHandler: failed without a retry
            if outcome.status is not None and outcome.status < 300 and outcome.refusal is None:
                break
            if not retryable(outcome.status):
                break
        if outcome.status is not None and outcome.status < 300 and outcome.refusal is None:
            if outcome.reply is None:
                return
            status = self.publish(outcome.reply)
            if status < 300:
                return
            # event_dispatcher.go send(): the reply could not be forwarded.
            destination = ingress_url(self.namespace, self.routing.broker)
            outcome = Outcome(
                status, errors=error_extensions(destination, status, b"", kafka=self.kafka)
            )
        self._dead_letter(trigger, event, outcome, clock)

    def _backoff(
        self, trigger: TriggerInfo, waits: list[timedelta], attempt: int, last: Outcome
    ) -> float:
        """The wait before retry ``attempt`` (from 1), after ``last`` came back."""
        wait = waits[attempt - 1].total_seconds()
        # retries.go generateBackoffFn: only with retryAfterMax, only for 429 and 503.
        if self.kafka or trigger.retry_after_max is None or last.retry_after is None:
            return wait
        if last.status not in {429, 503}:
            return wait
        return max(wait, min(last.retry_after, trigger.retry_after_max.total_seconds()))

    def _wait(self, clock: _Elapsed, seconds: float) -> bool:
        """Wait before a retry; False where the channel's fan-out gives up first."""
        seconds = max(seconds, 0.0)
        if self.limit is not None and clock.seconds + seconds > self.limit:
            return False  # go-retryablehttp Do: the wait ends with the request's context
        self._sleep(seconds)
        clock.seconds += seconds
        return True

    def _past_limit(self, clock: _Elapsed) -> bool:
        return self.limit is not None and clock.seconds > self.limit

    def _give_up(self, trigger: TriggerInfo, event: Event) -> None:
        """The channel's fan-out timed out: neither delivered nor dead-lettered."""
        with self._lock:
            self.lost.append((trigger.name, event))
            self.timed_out.append(trigger.name)

    def _sleep(self, seconds: float) -> None:
        if seconds > 0:
            time.sleep(seconds * self.time_scale)

    def _send(
        self, trigger: TriggerInfo, url: str, event: Event, clock: _Elapsed, *, reply: bool
    ) -> Delivery | NoResponse:
        """One request: what came back, or why nothing did.

        Args:
            reply: The request goes through ``event_dispatcher.go`` ``send`` to its
                destination, which says ``Prefer: reply``: every request to a subscriber,
                and a dead letter the filter forwards.
        """
        # Without the Trigger's timeout: none on the channel broker (pkg/kncloudevents/
        # http_client.go sets none; DoWithRetries only the configured one), 600 s on Kafka's
        # (WebClientCloudEventSender.java, DEFAULT_TIMEOUT_MS).
        timeout: float | None = trigger.timeout.total_seconds() if trigger.timeout else None
        if timeout is None and self.kafka:
            timeout = 600.0
        message = encode_binary(event)
        if not self.kafka:
            headers = {**message.headers, KN_NAMESPACE: self.namespace}
            if reply:
                headers["prefer"] = "reply"
            message = Message(headers, message.body)
        sent_at = clock.seconds
        started = time.monotonic()
        delivery: Delivery | NoResponse
        try:
            delivery = self.transport(url, message, timeout)
        except NoResponse as failure:
            delivery = failure
        took = time.monotonic() - started
        if isinstance(delivery, Delivery) and delivery.elapsed is not None:
            took = delivery.elapsed
        elif isinstance(delivery, NoResponse) and delivery.timed_out and timeout is not None:
            took = timeout
        clock.seconds += took
        status = delivery.status if isinstance(delivery, Delivery) else None
        if self._past_limit(clock):
            status = None  # cancelled with the fan-out's request: no answer reached the broker
        with self._lock:
            self.attempts.append(
                Attempt(trigger.name, url, event["type"], event["id"], status, sent_at)
            )
        return delivery

    def _attempt(self, trigger: TriggerInfo, event: Event, clock: _Elapsed) -> Outcome:
        url = self.urls[trigger.subscriber]
        ttl = event.get(TTL)
        # filter_handler.go: the subscriber never sees the broker's TTL.
        delivery = self._send(trigger, url, event.with_attributes(**{TTL: None}), clock, reply=True)
        if isinstance(delivery, NoResponse):
            return Outcome(None, errors=self._unanswered(url, delivery))
        if delivery.status >= 300:
            return Outcome(
                delivery.status,
                errors=error_extensions(
                    url, delivery.status, delivery.message.body, kafka=self.kafka
                ),
                retry_after=self._retry_after(delivery),
            )
        return self._reply(delivery, url, ttl)

    def _retry_after(self, delivery: Delivery) -> float | None:
        # filter_handler.go hands the subscriber's Retry-After on (pkg/utils/headers.go,
        # PassThroughHeaders).
        return retry_after_seconds(delivery.message.header("retry-after"), now=self.clock())

    def _unanswered(self, url: str, failure: NoResponse) -> dict[str, str] | None:
        """What the dead-letter sink is told of a subscriber that gave no response."""
        if self.kafka:
            # RecordDispatcherImpl.onSubscriberFailure: no response, only the destination.
            return {"knativeerrordest": url}
        if failure.timed_out:
            # The filter's own request has no timeout (pkg/kncloudevents/http_client.go): the
            # dispatcher's request to the filter ends first, and its "dispatch error" names
            # the filter and is no ErrExtensionInfo, so dispatchExecutionInfoTransformers
            # adds no extension at all.
            return None
        # event_dispatcher.go executeRequest: ResponseCode 500, ResponseBody "dispatch error:
        # " + the client's error (Go's url.Error: Post "<url>": <cause>; the cause is this
        # transport's words, not Go's). The filter answers that 500 with ErrExtensionInfo{the
        # subscriber's URL, that body} (filter_handler.go send), which the dispatcher unwraps.
        body = f'dispatch error: Post "{url}": {failure}'.encode()
        return error_extensions(url, 500, body, kafka=False)

    def _reply(self, delivery: Delivery, url: str, ttl: str | None) -> Outcome:
        try:
            reply = decode(delivery.message)
        except MalformedEvent as exc:
            reason = f"malformed CloudEvent: {exc}"
            return self._refused(url, reason)
        if reply is None:
            if delivery.message.body:
                return self._refused(url, "a non-empty response not recognized as CloudEvent")
            return Outcome(delivery.status)
        if not self.kafka and ttl is not None:
            reply = reply.with_attributes(**{TTL: ttl})
        return Outcome(delivery.status, reply=reply)

    def _refused(self, url: str, reason: str) -> Outcome:
        if self.kafka:
            # RecordDispatcherImpl.onSubscriberFailure: no response object, only the destination.
            return Outcome(200, errors={"knativeerrordest": url}, refusal=reason)
        # filter_handler.go writeResponse: 502, no body, so no error extensions downstream.
        return Outcome(502, errors=None, refusal=reason)

    def _dead_letter(
        self, trigger: TriggerInfo, event: Event, outcome: Outcome, clock: _Elapsed
    ) -> None:
        if trigger.dead_letter is None:
            with self._lock:
                self.lost.append((trigger.name, event))
            return
        letter = event.with_attributes(**(outcome.errors or {}))
        url = self.urls[trigger.dead_letter]
        waits = trigger.backoff_schedule(self.broker_class)
        accepted = False
        reply: Event | None = None
        # event_dispatcher.go send: the sink's executeRequest gets the same config.retryConfig,
        # so the same backoff, Retry-After included (retries.go generateBackoffFn).
        last = Outcome(status=None)
        cut = False
        for attempt in range(1 + (trigger.retry or 0)):
            if attempt and not self._wait(clock, self._backoff(trigger, waits, attempt, last)):
                cut = True
                break
            delivery = self._send(trigger, url, letter, clock, reply=self._via_filter)
            if self._past_limit(clock):
                cut = True
                break
            status = delivery.status if isinstance(delivery, Delivery) else None
            last = Outcome(status)
            if isinstance(delivery, Delivery) and delivery.status >= 300:
                last.retry_after = self._retry_after(delivery)
            if isinstance(delivery, Delivery) and delivery.status < 300 and self._via_filter:
                refusal = self._dead_letter_refusal(delivery)
                if refusal is not None:
                    with self._lock:
                        self.refused_replies.append((trigger.name, refusal))
                    status = 502  # the filter's answer, which the dispatcher retries
                    last = Outcome(status)
            if isinstance(delivery, Delivery) and status is not None and status < 300:
                accepted = True
                if self.kafka:
                    # The dead-letter sink's reply goes through the same response handler.
                    try:
                        reply = decode(delivery.message)
                        accepted = reply is not None or not delivery.message.body
                    except MalformedEvent:
                        accepted = False
                    if not accepted:
                        with self._lock:
                            self.refused_replies.append((trigger.name, "dead-letter sink reply"))
                break
            if not retryable(status):
                break
        with self._lock:
            self.dead_letters.append(DeadLetter(trigger.name, letter, accepted))
        if cut:
            return self._give_up(trigger, event)
        if not accepted:
            with self._lock:
                self.lost.append((trigger.name, event))
        if reply is not None:
            self.publish(reply)

    def _dead_letter_refusal(self, delivery: Delivery) -> str | None:
        """Why the filter's ``/dls`` path answers the sink's 2xx with 502 (None: it does not).

        eventing ``pkg/broker/filter/filter_handler.go`` (knative-v1.22.2, 532b01f; unchanged
        on main at 8cf4c4b): ``handleDispatchToDLSRequest`` calls ``send`` with ``skipTTL``,
        whose ``writeResponse`` answers 502 for a non-empty body of no CloudEvent encoding
        ("The response MUST be either empty or a valid CloudEvent") and for one that
        ``binding.ToEvent`` cannot read; an empty body keeps the sink's status, and a valid
        CloudEvent goes back to the dispatcher, which discards it (``event_dispatcher.go``
        ``send``: ``deadLetterResponse`` is only finished).
        """
        try:
            reply = decode(delivery.message)
        except MalformedEvent as exc:
            return f"dead-letter sink reply: malformed CloudEvent: {exc}"
        if reply is None and delivery.message.body:
            return "dead-letter sink reply: a non-empty response not recognized as CloudEvent"
        return None
