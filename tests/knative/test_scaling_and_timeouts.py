"""Scaling, GPU placement and timeouts of the rendered overlays hold together."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
import yaml

from .autoscaling import refusals
from .conftest import OVERLAYS, REPO
from .manifest_schemas import CRD_DIR
from .routing import Routing, ServiceInfo, parse_go_duration

RoutingOf = Callable[[str], Routing]

# What one render may take on the production GPU, with headroom: FLUX.1-schnell (4 steps,
# 1024x1024) takes seconds on an L40S, FLUX.1-dev (28 steps) about 30 s.
EXPECTED_INFERENCE_S = 60
# Container start to model on the GPU: about 34 GB of weights at 50 MB/s or more, then
# the load into GPU memory.
MODEL_LOAD_BUDGET_S = 15 * 60
# Before the container starts: a GPU node from the cluster autoscaler and the CUDA image.
NODE_AND_PULL_BUDGET_S = 10 * 60
# Around the load, before /readyz turns 200: the process's start and its torch/CUDA imports,
# then the warm-up render (prod's IMAGEGEN_RENDER_WARMUP), which with IMAGEGEN_RENDER_COMPILE
# compiles each shape it draws. Start to /readyz with regional compile and a cold compile cache
# took 28 s on an H200 (docs/benchmarks.md); 5 min leaves a slower GPU ten times that.
START_AND_WARM_UP_BUDGET_S = 5 * 60
# What the progress deadline leaves beyond the node and the probe's window: the container's
# creation and the probes' own timeouts, so a start that uses every budget still turns ready.
PROGRESS_SLACK_S = 5 * 60
# How long a render request may wait in the activator for a free slot (another render
# ending, or a warm pod's second GPU) and still get the function's own answer.
ACTIVATOR_WAIT_S = 6 * EXPECTED_INFERENCE_S
# Knative Serving refuses a scale-down-delay above one hour.
MAX_SCALE_DOWN_DELAY = timedelta(hours=1)

AUTOSCALING = "autoscaling.knative.dev/"
KNOWN_ANNOTATIONS = {
    *(
        AUTOSCALING + name
        for name in (
            "class",
            "metric",
            "target",
            "target-utilization-percentage",
            "target-burst-capacity",
            "min-scale",
            "max-scale",
            "initial-scale",
            "activation-scale",
            "scale-down-delay",
            "scale-to-zero-pod-retention-period",
            "window",
            "panic-window-percentage",
            "panic-threshold-percentage",
            "metric-aggregation-algorithm",
        )
    ),
    "serving.knative.dev/progress-deadline",
    "serving.knative.dev/rollout-duration",
}
CPU_FUNCTIONS = ("enhance", "persist", "deadletter")

# The GPU node prod's render is sized for (overlays/prod/render.yaml): a GKE g2-standard-8,
# one NVIDIA L4, 8 vCPU, 32 GiB, as GKE makes it. GKE labels a GPU node with its accelerator
# type and, in a cluster that also has nodes without GPUs, taints it
# nvidia.com/gpu=present:NoSchedule (GKE docs, "Run GPUs in GKE Standard node pools"); nodes
# with Google-installed drivers carry no NVIDIA GPU Feature Discovery labels (nvidia.com/gpu.*).
GKE_L4_NODE: dict[str, Any] = {
    "labels": {
        "cloud.google.com/gke-accelerator": "nvidia-l4",
        "node.kubernetes.io/instance-type": "g2-standard-8",
        "kubernetes.io/os": "linux",
    },
    "taints": [{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}],
    "cpu": 8,
    "memory_gib": 32,
}


def _upstream_default(file: str, key: str) -> str:
    """A default from the `_example` block of an upstream Knative ConfigMap."""
    config_map = yaml.safe_load((CRD_DIR / file).read_text())
    return str(yaml.safe_load(config_map["data"]["_example"])[key])


MAX_REVISION_TIMEOUT_S = int(
    _upstream_default("serving-config-defaults.yaml", "max-revision-timeout-seconds")
)


def _cpu(quantity: str) -> float:
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def _bytes(quantity: str) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9}
    match = re.fullmatch(r"(\d+)([A-Za-z]*)", quantity)
    assert match, quantity
    return int(match[1]) * units.get(match[2], 1)


def _pod(service: ServiceInfo) -> dict[str, Any]:
    return dict(service.manifest["spec"]["template"]["spec"])


def _container(service: ServiceInfo) -> dict[str, Any]:
    return dict(_pod(service)["containers"][0])


def _render(r: Routing) -> ServiceInfo:
    return r.services["imagegen-render"]


def _requests_gpu(service: ServiceInfo) -> bool:
    resources = _container(service).get("resources", {})
    return any("nvidia.com/gpu" in resources.get(part, {}) for part in ("requests", "limits"))


def _scale(service: ServiceInfo, name: str) -> int | None:
    value = service.annotations.get(AUTOSCALING + name)
    return None if value is None else int(value)


# 1. Where pods run and how many.


def test_dev_scales_everything_to_zero_without_a_gpu(routing: RoutingOf) -> None:
    for service in routing("dev").services.values():
        assert _scale(service, "min-scale") == 0, service.name
        assert not _requests_gpu(service), service.name
        assert "nodeSelector" not in _pod(service), service.name
        assert "tolerations" not in _pod(service), service.name


def test_dev_renders_the_tiny_model_with_the_cpu_image(routing: RoutingOf) -> None:
    render = _render(routing("dev"))
    assert render.image == "ghcr.io/orchestr8/imagegen:render-cpu"
    assert render.env["IMAGEGEN_MODEL"] == "tiny"


def test_prod_renders_on_a_gpu_node_and_stays_warm(routing: RoutingOf) -> None:
    render = _render(routing("prod"))
    assert render.image == "ghcr.io/orchestr8/imagegen:render-gpu"
    assert _container(render)["resources"]["limits"]["nvidia.com/gpu"] == "1"
    pod = _pod(render)
    assert pod["nodeSelector"], "render must select GPU nodes"
    assert any(t.get("key") == "nvidia.com/gpu" for t in pod["tolerations"])
    min_scale = _scale(render, "min-scale")
    assert min_scale is not None and min_scale >= 1
    assert (_scale(render, "initial-scale") or 0) >= min_scale
    assert render.env["IMAGEGEN_PROFILE"] == "prod"


def _tolerates(toleration: dict[str, Any], taint: dict[str, Any]) -> bool:
    """Kubernetes' rule (k8s.io/api core/v1 toleration.go, Toleration.ToleratesTaint)."""
    if toleration.get("effect") and toleration["effect"] != taint["effect"]:
        return False
    operator = toleration.get("operator", "Equal")
    if not toleration.get("key"):
        return bool(operator == "Exists")  # an empty key with Exists tolerates every taint
    if toleration["key"] != taint["key"]:
        return False
    return bool(operator == "Exists" or toleration.get("value", "") == taint.get("value", ""))


