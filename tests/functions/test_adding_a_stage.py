"""The worked example of docs/architecture.md, run as written: a stage is one new module.

The section's two code blocks become ``check.py`` in a folder added to the stage package's path
and the functions-framework target beside it; nothing else of the project is touched. A fresh
process (the registry is read once per process) reports what it sees, and this test checks it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow  # a process of its own, which loads PIL and functions-framework

EXAMPLE = Path(__file__).with_name("worked_example.py")


def _example_code() -> tuple[str, str]:
    """The stage module and the function file, as the worked example shows them."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    section = text[text.index("## Worked example") : text.index("## Decisions")]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)
    assert len(blocks) == 2, "the worked example shows the stage module and the function file"
    return blocks[0], blocks[1]


def test_the_worked_example_adds_a_stage_with_one_module(tmp_path: Path) -> None:
    stage_code, function_code = _example_code()
    extra, functions = tmp_path / "stages", tmp_path / "functions"
    extra.mkdir()
    functions.mkdir()
    (extra / "check.py").write_text(stage_code)
    (functions / "check.py").write_text(function_code)
    env = {
        **os.environ,
        "IMAGEGEN_STORAGE_URL": str(tmp_path / "store"),
        "IMAGEGEN_LOG_LEVEL": "WARNING",
        "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path]),
    }
    done = subprocess.run(
        [sys.executable, str(EXAMPLE), str(extra), str(functions), str(tmp_path / "store")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.splitlines()[-1])

    # The registry, and everything derived from it, knows the stage.
    assert "check" in seen["names"]
    assert seen["order"].index("render") < seen["order"].index("check")
    assert seen["event_models"]["dev.orchestr8.imagegen.image.checked"] == "RenderedImage"
    assert "image.checked.json" in seen["schemas"]
    assert "/" in seen["openapi_paths"]
    assert "check" in seen["failed_schema_enum"]
    assert seen["failed_names_check"] == "check" and seen["unknown_stage_refused"] is True
    assert "check" in seen["serve_help"]

    # Served by functions-framework: an event in, the next event out, the same claim check.
    assert seen["ready"]["ready"] is True and seen["ready"]["stage"] == "check"
    assert seen["good"]["status"] == 200
    assert seen["good"]["type"] == "dev.orchestr8.imagegen.image.checked"
    assert seen["good"]["json"] == seen["good_input"]
    assert seen["plain"] == 200
    # A blank image: the event cannot succeed, so the reply is a generation.failed naming check.
    assert seen["blank"]["status"] == 200
    assert seen["blank"]["type"] == "dev.orchestr8.imagegen.generation.failed"
    failed = seen["blank"]["json"]
    assert failed["stage"] == "check" and failed["generation_id"] == "gen-blank"
    assert failed["error"]["code"] == "invalid_request"
    assert failed["error"]["errors"] == [{"field": "key", "message": "every pixel is black"}]
    # An event type the stage does not consume is refused, as by every stage.
    assert seen["unknown_type"] == 400
