"""The ``imagegen`` command line: the whole chain on a laptop, and tools for the functions.

The ``imagegen`` script and ``python -m imagegen.cli`` start at :func:`main`. This module
imports nothing else: the commands (typer, click, the command modules, in
:mod:`imagegen.cli._main`) are imported by :func:`main`, where a Ctrl-C that comes while they
load is said as one line, as it is once they have.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:
    from imagegen.cli._main import app as app
    from imagegen.cli.tools import functions_dir as functions_dir

__all__ = ["app", "main"]


def main(argv: list[str] | None = None) -> None:
    """Entry point: errors are one readable line and a non-zero exit, never a traceback."""
    try:
        from imagegen.cli._main import run
    except KeyboardInterrupt:
        _interrupted()
    run(argv)


def _interrupted() -> NoReturn:
    """Exit as a command Ctrl-C stopped does (:func:`imagegen.cli._main.run`): one line, 130."""
    # With stderr closed (2>&-) or full, the exit status says it all the same.
    with contextlib.suppress(Exception):
        sys.stderr.write(_INTERRUPTED)
        sys.stderr.flush()
    sys.exit(130)


_INTERRUPTED = "imagegen: error: interrupted\n"
"""What a command Ctrl-C stopped says (exit 130), before it has loaded as after."""


def _no_color() -> bool:
    """Whether ``NO_COLOR`` is set, not empty (https://no-color.org): then what imagegen
    writes, and the libraries it runs, carries no colour or other style."""
    return bool(os.environ.get("NO_COLOR"))


# The application and a helper, for code that imports them from here; loaded on first use
# (PEP 562), as the package ``imagegen`` loads its names.
_LAZY = {"app": "imagegen.cli._main", "functions_dir": "imagegen.cli.tools"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'imagegen.cli' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value
