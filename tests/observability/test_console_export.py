"""The console exporters write to stderr: a command's output on stdout stays its own."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import isolated_environ

SMALL = ["--model", "tiny", "--width", "256", "--height", "256", "--steps", "2"]


@pytest.mark.slow
def test_generate_json_stays_json_with_the_console_exporters(tmp_path: Path) -> None:
    env = {
        **isolated_environ(tmp_path),
        "OTEL_TRACES_EXPORTER": "console",
        "OTEL_METRICS_EXPORTER": "console",
    }
    # A process of its own: the exporters are made, and write, as a user's command's do.
    command = [sys.executable, "-m", "imagegen.cli", "generate", "a fox", "--no-enhance"]
    result = subprocess.run(
        [*command, "--json", *SMALL],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)  # the JSON object, and nothing else
    generation_id = printed["image"]["generation_id"]
    # The spans and metrics went to stderr, the generation's among them.
    assert '"name": "imagegen.render"' in result.stderr
    assert f'"imagegen.generation_id": "{generation_id}"' in result.stderr
    assert '"name": "imagegen.stage.duration"' in result.stderr
