"""Event routing as the rendered Knative manifests declare it.

Reads a kustomize directory (``kubectl kustomize``) or already-parsed manifests and answers
which Trigger receives an event, how it is delivered (retries, backoff, per-attempt
timeout, dead-letter sink) and how each Knative Service runs its function (the environment
it gets from ``env`` and ``envFrom`` ConfigMaps). Nothing here is hard-coded: change the
manifests and the answers change.

    routing = Routing.load("knative/overlays/dev")
    [trigger] = routing.triggers_for("dev.orchestr8.imagegen.prompt.enhanced")
    trigger.subscriber                      # "imagegen-render"
    routing.services[trigger.subscriber].env["FUNCTION_TARGET"]   # "render"
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import yaml
from pydantic import TypeAdapter

__all__ = [
    "CHANNEL_BROKER",
    "KAFKA_BROKER",
    "PING_EVENT_TYPE",
    "Routing",
    "ServiceInfo",
    "TriggerInfo",
    "parse_go_duration",
    "parse_iso_duration",
    "render_kustomize",
]

PING_EVENT_TYPE = "dev.knative.sources.ping"
"""The only type a PingSource emits; the dreaming Trigger routes it to enhance."""

CHANNEL_BROKER = "MTChannelBasedBroker"
KAFKA_BROKER = "Kafka"
KAFKA_DEFAULT_BACKOFF_DELAY = timedelta(milliseconds=1000)
"""The Kafka broker's backoff delay where a Trigger with ``retry`` sets none (see
:meth:`TriggerInfo.backoff_schedule`)."""
BROKER_CLASS_ANNOTATION = "eventing.knative.dev/broker.class"

_KSVC_API = "serving.knative.dev/v1"
_DURATION = TypeAdapter(timedelta)
_GO_DURATION = re.compile(r"(\d+(?:\.\d+)?)(h|ms|m|s)")
_GO_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}


def render_kustomize(directory: str | Path) -> list[dict[str, Any]]:
    """The objects ``kubectl kustomize DIRECTORY`` renders.

    Raises:
        FileNotFoundError: kubectl is not installed.
        subprocess.CalledProcessError: kustomize failed; its message is in ``stderr``.
    """
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        raise FileNotFoundError("kubectl (with kustomize) is needed to render Knative manifests")
    result = subprocess.run(
        [kubectl, "kustomize", str(directory)],
        check=True,
        capture_output=True,
        text=True,
    )
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def parse_iso_duration(text: str) -> timedelta:
    """An ISO-8601 duration as Knative Eventing writes them (``PT11M``, ``PT0.5S``)."""
    if not text.startswith("P"):
        raise ValueError(f"not an ISO-8601 duration: {text!r}")
    return _DURATION.validate_python(text)


def parse_go_duration(text: str) -> timedelta:
    """A Go duration as Knative Serving annotations take them (``15m``, ``1h30m``, ``90s``)."""
    parts = _GO_DURATION.findall(text)
    if not parts or "".join(number + unit for number, unit in parts) != text:
        raise ValueError(f"not a Go duration: {text!r}")
    return timedelta(seconds=sum(float(number) * _GO_UNITS[unit] for number, unit in parts))


def _service_ref(destination: Mapping[str, Any] | None, what: str) -> str | None:
    """The Knative Service a Destination points at; anything else is not supported here."""
    if destination is None:
        return None
    ref = destination.get("ref")
    if ref is None or destination.get("uri"):
        raise ValueError(f"{what}: only a ref to a Knative Service is supported, got {destination}")
    if ref.get("apiVersion") != _KSVC_API or ref.get("kind") != "Service":
        raise ValueError(f"{what}: {ref} is not a Knative Service")
    return str(ref["name"])


@dataclass(frozen=True)
class TriggerInfo:
    """One Trigger: what it accepts, where it sends, how it retries.

    Attributes:
        name: The Trigger's name.
        broker: The Broker it subscribes to.
        filter: Exact-match CloudEvents attributes (``spec.filter.attributes``).
        subscriber: Name of the Knative Service that receives the events.
        retry: Retries after the first attempt (None: the broker's default).
        backoff_policy: ``exponential`` or ``linear`` (None: the broker's default).
        backoff_delay: The base delay between attempts.
        timeout: The limit of one delivery attempt.
        dead_letter: Name of the Knative Service that gets events whose retries ran out.
        retry_after_max: ``delivery.retryAfterMax``: the longest ``Retry-After`` honoured.
    """

    name: str
    broker: str
    filter: Mapping[str, str]
    subscriber: str
    retry: int | None = None
    backoff_policy: str | None = None
    backoff_delay: timedelta | None = None
    timeout: timedelta | None = None
    dead_letter: str | None = None
    retry_after_max: timedelta | None = None

    @classmethod
    def from_manifest(cls, trigger: Mapping[str, Any]) -> TriggerInfo:
        """Read a Trigger object (``eventing.knative.dev/v1``)."""
        name = trigger["metadata"]["name"]
        spec = trigger["spec"]
        if spec.get("filters"):
            raise ValueError(f"Trigger {name}: `filters` (the new filter dialect) is not supported")
        delivery = spec.get("delivery") or {}
        delay = delivery.get("backoffDelay")
        timeout = delivery.get("timeout")
        retry_after_max = delivery.get("retryAfterMax")
        subscriber = _service_ref(spec.get("subscriber"), f"Trigger {name} subscriber")
        if subscriber is None:
            raise ValueError(f"Trigger {name} has no subscriber")
        return cls(
            name=name,
            broker=spec["broker"],
            filter=dict((spec.get("filter") or {}).get("attributes") or {}),
            subscriber=subscriber,
            retry=delivery.get("retry"),
            backoff_policy=delivery.get("backoffPolicy"),
            backoff_delay=parse_iso_duration(delay) if delay else None,
            timeout=parse_iso_duration(timeout) if timeout else None,
            dead_letter=_service_ref(
                delivery.get("deadLetterSink"), f"Trigger {name} deadLetterSink"
            ),
            retry_after_max=parse_iso_duration(retry_after_max) if retry_after_max else None,
        )

    def matches(self, attributes: Mapping[str, str], broker_class: str = CHANNEL_BROKER) -> bool:
        """Whether an event with these CloudEvents attributes passes the filter.

        The brokers differ on a filter value ``""``:

        - channel-based: "the attribute exists and is not empty"; any other value must be
          equal (eventing ``pkg/eventfilter/attributes/filter.go``, ``TriggerAnyFilter``).
        - Kafka: an empty value is dropped from the filter, so it matches any event, even one
          without the attribute; any other value must be equal (eventing-kafka-broker
          ``data-plane/core/.../core/filter/AttributesFilter.java`` constructor and
          ``subscriptionsapi/ExactFilter.java``).
        """
        for key, wanted in self.filter.items():
            value = attributes.get(key)
            if broker_class == KAFKA_BROKER:
                if wanted and value != wanted:
                    return False
            elif value is None or value == "" or (wanted and value != wanted):
                return False
        return True

    def backoff_schedule(self, broker_class: str = CHANNEL_BROKER) -> list[timedelta]:
        """The waits before retry 1, 2, … as each broker computes them (one per retry).

        Channel-based (eventing ``pkg/kncloudevents/retries.go``, ``RetryConfigFromDeliverySpec``;
        go-retryablehttp counts attempts from 0): exponential ``delay * 2**n``, linear
        ``delay * n``, for n = 0, 1, … Only with both ``backoffPolicy`` and ``backoffDelay``:
        otherwise the ``Backoff`` of ``NoRetries()`` stays, which returns 0, and every retry
        follows at once (no webhook defaults either: ``pkg/apis/duck/v1/delivery_defaults.go``).

        Kafka (``data-plane/dispatcher/.../impl/http/WebClientCloudEventSender.java``:
        ``retry()`` applies the policy to ``retryCounter + 1``, ``computeRetryPolicy``):
        exponential ``delay * 2**(n+1)``, linear ``delay * (n+1)``: each wait twice as long; a
        delay of 0 waits 0. With ``retry`` set, the control plane fills in what is missing
        (``control-plane/pkg/core/config/utils.go``, ``EgressConfigFromDelivery``): the delay
        ``BROKER_DEFAULT_BACKOFF_DELAY_MS`` (1000 in
        ``control-plane/config/eventing-kafka-broker/200-controller/500-controller.yaml``) and
        the policy exponential (``BackoffPolicyFromString``). knative-extensions/
        eventing-kafka-broker main at 7d8fe89.
        """
        if not self.retry:
            return []
        policy, delay = self.backoff_policy, self.backoff_delay
        if broker_class == KAFKA_BROKER:
            policy = policy or "exponential"
            delay = KAFKA_DEFAULT_BACKOFF_DELAY if delay is None else delay
        elif policy is None or delay is None:
            return [timedelta(0)] * self.retry
        shift = 1 if broker_class == KAFKA_BROKER else 0
        if policy == "exponential":
            return [delay * 2 ** (n + shift) for n in range(self.retry)]
        if policy == "linear":
            return [delay * (n + shift) for n in range(self.retry)]
        raise ValueError(f"Trigger {self.name}: unknown backoffPolicy {policy!r}")


@dataclass(frozen=True)
class ServiceInfo:
    """One Knative Service and how its (single) container runs.

    Attributes:
        name: The Service's name.
        image: The container image.
        env: The environment the container sees from ``env`` values and ``envFrom``
            ConfigMaps (Secrets are left out: their values are not in the manifests).
        annotations: The revision template's annotations (autoscaling, deadlines).
        container_concurrency: Requests one pod takes at once (0: unlimited).
        timeout_seconds: The revision's request timeout, if set.
        manifest: The whole object, for anything else.
    """

    name: str
    image: str
    env: Mapping[str, str]
    annotations: Mapping[str, str]
    container_concurrency: int
    timeout_seconds: int | None
    manifest: Mapping[str, Any] = field(repr=False)

    @property
    def function(self) -> str | None:
        """The function the container serves (``FUNCTION_TARGET``)."""
        return self.env.get("FUNCTION_TARGET")

    @classmethod
    def from_manifest(
        cls, service: Mapping[str, Any], config_maps: Mapping[str, Mapping[str, str]]
    ) -> ServiceInfo:
        """Read a Knative Service; ``config_maps`` resolves its ``envFrom`` references."""
        name = service["metadata"]["name"]
        template = service["spec"]["template"]
        spec = template["spec"]
        containers = spec["containers"]
        if len(containers) != 1:
            raise ValueError(f"Service {name}: expected one container, got {len(containers)}")
        container = containers[0]
        env: dict[str, str] = {}
        # Kubernetes order: envFrom first, then env overrides it.
        for source in container.get("envFrom") or []:
            ref = source.get("configMapRef")
            if ref is None:
                continue
            data = config_maps.get(ref["name"])
            if data is None and not ref.get("optional"):
                raise ValueError(f"Service {name}: ConfigMap {ref['name']} is not in the manifests")
            env.update(
                {source.get("prefix", "") + key: value for key, value in (data or {}).items()}
            )
        for variable in container.get("env") or []:
            if "value" in variable:
                env[variable["name"]] = variable["value"]
        return cls(
            name=name,
            image=container["image"],
            env=env,
            annotations=dict((template.get("metadata") or {}).get("annotations") or {}),
            container_concurrency=int(spec.get("containerConcurrency", 0)),
            timeout_seconds=spec.get("timeoutSeconds"),
            manifest=service,
        )


class Routing:
    """The Broker, its Triggers and the Knative Services of one rendered overlay."""

    def __init__(self, documents: Iterable[Mapping[str, Any]]) -> None:
        documents = list(documents)
        brokers = [d for d in documents if d.get("kind") == "Broker"]
        if len(brokers) != 1:
            raise ValueError(f"expected one Broker, found {len(brokers)}")
        self.broker: str = brokers[0]["metadata"]["name"]
        annotations = brokers[0]["metadata"].get("annotations") or {}
        # The default class of a cluster without config-br-defaults.
        self.broker_class: str = annotations.get(BROKER_CLASS_ANNOTATION, CHANNEL_BROKER)
        config_maps = {
            d["metadata"]["name"]: d.get("data") or {}
            for d in documents
            if d.get("kind") == "ConfigMap" and d.get("apiVersion") == "v1"
        }
        self.triggers: tuple[TriggerInfo, ...] = tuple(
            TriggerInfo.from_manifest(d) for d in documents if d.get("kind") == "Trigger"
        )
        # eventing pkg/apis/sources/v1/ping_lifecycle.go PingSourceSource: the `source` of
        # every event a PingSource sends.
        self.ping_sources: tuple[str, ...] = tuple(
            f"/apis/v1/namespaces/{d['metadata'].get('namespace', 'default')}"
            f"/pingsources/{d['metadata']['name']}"
            for d in documents
            if d.get("kind") == "PingSource"
        )
        self.services: dict[str, ServiceInfo] = {
            d["metadata"]["name"]: ServiceInfo.from_manifest(d, config_maps)
            for d in documents
            if d.get("kind") == "Service" and d.get("apiVersion") == _KSVC_API
        }
        for trigger in self.triggers:
            for target in (trigger.subscriber, trigger.dead_letter):
                if target is not None and target not in self.services:
                    raise ValueError(f"Trigger {trigger.name} points at unknown Service {target}")

    @classmethod
    def load(cls, directory: str | Path) -> Routing:
        """Render a kustomize directory and read its routing."""
        return cls(render_kustomize(directory))

    def triggers_for(
        self, event_type: str, attributes: Mapping[str, str] | None = None
    ) -> list[TriggerInfo]:
        """The Triggers of this broker that receive an event of ``event_type``.

        Args:
            event_type: The CloudEvents ``type``.
            attributes: Other attributes of the event (``source``, extensions), for
                Triggers that filter on more than the type.

        Returns:
            Every matching Trigger, in manifest order: the broker delivers to each.
        """
        if event_type == PING_EVENT_TYPE and attributes is None and len(self.ping_sources) == 1:
            # What this broker's own PingSource sends.
            attributes = {"source": self.ping_sources[0]}
        event = {**(attributes or {}), "type": event_type}
        return [
            t
            for t in self.triggers
            if t.broker == self.broker and t.matches(event, self.broker_class)
        ]
