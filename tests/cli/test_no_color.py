"""``NO_COLOR`` (https://no-color.org), set and not empty: what imagegen writes to a terminal
carries no ANSI style at all, bold included. Rich's own reading of it drops the colours and
keeps the rest; a pipe gets none either way, so this is seen on a terminal only (a real
pseudo-terminal here)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from tests.conftest import isolated_environ
from tests.test_cli import on_a_terminal, terminal_output


def _on_a_terminal(tmp_path: Path, args: list[str], **env: str) -> str:
    """What ``imagegen ARGS`` shows on a terminal, under ``env`` (NO_COLOR only if there)."""
    environ = {k: v for k, v in isolated_environ(tmp_path).items() if k != "NO_COLOR"}
    environ.update({"TERM": "xterm-256color", "COLUMNS": "100", **env})
    pid, fd = on_a_terminal(tmp_path, args, environ)
    seen = b""
    try:
        for chunk in terminal_output(fd, seconds=120):
            seen += chunk
    finally:
        os.close(fd)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, seen
    return seen.decode(errors="replace")


@pytest.mark.parametrize(
    ("no_color", "styled"),
    [("1", False), ("", True), (None, True)],
    ids=["set", "empty", "unset"],
)
def test_no_color_leaves_every_style_out_on_a_terminal(
    tmp_path: Path, no_color: str | None, styled: bool
) -> None:
    """The history's header was bold (``ESC[1m``) with NO_COLOR set."""
    env = {} if no_color is None else {"NO_COLOR": no_color}
    shown = _on_a_terminal(tmp_path, ["history"], **env)
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", shown)
    assert re.search(r"\bcreated\b.*\bgeneration\b.*\bstatus\b", plain), shown
    assert ("\x1b[" in shown) is styled, shown