def _gke_allocatable(cpu: int, memory_gib: float) -> tuple[float, float]:
    """What GKE leaves to pods on a Standard node (GKE docs, "Plan node sizes": memory and CPU
    reservations, and a 100 MiB eviction threshold): cores, GiB."""
    memory_tiers = [(4, 0.25), (4, 0.20), (8, 0.10), (112, 0.06), (float("inf"), 0.02)]
    cpu_tiers = [(1, 0.06), (1, 0.01), (2, 0.005), (float("inf"), 0.0025)]

    def reserved(total: float, tiers: list[tuple[float, float]]) -> float:
        taken, left = 0.0, total
        for size, share in tiers:
            part = min(left, size)
            taken, left = taken + part * share, left - part
        return taken

    eviction_gib = 100 / 1024
    memory = memory_gib - reserved(memory_gib, memory_tiers) - eviction_gib
    return cpu - reserved(cpu, cpu_tiers), memory


def test_prod_render_fits_the_gke_l4_node_it_is_sized_for(routing: RoutingOf) -> None:
    # The node selector, the toleration and the memory must describe the same node: a selector
    # of another platform's labels matches no GKE node, and render stays Pending.
    render = _render(routing("prod"))
    pod = _pod(render)
    selector = pod["nodeSelector"]
    labels = GKE_L4_NODE["labels"]
    assert selector.items() <= labels.items(), f"no GKE L4 node carries {selector}"
    for taint in GKE_L4_NODE["taints"]:
        assert any(_tolerates(t, taint) for t in pod["tolerations"]), taint
    cpu, memory_gib = _gke_allocatable(GKE_L4_NODE["cpu"], GKE_L4_NODE["memory_gib"])
    requests = _container(render)["resources"]["requests"]
    assert _cpu(requests["cpu"]) <= cpu
    assert _bytes(requests["memory"]) <= memory_gib * 2**30
    # The rules above can refuse: GPU Feature Discovery's labels, another taint.
    assert not {"nvidia.com/gpu.product": "NVIDIA-L4"}.items() <= labels.items()
    assert not _tolerates({"key": "nvidia.com/gpu", "value": "true"}, GKE_L4_NODE["taints"][0])
    assert _tolerates({"operator": "Exists"}, GKE_L4_NODE["taints"][0])


