"""The rendered overlays route every event of the pipeline exactly once, without loops.

Each event type has exactly one *replying* consumer (the next stage, whose reply continues the
chain) and any number of subscribers that reply nothing; the ledger is one of them and hears
every imagegen type. The broker hands each event to every matching Trigger independently
(``brokers.py``: one Subscription per Trigger, one consumer group per Trigger), so a second
replying consumer would fork the chain, and a silent one cannot.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
import yaml

from imagegen.events import MODEL_ATTRIBUTE

from .conftest import OVERLAYS, REPO, service_settings
from .cron import schedule_refusal
from .manifest_schemas import CRD_DIR
from .routing import PING_EVENT_TYPE, Routing

Render = Callable[[str], list[dict[str, Any]]]
RoutingOf = Callable[[str], Routing]

PREFIX = "dev.orchestr8.imagegen."
REQUESTED = PREFIX + "generation.requested"
ENHANCED = PREFIX + "prompt.enhanced"
RENDERED = PREFIX + "image.rendered"
PERSISTED = PREFIX + "image.persisted"
DERIVED = PREFIX + "image.derived"
FAILED = PREFIX + "generation.failed"
ALL_TYPES = (REQUESTED, ENHANCED, RENDERED, PERSISTED, DERIVED, FAILED)

# The product's contract: what each function consumes and replies with.
CONSUMES = {
    "enhance": {REQUESTED, PING_EVENT_TYPE},
    "render": {ENHANCED},
    "persist": {RENDERED},
    "derive": {PERSISTED},
    "deadletter": {FAILED},
    "ledger": set(ALL_TYPES),
}
REPLIES = {
    "enhance": {ENHANCED, FAILED},
    "render": {RENDERED, FAILED},
    "persist": {PERSISTED, FAILED},
    "derive": {DERIVED, FAILED},
    "deadletter": set(),
    "ledger": set(),
}
OUTPUT = DERIVED
# Sent from outside the pipeline: by callers, and by the PingSource.
EXTERNAL = {REQUESTED, PING_EVENT_TYPE}


def _function_of(routing: Routing, service: str) -> str:
    function = routing.services[service].function
    assert function is not None, f"{service} sets no FUNCTION_TARGET"
    return function


def _served(r: Routing) -> list[str]:
    """The models the overlay's enhance accepts (IMAGEGEN_SERVED_MODELS)."""
    [enhance] = [s for s in r.services.values() if s.function == "enhance"]
    return [m.strip() for m in enhance.env["IMAGEGEN_SERVED_MODELS"].split(",")]


def _sent(r: Routing, event_type: str) -> list[dict[str, str] | None]:
    """The extension attributes events of ``event_type`` carry: enhance stamps each
    prompt.enhanced event with its model (imagegen.events.routing_attributes)."""
    if event_type == ENHANCED:
        return [{MODEL_ATTRIBUTE: model} for model in _served(r)]
    return [None]


