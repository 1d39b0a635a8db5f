"""The command line's application and its error handling, imported by :func:`imagegen.cli.main`.

The commands live by concern (:mod:`imagegen.cli.generate`, :mod:`imagegen.cli.tools`,
:mod:`imagegen.cli.doctor`) and register themselves on :data:`app` as this module imports
them; :func:`run` turns every error into one line.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import sys
from typing import NoReturn, TextIO

import typer

# Importing the command modules registers their commands on ``app``, in this order.
from imagegen.cli import doctor, generate, history, models, tools  # noqa: F401
from imagegen.cli._app import (
    STOPPED,
    CannotWrite,
    _Said,
    app,
    click_exceptions,
    exit_at_once,
    failed_write,
    printable,
    say_stopped,
)
from imagegen.cli.tools import functions_dir as functions_dir
from imagegen.errors import ConfigurationError, ImageGenError, InvalidRequest, first_line

__all__ = ["app", "run"]

# A group given no command shows its help, as click's groups do (and ``imagegen`` itself):
# never a bare "Missing command.".
for _group in app.registered_groups:
    _group.no_args_is_help = True


def run(argv: list[str] | None = None) -> None:
    """Run the command ``argv`` names: errors are one readable line and a non-zero exit,
    never a traceback."""
    _Said.reset()  # an earlier command in this process may have said it was stopped
    if sys.stderr is None:  # started with stderr closed (2>&-): what it says goes nowhere
        sys.stderr = _devnull(2)
    if sys.stdout is None:  # started with stdout closed (>&-): nothing to write the result to
        sys.stdout = _devnull(1)
        _fail("cannot write output: standard output is closed", 1)
    if getattr(sys.stdout, "errors", None) == "strict" and hasattr(sys.stdout, "reconfigure"):
        # A file name's bytes that are no UTF-8 (kept by os.fsdecode) are written as they are,
        # as the C locale's stdout writes them, and the path printed is the file's.
        sys.stdout.reconfigure(errors="surrogateescape")
    try:
        result = app(args=argv, prog_name="imagegen", standalone_mode=False)
        sys.stdout.flush()  # here, not at exit: a failure to write is said as one
    except click_exceptions.UsageError as exc:
        if isinstance(exc, getattr(click_exceptions, "NoArgsIsHelpError", ())):
            exc.show()  # the help, on stderr, and exit 2: what click does without us
            sys.exit(exc.exit_code)
        _fail(exc.format_message(), 2)
    except click_exceptions.ClickException as exc:
        _fail(exc.format_message(), exc.exit_code or 1)
    except typer.Abort:
        _fail("aborted", 130)
    except ConfigurationError as exc:
        _fail(exc.explained(_variable), 2)  # a setting's refusal says its reasons
    except InvalidRequest as exc:
        _fail(exc.explained(), 2)
    except ImageGenError as exc:
        _fail(exc.message, 1)
    except KeyboardInterrupt:
        _stopped(130)
    except CannotWrite as exc:
        _cannot_write(exc.error, exc.done)
    except OSError as exc:
        if exc.errno == errno.EPIPE:  # a pipe closed early (| head): quiet, as click ends it
            _discard(sys.stdout)
            sys.exit(1)
        if not failed_write(exc):
            _internal_error(exc)
        _cannot_write(exc)
    except Exception as exc:  # a bug, or a failure nothing above names: still one line
        _internal_error(exc)
    # typer turns Ctrl-C into Exit(130), returned here without a word; generate's SIGTERM and
    # SIGHUP come back as 143 and 129 alike.
    if result in STOPPED:
        _stopped(result)
    if isinstance(result, int) and result:
        sys.exit(result)


def _stopped(code: int) -> NoReturn:
    """Exit after a signal stopped the command.

    The interpreter then waits for the threads still at work: a render, which stops at its next
    denoising step. Another signal meanwhile ends the process at once, rather than break into
    that wait with a traceback (and torch's threads, still running, torn down with the
    interpreter: an abort); it may have come before, and said the line already.
    """
    exit_at_once(code)
    say_stopped(code, _say)
    sys.exit(code)


def _internal_error(exc: Exception) -> NoReturn:
    """One line for an error no handler above expects; its traceback with ``-v``."""
    said, kind = first_line(exc), type(exc).__name__
    what = kind if said == kind else f"{kind}: {said}"
    if logging.NOTSET < logging.getLogger("imagegen").level <= logging.INFO:  # -v set it so
        import traceback

        traceback.print_exception(exc)
        _fail(f"internal error ({what})", 1)
    _fail(f"internal error ({what}); run with -v for the traceback", 1)


def _cannot_write(error: OSError, done: str = "") -> NoReturn:
    """Exit after writing the output failed: a full disk, a closed descriptor."""
    _discard(sys.stdout)  # what is still buffered, flushed at exit, would fail again
    said = f"cannot write output: {error.strerror or first_line(error)}"
    _fail(f"{said} ({done})" if done else said, 1)


def _variable(field: str) -> str:
    """A setting's field as the variable a person sets; any other name as it is."""
    from imagegen.settings import Settings

    return Settings.variable(field) if field in Settings.model_fields else field


def _fail(message: str, code: int) -> NoReturn:
    _say(message)
    sys.exit(code)


def _say(message: str) -> None:
    try:  # the exit status says it all the same where stderr is closed or full
        sys.stderr.write(f"imagegen: error: {printable(message)}\n")
        sys.stderr.flush()
    except Exception:
        _discard(sys.stderr)


def _discard(stream: object) -> None:
    """Send what is written to ``stream`` from now on (what it still buffers too) nowhere:
    flushed at exit, it would fail again, and the interpreter then exits 120."""
    with contextlib.suppress(Exception):  # not a file (a test's capture), or closed
        fd = stream.fileno()  # type: ignore[attr-defined]
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, fd)
        os.close(devnull)


def _devnull(fd: int) -> TextIO:
    """A text stream on ``fd``, opened on the null device: a descriptor left closed would be
    taken by the next file opened (the ledger's database), and a library writing to it
    would write into that file."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    if devnull != fd:
        os.dup2(devnull, fd)
        os.close(devnull)
    return open(fd, "w", closefd=False)  # the process's, for its whole life
