"""docs/observability.md names every metric in Prometheus as the code exports it."""

from __future__ import annotations

import re

from imagegen.telemetry import METRICS, prometheus_series
from tests.conftest import ROOT

DOC = ROOT / "docs" / "observability.md"

_ROW = re.compile(r"^\| `([^`]+)` \| (.+) \|$")


def prometheus_table() -> list[tuple[str, tuple[str, ...]]]:
    """The rows of "Names in Prometheus": each OpenTelemetry name and the series it becomes,
    a histogram's ``_sum`` and ``_count`` written out in full."""
    section = DOC.read_text().split("### Names in Prometheus", 1)[1]
    table = section.split("\n| OpenTelemetry | Prometheus |\n| --- | --- |\n", 1)[1]
    rows = []
    for line in table.splitlines():
        if not line.startswith("|"):
            break
        match = _ROW.fullmatch(line)
        assert match, line
        first, *more = (name.strip(" `") for name in match[2].split(","))
        stem = first.rsplit("_", 1)[0]  # "_sum" stands for the first name's, its suffix changed
        named = (stem + name if name.startswith("_") else name for name in more)
        rows.append((match[1], (first, *named)))
    return rows


def test_the_prometheus_names_table_has_one_row_per_metric_as_exported() -> None:
    rows = prometheus_table()
    names = [name for name, _ in rows]
    assert sorted(names) == sorted(spec.name for spec in METRICS.values())  # each exactly once
    exported = {spec.name: tuple(prometheus_series(spec)) for spec in METRICS.values()}
    for name, series in rows:
        assert series == exported[name], name
