"""The dashboard and alert rules query exactly the metrics and labels the code emits."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from imagegen.telemetry import METRICS, prometheus_series
from tests.conftest import ROOT

DASHBOARD = ROOT / "observability" / "grafana" / "imagegen.json"
ALERTS = ROOT / "observability" / "prometheus" / "alerts.yaml"

SERIES = {series: key for key, spec in METRICS.items() for series in prometheus_series(spec)}
# Labels Prometheus adds: histogram buckets, and the target (service.name, service.instance.id).
LABELS = {a.replace(".", "_") for spec in METRICS.values() for a in spec.attributes} | {
    "le",
    "job",
    "instance",
}

_METRIC = re.compile(r"\b(imagegen_[a-z0-9_]+)")
_SELECTOR = re.compile(r"\b(imagegen_[a-z0-9_]+)\s*\{([^}]*)\}")
_MATCHER = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)")


def strings(node: Any, keys: tuple[str, ...]) -> Iterator[str]:
    """Every string under one of ``keys``, anywhere in a JSON/YAML document."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in keys and isinstance(value, str):
                yield value
            else:
                yield from strings(value, keys)
    elif isinstance(node, list):
        for item in node:
            yield from strings(item, keys)


def dashboard_queries() -> list[str]:
    return list(strings(json.loads(DASHBOARD.read_text()), ("expr", "query", "definition")))


def alert_rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(ALERTS.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def metric_names(query: str) -> list[str]:
    """The metrics a PromQL query reads (label names in matchers and groupings left out)."""
    query = re.sub(r"\{[^}]*\}", "", query)
    query = _GROUPING.sub("", query)
    return _METRIC.findall(query)


def unknown_metrics(queries: list[str]) -> set[str]:
    return {name for q in queries for name in metric_names(q)} - set(SERIES)


def unknown_labels(queries: list[str]) -> set[str]:
    found: set[str] = set()
    for query in queries:
        for _, matchers in _SELECTOR.findall(query):
            found.update(_MATCHER.findall(matchers))
        for grouping in _GROUPING.findall(query):
            found.update(label.strip() for label in grouping.split(",") if label.strip())
    return found - LABELS


@pytest.mark.parametrize(
    ("source", "queries"),
    [("dashboard", dashboard_queries()), ("alerts", [r["expr"] for r in alert_rules()])],
)
def test_every_metric_and_label_queried_is_emitted(source: str, queries: list[str]) -> None:
    assert queries, f"no queries found in the {source}"
    assert unknown_metrics(queries) == set(), source
    assert unknown_labels(queries) == set(), source


def test_the_checks_catch_a_misspelt_name_or_label() -> None:
    assert unknown_metrics(["rate(imagegen_stage_duration_bucket[5m])"]) == {
        "imagegen_stage_duration_bucket"
    }
    assert unknown_metrics(["imagegen_generations"]) == {"imagegen_generations"}
    query = 'sum by (model) (imagegen_generations_total{status="x"})'
    assert unknown_labels([query]) == {"model", "status"}
    assert unknown_metrics(["sum by (imagegen_model) (imagegen_render_in_flight)"]) == set()


def test_the_dashboard_shows_every_metric() -> None:
    shown = {SERIES[name] for q in dashboard_queries() for name in metric_names(q)}
    assert shown == set(METRICS)


def test_alert_rules_are_complete() -> None:
    rules = alert_rules()
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names))
    for rule in rules:
        assert rule["labels"]["severity"] in {"info", "warning", "critical"}, rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
        assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]


def _refused_by_caller() -> set[str]:
    """Reasons a generation is counted failed for what its caller sent: every error code of a
    4xx answer (render's 429 included) but a missing object (``not_found``: the image an event
    names), as the adapter counts them (a path or method no stage takes is not counted)."""
    from imagegen import errors

    codes = {
        cls.code
        for cls in _subclasses(errors.ImageGenError)
        # The stages' errors (the ledger's own answer its queries, which count no generation).
        if cls.__module__ == errors.__name__
        and 400 <= cls.status < 500
        and cls not in (errors.RouteNotFound, errors.MethodNotAllowed)
    }
    return codes - {"not_found"}


def _subclasses(cls: type) -> list[type]:
    return [cls] + [each for sub in cls.__subclasses__() for each in _subclasses(sub)]


