"""The command line in an install without the render extra (the CPU functions'
``.[ledger]``): the commands that need it say so in ``generate``'s line, exit 2, and those that
only look work without it.

Each runs in a process of its own in which torch, diffusers, transformers and the Hub client
cannot be imported (None in ``sys.modules``, as the import system reads it): nothing this test
process has imported stands in for them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from imagegen.render._errors import INSTALL_HINT
from tests.conftest import isolated_environ
from tests.functions.servers import free_port

NEEDS_IT = (
    "imagegen: error: rendering needs the render extra (diffusers is not installed): "
    + INSTALL_HINT
    + "\n"
)
HUB_MODEL = "black-forest-labs/FLUX.2-klein-4B"

_WITHOUT_THE_EXTRA = """
import os, sys
for name in ("torch", "diffusers", "transformers", "huggingface_hub"):
    sys.modules[name] = None
def started(*args):
    sys.exit("serve started the server")
os.execv = started
from imagegen.cli import main
main(sys.argv[1:])
"""


def without_the_extra(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _WITHOUT_THE_EXTRA, *args],
        cwd=cwd,
        env={**isolated_environ(cwd), "COLUMNS": "160"},  # wide: the table's "here" shown
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_models_list_prints_the_table(tmp_path: Path) -> None:
    """It failed, an internal error (ModuleNotFoundError: huggingface_hub)."""
    listed = without_the_extra("models", "list", "--json", cwd=tmp_path)
    table = without_the_extra("models", "list", cwd=tmp_path)

    assert listed.returncode == 0, listed.stderr
    here = {row["model"]: row["here"] for row in json.loads(listed.stdout)}
    assert here[HUB_MODEL] == "no render extra"
    assert here["tiny"] == "built offline"
    assert table.returncode == 0, table.stderr
    [row] = [line.split() for line in table.stdout.splitlines() if HUB_MODEL in line]
    assert row[0] == HUB_MODEL and row[-3:] == ["no", "render", "extra"]
    assert table.stderr == ""


@pytest.mark.parametrize("models", [[], ["tiny"], [HUB_MODEL]], ids=["served", "tiny", "hub"])
def test_models_pull_says_what_to_install(tmp_path: Path, models: list[str]) -> None:
    """It failed, an internal error (ModuleNotFoundError: huggingface_hub), exit 1."""
    result = without_the_extra("models", "pull", *models, cwd=tmp_path)

    assert result.returncode == 2, result.stderr
    assert result.stderr == NEEDS_IT
    assert result.stdout == ""


def test_serve_render_is_refused_before_it_starts(tmp_path: Path) -> None:
    """It said where it served, and answered every request a 503 until stopped."""
    result = without_the_extra("serve", "render", "--port", "26012", cwd=tmp_path)

    assert result.returncode == 2, result.stderr
    assert result.stderr == NEEDS_IT
    assert "serving" not in result.stdout + result.stderr


def test_serve_persist_needs_no_render_extra(tmp_path: Path) -> None:
    """The CPU functions are served from such an install: only their start is stubbed here."""
    port = free_port()  # serve checks it can listen there before it starts
    result = without_the_extra("serve", "persist", "--port", str(port), cwd=tmp_path)

    assert result.returncode == 1, result.stderr
    # Where it serves is said by the server once it listens (imagegen.cli._server).
    assert result.stderr == "serve started the server\n"
