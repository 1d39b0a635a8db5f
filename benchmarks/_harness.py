"""What every benchmark shares: interleaved A/B rounds, the printed row, served functions."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Self, TypeVar

import httpx

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python benchmarks/run.py` puts only benchmarks/ on the path
    sys.path.insert(0, str(ROOT))

from _cli import held_sigterm  # noqa: E402

from tests.functions.servers import FunctionServer  # noqa: E402

__all__ = ["ROOT", "Comparison", "Served", "absolute_verdict", "interleave", "rotated", "served"]

T = TypeVar("T")


@dataclass
class Comparison:
    """One row: the project's figure against a baseline measured in the same run.

    ``better`` says which way the ratio (project / baseline) should go: ``"lower"`` for times
    (at most ``target``), ``"higher"`` for speed-ups and rates (at least ``target``). A row
    with no ``target`` only informs: it is neither met nor missed.
    ``statistic`` picks one figure per side: ``"best"`` is the shortest time or the highest
    rate over the rounds (what the machine can do when others leave it alone), ``"median"``
    the median round.
    ``held`` says why the target is not judged in this run (the conditions it needs were not
    there): the row then prints the target and the reason, and counts as having none.
    """

    name: str
    unit: str
    better: Literal["lower", "higher"]
    target: float | None
    baseline: list[float] = field(default_factory=list)
    project: list[float] = field(default_factory=list)
    statistic: Literal["best", "median"] = "best"
    note: str = ""
    held: str = ""

    @property
    def is_rate(self) -> bool:
        """A rate (so many per second): its best round is its maximum; any other, its minimum."""
        return self.unit.endswith("/s")

    def best(self, values: list[float]) -> float:
        """The best round: a rate's maximum, any other figure's minimum."""
        return max(values) if self.is_rate else min(values)

    def pick(self, values: list[float]) -> float:
        if self.statistic == "median":
            return statistics.median(values)
        return self.best(values)

    def ratio(self) -> float:
        if self.better == "higher" and not self.is_rate:
            # A speed-up: the baseline's time over ours.
            return self.pick(self.baseline) / self.pick(self.project)
        return self.pick(self.project) / self.pick(self.baseline)

    @property
    def has_target(self) -> bool:
        """A target judged in this run: one given, and not held back."""
        return self.target is not None and not self.held

    def met(self) -> bool:
        """Against the target as given: it is rounded only where printed."""
        if self.target is None:
            raise ValueError(f"{self.name}: no target to meet")
        if self.held:
            raise ValueError(f"{self.name}: target not judged: {self.held}")
        ratio = self.ratio()
        return ratio <= self.target if self.better == "lower" else ratio >= self.target

    def verdict(self, *, markdown: bool = False) -> str:
        """The target and whether it was met, as the printed line or the table says it."""
        if self.target is None:
            return "no target"
        at_most = self.better == "lower"
        sign = ("≤" if at_most else "≥") if markdown else ("<=" if at_most else ">=")
        if self.held:
            if markdown:
                return f"{sign} {self.target:.3g}x not judged ({self.held})"
            return f"target {sign} {self.target:.3g}x  not judged: {self.held}"
        if markdown:
            return f"{sign} {self.target:.3g}x {'met' if self.met() else '**not met**'}"
        return f"target {sign} {self.target:.3g}x  {'met' if self.met() else 'NOT MET'}"

    def label(self) -> str:
        """Which figure the ratio compares: ``min`` (times), ``max`` (rates) or ``median``."""
        if self.statistic == "median":
            return "median"
        return "max" if self.is_rate else "min"

    def markdown(self) -> str:
        """The row as a line of the summary table that docs/benchmarks.md shows."""

        def both(values: list[float]) -> str:
            return f"{self.best(values):.4g} / {statistics.median(values):.4g} {self.unit}"

        return (
            f"| {self.name} | {both(self.baseline)} | {both(self.project)} | {self.ratio():.2f}x"
            f" ({self.label()}) | {self.verdict(markdown=True)} |"
        )

    def print(self) -> None:
        def summary(values: list[float]) -> str:
            best = f"{'max' if self.is_rate else 'min'} {self.best(values):9.4f}"
            return f"{best} med {statistics.median(values):9.4f} {self.unit}"

        print(f"{self.name}")
        print(f"    baseline  {summary(self.baseline)}")
        print(f"    project   {summary(self.project)}")
        print(
            f"    ratio {self.ratio():6.2f}x ({self.label()} against {self.label()});"
            f" {self.verdict()}{'  ' + self.note if self.note else ''}",
            flush=True,
        )


def interleave(
    rounds: int, baseline: Callable[[], T], project: Callable[[], T]
) -> tuple[list[T], list[T]]:
    """Alternate the two measurements, swapping which goes first each round."""
    ours: list[T] = []
    theirs: list[T] = []
    for i in range(rounds):
        order = [(baseline, theirs), (project, ours)]
        for measure, into in order if i % 2 == 0 else reversed(order):
            into.append(measure())
    return theirs, ours


def rotated(items: list[T], round_: int) -> list[T]:
    """``items`` starting ``round_`` places on: each round another one goes first.

    With more than two arms, rotating (not swapping) also changes which arm runs after which,
    so no arm always follows the same one.
    """
    shift = round_ % len(items) if items else 0
    return items[shift:] + items[:shift]


def absolute_verdict(value: float, target: float, *, at_most: bool, unit: str) -> str:
    """A figure held against a target in its own unit: ``target <= 5 ms  met``."""
    met = value <= target if at_most else value >= target
    return f"target {'<=' if at_most else '>='} {target:g} {unit}  {'met' if met else 'NOT MET'}"


HELLO = ROOT / "benchmarks" / "hello.py"
"""A bare functions-framework function: the floor for start-up and request overhead."""
HELLOS = {"hello": HELLO, "hello_settings": ROOT / "benchmarks" / "hello_settings.py"}
"""The served functions that are not stages: the hello, and the hello that reads a setting."""


class Served(FunctionServer):
    """A function served by functions-framework with ``threads`` request threads.

    ``stage="hello"`` (or another name of :data:`HELLOS`) serves that file instead of a stage.
    """

    def __init__(self, stage: str, env: dict[str, str], *, log_dir: Path, threads: int) -> None:
        super().__init__(stage, env, log_dir=log_dir)
        self.env["THREADS"] = str(threads)

    def start(self, *, wait: bool = True) -> Self:
        # Kept in self.process before a SIGTERM's exit unwinds: stop() then ends it, where it
        # would otherwise serve on in its own session.
        with held_sigterm():
            if self.stage not in HELLOS:
                super().start(wait=False)
            else:
                command = [sys.executable, "-m", "functions_framework", "--target", self.stage]
                command += ["--source", str(HELLOS[self.stage])]
                command += ["--host", "127.0.0.1", "--port", str(self.port)]
                self.process = subprocess.Popen(
                    command,
                    env=self.env,
                    stdout=self.log_path.open("ab"),
                    stderr=subprocess.STDOUT,
                    cwd=ROOT,
                    start_new_session=True,
                )
        if wait and self.stage not in HELLOS:  # a hello is asked for /readyz by its caller
            self.wait("/healthz")
        return self

    @property
    def pid(self) -> int:
        """The served process (gunicorn's arbiter; its worker is a child of it)."""
        assert self.process is not None
        return self.process.pid

    def ready_after(self, timeout: float = 120.0) -> float:
        """Start the process; return the seconds until ``/readyz`` answers 200.

        Raises:
            RuntimeError: the process exited, or ``/readyz`` said its start-up failed (it
                tries again only after a while, and never where a setting is wrong); the
                server's log, which says why, in the message.
            TimeoutError: not ready after ``timeout`` seconds.
        """
        started = time.perf_counter()
        self.start(wait=False)
        deadline = started + timeout
        with httpx.Client(timeout=1.0) as client:
            while time.perf_counter() < deadline:
                assert self.process is not None
                if self.process.poll() is not None:
                    raise RuntimeError(f"{self.stage} exited:\n{self.logs()}")
                try:
                    reply = client.get(self.url + "/readyz")
                except httpx.HTTPError:
                    pass
                else:
                    if reply.status_code == 200:
                        return time.perf_counter() - started
                    if self._start_up_failed(reply):
                        raise RuntimeError(f"{self.stage} start-up failed:\n{self.logs()}")
                time.sleep(0.01)
        raise TimeoutError(f"{self.stage} not ready after {timeout}s:\n{self.logs()}")

    def _start_up_failed(self, reply: httpx.Response) -> bool:
        """Whether ``reply`` is this stage's ``/readyz`` saying its start-up failed."""
        try:
            body = reply.json()
        except ValueError:
            return False
        return (
            isinstance(body, dict)
            and body.get("status") == "start-up failed"
            and body.get("stage") == self.stage
        )


@contextmanager
def served(stage: str, env: dict[str, str], *, log_dir: Path, threads: int = 8) -> Iterator[Served]:
    server = Served(stage, {**os.environ, **env}, log_dir=log_dir, threads=threads)
    try:
        server.ready_after(timeout=600)
        yield server
    finally:
        server.stop()
