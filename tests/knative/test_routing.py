"""Unit tests of routing.py on small hand-written manifests and on the rendered overlays."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest

from .routing import (
    PING_EVENT_TYPE,
    Routing,
    TriggerInfo,
    parse_go_duration,
    parse_iso_duration,
)

Render = Callable[[str], list[dict[str, Any]]]


def ksvc_ref(name: str) -> dict[str, Any]:
    return {"ref": {"apiVersion": "serving.knative.dev/v1", "kind": "Service", "name": name}}


def service(
    name: str, *, env: dict[str, str] | None = None, config_maps: tuple[str, ...] = ()
) -> dict[str, Any]:
    container: dict[str, Any] = {
        "image": f"example/{name}:1",
        "env": [{"name": k, "value": v} for k, v in (env or {}).items()],
        "envFrom": [{"configMapRef": {"name": c}} for c in config_maps]
        + [{"secretRef": {"name": "creds"}}],
    }
    return {
        "apiVersion": "serving.knative.dev/v1",
        "kind": "Service",
        "metadata": {"name": name},
        "spec": {
            "template": {
                "metadata": {"annotations": {"autoscaling.knative.dev/max-scale": "3"}},
                "spec": {
                    "containerConcurrency": 7,
                    "timeoutSeconds": 42,
                    "containers": [container],
                },
            }
        },
    }


def trigger(
    name: str, subscriber: str, broker: str = "bus", **filter_attributes: str
) -> dict[str, Any]:
    return {
        "apiVersion": "eventing.knative.dev/v1",
        "kind": "Trigger",
        "metadata": {"name": name},
        "spec": {
            "broker": broker,
            "filter": {"attributes": filter_attributes},
            "subscriber": ksvc_ref(subscriber),
            "delivery": {
                "retry": 4,
                "backoffPolicy": "exponential",
                "backoffDelay": "PT0.5S",
                "timeout": "PT1M30S",
                "deadLetterSink": ksvc_ref("sink"),
            },
        },
    }


def documents() -> list[dict[str, Any]]:
    return [
        {"apiVersion": "eventing.knative.dev/v1", "kind": "Broker", "metadata": {"name": "bus"}},
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "shared"},
            "data": {"A": "from-config", "B": "from-config"},
        },
        service(
            "first", env={"FUNCTION_TARGET": "first", "B": "from-env"}, config_maps=("shared",)
        ),
        service("second", env={"FUNCTION_TARGET": "second"}),
        service("sink"),
        trigger("to-first", "first", type="example.one"),
        trigger("to-second", "second", type="example.two", source="/only/here"),
        trigger("catch-all", "sink"),
        trigger("elsewhere", "first", broker="other", type="example.one"),
    ]


def test_triggers_for_matches_the_exact_type() -> None:
    routing = Routing(documents())
    assert [t.name for t in routing.triggers_for("example.one")] == ["to-first", "catch-all"]
    assert [t.name for t in routing.triggers_for("example.unknown")] == ["catch-all"]


def test_triggers_for_matches_every_filtered_attribute() -> None:
    routing = Routing(documents())
    assert [t.name for t in routing.triggers_for("example.two")] == ["catch-all"]
    matched = routing.triggers_for("example.two", {"source": "/only/here"})
    assert [t.name for t in matched] == ["to-second", "catch-all"]
    # The event's own type wins over a `type` passed among the attributes.
    assert [t.name for t in routing.triggers_for("example.one", {"type": "example.two"})] == [
        "to-first",
        "catch-all",
    ]


def test_triggers_of_other_brokers_are_ignored() -> None:
    assert "elsewhere" not in [t.name for t in Routing(documents()).triggers_for("example.one")]


def test_trigger_delivery_is_read_from_the_manifest() -> None:
    [info] = [t for t in Routing(documents()).triggers if t.name == "to-first"]
    assert info == TriggerInfo(
        name="to-first",
        broker="bus",
        filter={"type": "example.one"},
        subscriber="first",
        retry=4,
        backoff_policy="exponential",
        backoff_delay=timedelta(seconds=0.5),
        timeout=timedelta(seconds=90),
        dead_letter="sink",
    )


def test_missing_delivery_leaves_the_broker_defaults() -> None:
    doc = trigger("plain", "first", type="x")
    del doc["spec"]["delivery"]
    info = TriggerInfo.from_manifest(doc)
    assert (info.retry, info.backoff_policy, info.timeout, info.dead_letter) == (
        None,
        None,
        None,
        None,
    )
    assert info.backoff_schedule() == []


def test_backoff_schedule_follows_knative() -> None:
    info = TriggerInfo.from_manifest(trigger("t", "first"))
    assert info.backoff_schedule() == [timedelta(seconds=s) for s in (0.5, 1, 2, 4)]
    linear = dataclasses.replace(info, backoff_policy="linear")
    assert linear.backoff_schedule() == [timedelta(seconds=s) for s in (0, 0.5, 1, 1.5)]


def test_service_environment_merges_config_maps_then_env() -> None:
    first = Routing(documents()).services["first"]
    assert first.env == {"A": "from-config", "B": "from-env", "FUNCTION_TARGET": "first"}
    assert first.function == "first"
    assert (first.container_concurrency, first.timeout_seconds) == (7, 42)
    assert first.annotations == {"autoscaling.knative.dev/max-scale": "3"}
    assert first.image == "example/first:1"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda docs: docs.append(copy.deepcopy(docs[0])), "expected one Broker"),
        (lambda docs: docs.append(trigger("lost", "nobody", type="x")), "unknown Service nobody"),
        (
            lambda docs: docs[2]["spec"]["template"]["spec"]["containers"][0]["envFrom"].append(
                {"configMapRef": {"name": "missing"}}
            ),
            "ConfigMap missing",
        ),
        (
            lambda docs: docs[5]["spec"].update(subscriber={"uri": "http://example.com"}),
            "only a ref to a Knative Service",
        ),
        (
            lambda docs: docs[5]["spec"].update(filters=[{"exact": {"type": "x"}}]),
            "`filters`",
        ),
    ],
    ids=["two brokers", "unknown subscriber", "missing config map", "uri subscriber", "filters"],
)
def test_unsupported_or_broken_manifests_are_refused(
    change: Callable[[list[dict[str, Any]]], None], message: str
) -> None:
    docs = documents()
    change(docs)
    with pytest.raises(ValueError, match=message):
        Routing(docs)


def test_an_optional_missing_config_map_is_fine() -> None:
    docs = documents()
    env_from = docs[2]["spec"]["template"]["spec"]["containers"][0]["envFrom"]
    env_from.append({"configMapRef": {"name": "missing", "optional": True}})
    assert Routing(docs).services["first"].env["A"] == "from-config"


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("15m", 900), ("1h30m", 5400), ("90s", 90), ("500ms", 0.5), ("1.5h", 5400)],
)
def test_parse_go_duration(text: str, seconds: float) -> None:
    assert parse_go_duration(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["", "15", "15 m", "PT15M", "m15"])
def test_parse_go_duration_refuses_other_text(text: str) -> None:
    with pytest.raises(ValueError):
        parse_go_duration(text)


def test_parse_iso_duration() -> None:
    assert parse_iso_duration("PT11M") == timedelta(minutes=11)
    assert parse_iso_duration("PT2M30S") == timedelta(seconds=150)
    with pytest.raises(ValueError):
        parse_iso_duration("11m")


# On the real manifests: Routing reports what they say, and follows when they change.


def test_rendered_dev_routes_the_pipeline(render: Render) -> None:
    routing = Routing(render("dev"))
    # Each type also reaches the ledger, which replies nothing (test_event_routing.py).
    requested = routing.triggers_for("dev.orchestr8.imagegen.generation.requested")
    enhanced = routing.triggers_for("dev.orchestr8.imagegen.prompt.enhanced")
    [dream] = routing.triggers_for(PING_EVENT_TYPE)
    assert sorted(t.subscriber for t in requested) == ["imagegen-enhance", "imagegen-ledger"]
    assert sorted(t.subscriber for t in enhanced) == ["imagegen-ledger", "imagegen-render"]
    [enhance] = [t for t in requested if t.subscriber != "imagegen-ledger"]
    [render_trigger] = [t for t in enhanced if t.subscriber != "imagegen-ledger"]
    assert enhance.subscriber == dream.subscriber == "imagegen-enhance"
    assert render_trigger.subscriber == "imagegen-render"
    assert render_trigger.dead_letter == "imagegen-deadletter"
    assert routing.services["imagegen-render"].env["FUNCTION_TARGET"] == "render"
    assert routing.services["imagegen-render"].env["IMAGEGEN_MODEL"] == "tiny"


def test_routing_follows_the_manifests(render: Render) -> None:
    docs = render("dev")
    [doc] = [
        d for d in docs if d["kind"] == "Trigger" and d["metadata"]["name"] == "imagegen-render"
    ]
    doc["spec"]["delivery"].update(retry=9, timeout="PT1H")
    doc["spec"]["subscriber"]["ref"]["name"] = "imagegen-persist"
    [info] = [
        t
        for t in Routing(docs).triggers_for("dev.orchestr8.imagegen.prompt.enhanced")
        if t.name == "imagegen-render"
    ]
    assert (info.retry, info.timeout, info.subscriber) == (
        9,
        timedelta(hours=1),
        "imagegen-persist",
    )
