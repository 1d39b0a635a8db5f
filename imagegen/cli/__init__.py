"""The ``imagegen`` command line: the whole chain on a laptop, and tools for the functions.

The commands live by concern (:mod:`imagegen.cli.generate`, :mod:`imagegen.cli.tools`,
:mod:`imagegen.cli.doctor`) and
register themselves on :data:`app`; :func:`main` turns every error into one line.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
from typing import NoReturn

import typer

# Importing the command modules registers their commands on ``app``, in this order.
from imagegen.cli import doctor, generate, history, models, tools  # noqa: F401
from imagegen.cli._app import app
from imagegen.cli.tools import functions_dir as functions_dir
from imagegen.errors import ConfigurationError, ImageGenError, InvalidRequest, first_line

try:  # recent typer releases carry their own copy of click
    from typer._click import exceptions as click_exceptions
except ImportError:  # pragma: no cover - older typer uses click itself
    from click import exceptions as click_exceptions  # type: ignore[no-redef]

__all__ = ["app", "main"]

# A group given no command shows its help, as click's groups do (and ``imagegen`` itself):
# never a bare "Missing command.".
for _group in app.registered_groups:
    _group.no_args_is_help = True


def main(argv: list[str] | None = None) -> None:
    """Entry point: errors are one readable line and a non-zero exit, never a traceback."""
    try:
        result = app(args=argv, prog_name="imagegen", standalone_mode=False)
    except click_exceptions.UsageError as exc:
        if isinstance(exc, getattr(click_exceptions, "NoArgsIsHelpError", ())):
            exc.show()  # the help, on stderr, and exit 2: what click does without us
            sys.exit(exc.exit_code)
        _fail(exc.format_message(), 2)
    except click_exceptions.ClickException as exc:
        _fail(exc.format_message(), exc.exit_code or 1)
    except typer.Abort:
        _fail("aborted", 130)
    except (InvalidRequest, ConfigurationError) as exc:
        _fail(exc.explained(), 2)  # a setting's refusal says its reasons
    except ImageGenError as exc:
        _fail(exc.message, 1)
    except KeyboardInterrupt:
        _stopped(130)
    except Exception as exc:  # a bug, or a failure nothing above names: still one line
        _internal_error(exc)
    # typer turns Ctrl-C into Exit(130), returned here without a word; generate's SIGTERM and
    # SIGHUP come back as 143 and 129 alike.
    if result in _STOPPED:
        _stopped(result)
    if isinstance(result, int) and result:
        sys.exit(result)


_STOPPED = {130: "interrupted", 143: "terminated", 129: "hung up"}
"""The exit status of a command a signal stopped (128 + its number: SIGINT, SIGTERM, SIGHUP)
and what is said of it."""


def _stopped(code: int) -> NoReturn:
    """Exit after a signal stopped the command.

    The interpreter then waits for the threads still at work: a render, which stops at its next
    denoising step. Another signal meanwhile ends the process at once, rather than break into
    that wait with a traceback (and torch's threads, still running, torn down with the
    interpreter: an abort).
    """

    def now(signum: int, frame: object) -> None:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)

    for name in ("SIGINT", "SIGTERM", "SIGHUP"):
        signum = getattr(signal, name, None)  # Windows has no SIGHUP
        if signum is not None:
            signal.signal(signum, now)
    _fail(_STOPPED[code], code)


def _internal_error(exc: Exception) -> NoReturn:
    """One line for an error no handler above expects; its traceback with ``-v``."""
    said, kind = first_line(exc), type(exc).__name__
    what = kind if said == kind else f"{kind}: {said}"
    if logging.NOTSET < logging.getLogger("imagegen").level <= logging.INFO:  # -v set it so
        import traceback

        traceback.print_exception(exc)
        _fail(f"internal error ({what})", 1)
    _fail(f"internal error ({what}); run with -v for the traceback", 1)


def _fail(message: str, code: int) -> NoReturn:
    sys.stderr.write(f"imagegen: error: {message}\n")
    sys.exit(code)
