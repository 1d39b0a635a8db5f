"""docs/deploy.md's timeout table and docs/runbook.md's alerts agree with what they describe."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
import yaml

from .conftest import REPO, service_settings
from .routing import CHANNEL_BROKER, KAFKA_BROKER, Routing, TriggerInfo

# The stage budgets as the functions compute them; load_stage is a fixture, used by name.
from .test_function_contract import load_stage  # noqa: F401

RoutingOf = Callable[[str], Routing]
DEPLOY = REPO / "docs" / "deploy.md"
RUNBOOK = REPO / "docs" / "runbook.md"
ALERTS = REPO / "observability" / "prometheus" / "alerts.yaml"


def markdown_table(text: str, heading: str) -> dict[str, list[str]]:
    """The first table under ``heading``: first cell of each row -> the other cells."""
    section = text.split(heading, 1)[1]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    table: dict[str, list[str]] = {}
    started = False
    for line in section.splitlines():
        if line.startswith("|"):
            started = True
            cells = [cell.strip() for cell in line.strip("|").split("|")]
            table[cells[0]] = cells[1:]
        elif started:
            break
    assert rows, f"no table under {heading}"
    return table


def _trigger(r: Routing, service: str) -> TriggerInfo:
    """The delivery settings of the Triggers feeding a Service (they must agree)."""
    triggers = [t for t in r.triggers if t.subscriber == service]
    settings = {(t.retry, t.backoff_delay, t.backoff_policy, t.timeout) for t in triggers}
    assert len(settings) == 1, f"{service}: Triggers with different delivery settings"
    return triggers[0]


def _seconds(value: timedelta | None) -> int:
    assert value is not None
    return round(value.total_seconds())


def test_the_nested_timeout_table_is_what_the_manifests_say(
    routing: RoutingOf, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    load: Callable[[str], Any] = request.getfixturevalue("load_stage")
    table = markdown_table(DEPLOY.read_text(), "### Nested timeouts")
    stages = table.pop("limit (seconds unless counted)")
    table.pop("---")
    r = routing("prod")
    expected: dict[str, list[str]] = {key: [] for key in table}
    for stage in stages:
        service = r.services[f"imagegen-{stage}"]
        pod = service.manifest["spec"]["template"]["spec"]
        trigger = _trigger(r, service.name)
        attempts = 1 + (trigger.retry or 0)
        waits = {
            broker: sum(map(_seconds, trigger.backoff_schedule(broker)))
            for broker in (CHANNEL_BROKER, KAFKA_BROKER)
        }
        budget = load(stage).timeout(service_settings(service, monkeypatch))
        values = {
            "function budget": budget,
            "`timeoutSeconds`": pod["timeoutSeconds"],
            "`responseStartTimeoutSeconds`": pod["responseStartTimeoutSeconds"],
            "Trigger `timeout`": _seconds(trigger.timeout),
            "Trigger `retry` (count)": trigger.retry,
            "Trigger `backoffDelay`": _seconds(trigger.backoff_delay),
            "total backoff, channel-based broker": waits[CHANNEL_BROKER],
            "total backoff, Kafka broker": waits[KAFKA_BROKER],
            "longest time to the dead-letter sink, channel-based": attempts
            * _seconds(trigger.timeout)
            + waits[CHANNEL_BROKER],
            "longest time to the dead-letter sink, Kafka": attempts * _seconds(trigger.timeout)
            + waits[KAFKA_BROKER],
        }
        assert set(values) == set(table), "the table's rows changed: update this test"
        for key, value in values.items():
            expected[key].append(f"{value:g}" if isinstance(value, float) else str(value))
        # The relations the section states.
        assert budget < pod["timeoutSeconds"] <= _seconds(trigger.timeout), stage
        assert pod["responseStartTimeoutSeconds"] == pod["timeoutSeconds"], stage
    assert table == expected


def test_the_activator_margin_in_the_text_is_the_manifests(routing: RoutingOf) -> None:
    render = routing("prod").services["imagegen-render"]
    margin = render.timeout_seconds - float(render.env["IMAGEGEN_RENDER_TIMEOUT"])  # type: ignore[operator]
    assert f"`timeoutSeconds` minus the budget ({margin:g} s)" in DEPLOY.read_text()


def test_every_alert_has_a_runbook_section() -> None:
    rules = yaml.safe_load(ALERTS.read_text())
    alerts = [rule["alert"] for group in rules["groups"] for rule in group["rules"]]
    sections = set(re.findall(r"^### (\S+)$", RUNBOOK.read_text(), re.MULTILINE))
    assert alerts and not set(alerts) - sections, set(alerts) - sections


# The Triggers each dead-letter loss window is told for, in the order of docs/deploy.md's
# table ("Dead letters and storage outages") and of the runbook's ImagegenDeadLetterCannotRecord.
LOSS_GROUPS = (
    ("imagegen-enhance", "imagegen-dream", "imagegen-persist", "imagegen-derive"),
    ("imagegen-render",),
    ("imagegen-ledger-generation-requested", "imagegen-ledger-image-derived", "imagegen-failed"),
)


def _loss_seconds(r: Routing, broker_class: str) -> list[float]:
    """Seconds of storage outage after which each group's dead letters are dropped: every
    attempt lasting the sink's RETRY_FOR (test_dead_letter_window.py), plus the backoff."""
    from imagegen.stages.deadletter import RETRY_FOR

    seconds = []
    for group in LOSS_GROUPS:
        windows = set()
        for name in group:
            [trigger] = [t for t in r.triggers if t.name == name]
            waits = trigger.backoff_schedule(broker_class)
            windows.add((1 + (trigger.retry or 0)) * RETRY_FOR + sum(map(_seconds, waits)))
        [window] = windows
        seconds.append(window)
    return seconds


