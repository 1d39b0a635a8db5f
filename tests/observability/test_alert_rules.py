"""The alert rules, evaluated by Prometheus's own ``promtool`` on series written minute by minute.

Each fixture under ``alert_rules/`` is a ``promtool test rules`` file. It runs against
``observability/prometheus/alerts.yaml`` as it is (expressions, ``for`` and labels), each rule's
annotations replaced by its value alone, so that a fixture states the number an alert fires with.

Fixtures keep away from the start of a range, so that they hold with Prometheus 2 and 3 alike.
Series are written on the minute grid the rules are evaluated on, so a window ``[15m]`` begins
on a sample, which Prometheus 2 reads and Prometheus 3 (its ranges open at the start) leaves out;
nothing a fixture asserts may hang on it. Where it is a counter's first in the window and above
zero, Prometheus 3's ``increase()`` and ``rate()`` extrapolate from the next one to the window's
start (4 failures read as 4.286): such a case asserts when an alert fires, not its value.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import ROOT

ALERTS = ROOT / "observability" / "prometheus" / "alerts.yaml"
FIXTURES = Path(__file__).with_name("alert_rules")
# Where `.ci/run` unpacks Debian's prometheus package; looked at after PROMTOOL and the PATH.
UNPACKED_PROMTOOL = ROOT / ".cache" / "prometheus-deb" / "usr" / "bin" / "promtool"
GET_PROMTOOL = (
    f"promtool is required (PROMTOOL, the PATH, or {UNPACKED_PROMTOOL}, where `bash .ci/run`"
    " unpacks it): `apt-get download prometheus && dpkg -x prometheus_*.deb DIR` (nothing"
    " installed), then PROMTOOL=DIR/usr/bin/promtool"
)


@pytest.fixture(scope="module")
def promtool() -> str:
    found = os.environ.get("PROMTOOL") or shutil.which("promtool") or str(UNPACKED_PROMTOOL)
    assert os.access(found, os.X_OK), GET_PROMTOOL
    return found


def _rules() -> dict[str, Any]:
    rules: dict[str, Any] = yaml.safe_load(ALERTS.read_text())
    return rules


def _alertnames(fixture: dict[str, Any]) -> set[str]:
    """The alerts a fixture expects something of, by name."""
    names = set()
    for group in fixture["tests"]:
        names |= {case["alertname"] for case in group.get("alert_rule_test", [])}
        for case in group.get("promql_expr_test", []):
            names |= set(re.findall(r'alertname="(\w+)"', case["expr"]))
    return names


def test_promtool_checks_the_rules(promtool: str) -> None:
    checked = subprocess.run(
        [promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


@pytest.mark.parametrize("name", sorted(p.stem for p in FIXTURES.glob("*.yaml")))
def test_the_failure_alerts_fire_on_what_failed(promtool: str, name: str, tmp_path: Path) -> None:
    fixture = yaml.safe_load((FIXTURES / f"{name}.yaml").read_text())
    rules = _rules()
    # An alert a fixture names and the rules lack would pass every "fires on nothing" case.
    known = {rule["alert"] for group in rules["groups"] for rule in group["rules"]}
    assert _alertnames(fixture) <= known, _alertnames(fixture) - known
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule["annotations"] = {"value": '{{ $value | printf "%.4g" }}'}
    (tmp_path / fixture["rule_files"][0]).write_text(yaml.safe_dump(rules, sort_keys=False))
    shutil.copy(FIXTURES / f"{name}.yaml", tmp_path)

    tested = subprocess.run(
        [promtool, "test", "rules", f"{name}.yaml"], cwd=tmp_path, capture_output=True, text=True
    )
    assert tested.returncode == 0, tested.stdout + tested.stderr
