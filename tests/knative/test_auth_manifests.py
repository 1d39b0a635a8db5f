"""Manifests for authenticated invocation: audiences, the cluster flag, who may connect."""

from __future__ import annotations

import re
import subprocess
from functools import cache
from typing import Any

import yaml

from imagegen.auth import audience_for
from imagegen.settings import Settings
from tests.conftest import ROOT

KNATIVE = ROOT / "knative"
FUNCTIONS = ("enhance", "render", "persist", "derive", "deadletter", "ledger")
# Where each networking layer's gateway for cluster-local Services runs, i.e. the pods that
# connect to a function pod when a caller uses its cluster-local name: Kourier's gateway in
# kourier-system (net-kourier), Istio's knative-local-gateway in istio-system (net-istio),
# Contour's internal Envoy in contour-internal (net-contour config/config-contour.yaml,
# visibility ClusterLocal: service contour-internal/envoy; ExternalIP: contour-external/envoy).
INGRESS_NAMESPACES = {
    "Kourier": "kourier-system",
    "Istio": "istio-system",
    "Contour": "contour-internal",
}


@cache
def rendered(overlay: str) -> list[dict[str, Any]]:
    out = subprocess.run(
        ["kubectl", "kustomize", str(KNATIVE / "overlays" / overlay)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def of_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def functions(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The Knative Services (not the plain Services beside them, e.g. the dev database's)."""
    return [d for d in of_kind(docs, "Service") if d["apiVersion"] == "serving.knative.dev/v1"]


def test_every_delivery_names_the_audience_its_function_accepts() -> None:
    for overlay in ("dev", "prod"):
        for trigger in of_kind(rendered(overlay), "Trigger"):
            destinations = [trigger["spec"]["subscriber"]]
            destinations.append(trigger["spec"]["delivery"]["deadLetterSink"])
            for destination in destinations:
                service = destination["ref"]["name"]
                function = service.removeprefix("imagegen-")
                assert function in FUNCTIONS, service
                assert destination["audience"] == audience_for(function), trigger["metadata"]


def test_the_cluster_turns_oidc_on() -> None:
    docs = yaml.safe_load_all((KNATIVE / "cluster" / "eventing-config-features.yaml").read_text())
    (features,) = [d for d in docs if d]
    assert features["metadata"] == {"name": "config-features", "namespace": "knative-eventing"}
    assert features["data"]["authentication-oidc"] == "enabled"


def test_prod_requires_tokens_and_dev_does_not() -> None:
    profiles = {}
    for overlay in ("dev", "prod"):
        (config,) = [
            d
            for d in of_kind(rendered(overlay), "ConfigMap")
            if d["metadata"]["name"] == "imagegen-config"
        ]
        profiles[overlay] = Settings(profile=config["data"]["IMAGEGEN_PROFILE"]).auth_required
    assert profiles == {"dev": False, "prod": True}


def test_every_function_reads_the_api_key_hashes_and_no_overlay_ships_them() -> None:
    for overlay in ("dev", "prod"):
        docs = rendered(overlay)
        for service in functions(docs):
            (container,) = service["spec"]["template"]["spec"]["containers"]
            refs = [e["secretRef"] for e in container["envFrom"] if "secretRef" in e]
            assert {"name": "imagegen-api-keys", "optional": True} in refs, service["metadata"]
        # Created in the cluster, never applied: an apply would reset real hashes.
        assert "imagegen-api-keys" not in {d["metadata"]["name"] for d in of_kind(docs, "Secret")}


def test_only_knative_data_paths_may_connect_to_the_functions() -> None:
    for overlay in ("dev", "prod"):
        docs = rendered(overlay)
        services = {s["metadata"]["name"] for s in functions(docs)}
        (policy,) = of_kind(docs, "NetworkPolicy")
        (selector,) = policy["spec"]["podSelector"]["matchExpressions"]
        # Knative labels every pod of a Service with serving.knative.dev/service.
        assert selector["key"] == "serving.knative.dev/service" and selector["operator"] == "In"
        assert set(selector["values"]) == services
        assert policy["spec"]["policyTypes"] == ["Ingress"]
        (rule,) = policy["spec"]["ingress"]
        assert "ports" not in rule  # queue-proxy's ports all belong to these paths
        admitted = set()
        for peer in rule["from"]:
            assert set(peer) == {"namespaceSelector"}  # never a whole-cluster podSelector
            (expression,) = peer["namespaceSelector"]["matchExpressions"]
            assert expression["key"] == "kubernetes.io/metadata.name"
            admitted |= set(expression["values"])
        assert admitted == {"knative-serving", "knative-eventing", *INGRESS_NAMESPACES.values()}
        # Only the ingresses' cluster-local gateways are admitted (contour-external is not):
        # which holds while no function is exposed outside the cluster.
        for service in functions(docs):
            labels = service["metadata"]["labels"]
            assert labels["networking.knative.dev/visibility"] == "cluster-local", labels


def test_every_networking_layer_the_guide_names_is_admitted() -> None:
    # docs/deploy.md's prerequisites name the networking layers Knative may run on here; the
    # NetworkPolicy must admit the namespace of each one's cluster-local gateway.
    text = " ".join((ROOT / "docs" / "deploy.md").read_text().split())
    prerequisites = text.split("## Prerequisites", 1)[1]
    match = re.search(r"with a networking layer \(([^);]*)", prerequisites)
    assert match, "the prerequisites name the networking layers"
    layers = set(re.split(r",\s*|\s+or\s+", match[1].strip()))
    assert layers == set(INGRESS_NAMESPACES), layers
    (policy,) = of_kind(rendered("prod"), "NetworkPolicy")
    (rule,) = policy["spec"]["ingress"]
    admitted = {
        value
        for peer in rule["from"]
        for expression in peer["namespaceSelector"]["matchExpressions"]
        for value in expression["values"]
    }
    for layer in layers:
        assert INGRESS_NAMESPACES[layer] in admitted, layer


def test_prod_names_who_may_send_to_the_broker() -> None:
    docs = rendered("prod")
    (policy,) = of_kind(docs, "EventPolicy")
    (target,) = policy["spec"]["to"]
    (broker,) = of_kind(docs, "Broker")
    assert target["ref"] == {
        "apiVersion": "eventing.knative.dev/v1",
        "kind": "Broker",
        "name": broker["metadata"]["name"],
    }
    senders = {(f["ref"]["kind"], f["ref"]["name"]) for f in policy["spec"]["from"] if "ref" in f}
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert senders <= names  # every referenced source exists in the overlay
    assert ("PingSource", "imagegen-dream") in senders
    assert ("SinkBinding", "imagegen-ledger-replays") in senders  # the ledger's replays