def _functions(r: Routing, event_type: str, attributes: dict[str, str] | None) -> list[str]:
    """The functions an event reaches: one per matching Trigger, as the broker delivers."""
    return [_function_of(r, t.subscriber) for t in r.triggers_for(event_type, attributes)]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_event_has_one_replying_consumer_and_the_ledger(
    routing: RoutingOf, overlay: str
) -> None:
    r = routing(overlay)
    emitted = set().union(*REPLIES.values()) | EXTERNAL
    for event_type in sorted(emitted):
        for attributes in _sent(r, event_type):
            functions = _functions(r, event_type, attributes)
            replying = [f for f in functions if REPLIES[f]]
            silent = sorted(f for f in functions if not REPLIES[f])
            # Two replying consumers would fork the chain; the output ends it.
            assert len(replying) == (0 if event_type in {OUTPUT, FAILED} else 1), (
                event_type,
                functions,
            )
            expected = {FAILED: ["deadletter"]}.get(event_type, [])
            if event_type in ALL_TYPES:
                expected = sorted([*expected, "ledger"])  # the ledger hears every type once
            assert silent == expected, (event_type, functions)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_imagegen_type_reaches_the_ledger_once(routing: RoutingOf, overlay: str) -> None:
    r = routing(overlay)
    for event_type in ALL_TYPES:
        for attributes in _sent(r, event_type):
            assert _functions(r, event_type, attributes).count("ledger") == 1, event_type
    # The ledger records imagegen events only: not the PingSource's ticks.
    assert "ledger" not in _functions(r, PING_EVENT_TYPE, None)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_event_reaches_the_stage_that_consumes_it(routing: RoutingOf, overlay: str) -> None:
    r = routing(overlay)
    for function, types in CONSUMES.items():
        for event_type in types:
            for attributes in _sent(r, event_type):
                assert _functions(r, event_type, attributes).count(function) == 1, event_type


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_served_model_reaches_a_render_service_that_loads_it(
    routing: RoutingOf, overlay: str
) -> None:
    # "Allowed" means "served": every model enhance accepts is routed to a render Service
    # whose IMAGEGEN_MODEL is that model, so no job waits for a Service that is not there.
    r = routing(overlay)
    for attributes in _sent(r, ENHANCED):
        assert attributes is not None
        routed = r.triggers_for(ENHANCED, attributes)
        [trigger] = [t for t in routed if REPLIES[_function_of(r, t.subscriber)]]
        service = r.services[trigger.subscriber]
        assert service.env["IMAGEGEN_MODEL"] == attributes[MODEL_ATTRIBUTE], trigger.name
        assert service.env["IMAGEGEN_SERVED_MODELS"] == ",".join(_served(r))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_stage_consumes_the_output(routing: RoutingOf, overlay: str) -> None:
    # Other services may subscribe to image.derived; the pipeline itself ends there: no
    # stage that replies consumes it (the ledger records it and replies nothing).
    r = routing(overlay)
    assert not [t.name for t in r.triggers_for(OUTPUT) if REPLIES[_function_of(r, t.subscriber)]]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_stage_receives_its_own_replies(routing: RoutingOf, overlay: str) -> None:
    r = routing(overlay)
    for trigger in r.triggers:
        function = _function_of(r, trigger.subscriber)
        assert trigger.filter.get("type") not in REPLIES[function], trigger.name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_trigger_filters_on_one_exact_known_type(routing: RoutingOf, overlay: str) -> None:
    r = routing(overlay)
    for trigger in r.triggers:
        assert trigger.broker == r.broker, trigger.name
        assert trigger.filter["type"] in {*ALL_TYPES, PING_EVENT_TYPE}, trigger.name
        # An empty value means "any" (or "exists"), and the brokers disagree on which.
        assert all(trigger.filter.values()), f"{trigger.name}: {trigger.filter}"
        # The ping type is shared by every PingSource: that Trigger names its source too.
        expected = {"type", "source"} if trigger.filter["type"] == PING_EVENT_TYPE else {"type"}
        # A render Trigger may also route by model (docs/models.md).
        if trigger.filter["type"] == ENHANCED and MODEL_ATTRIBUTE in trigger.filter:
            expected = {"type", MODEL_ATTRIBUTE}
        assert set(trigger.filter) == expected, f"{trigger.name}: {trigger.filter}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_trigger_retries_then_dead_letters(routing: RoutingOf, overlay: str) -> None:
    r = routing(overlay)
    [deadletter] = [s for s in r.services.values() if s.function == "deadletter"]
    for trigger in r.triggers:
        assert trigger.retry is not None and trigger.retry >= 1, trigger.name
        assert trigger.backoff_policy == "exponential", trigger.name
        assert trigger.backoff_delay is not None and trigger.backoff_delay >= timedelta(seconds=1)
        assert trigger.timeout is not None, trigger.name
        assert trigger.dead_letter == deadletter.name, trigger.name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_function_runs_in_one_service(routing: RoutingOf, overlay: str) -> None:
    services = routing(overlay).services.values()
    assert sorted(s.function or "" for s in services) == sorted(CONSUMES)
    for service in services:
        assert service.name == f"imagegen-{service.function}"
        assert service.env["FUNCTION_SOURCE"] == f"functions/{service.function}.py"
        assert service.env.get("OTEL_SERVICE_NAME") == service.name


def test_function_sources_exist(routing: RoutingOf) -> None:
    for service in routing("prod").services.values():
        assert (REPO / service.env["FUNCTION_SOURCE"]).is_file(), service.name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_service_is_cluster_local(render: Render, overlay: str) -> None:
    # Events enter through the broker: a stage called directly would send its reply back
    # to the caller instead of on to the next stage.
    for doc in render(overlay):
        if doc["kind"] == "Service" and "knative" in doc["apiVersion"]:
            labels = doc["metadata"].get("labels", {})
            assert labels.get("networking.knative.dev/visibility") == "cluster-local", doc[
                "metadata"
            ]


