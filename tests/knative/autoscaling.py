"""The values Knative Serving's webhook accepts in ``autoscaling.knative.dev/*`` annotations.

A rule-by-rule reading of knative/serving ``pkg/apis/autoscaling/annotation_validation.go``
(``ValidateAnnotations``, v1.23 line) with the bounds of ``pkg/apis/autoscaling/register.go``,
under the defaults of ``config-autoscaler`` (``config/core/configmaps/autoscaler.yaml``: the KPA
class, no max-scale limit, no zero initial scale). Each annotation is read as the webhook reads
it, through register.go's ``kmap.KeyPriority`` alias list (``min-scale`` then the legacy
``minScale``, …): the first alias present wins, and two aliases given together are not refused
(knative.dev/pkg ``kmap/lookup.go``, ``KeyPriority.Get``). :func:`refusals` lists what the webhook
would refuse in one Service's annotations, each naming the alias it read; an empty list is a
Service the API server admits.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

from .routing import parse_go_duration

__all__ = ["ALIASES", "AutoscalerConfig", "refusals"]

PREFIX = "autoscaling.knative.dev/"
KPA = "kpa.autoscaling.knative.dev"
HPA = "hpa.autoscaling.knative.dev"
TARGET_MIN = 0.01
WINDOW_MIN = timedelta(seconds=6)
WINDOW_MAX = timedelta(hours=1)
PANIC_WINDOW_PERCENTAGE = (1.0, 100.0)
PANIC_THRESHOLD_PERCENTAGE = (110.0, 1000.0)
ALGORITHMS = ("linear", "weighted-exponential", "weightedExponential")
INT32_MAX = 2**31 - 1
# strconv.Atoi / ParseInt(v, 10, …): an optional sign, then ASCII digits (no spaces, no "_").
_GO_INT = re.compile(r"[+-]?[0-9]+")

# register.go's kmap.KeyPriority lists, under the prefix, highest priority first.
ALIASES: dict[str, tuple[str, ...]] = {
    "class": ("class",),
    "initial-scale": ("initial-scale", "initialScale"),
    "max-scale": ("max-scale", "maxScale"),
    "metric": ("metric",),
    "metric-aggregation-algorithm": ("metric-aggregation-algorithm", "metricAggregationAlgorithm"),
    "activation-scale": ("activation-scale",),
    "min-scale": ("min-scale", "minScale"),
    "panic-threshold-percentage": ("panic-threshold-percentage", "panicThresholdPercentage"),
    "panic-window-percentage": ("panic-window-percentage", "panicWindowPercentage"),
    "scale-down-delay": ("scale-down-delay", "scaleDownDelay"),
    "scale-to-zero-pod-retention-period": (
        "scale-to-zero-pod-retention-period",
        "scaleToZeroPodRetentionPeriod",
    ),
    "target": ("target",),
    "target-burst-capacity": ("target-burst-capacity", "targetBurstCapacity"),
    "target-utilization-percentage": (
        "target-utilization-percentage",
        "targetUtilizationPercentage",
    ),
    "window": ("window",),
}


def _resolve(annotations: Mapping[str, str]) -> dict[str, tuple[str, str]]:
    """Each key of :data:`ALIASES` that is set: (the alias read, its value), as
    ``KeyPriority.Get`` picks it."""
    resolved = {}
    for key, aliases in ALIASES.items():
        for alias in aliases:
            if PREFIX + alias in annotations:
                resolved[key] = (alias, annotations[PREFIX + alias])
                break
    return resolved


@dataclass(frozen=True)
class AutoscalerConfig:
    """The ``config-autoscaler`` keys the annotations are checked against (its defaults)."""

    pod_autoscaler_class: str = KPA
    allow_zero_initial_scale: bool = False
    max_scale_limit: int = 0


def _float(value: str) -> float | None:
    """Go's ``strconv.ParseFloat(v, 64)``: None where it fails."""
    try:
        return float(value)
    except ValueError:
        return None


def _int_ge0(value: str | None) -> tuple[int, bool]:
    """``getIntGE0``: (the value, whether it is valid); absent is 0."""
    if value is None:
        return 0, True
    if not _GO_INT.fullmatch(value):
        return 0, False
    number = int(value, 10)
    return (number, True) if 0 <= number <= INT32_MAX else (0, False)


def _atoi(value: str) -> int | None:
    """Go's ``strconv.Atoi``: None where it fails."""
    return int(value, 10) if _GO_INT.fullmatch(value) else None


def _duration(value: str) -> timedelta | None:
    try:
        return parse_go_duration(value)
    except ValueError:
        return None


