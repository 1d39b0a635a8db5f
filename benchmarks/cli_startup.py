"""How long a newcomer waits for the command line before it does anything.

    python benchmarks/cli_startup.py [--rounds N]

Each round runs, one after another, ``python -c pass`` (the interpreter alone: the baseline),
``imagegen --help`` (the installed console script, as a user runs it), ``imagegen generate
--help`` and ``python -c "import imagegen"``, each round starting one command further on, so
that none always runs first or always after the same one. Interleaving the rounds puts each
command and the baseline under the same machine load. Prints min and median seconds and
the ratio of medians to the baseline; then the figure the target judges: ``imagegen --help``'s
own time, each round's ``imagegen --help`` less that round's ``python -c pass`` (what the
command line adds to the interpreter's start, whatever the machine's interpreter costs), min
and median, and whether its median meets the target (at most 0.22 s: the 0.25 s a user waits
for ``imagegen --help``, less the 0.03 s an idle machine's interpreter takes to start). Exits 1
when it does not and ``--check`` is given.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _cli import count
from _harness import absolute_verdict, rotated

BASELINE = "python -c pass (baseline)"
TARGET_OWN_S = 0.22
"""The most ``imagegen --help`` may add to the interpreter's start (median over the rounds)."""


def _commands() -> dict[str, list[str]]:
    here = Path(sys.executable).parent
    imagegen = shutil.which("imagegen", path=f"{here}{os.pathsep}{os.environ.get('PATH', '')}")
    if imagegen is None:
        raise SystemExit("the imagegen console script is not installed (pip install -e .)")
    return {
        BASELINE: [sys.executable, "-c", "pass"],
        "imagegen --help": [imagegen, "--help"],
        "imagegen generate --help": [imagegen, "generate", "--help"],
        "python -c 'import imagegen'": [sys.executable, "-c", "import imagegen"],
    }


def _time(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=count, default=15)
    parser.add_argument("--check", action="store_true", help="exit 1 when the target is missed")
    args = parser.parse_args()

    commands = _commands()
    times: dict[str, list[float]] = {name: [] for name in commands}
    for command in commands.values():  # one warm-up each: page cache, .pyc files
        _time(command)
    for round_ in range(args.rounds):
        for name, command in rotated(list(commands.items()), round_):
            times[name].append(_time(command))

    for line in report(times, args.rounds):
        print(line)
    return 0 if own_met(times) or not args.check else 1


def _own(times: dict[str, list[float]]) -> list[float]:
    """``imagegen --help`` less ``python -c pass`` of the same round: the CLI's own time."""
    help_times, base_times = times["imagegen --help"], times[BASELINE]
    return [h - b for h, b in zip(help_times, base_times, strict=True)]


def own_met(times: dict[str, list[float]]) -> bool:
    """Whether the CLI's own time, median over the rounds, meets its target."""
    return statistics.median(_own(times)) <= TARGET_OWN_S


def report(times: dict[str, list[float]], rounds: int) -> list[str]:
    """The printed lines: each command's min and median, then the judged figure."""
    baseline = statistics.median(times[BASELINE])
    lines = [f"{'command':<30} {'min':>8} {'median':>8}  vs baseline ({rounds} rounds, medians)"]
    for name, samples in times.items():
        median = statistics.median(samples)
        lines.append(f"{name:<30} {min(samples):>7.3f}s {median:>7.3f}s  x{median / baseline:.1f}")
    own = _own(times)
    lines.append(
        f"imagegen --help's own time (less python -c pass of the same round) min {min(own):.3f}s"
        f" median {statistics.median(own):.3f}s: judged on the median,"
        f" {absolute_verdict(statistics.median(own), TARGET_OWN_S, at_most=True, unit='s')}"
    )
    return lines


if __name__ == "__main__":
    sys.exit(main())
