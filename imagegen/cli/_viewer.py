"""Opening a finished image in the platform's default viewer (``generate --open``)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Mapping

__all__ = ["open_in_viewer", "viewer_command"]


def viewer_command(
    target: str, *, platform: str = sys.platform, environ: Mapping[str, str] = os.environ
) -> list[str] | str:
    """The command that shows ``target`` (a path or URL), or why there is none.

    macOS has ``open``; Linux and the BSDs have freedesktop's ``xdg-open``, which needs a
    graphical session (``DISPLAY`` for X11, ``WAYLAND_DISPLAY`` for Wayland). Windows is
    handled by :func:`open_in_viewer` itself (``os.startfile``).

    Returns:
        The argv to run, or a sentence saying why nothing can be shown here.
    """
    if platform == "darwin":
        return ["open", target]
    if not (environ.get("DISPLAY") or environ.get("WAYLAND_DISPLAY")):
        return "no display here (neither DISPLAY nor WAYLAND_DISPLAY is set)"
    opener = shutil.which("xdg-open", path=environ.get("PATH"))
    if opener is None:
        return "xdg-open is not installed (package xdg-utils)"
    return [opener, target]


def open_in_viewer(target: str) -> str | None:
    """Show ``target`` without waiting for the viewer; None when started, else why not."""
    if sys.platform == "win32":  # pragma: no cover - exercised on Windows only
        os.startfile(target)  # type: ignore[attr-defined]  # noqa: S606
        return None
    command = viewer_command(target)
    if isinstance(command, str):
        return command
    try:
        # Detached and silent: the viewer outlives this command and its chatter is not ours.
        subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
    except OSError as exc:
        return f"{command[0]} could not start: {exc.strerror or exc}"
    return None
