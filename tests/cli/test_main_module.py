"""``python -m imagegen``: the ``imagegen`` command, as ``python -m imagegen.cli`` is."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import isolated_environ


def python(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        env=isolated_environ(cwd),
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_python_m_imagegen_runs_the_command(tmp_path: Path) -> None:
    """It failed: No module named imagegen.__main__."""
    package = python("-m", "imagegen", "models", "list", "--json", cwd=tmp_path)
    command = python("-m", "imagegen.cli", "models", "list", "--json", cwd=tmp_path)

    assert package.returncode == 0, package.stderr
    assert package.stdout == command.stdout
    assert '"model": "tiny"' in package.stdout


def test_python_m_imagegen_says_errors_as_the_command_does(tmp_path: Path) -> None:
    result = python("-m", "imagegen", "no-such-command", cwd=tmp_path)

    assert result.returncode == 2
    assert result.stderr == "imagegen: error: No such command 'no-such-command'.\n"


def test_importing_the_package_runs_no_command(tmp_path: Path) -> None:
    """The package imports nothing until a name is used: its ``__main__`` nor the CLI."""
    code = "import imagegen, sys; print(sorted(m for m in sys.modules if m.startswith('imagegen')))"
    result = python("-c", code, cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    assert result.stdout == "['imagegen']\n"
