"""One delivery to a subscriber, as both Knative broker classes make it (see ``brokers``).

What goes over the wire and what comes back: the transport, the statuses that are retried
(eventing ``pkg/kncloudevents/retries.go`` ``SelectiveRetry``; eventing-kafka-broker
``WebClientCloudEventSender.isRetryableStatusCode``) and the error extensions a dead-letter
sink is told (eventing ``pkg/kncloudevents/event_dispatcher.go``; eventing-kafka-broker
``RecordDispatcherImpl.java``).
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx

from .cloudevents_http import Event, Message

MAX_TTL = 255  # cmd/broker/ingress/main.go: MAX_TTL default
TTL = "knativebrokerttl"
ERROR_DATA_MAX = (
    1024  # eventing: KnativeErrorDataExtensionMaxLength; kafka: KN_ERROR_DATA_MAX_BYTES
)
INGRESS_URL = "http://broker-ingress.knative-eventing.svc.cluster.local/ns/broker"


class NoResponse(Exception):
    """The subscriber could not be reached, or did not answer within the attempt timeout."""


class RoutingLoop(RuntimeError):
    """More events than ``max_events`` were accepted: a loop the Kafka broker never ends."""


@dataclass(frozen=True)
class Delivery:
    """What came back from one HTTP request: the status and the response message."""

    status: int
    message: Message = field(default_factory=Message)


Transport = Callable[[str, Message, float], Delivery]
"""POST a message to a URL within a timeout; raises NoResponse when nothing came back."""


def http_transport(client: httpx.Client | None = None) -> Transport:
    """A transport over real HTTP (httpx)."""
    http = client or httpx.Client()

    def send(url: str, message: Message, timeout: float) -> Delivery:
        try:
            response = http.post(
                url, headers=dict(message.headers), content=message.body, timeout=timeout
            )
        except httpx.HTTPError as exc:
            raise NoResponse(f"{type(exc).__name__}: {exc}") from exc
        headers = {k.lower(): v for k, v in response.headers.items()}
        return Delivery(response.status_code, Message(headers, response.content))

    return send


@dataclass(frozen=True)
class Attempt:
    """One delivery attempt to a subscriber (status None: no response)."""

    trigger: str
    target: str
    event_type: str
    event_id: str
    status: int | None


@dataclass(frozen=True)
class DeadLetter:
    """An event handed to a Trigger's dead-letter sink, as the sink received it."""

    trigger: str
    event: Event
    accepted: bool


def retryable(status: int | None) -> bool:
    """eventing retries.go SelectiveRetry = WebClientCloudEventSender.isRetryableStatusCode."""
    return status is None or status >= 500 or status in {404, 408, 409, 429}


def error_extensions(
    destination: str, status: int | None, body: bytes | None, *, kafka: bool
) -> dict[str, str]:
    extensions = {"knativeerrordest": destination}
    if status is None or body is None:
        return extensions
    if kafka:
        data = base64.b64encode(body[:ERROR_DATA_MAX]).decode()
    else:
        data = base64.b64encode(body).decode()[:ERROR_DATA_MAX]
    return {**extensions, "knativeerrorcode": str(status), "knativeerrordata": data}


@dataclass
class Outcome:
    status: int | None
    reply: Event | None = None
    # What the dead-letter sink is told (None: the broker adds no error extensions).
    errors: dict[str, str] | None = None
    refusal: str | None = None  # why a 2xx reply was refused
    retry_after: float | None = None  # the Retry-After header, in seconds
