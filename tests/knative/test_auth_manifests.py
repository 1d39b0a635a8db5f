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

from .knative_pod import revision_pod

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
        selector = policy["spec"]["podSelector"]
        # Every function's revision pods are selected, and no other pod of the namespace.
        selected = {
            s["metadata"]["name"]
            for s in functions(docs)
            if label_selector_matches(selector, revision_pod(s)["metadata"]["labels"])
        }
        assert selected == services
        for doc in docs:
            template = (doc.get("spec") or {}).get("template") or {}
            if doc["kind"] in {"Job", "Deployment", "StatefulSet"}:
                labels = (template.get("metadata") or {}).get("labels") or {}
                assert not label_selector_matches(selector, labels), doc["metadata"]["name"]
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


def label_selector_matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Whether a metav1.LabelSelector selects an object with these labels.

    Kubernetes apimachinery pkg/apis/meta/v1/helpers.go LabelSelectorAsSelector: every
    matchLabels pair is an ``=`` requirement, every matchExpression one of In, NotIn, Exists,
    DoesNotExist; all must hold (pkg/labels/selector.go Requirement.Matches: NotIn and
    DoesNotExist hold where the key is absent). An empty selector selects everything.
    """
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expression in selector.get("matchExpressions") or []:
        key, operator = expression["key"], expression["operator"]
        values = set(expression.get("values") or [])
        present = key in labels
        if operator == "In" and not (present and labels[key] in values):
            return False
        if operator == "NotIn" and present and labels[key] in values:
            return False
        if operator == "Exists" and not present:
            return False
        if operator == "DoesNotExist" and present:
            return False
    return True


def test_a_function_copied_under_another_name_is_still_behind_the_network_policy() -> None:
    """docs/deploy.md, "Serving several models": a render Service copied for another model
    must be selected without editing the policy, through the template label every function
    carries; a Service whose template lost the label would not be, which the check above
    catches for the shipped ones."""
    for overlay in ("dev", "prod"):
        docs = rendered(overlay)
        (policy,) = of_kind(docs, "NetworkPolicy")
        selector = policy["spec"]["podSelector"]
        (render,) = [s for s in functions(docs) if s["metadata"]["name"] == "imagegen-render"]
        copy = yaml.safe_load(yaml.safe_dump(render))
        copy["metadata"]["name"] = "imagegen-render-flux1-schnell"
        labels = revision_pod(copy)["metadata"]["labels"]
        assert label_selector_matches(selector, labels), (overlay, selector)
        # Every shipped function's pods carry what the policy selects on, from their template.
        for service in functions(docs):
            template_labels = service["spec"]["template"]["metadata"]["labels"]
            for key, value in (selector.get("matchLabels") or {}).items():
                assert template_labels.get(key) == value, service["metadata"]["name"]


def test_label_selector_semantics() -> None:
    selector = {
        "matchLabels": {"a": "1"},
        "matchExpressions": [{"key": "s", "operator": "Exists"}],
    }
    assert label_selector_matches(selector, {"a": "1", "s": "x"})
    assert not label_selector_matches(selector, {"a": "1"})
    assert not label_selector_matches(selector, {"a": "2", "s": "x"})
    names = {"matchExpressions": [{"key": "s", "operator": "In", "values": ["x"]}]}
    assert label_selector_matches(names, {"s": "x"})
    assert not label_selector_matches(names, {"s": "y"})
    assert label_selector_matches(
        {"matchExpressions": [{"key": "s", "operator": "NotIn", "values": ["x"]}]}, {}
    )
    assert not label_selector_matches(
        {"matchExpressions": [{"key": "s", "operator": "DoesNotExist"}]}, {"s": "x"}
    )
    assert label_selector_matches({}, {})
