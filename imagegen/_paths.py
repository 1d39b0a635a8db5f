"""Paths as people write them: ``~`` expanded, or said why it cannot be."""

from __future__ import annotations

from pathlib import Path

__all__ = ["NO_HOME", "NoHome", "expanded"]

NO_HOME = "~ names no home directory this process can find"


class NoHome(ValueError):
    """A ``~`` that names no home this process can find: an unknown ``~user``, or a user with
    no passwd entry and no ``HOME``, as in many containers (pathlib raises RuntimeError)."""


def expanded(path: str | Path) -> Path:
    """``path`` with a leading ``~`` or ``~user`` expanded.

    Raises:
        NoHome: saying :data:`NO_HOME`.
    """
    try:
        return Path(path).expanduser()
    except RuntimeError:  # pathlib's "Could not determine home directory."
        raise NoHome(NO_HOME) from None
