"""``imagegen serve``: what the function would refuse as it starts is refused before it
starts, in one line, and it never says it serves."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conftest import ROOT, RunCli
from tests.functions.servers import free_port

# Never bound: each case is refused before serve binds it.
PORT = str(free_port())


@pytest.fixture(autouse=True)
def _never_started(monkeypatch: pytest.MonkeyPatch) -> None:
    """serve replaces this process with the server once its checks pass: a test that got
    that far fails instead."""
    monkeypatch.setattr(os, "execv", lambda *_: pytest.fail("serve started the server"))


@pytest.mark.parametrize("under", [False, True], ids=["a-file", "under-a-file"])
def test_local_storage_the_function_cannot_write_is_refused(
    cli: RunCli, tmp_path: Path, under: bool
) -> None:
    """It said where it served, and every request was answered 503 (storage unusable),
    while ``imagegen generate -o`` refused the same folder at once."""
    file = tmp_path / "afile"
    file.write_text("not a folder")
    root = file / "images" if under else file
    for stage in ("persist", "enhance"):
        result = cli("serve", stage, "--port", PORT, env={"IMAGEGEN_STORAGE_URL": str(root)})
        assert result.returncode == 1, result.stderr
        assert result.stderr == (
            f"imagegen: error: local storage: cannot write to {str(root)!r}: {str(file)!r} is a"
            " file, not a directory\n"
        )
        assert "serving" not in result.stdout + result.stderr


def test_a_functions_folder_without_the_stage_is_refused(cli: RunCli, tmp_path: Path) -> None:
    """functions-framework said it in a page of traceback, after serve said where it served."""
    functions = tmp_path / "functions"
    functions.mkdir()
    (functions / "_adapter.py").write_text((ROOT / "functions" / "_adapter.py").read_text())
    result = cli("serve", "persist", "--port", PORT, env={"IMAGEGEN_FUNCTIONS_DIR": str(functions)})
    assert result.returncode == 2, result.stderr
    assert result.stderr == (
        f"imagegen: error: no persist function: {functions / 'persist.py'} does not exist\n"
    )
    assert "serving" not in result.stdout
