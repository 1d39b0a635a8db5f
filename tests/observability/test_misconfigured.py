"""A function whose settings cannot be read still logs JSON lines and counts its refusals."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest

from imagegen.observability import setup_logging
from tests.functions.conftest import base_env
from tests.functions.servers import FunctionServer
from tests.observability.collector import Collector

SECRET = "whsec_never-logged-4f2a"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("broken", "variable"),
    [
        ({"IMAGEGEN_LOG_LEVEL": "verbose"}, "IMAGEGEN_LOG_LEVEL"),
        ({"IMAGEGEN_OLLAMA_TIMEOUT": "abc"}, "IMAGEGEN_OLLAMA_TIMEOUT"),
    ],
)
def test_a_function_that_cannot_read_its_settings_logs_json_and_counts_its_refusals(
    tmp_path: Path, broken: dict[str, str], variable: str
) -> None:
    with Collector() as collector:  # a port the system gives: never one in use
        env = {
            **base_env(tmp_path / "store"),
            **broken,
            "IMAGEGEN_WEBHOOK_SECRETS": SECRET,  # given, though never read
            "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": f"{collector.url}/v1/metrics",
            "OTEL_METRIC_EXPORT_INTERVAL": "100",
        }
        server = FunctionServer("enhance", env, log_dir=tmp_path)
        with server:
            for _ in range(3):
                reply = server.post("/", json={"prompt": "a fox"}, timeout=30)
                assert reply.status_code == 503, reply.text
                assert reply.json()["error"] == "not_configured"
            refused = frozenset(
                {("stage", "enhance"), ("outcome", "failed"), ("reason", "not_configured")}
            )
            deadline = time.monotonic() + 10
            while collector.counts("imagegen.generations").get(refused) != 3:
                assert time.monotonic() < deadline, collector.counts("imagegen.generations")
                time.sleep(0.1)
            # Exported from 0 as the docs say, like any function's: the success series too.
            success = frozenset({("stage", "enhance"), ("outcome", "success")})
            assert collector.counts("imagegen.generations")[success] == 0
        logs = server.logs()
    records = server.log_records()
    said = [r for r in records if r["message"].startswith("start-up failed")]
    assert said, logs
    [line] = said
    assert line["level"] == "ERROR" and line["stage"] == "enhance" and line["time"]
    assert variable in line["message"]
    failed = [r for r in records if r["message"].startswith("request failed")]
    assert len(failed) == 3 and all(r["stage"] == "enhance" for r in failed)
    assert SECRET not in logs


def test_without_settings_the_values_given_to_secret_variables_are_redacted(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("IMAGEGEN_WEBHOOK_SECRETS", f"{SECRET}, whsec_second")
    monkeypatch.setenv("IMAGEGEN_S3_SECRET_ACCESS_KEY", "wJalrXUtnFEMI-K7MDENG")
    monkeypatch.setenv("IMAGEGEN_LOG_LEVEL", "verbose")  # the settings cannot be read
    root = logging.getLogger()
    kept = logging.NullHandler()
    root.handlers = [kept]  # a set-up in place (the suite's restores its own after the test)
    setup_logging(None, "persist")
    assert root.handlers == [kept]  # kept, as logging.basicConfig would
    root.handlers = []  # none, as in a function's process
    setup_logging(None, "persist")
    log = logging.getLogger("imagegen.test")
    log.info("given %s and %s", SECRET, "whsec_second, wJalrXUtnFEMI-K7MDENG")
    log.info("given whsec_second")
    log.debug("below the default level")
    entry, alone = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert alone["message"] == "given ***"  # one of the list's items, on its own
    assert entry["message"].startswith("given ***")
    assert "whsec" not in entry["message"] and "wJalr" not in entry["message"]
    assert entry["level"] == "INFO" and entry["stage"] == "persist"