def _whole_seconds(value: timedelta) -> bool:
    return value == timedelta(seconds=round(value.total_seconds()))


def refusals(annotations: Mapping[str, str], config: AutoscalerConfig | None = None) -> list[str]:
    """What the webhook refuses in ``annotations`` (keys as written), in its order."""
    config = config or AutoscalerConfig()
    found = _resolve(annotations)
    ann = {key: value for key, (_, value) in found.items()}
    name = {key: alias for key, (alias, _) in found.items()}
    errors: list[str] = []
    # validateClass
    klass = ann.get("class")
    if klass is not None and klass.endswith(".knative.dev") and klass not in (KPA, HPA):
        errors.append(f"class: {klass}")
    # validateMinMaxScale
    low, low_ok = _int_ge0(ann.get("min-scale"))
    high, high_ok = _int_ge0(ann.get("max-scale"))
    errors += [
        f"{name[k]}: {ann[k]}"
        for k, ok in (("min-scale", low_ok), ("max-scale", high_ok))
        if not ok
    ]
    if high != 0 and high < low:
        errors.append(f"max-scale={high} is less than min-scale={low}")
    limit = config.max_scale_limit
    if "max-scale" in ann and limit and (high > limit or high == 0):
        errors.append(f"{name['max-scale']}: {high} outside 1..{limit}")
    if "activation-scale" in ann:
        activation = _atoi(ann["activation-scale"])
        if activation is None:
            errors.append(f"activation-scale: {ann['activation-scale']}")
        elif low > activation or (high != 0 and high < activation) or activation < 2:
            errors.append(f"activation-scale: {activation} (min {low}, max {high})")
    # validateFloats
    for key, (least, most) in (
        ("panic-window-percentage", PANIC_WINDOW_PERCENTAGE),
        ("panic-threshold-percentage", PANIC_THRESHOLD_PERCENTAGE),
        ("target-utilization-percentage", (1.0, 100.0)),
    ):
        if key in ann:
            number = _float(ann[key])
            if number is None or number < least or number > most:
                errors.append(f"{name[key]}: {ann[key]}")
    if "target" in ann:
        number = _float(ann["target"])
        if number is None or number < TARGET_MIN:
            errors.append(f"target: {ann['target']} (at least {TARGET_MIN})")
    if "target-burst-capacity" in ann:
        number = _float(ann["target-burst-capacity"])
        if number is None or (number < 0 and number != -1):
            errors.append(f"{name['target-burst-capacity']}: {ann['target-burst-capacity']}")
    # validateWindow, validateLastPodRetention, validateScaleDownDelay
    if "window" in ann:
        window = _duration(ann["window"])
        if window is None or not WINDOW_MIN <= window <= WINDOW_MAX or not _whole_seconds(window):
            errors.append(f"window: {ann['window']}")
    if "scale-to-zero-pod-retention-period" in ann:
        retention = _duration(ann["scale-to-zero-pod-retention-period"])
        if retention is None or not timedelta(0) <= retention <= WINDOW_MAX:
            key = "scale-to-zero-pod-retention-period"
            errors.append(f"{name[key]}: {ann[key]}")
    if "scale-down-delay" in ann:
        delay = _duration(ann["scale-down-delay"])
        if delay is None or not timedelta(0) <= delay <= WINDOW_MAX or not _whole_seconds(delay):
            errors.append(f"{name['scale-down-delay']}: {ann['scale-down-delay']}")
    # validateMetric: the KPA scales on concurrency or rps; the HPA on anything but ""; a class
    # annotation, even empty, replaces the configured class.
    if "metric" in ann:
        metric = ann["metric"]
        scaler = klass if klass is not None else config.pod_autoscaler_class
        if scaler == KPA and metric not in ("concurrency", "rps"):
            errors.append(f"metric: {metric} (the KPA scales on concurrency or rps)")
        if scaler == HPA and metric == "":
            errors.append("metric: empty")
    # validateAlgorithm: checked for an explicit KPA class only.
    if klass == KPA and ann.get("metric-aggregation-algorithm", "") not in ("", *ALGORITHMS):
        key = "metric-aggregation-algorithm"
        errors.append(f"{name[key]}: {ann[key]}")
    # validateInitialScale
    if "initial-scale" in ann:
        initial = _atoi(ann["initial-scale"])
        if initial is None:
            errors.append(f"{name['initial-scale']}: {ann['initial-scale']}")
        elif initial < 0 or (initial == 0 and not config.allow_zero_initial_scale):
            errors.append(f"{name['initial-scale']}: {initial}")
    return errors