def _loss_minutes(r: Routing, broker_class: str) -> list[int]:
    return [round(window / 60) for window in _loss_seconds(r, broker_class)]


def _said(text: str) -> str:
    return " ".join(text.split())


def test_the_dead_letter_loss_windows_told_are_the_manifests(routing: RoutingOf) -> None:
    r = routing("prod")
    channel, kafka = _loss_minutes(r, CHANNEL_BROKER), _loss_minutes(r, KAFKA_BROKER)
    table = markdown_table(DEPLOY.read_text(), "### Dead letters and storage outages")
    rows = [cells for name, cells in table.items() if name not in {"Triggers", "---"}]
    told = [[int(re.findall(r"about (\d+) min", cell)[0]) for cell in cells] for cells in rows]
    assert told == [list(pair) for pair in zip(channel, kafka, strict=True)]
    # A generation.failed is delivered to the sink, then dead-lettered to it: twice the window.
    twice = [round(2 * _loss_seconds(r, b)[-1] / 60) for b in (CHANNEL_BROKER, KAFKA_BROKER)]
    outages = _said(DEPLOY.read_text().split("### Dead letters and storage outages", 1)[1])
    assert f"about {twice[0]} minutes ({twice[1]} on the Kafka broker)" in outages

    # The runbook assumes prod: the Kafka broker's windows, the channel-based broker's beside.
    section = _said(RUNBOOK.read_text().split("### ImagegenDeadLetterCannotRecord", 1)[1])
    stages, render, ledger = kafka
    assert (
        f"on prod's Kafka broker about {stages} minutes into the outage for enhance, persist and"
        f" derive, {render} for render, {ledger} for the ledger's Triggers" in section
    )
    first, second, third = channel
    assert f"whose backoff is half as long, {first}, {second} and {third};" in section
    description = _said(_alert("ImagegenDeadLetterCannotRecord")["annotations"]["description"])
    assert (
        f"on the Kafka broker about {stages} minutes into an outage for enhance, persist and"
        f" derive ({render} for render, {ledger} for the ledger's and imagegen-failed;"
        f" {channel[0]}, {channel[1]} and {channel[2]} on the channel-based broker)" in description
    )


def test_the_time_the_ledgers_failures_take_to_be_dead_lettered_is_the_manifests(
    routing: RoutingOf,
) -> None:
    """ImagegenSinkCannotRecord's alert and runbook section say when the broker gives up on the
    ledger: the backoff of its Triggers, every retry spent (the attempts' own time not counted)."""
    trigger = _trigger(routing("prod"), "imagegen-ledger")
    minutes = {
        broker: round(sum(map(_seconds, trigger.backoff_schedule(broker))) / 60)
        for broker in (KAFKA_BROKER, CHANNEL_BROKER)
    }
    told = (
        f"about {minutes[KAFKA_BROKER]} minutes on the Kafka broker, {minutes[CHANNEL_BROKER]}"
        f" on the channel-based one: retry {trigger.retry}, backoff from"
        f" {_seconds(trigger.backoff_delay)} s"
    )

    section = RUNBOOK.read_text().split("### ImagegenSinkCannotRecord", 1)[1].split("\n### ", 1)[0]
    assert told in _said(section)
    assert told in _said(_alert("ImagegenSinkCannotRecord")["annotations"]["description"])


def _alert(name: str) -> dict[str, Any]:
    """The Prometheus rule of the alert ``name`` (observability/prometheus/alerts.yaml)."""
    rules = yaml.safe_load(ALERTS.read_text())
    [alert] = [
        rule for group in rules["groups"] for rule in group["rules"] if rule.get("alert") == name
    ]
    return dict(alert)