def _reasons(rule: str, operator: str) -> set[str]:
    [expr] = [r["expr"] for r in alert_rules() if r["alert"] == rule]
    [pattern] = set(re.findall(rf'reason\s*{operator}\s*"([^"]*)"', expr))  # one, maybe repeated
    return set(pattern.split("|"))


def test_the_critical_failure_alert_leaves_out_what_callers_get_refused() -> None:
    # Four bad tokens from a port scanner, or four 429s Knative retries, page no one; a stage
    # failing on its own (storage, the model, a timeout, a bug) does.
    from imagegen.auth.oidc import KeyNotFetched

    refused = _refused_by_caller()
    assert {"invalid_request", "unauthenticated", "forbidden", "overloaded"} <= refused
    # A 503 anyone can cause with a token naming an unknown key (retried, gone in seconds
    # after a real rotation): no page either.
    unverified = {KeyNotFetched.code}
    assert _reasons("ImagegenGenerationFailures", "!~") == refused | unverified
    assert _reasons("ImagegenInvalidRequestsHigh", "=~") == refused - {"overloaded"}
    assert _reasons("ImagegenSinkCannotRecord", "!~") == refused - {"overloaded"} | unverified


def test_each_failure_the_dead_letter_alert_pages_on_is_counted_from_zero() -> None:
    # A sink that cannot record a delivery answers a 5xx of the stages' errors: its storage
    # or database (dependency_unavailable), its settings (not_configured), a bug (internal).
    # The alert pages at the first; a series first exported at 1 hides it from rate().
    from imagegen import errors
    from imagegen.telemetry import SINK_COUNTED_FROM_ZERO

    failures = {
        cls.code
        for cls in _subclasses(errors.ImageGenError)
        if cls.__module__ == errors.__name__ and cls.status >= 500
    }
    paged = failures - _reasons("ImagegenDeadLetterCannotRecord", "!~")
    assert {"dependency_unavailable", "not_configured", "internal"} <= paged
    started = {labels.get("reason") for labels in SINK_COUNTED_FROM_ZERO}
    assert paged <= started


def _threshold(rule: str, stage: str) -> tuple[str, float]:
    """The selector and threshold of ``stage``'s line in a ``histogram_quantile`` alert."""
    [expr] = [r["expr"] for r in alert_rules() if r["alert"] == rule]
    [(selector, threshold)] = re.findall(
        rf'\{{(stage="{stage}"[^}}]*)\}}\[\w+\]\)\)\)\s*>\s*([\d.]+)', expr
    )
    return selector, float(threshold)


