"""A scripted cluster for the broker model's tests: manifests, events and subscribers.

Subscribers are functions behind an in-process transport, by Service name; the broker records
the backoff waits it would sleep.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from .brokers import Broker
from .cloudevents_http import Event, Message, decode
from .delivery import Delivery
from .routing import Routing

Handler = Callable[[Message], Delivery]


def ksvc(name: str) -> dict[str, Any]:
    return {"ref": {"apiVersion": "serving.knative.dev/v1", "kind": "Service", "name": name}}


def manifests(
    *, retry: int = 2, delay: str = "PT1S", filter: dict[str, str] | None = None, **delivery: str
) -> list[dict[str, Any]]:
    def service(name: str) -> dict[str, Any]:
        return {
            "apiVersion": "serving.knative.dev/v1",
            "kind": "Service",
            "metadata": {"name": name},
            "spec": {"template": {"spec": {"containers": [{"image": f"x/{name}"}]}}},
        }

    return [
        {"apiVersion": "eventing.knative.dev/v1", "kind": "Broker", "metadata": {"name": "bus"}},
        service("sub"),
        service("dls"),
        {
            "apiVersion": "eventing.knative.dev/v1",
            "kind": "Trigger",
            "metadata": {"name": "t"},
            "spec": {
                "broker": "bus",
                "filter": {"attributes": filter if filter is not None else {"type": "ping"}},
                "subscriber": ksvc("sub"),
                "delivery": {
                    "retry": retry,
                    "backoffPolicy": "exponential",
                    "backoffDelay": delay,
                    "deadLetterSink": ksvc("dls"),
                    **delivery,
                },
            },
        },
    ]


def with_silent_subscriber(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``docs`` plus a Service ``log`` and a Trigger sending it what ``t`` receives."""
    [trigger] = [d for d in docs if d["kind"] == "Trigger"]
    [service] = [d for d in docs if d["metadata"]["name"] == "sub"]
    log_service = {**service, "metadata": {"name": "log"}}
    log_trigger = {
        **trigger,
        "metadata": {"name": "t-log"},
        "spec": {**trigger["spec"], "subscriber": ksvc("log")},
    }
    return [*docs, log_service, log_trigger]


def event(event_type: str = "ping", **extra: str) -> Event:
    return Event(
        {"specversion": "1.0", "id": "e1", "source": "/test", "type": event_type, **extra},
        b'{"n": 1}',
    )


def binary_reply(event_type: str, status: int = 200) -> Delivery:
    headers = {
        "ce-specversion": "1.0",
        "ce-id": "r1",
        "ce-source": "/sub",
        "ce-type": event_type,
        "content-type": "application/json",
    }
    return Delivery(status, Message(headers, b"{}"))


class Cluster:
    """Scripted subscribers by Service name, and a broker that records its backoff waits."""

    def __init__(self, broker_class: str, docs: list[dict[str, Any]], **options: Any) -> None:
        self.handlers: dict[str, Handler] = {
            "dls": lambda m: Delivery(202),
            "log": lambda m: Delivery(202),
        }
        self.received: dict[str, list[Event]] = {"sub": [], "dls": [], "log": []}
        self.timeouts: list[float | None] = []  # each request's, as the broker sets it
        self.waits: list[float] = []
        self.lock = threading.Lock()
        cluster = self

        class Recording(Broker):
            def _sleep(self, seconds: float) -> None:
                with cluster.lock:
                    cluster.waits.append(seconds)

        self.broker = Recording(
            Routing(docs),
            {"sub": "http://sub", "dls": "http://dls", "log": "http://log"},
            self.send,
            broker_class=broker_class,
            **options,
        )

    def send(self, url: str, message: Message, timeout: float | None) -> Delivery:
        name = url.removeprefix("http://")
        received = decode(message)
        assert received is not None, "the broker sends CloudEvents"
        with self.lock:
            self.received[name].append(received)
            self.timeouts.append(timeout)
        return self.handlers[name](message)

    def run(self, *events: Event) -> Broker:
        self.broker.run(*events, timeout=30)
        self.broker.close()
        return self.broker


def statuses(broker: Broker, target: str = "http://sub") -> list[int | None]:
    return [a.status for a in broker.attempts if a.target == target]
