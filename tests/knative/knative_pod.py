"""The pod Knative Serving creates for a Service's revision, and the checks Knative adds.

Kubernetes never sees a Knative Service: the webhook defaults and validates the revision
template, then the revision reconciler turns it into a Deployment whose pod template holds
the user container and the queue-proxy. A field the webhook lets through can still make the
API server refuse that Deployment (an HTTP startup probe without a port: ``port: Invalid
value: 0``), so the tests validate the pod this module builds, not the template.

Each step follows the upstream file named beside it (knative/serving, v1.23 line):

- ``pkg/apis/serving/v1/revision_defaults.go`` (``applyDefault``): a default readiness probe,
  ``successThreshold: 1``, and volume mounts of non-writable volume kinds made read-only.
- ``pkg/reconciler/revision/resources/deploy.go`` (``makePodSpec``, ``BuildUserContainers``,
  ``makeServingContainer``, ``makeContainer``, ``rewriteUserLivenessProbe``, ``BuildPodSpec``):
  the user port as the only port and ``PORT``; ``K_REVISION``, ``K_CONFIGURATION``,
  ``K_SERVICE``; the pre-stop hook on the queue-proxy's admin port; the readiness probe removed
  (the queue-proxy runs it); the liveness probe's port filled in; the **startup probe passed
  through unchanged**; ``terminationGracePeriodSeconds`` = ``timeoutSeconds``.
- ``pkg/reconciler/revision/resources/queue.go`` (``makeQueueContainer``): the queue-proxy
  container, its ports and its readiness probe.
- ``pkg/apis/serving/k8s_validation.go``: reserved names, ports, env vars and paths; probe
  rules; volume mounts; feature-gated volume kinds.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from typing import Any

__all__ = [
    "QUEUE_ADMIN_PORT",
    "QUEUE_CONTAINER",
    "knative_errors",
    "revision_pod",
]

# pkg/apis/serving/v1 (DefaultUserPort, UserPortName) and pkg/networking (constants.go).
DEFAULT_USER_PORT = 8080
USER_PORT_NAME = "user-port"
QUEUE_HTTP_PORT = 8012
QUEUE_HTTP2_PORT = 8013
QUEUE_HTTPS_PORT = 8112
QUEUE_ADMIN_PORT = 8022
AUTOSCALING_METRICS_PORT = 9090
USER_METRICS_PORT = 9091
PROFILING_PORT = 8008
QUEUE_CONTAINER = "queue-proxy"
DEFAULT_CONTAINER_NAME = "user-container"

# k8s_validation.go
RESERVED_CONTAINER_NAMES = {QUEUE_CONTAINER}
RESERVED_ENV_VARS = {"PORT", "K_SERVICE", "K_CONFIGURATION", "K_REVISION"}
RESERVED_PORTS = {
    QUEUE_HTTP_PORT,
    QUEUE_HTTP2_PORT,
    QUEUE_ADMIN_PORT,
    AUTOSCALING_METRICS_PORT,
    USER_METRICS_PORT,
    PROFILING_PORT,
}
RESERVED_PATHS = {"/", "/dev", "/dev/log"}
VALID_PORT_NAMES = {"h2c", "http1", ""}
WRITABLE_VOLUME_KINDS = ("emptyDir", "persistentVolumeClaim", "ephemeral")
GATED_VOLUMES = {
    "emptyDir": "kubernetes.podspec-volumes-emptydir",
    "persistentVolumeClaim": "kubernetes.podspec-persistent-volume-claim",
    "hostPath": "kubernetes.podspec-volumes-hostpath",
    "csi": "kubernetes.podspec-volumes-csi",
    "ephemeral": "kubernetes.podspec-volumes-ephemeral",
    "image": "kubernetes.podspec-volumes-image",
}
_HANDLERS = ("httpGet", "tcpSocket", "exec", "grpc")


def _user_port(container: Mapping[str, Any]) -> int:
    """deploy.go getUserPort: the first declared port, else 8080."""
    ports = container.get("ports") or []
    if ports and ports[0].get("containerPort"):
        return int(ports[0]["containerPort"])
    return DEFAULT_USER_PORT


def _port_is_zero(port: Any) -> bool:
    """intstr.IntValue() == 0: absent, 0, or a name (a string that is no number)."""
    if port is None:
        return True
    if isinstance(port, int):
        return port == 0
    try:
        return int(port) == 0
    except ValueError:
        return True


def _apply_defaults(spec: dict[str, Any]) -> None:
    """revision_defaults.go applyDefault, for a revision with one container."""
    volumes = spec.get("volumes") or []
    writable = {v["name"] for v in volumes if any(kind in v for kind in WRITABLE_VOLUME_KINDS)}
    for index, container in enumerate(spec["containers"]):
        container.setdefault("name", DEFAULT_CONTAINER_NAME if index == 0 else f"container-{index}")
        if len(spec["containers"]) == 1 or container.get("ports"):
            probe = container.setdefault("readinessProbe", {})
            if not any(handler in probe for handler in _HANDLERS):
                probe["tcpSocket"] = {}
        probe = container.get("readinessProbe")
        if probe is not None:
            if not probe.get("successThreshold"):
                probe["successThreshold"] = 1
            if probe.get("periodSeconds"):
                probe.setdefault("failureThreshold", 3)
                probe.setdefault("timeoutSeconds", 1)
        for mount in container.get("volumeMounts") or []:
            if mount["name"] not in writable:
                mount["readOnly"] = True


def _queue_container(template: Mapping[str, Any], user_port: int) -> dict[str, Any]:
    """queue.go makeQueueContainer, reduced to what the pod schema and the tests look at."""
    spec = template["spec"]
    user = spec["containers"][0]
    readiness = user.get("readinessProbe")
    container: dict[str, Any] = {
        "name": QUEUE_CONTAINER,
        "image": "gcr.io/knative-releases/knative.dev/serving/cmd/queue",
        "ports": [
            {"name": "http-autometric", "containerPort": AUTOSCALING_METRICS_PORT},
            {"name": "http-usermetric", "containerPort": USER_METRICS_PORT},
            {"name": "queue-port", "containerPort": QUEUE_HTTP_PORT},
            {"name": "https-port", "containerPort": QUEUE_HTTPS_PORT},
        ],
        "env": [
            {"name": "SERVING_REVISION", "value": "revision"},
            {"name": "QUEUE_SERVING_PORT", "value": str(QUEUE_HTTP_PORT)},
            {"name": "USER_PORT", "value": str(user_port)},
            {"name": "REVISION_TIMEOUT_SECONDS", "value": str(spec.get("timeoutSeconds", 300))},
            {
                "name": "REVISION_RESPONSE_START_TIMEOUT_SECONDS",
                "value": str(spec.get("responseStartTimeoutSeconds", 0)),
            },
            {"name": "CONTAINER_CONCURRENCY", "value": str(spec.get("containerConcurrency", 0))},
            # The user container's readiness probe, run by the queue-proxy itself.
            {"name": "SERVING_READINESS_PROBE", "value": json.dumps(readiness or {})},
        ],
        "resources": {"requests": {"cpu": "25m"}},
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }
    if readiness is not None:
        probe = copy.deepcopy(readiness)
        for handler in _HANDLERS:
            probe.pop(handler, None)
        probe["httpGet"] = {
            "port": QUEUE_HTTP_PORT,
            "httpHeaders": [{"name": "K-Network-Probe", "value": "queue"}],
        }
        container["readinessProbe"] = probe
    return container


def revision_pod(service: Mapping[str, Any], *, revision: str = "revision-00001") -> dict[str, Any]:
    """The Pod (``v1``) that the Deployment of a Knative Service's revision creates.

    Args:
        service: A ``serving.knative.dev/v1`` Service, as rendered by kustomize.
        revision: The revision name Knative would pick.

    Returns:
        A complete Pod object, ready for a Kubernetes schema.
    """
    name = service["metadata"]["name"]
    template = copy.deepcopy(service["spec"]["template"])
    spec = template["spec"]
    _apply_defaults(spec)
    # Knative fields of the revision spec that are not pod spec fields.
    for field in (
        "containerConcurrency",
        "timeoutSeconds",
        "responseStartTimeoutSeconds",
        "idleTimeoutSeconds",
    ):
        spec.pop(field, None)
    timeout = service["spec"]["template"]["spec"].get("timeoutSeconds", 300)

    containers = []
    for index, original in enumerate(spec["containers"]):
        container = copy.deepcopy(original)
        # makeContainer
        container["lifecycle"] = {
            "preStop": {"httpGet": {"port": QUEUE_ADMIN_PORT, "path": "/wait-for-drain"}}
        }
        container["env"] = [
            *(container.get("env") or []),
            {"name": "K_REVISION", "value": revision},
            {"name": "K_CONFIGURATION", "value": name},
            {"name": "K_SERVICE", "value": name},
        ]
        container["stdin"] = False
        container["tty"] = False
        container.setdefault("terminationMessagePolicy", "FallbackToLogsOnError")
        readiness = container.get("readinessProbe")
        if readiness is not None and any(h in readiness for h in ("httpGet", "tcpSocket", "grpc")):
            del container["readinessProbe"]
        if index == 0 or original.get("ports"):
            # makeServingContainer
            port = _user_port(original)
            container["ports"] = [{"name": USER_PORT_NAME, "containerPort": port}]
            container["env"].append({"name": "PORT", "value": str(port)})
            liveness = container.get("livenessProbe")
            if liveness is not None:
                # rewriteUserLivenessProbe (multi-container probing off): the port is set.
                for handler in ("httpGet", "tcpSocket"):
                    if handler in liveness:
                        liveness[handler]["port"] = port
            # The startup probe is left exactly as written.
        containers.append(container)

    pod_spec = {
        **spec,
        "containers": [*containers, _queue_container(template, _user_port(spec["containers"][0]))],
        "terminationGracePeriodSeconds": timeout,
        "enableServiceLinks": False,
    }
    labels = {
        **(template.get("metadata", {}).get("labels") or {}),
        "serving.knative.dev/service": name,
        "serving.knative.dev/configuration": name,
        "serving.knative.dev/revision": revision,
    }
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": f"{revision}-deployment-0", "labels": labels},
        "spec": pod_spec,
    }


def _probe_errors(
    probe: Mapping[str, Any] | None, port: Mapping[str, Any], where: str
) -> list[str]:
    """k8s_validation.go validateProbe, for the serving container."""
    if probe is None:
        return []
    errors = []
    handlers = [h for h in _HANDLERS if h in probe]
    if not handlers:
        errors.append(f"{where}: expected exactly one, got neither: {', '.join(_HANDLERS)}")
    elif len(handlers) > 1:
        errors.append(f"{where}: expected exactly one, got both: {', '.join(handlers)}")
    for handler in ("httpGet", "tcpSocket"):
        value = (probe.get(handler) or {}).get("port")
        if isinstance(value, str) and value and value != port.get("name", ""):
            errors.append(f"{where}.{handler}.port: Probe port must match container port")
    return errors


def _readiness_errors(probe: Mapping[str, Any] | None, port: Mapping[str, Any]) -> list[str]:
    """k8s_validation.go validateReadinessProbe."""
    if probe is None:
        return []
    where = "readinessProbe"
    errors = _probe_errors(probe, port, where)
    if probe.get("successThreshold", 1) < 1:
        errors.append(f"{where}.successThreshold: out of bounds")
    if not probe.get("periodSeconds"):
        for field in ("failureThreshold", "timeoutSeconds"):
            if probe.get(field):
                errors.append(f"{where}.{field}: disallowed when periodSeconds is zero")
    else:
        for field in ("failureThreshold", "timeoutSeconds"):
            if probe.get(field, 1) < 1:
                errors.append(f"{where}.{field}: out of bounds")
    return errors


def knative_errors(service: Mapping[str, Any], features: Mapping[str, str]) -> list[str]:
    """What Knative's webhook refuses in a Service's revision template.

    Args:
        service: A ``serving.knative.dev/v1`` Service.
        features: The effective ``config-features`` of knative-serving (flag -> value).

    Returns:
        One message per violation, naming the Service and the field.
    """
    name = service["metadata"]["name"]
    spec = service["spec"]["template"]["spec"]
    errors: list[str] = []
    volumes = {v["name"]: v for v in spec.get("volumes") or []}
    for volume in volumes.values():
        for kind, flag in GATED_VOLUMES.items():
            if kind in volume and features.get(flag) != "enabled":
                errors.append(f"volumes.{volume['name']}: {kind} support is disabled ({flag})")
        claim = volume.get("persistentVolumeClaim")
        write_flag = "kubernetes.podspec-persistent-volume-write"
        if (
            claim is not None
            and not claim.get("readOnly")
            and features.get(write_flag) != "enabled"
        ):
            errors.append(
                f"volumes.{volume['name']}: persistent volume write support is disabled "
                f"({write_flag}), but the claim is not read-only"
            )
    serving = [c for c in spec["containers"] if c.get("ports")] or spec["containers"][:1]
    if len(serving) != 1:
        errors.append("containers: exactly one container must declare a port")
    for container in spec["containers"]:
        where = f"containers.{container.get('name', '?')}"
        if container.get("name") in RESERVED_CONTAINER_NAMES:
            errors.append(f"{where}.name: {container['name']!r} is a reserved container name")
        if not container.get("image"):
            errors.append(f"{where}.image: missing field")
        for variable in container.get("env") or []:
            if variable["name"] in RESERVED_ENV_VARS:
                errors.append(
                    f"{where}.env: {variable['name']!r} is a reserved environment variable"
                )
        ports = container.get("ports") or []
        if len(ports) > 1:
            errors.append(f"{where}.ports: more than one container port is set")
        for port in ports:
            if port.get("containerPort") in RESERVED_PORTS:
                errors.append(
                    f"{where}.ports.containerPort: {port['containerPort']} is a reserved port"
                )
            if port.get("name", "") not in VALID_PORT_NAMES:
                errors.append(f"{where}.ports.name: Port name {port['name']} is not allowed")
            if port.get("protocol", "TCP") != "TCP":
                errors.append(f"{where}.ports.protocol: invalid value {port['protocol']}")
        paths = set()
        for mount in container.get("volumeMounts") or []:
            volume = volumes.get(mount["name"])
            if volume is None:
                errors.append(f"{where}.volumeMounts.{mount['name']}: no matching volume")
                continue
            path = mount.get("mountPath", "").rstrip("/") or "/"
            if path in RESERVED_PATHS:
                errors.append(f"{where}.volumeMounts.{mount['name']}: {path!r} is a reserved path")
            if path in paths:
                errors.append(f"{where}.volumeMounts.{mount['name']}: {path!r} must be unique")
            paths.add(path)
            if not any(kind in volume for kind in WRITABLE_VOLUME_KINDS) and not mount.get(
                "readOnly"
            ):
                errors.append(f"{where}.volumeMounts.{mount['name']}: should be readOnly")
            claim = volume.get("persistentVolumeClaim")
            if claim is not None and claim.get("readOnly") and not mount.get("readOnly"):
                errors.append(
                    f"{where}.volumeMounts.{mount['name']}: volume is readOnly but mount is not"
                )
        if container in serving:
            port = (container.get("ports") or [{}])[0]
            errors += [
                f"{where}.{e}" for e in _readiness_errors(container.get("readinessProbe"), port)
            ]
            for probe in ("livenessProbe", "startupProbe"):
                errors += [f"{where}.{e}" for e in _probe_errors(container.get(probe), port, probe)]
    return [f"Service {name}: {error}" for error in errors]