def test_the_render_latency_alert_fires_before_renders_time_out() -> None:
    # A p95 over the timeout comes only from renders that already time out: the alert must
    # warn before, on the renders that succeed (at a bucket boundary: below).
    manifest = yaml.safe_load((ROOT / "knative" / "base" / "render.yaml").read_text())
    [container] = manifest["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    timeout = float(env["IMAGEGEN_RENDER_TIMEOUT"])
    selector, threshold = _threshold("ImagegenStageLatencyHigh", "render")
    assert 'outcome="success"' in selector
    assert threshold <= 0.75 * timeout
    assert threshold in METRICS["stage_duration"].buckets


# One histogram_quantile of an alert and the threshold it is compared with.
_QUANTILE = re.compile(r"histogram_quantile\([^>]*?\b(imagegen_\w+_bucket)\b[^>]*>=?\s*([\d.]+)")


def quantile_thresholds() -> list[tuple[str, str, float]]:
    """Each latency alert's (rule, histogram, threshold), one per ``histogram_quantile``."""
    return [
        (rule["alert"], SERIES[series], float(threshold))
        for rule in alert_rules()
        for series, threshold in _QUANTILE.findall(rule["expr"])
    ]


def test_each_latency_alert_threshold_is_a_bucket_boundary() -> None:
    # histogram_quantile interpolates inside a bucket: a threshold of 2 s between boundaries
    # of 1 s and 2.5 s read a p95 of 2.4 s from calls that all took 1.1 s, and fired. At a
    # boundary, the quantile is over it only when more than 5% of the calls are.
    found = quantile_thresholds()
    assert {rule for rule, _, _ in found} >= {
        "ImagegenStageLatencyHigh",
        "ImagegenStorageLatencyHigh",
        "ImagegenOllamaSlow",
    }
    assert len(found) == sum(r["expr"].count("histogram_quantile") for r in alert_rules())
    for rule, metric, threshold in found:
        assert threshold in METRICS[metric].buckets, (rule, metric, threshold)


def test_alerts_on_enhance_traffic_count_only_the_requests_it_admitted() -> None:
    # Requests refused for what their caller sent (a scanner's, without a token) are no
    # traffic: they neither page "nothing persisted" nor dilute the fallback ratio.
    from imagegen.auth.oidc import KeyNotFetched

    admitted = _reasons("ImagegenNoSuccessfulGeneration", "!~")
    assert admitted == _refused_by_caller() - {"overloaded"} | {KeyNotFetched.code}
    [expr] = [r["expr"] for r in alert_rules() if r["alert"] == "ImagegenEnhanceFallbackRatioHigh"]
    ratio = re.findall(r"imagegen_generations_total\{([^}]*)\}", expr)
    assert ratio == [
        'stage="enhance", outcome="fallback"',
        'stage="enhance", outcome=~"success|fallback"',
    ]


def test_the_fallback_panel_shows_the_ratio_its_alert_fires_on() -> None:
    # Divided by every enhance outcome (refusals, redeliveries), the panel showed 8% where the
    # alert fired on 40%.
    panel = next(
        p
        for p in json.loads(DASHBOARD.read_text())["panels"]
        if p["title"] == "Enhance fallback ratio"
    )
    [target] = panel["targets"]
    ratio = re.findall(r"imagegen_generations_total\{([^}]*)\}", target["expr"])
    [alert] = [r["expr"] for r in alert_rules() if r["alert"] == "ImagegenEnhanceFallbackRatioHigh"]
    assert ratio == re.findall(r"imagegen_generations_total\{([^}]*)\}", alert)


def test_the_sink_alert_pages_only_failures_that_outlast_the_broker_s_retries() -> None:
    # One retryable 503 (a lock wait, a failover), retried a second later and recorded, kept an
    # increase over 15 minutes above zero past the rule's "for": a page for nothing lost.
    triggers = yaml.safe_load_all((ROOT / "knative" / "base" / "ledger-triggers.yaml").read_text())
    delivery = next(t for t in triggers if t and t.get("kind") == "Trigger")["spec"]["delivery"]
    [rule] = [r for r in alert_rules() if r["alert"] == "ImagegenSinkCannotRecord"]
    [window] = re.findall(
        r"rate\(imagegen_sink_deliveries_total\{[^}]*\}\[(\d+)m\]\)", rule["expr"]
    )
    held = int(rule["for"].removesuffix("m"))
    assert int(window) < held  # failures in every window for the whole "for", not one
    # The broker's retries, from the first backoff doubling (Knative's exponential policy):
    # the rule must not fire while they can still record the delivery.
    first = float(re.fullmatch(r"PT(\d+(?:\.\d+)?)S", delivery["backoffDelay"])[1])
    retries_minutes = sum(first * 2**n for n in range(delivery["retry"])) / 60
    assert held + int(window) >= retries_minutes


# A series that began within the window (not seen in the hour before it), counted by its latest
# value, or any other's increase (rate() for the sinks'):
# ``(last_over_time(S[w]) unless present_over_time(S[1h] offset w)) or increase(S[w])``.
# tests/observability/test_alert_rules.py runs them.
_FIRST_SEEN = re.compile(
    r"\(\s*last_over_time\((?P<s>imagegen_\w+\{[^}]*\})\[(?P<w>\d+m)\]\)\s*"
    r"unless\s+present_over_time\((?P=s)\[1h\]\s+offset\s+(?P=w)\)\s*\)"
    r"\s*or\s+(?:increase|rate)\((?P=s)\[(?P=w)\]\)"
)


@pytest.mark.parametrize(
    "rule",
    ["ImagegenGenerationFailures", "ImagegenSinkCannotRecord", "ImagegenDeadLetterCannotRecord"],
)
def test_a_failure_alert_counts_a_series_first_seen_above_zero(rule: str) -> None:
    # increase() and rate() never see a series' first sample: a pod whose first export already
    # holds its failures (its start-up export lost) is counted by its latest value instead.
    [expr] = [r["expr"] for r in alert_rules() if r["alert"] == rule]
    assert _FIRST_SEEN.search(expr), expr
    assert not _FIRST_SEEN.search('sum(increase(imagegen_generations_total{a="b"}[15m])) > 3')


def panels() -> list[dict[str, Any]]:
    return [p for p in json.loads(DASHBOARD.read_text())["panels"] if p.get("targets")]


def test_per_minute_panels_show_rates_per_minute() -> None:
    # increase() over $__rate_interval counts per rate window, not per minute: one circuit
    # transition read as "1 a minute" for as many minutes as the window lasts.
    per_minute = [p for p in panels() if "per minute" in p["title"]]
    assert per_minute
    for panel in per_minute:
        for target in panel["targets"]:
            expr = target["expr"]
            assert "increase(" not in expr, (panel["title"], expr)
            assert re.fullmatch(r".*\brate\(.*\)\s*\*\s*60", expr), (panel["title"], expr)
    for query in dashboard_queries():
        assert not re.search(r"increase\([^\]]*\[\$__rate_interval\]", query), query


def _label_values_sources(query: str) -> set[str]:
    """The metrics a Grafana ``label_values(<selector>, label)`` query reads: the named one, or
    those of a ``{__name__=~"a|b"}`` selector."""
    match = re.fullmatch(r'label_values\((?:(\w+)|\{__name__=~"([\w|]+)"\}),\s*\w+\)', query)
    assert match, query
    return set(match[1].split("|") if match[1] else match[2].split("|"))


def test_the_stage_variable_lists_every_stage_its_panels_filter_on() -> None:
    # Each panel filtering on $stage reads its metric's stages from the variable: the storage
    # panels show the dead-letter sink's calls (stage "deadletter"), a stage that runs no
    # generation and has no stage duration, so the variable reads the storage histogram too.
    templating = json.loads(DASHBOARD.read_text())["templating"]["list"]
    [variable] = [v for v in templating if v["name"] == "stage"]
    sources = {SERIES[name] for name in _label_values_sources(variable["query"]["query"])}
    assert variable["definition"] == variable["query"]["query"]
    filtered = {
        SERIES[name]
        for panel in panels()
        for target in panel["targets"]
        for name, matchers in _SELECTOR.findall(target["expr"])
        if '"$stage"' in matchers
    }
    # Every generation's run is timed (stage_duration); every write is a storage call.
    covered_by = {"generations": "stage_duration", "storage_bytes_written": "storage_duration"}
    assert {covered_by.get(key, key) for key in filtered} <= sources
    assert "storage_duration" in sources
    assert _label_values_sources("label_values(imagegen_stage_duration_seconds_count, stage)") == {
        "imagegen_stage_duration_seconds_count"
    }


def test_the_renders_in_flight_panel_says_what_a_render_pod_holds() -> None:
    from imagegen.render.stage import ADMITTED_SHARE_OF_TIMEOUT, UNMEASURED_QUEUE
    from imagegen.settings import Settings

    [panel] = [p for p in panels() if p["title"] == "Renders in flight"]
    description = panel["description"]
    for field in ("render_batch_size", "render_queue_size", "render_timeout"):
        assert Settings.variable(field) in description, field
    assert f"{round(ADMITTED_SHARE_OF_TIMEOUT * 100)}% of" in description
    assert f"{UNMEASURED_QUEUE} queued" in description
    assert "1 + IMAGEGEN_RENDER_QUEUE_SIZE" not in description


def test_the_webhook_backlog_alert_says_first_that_webhooks_may_be_off() -> None:
    """With no webhook secrets the ledger records messages and sends none: the backlog grows
    with no receiver at fault, and the alert points at the line the ledger logs then."""
    from imagegen.settings import Settings

    [rule] = [r for r in alert_rules() if r["alert"] == "ImagegenWebhookBacklogHigh"]
    description = " ".join(rule["annotations"]["description"].split())
    variable = Settings.variable("webhook_secrets")
    assert f"First check that webhooks are on: with {variable} unset" in description
    assert '"webhooks are off"' in description
    said = (ROOT / "imagegen" / "stages" / "ledger.py").read_text()
    assert '"webhooks are off (%s is not set)' in said  # the ledger's start-up line
