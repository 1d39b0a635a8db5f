"""What the benchmark scripts' command lines share: counts of at least one, SIGTERM as an exit,
a child process's failure said in one line.

Imports nothing heavy: the OTLP benchmark's children, which time requests, parse with it too.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

__all__ = ["at_least", "count", "exit_on_sigterm", "held_sigterm", "output_of", "run_child"]


def at_least(low: int) -> Callable[[str], int]:
    """An argparse ``type``: a whole number of at least ``low``; below it, a usage error."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, not {value}")
        return value

    return parse


count = at_least(1)
"""Rounds, requests, threads: at least one, or the figures are of nothing (min() of no
rounds, a sample of no request)."""


def exit_on_sigterm() -> None:
    """Make SIGTERM (a timeout, a cancelled CI job) exit as ``SystemExit(143)``.

    Python's default ends the process at once: no ``finally`` runs, so the served functions
    (each in a session of its own, which a signal to this process's group does not reach)
    and the temporary directories outlive it. Raised as an exit in the main thread, the
    context managers unwind: servers are stopped, children killed, directories removed. A
    second SIGTERM while they do does nothing, so the clean-up is not cut short.
    """

    def terminated(signum: int, frame: FrameType | None) -> None:
        # A handler, not SIG_IGN: a process started during the clean-up (`.ci/postgres stop`)
        # must not inherit an ignored SIGTERM across its exec.
        signal.signal(signal.SIGTERM, lambda signum, frame: None)
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminated)


@contextmanager
def held_sigterm() -> Iterator[None]:
    """Hold a SIGTERM that comes inside (:func:`exit_on_sigterm`'s ``SystemExit``), and
    deliver it as the block ends, in the main thread; elsewhere, nothing held.

    For starting a child: a ``SystemExit`` raised while ``Popen`` starts it (after the fork,
    as ``Popen`` waits to hear that the exec went well) leaves nothing holding the child,
    which goes on (the OTLP benchmark's, timing a million requests in a directory removed
    under it; a served function, in a session of its own). Held until the block has kept the
    child where the clean-up finds it, the exit then ends it.
    """
    if threading.current_thread() is not threading.main_thread():  # no handler to set there
        yield
        return
    held: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: held.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
        if held:
            signal.raise_signal(held[0])  # its handler runs here, the child kept


def run_child(command: list[str], **options: Any) -> subprocess.CompletedProcess[str]:
    """``subprocess.run(command, capture_output=True, text=True, **options)``, whose child a
    SIGTERM never leaves running: one while it starts is held until it is
    (:func:`held_sigterm`), one after kills and reaps it."""
    process: subprocess.Popen[str] | None = None
    try:
        with held_sigterm():
            process = subprocess.Popen(
                command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **options
            )
        stdout, stderr = process.communicate()
    except BaseException:
        if process is not None:
            process.kill()
            process.communicate()  # reaped, its pipes closed
        raise
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


TAIL_LINES = 4
"""The lines of a failed child's stderr its one line quotes: a Python exception's line and
what follows it (pydantic's field, message and link), or a shell script's message."""


def output_of(command: list[str], *, what: str) -> str:
    """Run ``command``, returning its stdout.

    Raises:
        SystemExit: it failed; one line with ``what``, its exit status and the last lines of
            its stderr (why it failed: a setting, a missing PostgreSQL), not a
            ``CalledProcessError`` that drops them.
    """
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        tail = [line.strip() for line in done.stderr.splitlines() if line.strip()]
        said = " | ".join(tail[-TAIL_LINES:]) or "nothing on stderr"
        raise SystemExit(f"{what} failed (exit status {done.returncode}): {said}")
    return done.stdout