def _eventtype_storage_version() -> str:
    """The apiVersion the EventType CRD stores (its version marked ``storage: true``)."""
    for doc in yaml.safe_load_all((CRD_DIR / "eventing-eventtype.yaml").read_text()):
        if doc and doc.get("kind") == "CustomResourceDefinition":
            [version] = [v["name"] for v in doc["spec"]["versions"] if v.get("storage")]
            return f"{doc['spec']['group']}/{version}"
    raise AssertionError("no EventType CRD")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_event_types_are_registered_with_their_schemas(render: Render, overlay: str) -> None:
    broker = Routing(render(overlay)).broker
    # Written in the version the CRD stores: a v1beta3 object is converted to v1beta2 for
    # storage (eventing pkg/apis/eventing/v1beta2/eventtype_conversion.go, ConvertFrom
    # *v1beta3), which keeps only the type, source and schemadata attributes, so a v1beta3
    # dataschema would be lost and every apply would change the object again.
    stored = _eventtype_storage_version()
    assert stored == "eventing.knative.dev/v1beta2"
    registered = {}
    for doc in render(overlay):
        if doc["kind"] != "EventType":
            continue
        assert doc["apiVersion"] == stored, doc["metadata"]["name"]
        assert doc["spec"]["reference"] == {
            "apiVersion": "eventing.knative.dev/v1",
            "kind": "Broker",
            "name": broker,
        }
        # v1beta2 EventTypeSpec.Validate (eventing pkg/apis/eventing/v1beta2/
        # eventtype_validation.go): ErrMissingField("type") when spec.type is empty.
        assert doc["spec"].get("type"), doc["metadata"]["name"]
        assert doc["spec"].get("description"), doc["metadata"]["name"]
        registered[doc["spec"]["type"]] = doc["spec"]["schema"]
    assert sorted(registered) == sorted(ALL_TYPES)
    for event_type, url in registered.items():
        name = event_type.removeprefix(PREFIX)
        assert url == f"https://schemas.orchestr8.dev/imagegen/{name}.json"
        schema_file = REPO / "schemas" / f"{name}.json"
        if schema_file.is_file():
            assert json.loads(schema_file.read_text())["$id"] == url


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pingsource_dreams_through_the_broker(render: Render, overlay: str) -> None:
    docs = render(overlay)
    r = Routing(docs)
    [ping] = [d for d in docs if d["kind"] == "PingSource"]
    spec = ping["spec"]
    assert spec["sink"] == {
        "ref": {"apiVersion": "eventing.knative.dev/v1", "kind": "Broker", "name": r.broker}
    }
    assert json.loads(spec["data"]) == {}, "dreaming sends no prompt"
    assert spec["contentType"] == "application/json"
    assert schedule_refusal(spec["schedule"], spec.get("timezone", "")) is None, spec
    # eventing pkg/apis/sources/v1/ping_lifecycle.go PingSourceSource.
    metadata = ping["metadata"]
    source = f"/apis/v1/namespaces/{metadata['namespace']}/pingsources/{metadata['name']}"
    [trigger] = r.triggers_for(PING_EVENT_TYPE, {"source": source})
    assert r.services[trigger.subscriber].function == "enhance"
    # Another namespace's PingSource on the same broker does not dream here.
    assert not r.triggers_for(PING_EVENT_TYPE, {"source": source.replace("/pingsources/", "/x/")})


@pytest.mark.parametrize(
    ("schedule", "timezone", "field"),
    [
        ("99 * * * *", "", "schedule"),
        ("*/0 * * * *", "", "schedule"),
        ("0 9 * * mon-fry", "", "schedule"),
        ("0 9 * *", "", "schedule"),
        ("@every 1h", "", "schedule"),
        ("0 9 * * *", "Mars/Olympus", "timezone"),
        ("0 9 * * mon-fri", "Europe/Berlin", None),
        ("30 */2 1,15 jan-jun *", "", None),
        ("@daily", "", None),
        # robfig/cron v3 Parse: the schedule's own CRON_TZ=/TZ= prefix, when spec.timezone is
        # empty.
        ("CRON_TZ=Europe/Berlin 0 9 * * mon-fri", "", None),
        ("TZ=Europe/Berlin   @daily", "", None),
        ("CRON_TZ=Mars/Olympus 0 9 * * *", "", "timezone"),
        ("CRON_TZ=Europe/Berlin", "", "schedule"),
        # Both: ping_validation.go puts CRON_TZ=<timezone> first, and the schedule's own prefix
        # is left as a field.
        ("CRON_TZ=Europe/Berlin 0 9 * * *", "Europe/Berlin", "schedule"),
        ("TZ=UTC 0 0 9 * * *", "UTC", "schedule"),
        # A descriptor is matched exactly: only the prefix's cut trims the spaces around it.
        (" @daily", "", "schedule"),
        (" @daily", "Europe/Berlin", None),
        ("0 9 * * *", "Local", None),
        ("", "", "schedule"),
    ],
)
def test_the_schedule_rules_refuse_what_knative_refuses(
    schedule: str, timezone: str, field: str | None
) -> None:
    refusal = schedule_refusal(schedule, timezone)
    assert (refusal and refusal[0]) == field, refusal


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_env_refs_resolve(render: Render, overlay: str) -> None:
    docs = render(overlay)
    config_maps = {d["metadata"]["name"] for d in docs if d["kind"] == "ConfigMap"}
    # Created by hand, as docs/deploy.md says (test_no_overlay_applies_a_secret).
    secrets = {"imagegen-storage", "imagegen-api-keys", "imagegen-ledger"}
    for doc in docs:
        if doc["kind"] != "Service" or doc["apiVersion"] != "serving.knative.dev/v1":
            continue
        for source in doc["spec"]["template"]["spec"]["containers"][0].get("envFrom", []):
            if "configMapRef" in source:
                assert source["configMapRef"]["name"] in config_maps
            if "secretRef" in source:
                assert source["secretRef"]["name"] in secrets


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_overlay_applies_a_secret(render: Render, overlay: str) -> None:
    # `kubectl apply -k` of an overlay that held the Secret would set real credentials back
    # to its placeholders: the Secret is created once, by hand (docs/deploy.md).
    assert not [d for d in render(overlay) if d["kind"] == "Secret"]


