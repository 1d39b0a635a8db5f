"""``OTEL_PROPAGATORS`` naming a propagator not installed is refused as a setting that cannot
work: in imagegen's words, naming the variable and what is installed; ``doctor`` reports it."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from imagegen import observability
from imagegen.errors import ConfigurationError
from imagegen.observability import check_propagators, setup_observability
from tests.conftest import isolated_environ

INSTALLED = sorted({ep.name for ep in entry_points(group="opentelemetry_propagator")})


def imagegen(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``imagegen ARGS`` in a fresh process: OpenTelemetry's API reads the variable once, as
    it is first imported, which this test process did long ago."""
    return subprocess.run(
        [sys.executable, "-m", "imagegen.cli", *args],
        cwd=cwd,
        env={**isolated_environ(cwd), **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize("given", ["b3", "tracecontext, b3", "tracecontext,,baggage", " "])
def test_setup_refuses_a_propagator_not_installed(
    monkeypatch: pytest.MonkeyPatch, given: str
) -> None:
    assert "b3" not in INSTALLED and "tracecontext" in INSTALLED
    monkeypatch.setattr(observability, "_active", None)
    monkeypatch.setenv("OTEL_PROPAGATORS", given)
    with pytest.raises(ConfigurationError) as refused:
        setup_observability("imagegen-test", logs=False)
    assert refused.value.fields == ["OTEL_PROPAGATORS"]
    said = refused.value.explained()
    assert said.startswith("invalid settings: OTEL_PROPAGATORS (")
    assert f"installed: {', '.join(INSTALLED)}" in said
    assert observability._active is None  # nothing set up: a later call refuses it again


@pytest.mark.parametrize("given", ["", "tracecontext", " tracecontext , baggage ", "NONE,b3"])
def test_what_opentelemetry_accepts_is_accepted(
    monkeypatch: pytest.MonkeyPatch, given: str
) -> None:
    # "none" ends the list, names after it unread (opentelemetry/propagate/__init__.py).
    monkeypatch.setenv("OTEL_PROPAGATORS", given)
    check_propagators()


@pytest.mark.parametrize(
    "args",
    [
        ["generate", "x", "--model", "tiny", "--width", "256", "--height", "256"],
        ["plugins"],
        ["serve", "enhance", "--port", "49711"],  # refused before the function starts
    ],
    ids=lambda args: args[0],
)
def test_a_command_refuses_it_in_one_line(tmp_path: Path, args: list[str]) -> None:
    result = imagegen(*args, cwd=tmp_path, env={"OTEL_PROPAGATORS": "tracecontext,b3"})
    assert result.returncode == 2, result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line == (
        "imagegen: error: invalid settings: OTEL_PROPAGATORS"
        f" (no propagator 'b3' is installed; installed: {', '.join(INSTALLED)})"
    )
    assert result.stdout == ""


def test_doctor_reports_it_as_a_failed_check_and_checks_the_rest(tmp_path: Path) -> None:
    result = imagegen("doctor", "--json", cwd=tmp_path, env={"OTEL_PROPAGATORS": "b3"})
    assert result.returncode == 1, result.stderr
    body = json.loads(result.stdout)
    assert body["ok"] is False
    checks = {c["check"]: c for c in body["checks"]}
    assert set(checks) == {"render", "model", "ollama", "storage", "plugins", "ledger", "telemetry"}
    telemetry = checks["telemetry"]
    assert telemetry["status"] == "error"
    assert telemetry["summary"].startswith("OTEL_PROPAGATORS: no propagator 'b3' is installed")
    assert "tracecontext" in telemetry["summary"] and telemetry["next_step"]
    assert checks["render"]["status"] == "ok" and checks["storage"]["status"] == "ok"
    assert "Traceback" not in result.stderr


def test_doctor_has_no_telemetry_row_when_it_can_work(tmp_path: Path) -> None:
    result = imagegen("doctor", "--json", cwd=tmp_path, env={"OTEL_PROPAGATORS": "tracecontext"})
    checks = {c["check"] for c in json.loads(result.stdout)["checks"]}
    assert "telemetry" not in checks, result.stderr
