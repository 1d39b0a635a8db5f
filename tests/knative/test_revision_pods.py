"""The pods Knative would create for each Service are valid Kubernetes pods.

``knative_pod.revision_pod`` turns a Service's revision template into the pod of its
Deployment as Knative Serving does; the pod is validated against the Kubernetes ``core/v1``
OpenAPI schema shipped by ``kubernetes-validate`` (strict: unknown fields are errors; the
oldest release Knative supports, ``manifest_schemas.KUBERNETES_VERSION``), and the
template against the rules Knative's webhook adds (``knative_pod.knative_errors``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest

from .conftest import OVERLAYS
from .knative_pod import QUEUE_ADMIN_PORT, QUEUE_CONTAINER, knative_errors, revision_pod
from .manifest_schemas import kubernetes_errors
from .test_cluster_config import _config_map, _upstream_features

Render = Callable[[str], list[dict[str, Any]]]


def pod_schema_errors(pod: dict[str, Any]) -> list[str]:
    """Every violation of the Kubernetes Pod schema, each with its field path."""
    errors = kubernetes_errors(pod)
    assert errors is not None, "kubernetes-validate ships no Pod schema"
    return errors


def _services(render: Render, overlay: str) -> list[dict[str, Any]]:
    return [d for d in render(overlay) if d["kind"] == "Service" and "knative" in d["apiVersion"]]


def _features(render: Render) -> dict[str, str]:
    return {
        **_upstream_features(),
        **_config_map(render("cluster"), "knative-serving", "config-features"),
    }


def _render_service(render: Render, overlay: str) -> dict[str, Any]:
    [service] = [
        s for s in _services(render, overlay) if s["metadata"]["name"] == "imagegen-render"
    ]
    return service


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_revision_pod_is_a_valid_kubernetes_pod(render: Render, overlay: str) -> None:
    errors = {
        service["metadata"]["name"]: pod_schema_errors(revision_pod(service))
        for service in _services(render, overlay)
    }
    assert not any(errors.values()), errors


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_knative_accepts_each_revision_template(render: Render, overlay: str) -> None:
    features = _features(render)
    errors = [e for s in _services(render, overlay) for e in knative_errors(s, features)]
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_startup_probes_reach_the_serving_port(render: Render, overlay: str) -> None:
    for service in _services(render, overlay):
        pod = revision_pod(service)
        [user] = [c for c in pod["spec"]["containers"] if c["name"] != QUEUE_CONTAINER]
        port = user["ports"][0]["containerPort"]
        for probe in ("startupProbe", "livenessProbe"):
            if probe in user:
                assert user[probe]["httpGet"]["port"] == port, (service["metadata"]["name"], probe)


def test_a_startup_probe_without_a_port_makes_an_invalid_pod(render: Render) -> None:
    # What the API server answered for the Deployment before: "port: Invalid value: 0".
    service = copy.deepcopy(_render_service(render, "prod"))
    container = service["spec"]["template"]["spec"]["containers"][0]
    del container["startupProbe"]["httpGet"]["port"]
    assert not knative_errors(service, _features(render)), "the webhook lets it through"
    errors = pod_schema_errors(revision_pod(service))
    assert any("startupProbe.httpGet" in e and "'port' is a required property" in e for e in errors)


def test_the_pod_follows_knative(render: Render) -> None:
    service = _render_service(render, "prod")
    template = service["spec"]["template"]["spec"]
    pod = revision_pod(service, revision="imagegen-render-00007")
    user, queue = pod["spec"]["containers"]
    assert queue["name"] == QUEUE_CONTAINER
    # The queue-proxy runs the readiness probe; the user container keeps liveness and startup.
    assert "readinessProbe" not in user and "readinessProbe" in queue
    assert user["startupProbe"] == template["containers"][0]["startupProbe"]
    assert user["lifecycle"]["preStop"]["httpGet"]["port"] == QUEUE_ADMIN_PORT
    env = {v["name"]: v.get("value") for v in user["env"]}
    assert env["K_REVISION"] == "imagegen-render-00007"
    assert env["K_SERVICE"] == env["K_CONFIGURATION"] == "imagegen-render"
    assert env["PORT"] == str(template["containers"][0]["ports"][0]["containerPort"])
    assert pod["spec"]["terminationGracePeriodSeconds"] == template["timeoutSeconds"]
    for field in ("containerConcurrency", "timeoutSeconds", "responseStartTimeoutSeconds"):
        assert field not in pod["spec"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda c, s: c["env"].append({"name": "PORT", "value": "9000"}),
            "'PORT' is a reserved environment variable",
        ),
        (lambda c, s: c["ports"][0].update(containerPort=8012), "8012 is a reserved port"),
        (lambda c, s: c["ports"][0].update(name="web"), "Port name web is not allowed"),
        (
            lambda c, s: c["livenessProbe"]["httpGet"].update(port="metrics"),
            "livenessProbe.httpGet.port: Probe port must match container port",
        ),
        (
            lambda c, s: c["startupProbe"].update(tcpSocket={"port": 8080}),
            "startupProbe: expected exactly one, got both",
        ),
        (
            lambda c, s: c["readinessProbe"].update(failureThreshold=3, periodSeconds=0),
            "failureThreshold: disallowed when periodSeconds is zero",
        ),
        (
            lambda c, s: (
                s["volumes"].append({"name": "cfg", "configMap": {"name": "x"}})
                or c["volumeMounts"].append({"name": "cfg", "mountPath": "/models"})
            ),
            "'/models' must be unique",
        ),
        (
            lambda c, s: s["volumes"].__setitem__(
                0, {"name": "model-cache", "persistentVolumeClaim": {"claimName": "m"}}
            ),
            "persistent volume write support is disabled",
        ),
        (lambda c, s: c.update(name="queue-proxy"), "reserved container name"),
    ],
    ids=[
        "reserved env",
        "reserved port",
        "port name",
        "probe port name",
        "two handlers",
        "readiness thresholds",
        "mount path twice",
        "writable claim",
        "container name",
    ],
)
def test_knative_rules_refuse_what_the_webhook_refuses(
    render: Render, change: Callable[[dict[str, Any], dict[str, Any]], Any], message: str
) -> None:
    service = copy.deepcopy(_render_service(render, "prod"))
    spec = service["spec"]["template"]["spec"]
    change(spec["containers"][0], spec)
    features = {**_features(render), "kubernetes.podspec-persistent-volume-claim": "enabled"}
    errors = knative_errors(service, features)
    assert any(message in e for e in errors), errors
