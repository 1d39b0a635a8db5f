"""knative/cluster enables every Knative feature the overlays use, and sets up tracing."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import pytest
import yaml

from .conftest import OVERLAYS, REPO
from .manifest_schemas import CRD_DIR

Render = Callable[[str], list[dict[str, Any]]]

_FLAG = "kubernetes.podspec-"
# Pod spec fields Knative Serving's webhook refuses unless config-features enables them
# (serving pkg/apis/serving/fieldmask.go PodSpecMask, pkg/apis/serving/k8s_validation.go).
POD_FIELD_FLAGS = {
    "affinity": _FLAG + "affinity",
    "nodeSelector": _FLAG + "nodeselector",
    "tolerations": _FLAG + "tolerations",
    "topologySpreadConstraints": _FLAG + "topologyspreadconstraints",
    "hostAliases": _FLAG + "hostaliases",
    "runtimeClassName": _FLAG + "runtimeclassname",
    "dnsPolicy": _FLAG + "dnspolicy",
    "dnsConfig": _FLAG + "dnsconfig",
    "securityContext": _FLAG + "securitycontext",
    "shareProcessNamespace": _FLAG + "shareprocessnamespace",
    "hostIPC": _FLAG + "hostipc",
    "hostPID": _FLAG + "hostpid",
    "hostNetwork": _FLAG + "hostnetwork",
    "priorityClassName": _FLAG + "priorityclassname",
    "schedulerName": _FLAG + "schedulername",
    "initContainers": _FLAG + "init-containers",
}
VOLUME_FLAGS = {
    "emptyDir": _FLAG + "volumes-emptydir",
    "hostPath": _FLAG + "volumes-hostpath",
    "ephemeral": _FLAG + "volumes-ephemeral",
    "csi": _FLAG + "volumes-csi",
    "image": _FLAG + "volumes-image",
    "persistentVolumeClaim": _FLAG + "persistent-volume-claim",
}


def _upstream_features() -> dict[str, str]:
    """The flags and defaults of config-features, from the `_example` block upstream ships."""
    config_map = yaml.safe_load((CRD_DIR / "serving-config-features.yaml").read_text())
    return {str(k): str(v) for k, v in yaml.safe_load(config_map["data"]["_example"]).items()}


def required_features(services: Sequence[Mapping[str, Any]]) -> Iterator[tuple[str, str]]:
    """(service name, flag) for every gated pod spec field the Knative Services use."""
    for service in services:
        name = service["metadata"]["name"]
        pod = service["spec"]["template"]["spec"]
        for field, flag in POD_FIELD_FLAGS.items():
            if pod.get(field):
                yield name, flag
        for volume in pod.get("volumes", []):
            for source, flag in VOLUME_FLAGS.items():
                if source in volume:
                    yield name, flag
            # k8s_validation.go validatePersistentVolumeClaims: the claim's own readOnly
            # decides, whatever the mounts say.
            claim = volume.get("persistentVolumeClaim")
            if claim is not None and not claim.get("readOnly"):
                yield name, _FLAG + "persistent-volume-write"
        for container in pod["containers"]:
            if container.get("securityContext", {}).get("capabilities", {}).get("add"):
                yield name, "kubernetes.containerspec-addcapabilities"
            for variable in container.get("env", []):
                if "fieldRef" in variable.get("valueFrom", {}):
                    yield name, _FLAG + "fieldref"


def _config_map(docs: list[dict[str, Any]], namespace: str, name: str) -> dict[str, str]:
    [config_map] = [
        d
        for d in docs
        if d["kind"] == "ConfigMap"
        and d["metadata"]["name"] == name
        and d["metadata"]["namespace"] == namespace
    ]
    return dict(config_map["data"])


def missing_features(
    services: Sequence[Mapping[str, Any]], overrides: Mapping[str, str]
) -> set[str]:
    """Messages for each gated field used while its flag is not `enabled` in the cluster."""
    effective = {**_upstream_features(), **overrides}
    return {
        f"{service} needs {flag}: {effective.get(flag, 'unknown flag')}"
        for service, flag in required_features(services)
        if effective.get(flag) != "enabled"
    }


def test_serving_feature_flags_exist_upstream(render: Render) -> None:
    flags = _config_map(render("cluster"), "knative-serving", "config-features")
    upstream = _upstream_features()
    assert set(flags) <= set(upstream), set(flags) - set(upstream)
    assert set(flags.values()) <= {"enabled", "disabled", "allowed"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_cluster_enables_every_pod_feature_the_overlay_uses(render: Render, overlay: str) -> None:
    flags = _config_map(render("cluster"), "knative-serving", "config-features")
    services = [
        d for d in render(overlay) if d["kind"] == "Service" and "knative" in d["apiVersion"]
    ]
    assert not missing_features(services, flags)


def test_prod_uses_the_gpu_placement_features(render: Render) -> None:
    services = [
        d for d in render("prod") if d["kind"] == "Service" and "knative" in d["apiVersion"]
    ]
    used = {flag for _, flag in required_features(services)}
    assert {
        _FLAG + "nodeselector",
        _FLAG + "tolerations",
        _FLAG + "persistent-volume-claim",
    } <= used
    # The model volume is read-only: no write flag.
    assert _FLAG + "persistent-volume-write" not in used


def test_feature_check_reports_a_flag_left_disabled(render: Render) -> None:
    [render_service] = [
        d
        for d in render("prod")
        if d["kind"] == "Service" and d["metadata"]["name"] == "imagegen-render"
    ]
    pod = render_service["spec"]["template"]["spec"]
    pod["volumes"] = [{"name": "model-cache", "persistentVolumeClaim": {"claimName": "models"}}]
    flags = _config_map(render("cluster"), "knative-serving", "config-features")
    assert missing_features([render_service], flags) == {
        f"imagegen-render needs {_FLAG}persistent-volume-write: disabled",
    }
    without_claims = {**flags, _FLAG + "persistent-volume-claim": "disabled"}
    assert f"imagegen-render needs {_FLAG}persistent-volume-claim: disabled" in missing_features(
        [render_service], without_claims
    )
    assert missing_features([render_service], {**flags, _FLAG + "tolerations": "disabled"}) >= {
        f"imagegen-render needs {_FLAG}tolerations: disabled"
    }


def test_eventing_allows_the_delivery_timeouts(render: Render) -> None:
    flags = _config_map(render("cluster"), "knative-eventing", "config-features")
    assert flags["delivery-timeout"] == "enabled"
    for overlay in OVERLAYS:
        assert any(
            "timeout" in d["spec"].get("delivery", {})
            for d in render(overlay)
            if d["kind"] == "Trigger"
        )


# Data keys (not only `_example`) that Knative Eventing's release sets in config-features
# (eventing config/core/configmaps/features.yaml: `authentication-oidc: "disabled"`). Whoever
# applied the release owns them, so a server-side apply of another value by the field manager
# imagegen is answered with a conflict unless it forces (docs/deploy.md, section 1).
UPSTREAM_EVENTING_FEATURE_KEYS = {"authentication-oidc": "disabled"}


def test_the_readme_applies_the_cluster_settings_the_way_that_works(render: Render) -> None:
    ours = _config_map(render("cluster"), "knative-eventing", "config-features")
    contested = {k for k, v in UPSTREAM_EVENTING_FEATURE_KEYS.items() if ours.get(k, v) != v}
    assert contested, "knative/cluster changes no key the release sets: nothing to force"
    commands = [
        line.split(" #", 1)[0].split()
        for line in (REPO / "README.md").read_text().splitlines()
        if line.startswith("kubectl apply") and "knative/cluster" in line
    ]
    assert commands, "the README applies knative/cluster"
    for args in commands:
        assert {"--server-side", "--field-manager=imagegen", "--force-conflicts"} <= set(args), (
            f"{' '.join(args)}: conflicts on {sorted(contested)} on a standard install"
        )


@pytest.mark.parametrize("namespace", ["knative-serving", "knative-eventing"])
def test_tracing_is_configured(render: Render, namespace: str) -> None:
    config = _config_map(render("cluster"), namespace, "config-observability")
    assert config["tracing-protocol"] in {"grpc", "http/protobuf"}
    assert config["tracing-endpoint"].startswith(("http://", "https://"))
    assert 0.0 < float(config["tracing-sampling-rate"]) <= 1.0
