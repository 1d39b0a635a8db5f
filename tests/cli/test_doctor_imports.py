"""``imagegen doctor`` imports torch and diffusers for its render row: a Ctrl-C while it does
stops it as any command, and an install that is there but does not import is said to be
broken, not missing. Each in a fresh process, where those imports happen."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import isolated_environ

_INTERRUPTED_AT_IMPORT = """
import os, signal, sys

# As a terminal's foreground job: Python's own SIGINT handler, even where the tests run in a
# background job, which starts its processes ignoring SIGINT.
signal.signal(signal.SIGINT, signal.default_int_handler)
module, fired = sys.argv[1], []


def interrupt(event, args):
    # A Ctrl-C the moment ``module`` begins to be imported, wherever that is.
    if event == "import" and args[0] == module and not fired:
        fired.append(True)
        open(os.environ["FIRED"], "w").close()  # the interrupt came where it is meant to
        signal.raise_signal(signal.SIGINT)


sys.addaudithook(interrupt)
from imagegen.cli import main

main(sys.argv[2:])
"""


@pytest.mark.slow
@pytest.mark.parametrize("module", ["numpy", "torch"])
def test_ctrl_c_while_doctor_imports_torch_is_one_line_and_130(tmp_path: Path, module: str) -> None:
    """numpy is first imported by torch's C start-up, which went on past the interrupt: doctor
    printed every row and exited 0 (or failed on a later import, or aborted)."""
    fired = tmp_path / "fired"
    result = subprocess.run(
        [sys.executable, "-c", _INTERRUPTED_AT_IMPORT, module, "doctor"],
        cwd=tmp_path,
        env={**isolated_environ(tmp_path), "FIRED": str(fired)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert fired.exists(), f"{module} was imported before doctor began, or never"
    assert (result.returncode, result.stderr) == (130, "imagegen: error: interrupted\n")
    assert result.stdout == ""


def test_a_render_extra_that_does_not_import_is_broken_not_missing(tmp_path: Path) -> None:
    """It said "torch is not installed: this install enhances and persists only", a warning,
    of an installed torch whose import failed."""
    broken = tmp_path / "broken" / "torch"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text(
        'raise ImportError("libtorch_cpu.so: cannot open shared object file")\n'
    )
    result = subprocess.run(
        [sys.executable, "-m", "imagegen.cli", "doctor", "--json"],
        cwd=tmp_path,
        env={**isolated_environ(tmp_path), "PYTHONPATH": str(broken.parent)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1, result.stderr
    rows = {row["check"]: row for row in json.loads(result.stdout)["checks"]}
    assert rows["render"] == {
        "check": "render",
        "status": "error",
        "summary": "The render extra is installed but does not import: libtorch_cpu.so: cannot"
        " open shared object file.",
        "next_step": "Reinstall the package it names (pip install --force-reinstall PACKAGE).",
    }
    assert "model" not in rows  # nothing to load it with