def test_prod_names_a_read_write_many_class_for_the_model_volume(
    render: Callable[[str], list[dict[str, Any]]],
) -> None:
    # Without storageClassName the cluster's default class is used, ReadWriteOnce only on GKE
    # (Persistent Disk), EKS (EBS) and AKS (Azure Disk): the claim would stay Pending and render
    # never start. "" would ask for no class at all (pre-provisioned volumes only).
    [claim] = [d for d in render("prod") if d["kind"] == "PersistentVolumeClaim"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    name = claim["spec"].get("storageClassName")
    assert name, "prod must name the model volume's ReadWriteMany StorageClass"
    # Kubernetes ValidatePersistentVolumeClaimSpec: ValidateClassName, a DNS subdomain.
    label = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
    assert len(name) <= 253 and re.fullmatch(rf"{label}(\.{label})*", name), name
    # The placeholder is one the deploy guide tells the deployer to replace.
    assert f"`{name}`" in (REPO / "docs" / "deploy.md").read_text()


def test_the_ledger_scales_to_zero_in_dev_and_stays_warm_in_prod(routing: RoutingOf) -> None:
    # Status queries and webhooks should not wait for a cold start where they matter.
    assert _scale(routing("dev").services["imagegen-ledger"], "min-scale") == 0
    ledger = routing("prod").services["imagegen-ledger"]
    assert _scale(ledger, "min-scale") == 1
    assert not _requests_gpu(ledger)


def test_prod_allows_more_enhance_persist_and_derive_pods(routing: RoutingOf) -> None:
    for name in ("imagegen-enhance", "imagegen-persist", "imagegen-derive"):
        dev = _scale(routing("dev").services[name], "max-scale") or 0
        prod = _scale(routing("prod").services[name], "max-scale") or 0
        assert prod > dev, name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_cpu_functions_are_small_busy_and_scale_to_zero(routing: RoutingOf, overlay: str) -> None:
    for function in CPU_FUNCTIONS:
        service = routing(overlay).services[f"imagegen-{function}"]
        resources = _container(service)["resources"]
        assert _scale(service, "min-scale") == 0, service.name
        assert not _requests_gpu(service), service.name
        assert service.container_concurrency >= 50, service.name
        assert _cpu(resources["requests"]["cpu"]) <= 0.5, service.name
        assert _bytes(resources["requests"]["memory"]) <= 2**30, service.name
        assert _bytes(resources["limits"]["memory"]) <= 2 * 2**30, service.name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_derive_takes_what_its_cores_encode_and_scales_to_zero(
    routing: RoutingOf, overlay: str
) -> None:
    # Encoding is CPU from start to end: a request beyond what the pod's cores encode would
    # wait inside it, where Knative cannot move it to a new pod.
    derive = routing(overlay).services["imagegen-derive"]
    resources = _container(derive)["resources"]
    cores = _cpu(resources["limits"]["cpu"])
    assert _cpu(resources["requests"]["cpu"]) == cores
    assert 1 <= derive.container_concurrency <= 2 * cores
    assert _scale(derive, "min-scale") == 0
    assert not _requests_gpu(derive)


def render_batch_size(service: ServiceInfo) -> int:
    """Renders one pod runs at once: its batch size setting, else the default (one)."""
    from imagegen.settings import Settings

    field = Settings.model_fields.get("render_batch_size")
    default = field.default if field is not None else 1
    return int(service.env.get("IMAGEGEN_RENDER_BATCH_SIZE", default))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_knative_queues_render_requests_not_the_pod(routing: RoutingOf, overlay: str) -> None:
    # A request queued inside a pod cannot move to a new pod, keeps its slot after Knative
    # gave up on it, and makes Knative's count of busy slots wrong; the activator's buffer
    # has none of these problems.
    render = _render(routing(overlay))
    assert int(render.env["IMAGEGEN_RENDER_QUEUE_SIZE"]) == 0
    assert render.container_concurrency == render_batch_size(render)
    assert render.annotations[AUTOSCALING + "metric"] == "concurrency"
    assert float(render.annotations[AUTOSCALING + "target"]) == render.container_concurrency
    assert float(render.annotations[AUTOSCALING + "target-utilization-percentage"]) == 100
    # The activator stays in the path, so it is there to buffer.
    assert render.annotations[AUTOSCALING + "target-burst-capacity"] == "-1"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_scale_bounds_are_consistent(routing: RoutingOf, overlay: str) -> None:
    for service in routing(overlay).services.values():
        low = _scale(service, "min-scale") or 0
        high = _scale(service, "max-scale")
        assert high is not None and high >= max(low, 1), (
            f"{service.name}: max-scale is the cost cap"
        )
        initial = _scale(service, "initial-scale")
        assert initial is None or low <= initial <= high, service.name
        target = service.annotations.get(AUTOSCALING + "target")
        if target is not None and service.container_concurrency:
            assert float(target) <= service.container_concurrency, service.name
        delay = service.annotations.get(AUTOSCALING + "scale-down-delay")
        if delay is not None:
            assert timedelta(0) <= parse_go_duration(delay) <= MAX_SCALE_DOWN_DELAY, service.name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_annotations_are_known_knative_ones(routing: RoutingOf, overlay: str) -> None:
    for service in routing(overlay).services.values():
        unknown = set(service.annotations) - KNOWN_ANNOTATIONS
        assert not unknown, f"{service.name}: {unknown}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_autoscaling_values_are_ones_the_webhook_admits(routing: RoutingOf, overlay: str) -> None:
    for service in routing(overlay).services.values():
        assert refusals(service.annotations) == [], service.name


@pytest.mark.parametrize(
    ("annotations", "refused"),
    [
        ({"metric": "concurency"}, "metric"),
        ({"metric": "cpu"}, "metric"),
        ({"target": "0"}, "target"),
        ({"target": "0.001"}, "target"),
        ({"target-utilization-percentage": "120"}, "target-utilization-percentage"),
        ({"target-burst-capacity": "-2"}, "target-burst-capacity"),
        ({"min-scale": "3", "max-scale": "2"}, "max-scale=2 is less than min-scale=3"),
        ({"min-scale": "-1"}, "min-scale"),
        ({"initial-scale": "0"}, "initial-scale"),
        ({"scale-down-delay": "2h"}, "scale-down-delay"),
        ({"scale-down-delay": "1.5s"}, "scale-down-delay"),
        ({"window": "5s"}, "window"),
        ({"activation-scale": "1"}, "activation-scale"),
        ({"class": "kpa.autoscaling.knative.dev", "metric-aggregation-algorithm": "x"}, "metric-"),
    ],
)
def test_the_webhook_rules_refuse_what_knative_refuses(
    annotations: dict[str, str], refused: str
) -> None:
    """The check above can fail: each value here is one Knative's webhook refuses."""
    (refusal,) = refusals({AUTOSCALING + k: v for k, v in annotations.items()})
    assert refusal.startswith(refused)
    admitted = {"metric": "rps", "target": "0.01", "min-scale": "2", "max-scale": "2"}
    assert refusals({AUTOSCALING + k: v for k, v in admitted.items()}) == []


@pytest.mark.parametrize(
    ("annotations", "refused"),
    [
        # register.go's kmap.KeyPriority: the legacy camelCase keys are read too.
        ({"minScale": "5", "maxScale": "2"}, ["max-scale=2 is less than min-scale=5"]),
        ({"min-scale": "5", "maxScale": "2"}, ["max-scale=2 is less than min-scale=5"]),
        ({"initialScale": "0"}, ["initialScale: 0"]),
        ({"scaleDownDelay": "2h"}, ["scaleDownDelay: 2h"]),
        ({"targetBurstCapacity": "-2"}, ["targetBurstCapacity: -2"]),
        ({"panicWindowPercentage": "0.5"}, ["panicWindowPercentage: 0.5"]),
        ({"minScale": "1_0"}, ["minScale: 1_0"]),
        # The first alias present wins (KeyPriority.Get); two together are not refused.
        ({"min-scale": "1", "minScale": "9", "max-scale": "2"}, []),
        ({"max-scale": "0", "maxScale": "1", "min-scale": "3"}, []),
        # Keys outside the alias lists are not read.
        ({"min_scale": "9", "max-scale": "2"}, []),
        # An empty class annotation replaces the configured KPA: metric is then not checked.
        ({"class": "", "metric": "cpu"}, []),
    ],
)
def test_the_webhook_reads_each_annotation_through_its_aliases(
    annotations: dict[str, str], refused: list[str]
) -> None:
    assert refusals({AUTOSCALING + k: v for k, v in annotations.items()}) == refused


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_server_threads_leave_room_for_probes(routing: RoutingOf, overlay: str) -> None:
    for service in routing(overlay).services.values():
        assert int(service.env["THREADS"]) >= service.container_concurrency + 2, service.name


# 2. Timeouts, from one inference up to the broker's delivery attempt.


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_delivery_outlasts_the_revision_timeout(routing: RoutingOf, overlay: str) -> None:
    """A Trigger's `timeout` bounds the delivery to its subscriber and to its dead-letter sink
    alike: the dispatcher sends to the sink with the Trigger's own retry config, RequestTimeout
    included (eventing pkg/kncloudevents/event_dispatcher.go, Dispatcher.send; the Kafka
    broker's dead-letter sender is built from the same egress config, eventing-kafka-broker
    data-plane/dispatcher ConsumerVerticleBuilder.createDeadLetterSinkRecordSender). It must
    outlast both Services' timeoutSeconds, or the broker cuts an answer Knative still serves
    (triggers.yaml: the function's budget < timeoutSeconds < the Trigger's timeout)."""
    r = routing(overlay)
    for trigger in r.triggers:
        assert trigger.timeout is not None, trigger.name
        assert trigger.dead_letter is not None, f"{trigger.name}: no dead-letter sink"
        targets = (("subscriber", trigger.subscriber), ("deadLetterSink", trigger.dead_letter))
        for role, name in targets:
            service = r.services[name]
            pod = _pod(service)
            timeout = pod["timeoutSeconds"]
            assert timeout <= MAX_REVISION_TIMEOUT_S, f"{service.name}: above Knative's maximum"
            assert pod.get("responseStartTimeoutSeconds", timeout) <= timeout, service.name
            assert trigger.timeout > timedelta(seconds=timeout), (trigger.name, role, service.name)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_render_budget_covers_one_batch_and_leaves_time_to_wait(
    routing: RoutingOf, overlay: str
) -> None:
    render = _render(routing(overlay))
    # IMAGEGEN_RENDER_TIMEOUT bounds one request: one batch, and it must end before
    # Knative's limit does. The activator counts a request's wait for a slot against
    # timeoutSeconds too: what is left is the wait the function's own answer survives.
    budget = float(render.env["IMAGEGEN_RENDER_TIMEOUT"])
    assert render.timeout_seconds is not None
    assert EXPECTED_INFERENCE_S <= budget < render.timeout_seconds
    assert render.timeout_seconds - budget >= ACTIVATOR_WAIT_S


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_render_cold_start_fits_the_deadlines(routing: RoutingOf, overlay: str) -> None:
    render = _render(routing(overlay))
    startup = _container(render)["startupProbe"]
    window = (
        startup.get("initialDelaySeconds", 0)
        + startup["failureThreshold"] * startup["periodSeconds"]
    )
    # /readyz turns 200 after the load and the warm-up: a load that takes its whole budget
    # must not fail the probe, or the kubelet restarts the container to load it again.
    assert window >= MODEL_LOAD_BUDGET_S + START_AND_WARM_UP_BUDGET_S, (
        "the startup probe gives up before the model loads and the warm-up renders"
    )
    # Knative waits that long for the revision to turn ready: the node and the image first.
    deadline = parse_go_duration(render.annotations["serving.knative.dev/progress-deadline"])
    assert deadline >= timedelta(seconds=NODE_AND_PULL_BUDGET_S + window + PROGRESS_SLACK_S)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_render_retries_outlast_a_cold_start(routing: RoutingOf, overlay: str) -> None:
    # While no render pod is ready the activator holds each attempt for up to timeoutSeconds;
    # the retries together must span the time Knative allows a new pod to become ready.
    r = routing(overlay)
    render = _render(r)
    [trigger] = [t for t in r.triggers if t.subscriber == render.name]
    assert trigger.retry is not None and render.timeout_seconds is not None
    attempts = (trigger.retry + 1) * timedelta(seconds=render.timeout_seconds)
    waits = sum(trigger.backoff_schedule(), timedelta(0))
    deadline = parse_go_duration(render.annotations["serving.knative.dev/progress-deadline"])
    assert attempts + waits >= deadline


# 3. Probes.


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_use_the_health_endpoints(routing: RoutingOf, overlay: str) -> None:
    for service in routing(overlay).services.values():
        container = _container(service)
        port = container["ports"][0]["containerPort"]
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz", service.name
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz", service.name
        # Knative fills in the port of readiness and liveness probes, so they may leave it out
        # (serving pkg/reconciler/revision/resources: queue.go moves the readiness probe to
        # queue-proxy with the user port, deploy.go rewriteUserLivenessProbe), but it passes a
        # startup probe to the pod unchanged, and Kubernetes refuses an HTTP probe without a
        # port (test_revision_pods.py models both).
        for probe in ("readinessProbe", "livenessProbe"):
            if probe in container:
                assert container[probe]["httpGet"].get("port", port) == port, (service.name, probe)
        if "startupProbe" in container:
            startup = container["startupProbe"]["httpGet"]
            assert startup.get("port") == port, (service.name, "startupProbe needs its port")
    render = _container(_render(routing(overlay)))
    # Without a startup probe the liveness probe would kill a pod still loading its model.
    assert render["startupProbe"]["httpGet"]["path"] == "/readyz"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_containers_run_as_non_root(routing: RoutingOf, overlay: str) -> None:
    for service in routing(overlay).services.values():
        context = _container(service)["securityContext"]
        assert context["runAsNonRoot"] is True, service.name
        assert context["allowPrivilegeEscalation"] is False, service.name
        assert context["capabilities"]["drop"] == ["ALL"], service.name


def test_the_dev_ledger_database_is_one_postgres_pod_and_prod_brings_its_own(
    render: Callable[[str], list[dict[str, Any]]],
) -> None:
    # Not highly available, and says so (docs/ledger.md): one replica on one volume.
    [database] = [d for d in render("dev") if d["kind"] == "StatefulSet"]
    assert database["spec"]["replicas"] == 1
    [container] = database["spec"]["template"]["spec"]["containers"]
    assert container["image"].startswith("postgres:15")
    [password] = [e for e in container["env"] if e["name"] == "POSTGRES_PASSWORD"]
    # From the Secret the ledger reads its URL from, created by hand (no overlay applies it).
    assert password["valueFrom"]["secretKeyRef"]["name"] == "imagegen-ledger"
    assert not [d for d in render("prod") if d["kind"] == "StatefulSet"]
    for overlay in OVERLAYS:
        ledger = Routing(render(overlay)).services["imagegen-ledger"].manifest
        sources = ledger["spec"]["template"]["spec"]["containers"][0]["envFrom"]
        assert {"secretRef": {"name": "imagegen-ledger"}} in sources
