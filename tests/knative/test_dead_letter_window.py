"""How long a dead letter outlives a storage outage, and whether its alert fires first.

The broker sends a dead letter with the failing Trigger's own delivery settings and drops it
once they are spent (eventing pkg/kncloudevents/event_dispatcher.go: ``send`` passes
``config.retryConfig`` to the ``executeRequest`` of the dead-letter sink); each attempt lasts
as long as the sink tries its write before answering 503: ``RETRY_FOR`` for a write storage
refuses, the shortest, so the loss windows below are the shortest there are; up to ``BUDGET``
for one that stalls (a store that accepts and never answers), the latest a failure is answered.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
import yaml

from imagegen.stages.deadletter import BUDGET, RETRY_FOR

from .conftest import OVERLAYS, REPO
from .routing import CHANNEL_BROKER, KAFKA_BROKER, Routing

RoutingOf = Callable[[str], Routing]
ALERTS = REPO / "observability" / "prometheus" / "alerts.yaml"
SINK = "imagegen-deadletter"

# What each Trigger's dead letters must outlive: an outage that long loses none.
OUTLIVED_MINUTES = 6
# From a delivery the sink answers 503 to, until Prometheus can see it: the OpenTelemetry SDK's
# metric export interval (OTEL_METRIC_EXPORT_INTERVAL, 60 s by default, docs/observability.md),
# a scrape interval and a rule evaluation interval (Prometheus' global defaults, 1 minute).
EXPORT, SCRAPE, EVALUATION = 60.0, 60.0, 60.0


def _loss_windows(r: Routing, broker_class: str) -> dict[str, float]:
    """Seconds of storage outage after which each Trigger's dead letter is dropped."""
    return {
        t.name: (1 + (t.retry or 0)) * RETRY_FOR
        + sum(wait.total_seconds() for wait in t.backoff_schedule(broker_class))
        for t in r.triggers
        if t.dead_letter == SINK
    }


def _duration(text: str) -> float:
    match = re.fullmatch(r"(\d+)([smh])", text)
    assert match, text
    return int(match[1]) * {"s": 1, "m": 60, "h": 3600}[match[2]]


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("broker_class", [CHANNEL_BROKER, KAFKA_BROKER])
def test_every_dead_letter_outlives_a_storage_outage_of_some_minutes(
    routing: RoutingOf, overlay: str, broker_class: str
) -> None:
    windows = _loss_windows(routing(overlay), broker_class)
    assert {"imagegen-enhance", "imagegen-failed", "imagegen-persist"} <= set(windows)
    short = {name: w for name, w in windows.items() if w < OUTLIVED_MINUTES * 60}
    assert not short, short


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_dead_letter_alert_fires_before_a_dead_letter_is_lost(
    routing: RoutingOf, overlay: str
) -> None:
    rules = yaml.safe_load(ALERTS.read_text())
    [rule] = [
        rule
        for group in rules["groups"]
        for rule in group["rules"]
        if 'stage="deadletter"' in rule["expr"] and "imagegen_sink_deliveries_total" in rule["expr"]
    ]
    assert rule["labels"]["severity"] == "critical"
    # The first delivery the sink gives up on, seen, evaluated, then held for the rule's "for":
    # given up on at BUDGET at the latest (a stalled write, answered at the sink's timeout),
    # while the shortest window counts attempts of RETRY_FOR (refused writes).
    fires = BUDGET + EXPORT + SCRAPE + EVALUATION + _duration(rule.get("for", "0s"))
    shortest = min(_loss_windows(routing(overlay), CHANNEL_BROKER).values())
    assert fires < shortest, (fires, shortest)