def test_the_deploy_guide_creates_every_secret_the_services_read(render: Render) -> None:
    from imagegen.settings import Settings

    guide = (REPO / "docs" / "deploy.md").read_text()
    created = set(re.findall(r"create secret generic (\S+)", guide))
    keys = set(re.findall(r"--from-literal=(IMAGEGEN_\w+)=", guide))
    for overlay in OVERLAYS:
        for doc in render(overlay):
            if doc["kind"] not in {"Service", "Job"} or "template" not in doc["spec"]:
                continue
            template = doc["spec"]["template"]["spec"]
            for source in template["containers"][0].get("envFrom", []):
                if "secretRef" in source:
                    assert source["secretRef"]["name"] in created, doc["metadata"]["name"]
    secret_settings = {
        f"IMAGEGEN_{name.upper()}"
        for name, field in Settings.model_fields.items()
        if "SecretStr" in str(field.annotation)
    }
    # API key hashes are not secret themselves, yet live in a Secret beside the keys' owners.
    assert keys <= secret_settings | {"IMAGEGEN_API_KEY_HASHES"}, keys - secret_settings


@pytest.mark.parametrize("overlay", ["dev", "prod"])
def test_every_function_that_touches_storage_gets_its_credentials(
    routing: RoutingOf, overlay: str
) -> None:
    """Enhance reads and writes its prompt memo in the bucket on every request, like the
    stages after it the images: without the Secret, boto3 falls back to the node's own
    credentials, and every generation stops at enhance with a 503."""
    services = routing(overlay).services
    for name in ("enhance", "render", "persist", "derive", "deadletter"):
        container = services[f"imagegen-{name}"].manifest["spec"]["template"]["spec"]
        sources = container["containers"][0].get("envFrom", [])
        secrets = [s["secretRef"] for s in sources if "secretRef" in s]
        assert {"name": "imagegen-storage"} in secrets, (overlay, name)


def test_broker_classes(render: Render) -> None:
    [dev] = [d for d in render("dev") if d["kind"] == "Broker"]
    assert (
        dev["metadata"]["annotations"]["eventing.knative.dev/broker.class"]
        == "MTChannelBasedBroker"
    )
    assert "config" not in dev.get("spec", {})

    docs = render("prod")
    [prod] = [d for d in docs if d["kind"] == "Broker"]
    assert prod["metadata"]["annotations"]["eventing.knative.dev/broker.class"] == "Kafka"
    ref = prod["spec"]["config"]
    assert (ref["apiVersion"], ref["kind"]) == ("v1", "ConfigMap")
    [config] = [
        d
        for d in docs
        if d["kind"] == "ConfigMap"
        and d["metadata"]["name"] == ref["name"]
        and d["metadata"]["namespace"] == ref["namespace"]
    ]
    assert {
        "bootstrap.servers",
        "default.topic.partitions",
        "default.topic.replication.factor",
    } <= set(config["data"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_settings_accept_each_service_environment(
    routing: RoutingOf, overlay: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from imagegen import settings as settings_module

    fields = settings_module.Settings.model_fields
    for service in routing(overlay).services.values():
        unknown = [
            key
            for key in service.env
            if key.startswith("IMAGEGEN_") and key.removeprefix("IMAGEGEN_").lower() not in fields
        ]
        assert not unknown, f"{service.name}: not a setting: {unknown}"
        assert service_settings(service, monkeypatch).profile == (
            "prod" if overlay == "prod" else "dev"
        )
    render_env = routing(overlay).services["imagegen-render"].env
    assert render_env["IMAGEGEN_MODEL"] == (
        "tiny" if overlay == "dev" else "black-forest-labs/FLUX.2-klein-4B"
    )
