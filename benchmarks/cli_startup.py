"""How long a newcomer waits for the command line before it does anything.

    python benchmarks/cli_startup.py [--rounds N]

Each round runs, one after another, ``python -c pass`` (the interpreter alone: the baseline),
``imagegen --help`` (the installed console script, as a user runs it), ``imagegen generate
--help`` and ``python -c "import imagegen"``, each round starting one command further on, so
that none always runs first or always after the same one. Interleaving the rounds puts each
command and the baseline under the same machine load. Prints min and median seconds and
the ratio of medians to the baseline, and whether ``imagegen --help`` meets its target
(0.25 s, median). Exits 1 when it does not and ``--check`` is given.
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

TARGET_HELP_S = 0.25


def _commands() -> dict[str, list[str]]:
    here = Path(sys.executable).parent
    imagegen = shutil.which("imagegen", path=f"{here}{os.pathsep}{os.environ.get('PATH', '')}")
    if imagegen is None:
        raise SystemExit("the imagegen console script is not installed (pip install -e .)")
    return {
        "python -c pass (baseline)": [sys.executable, "-c", "pass"],
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
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--check", action="store_true", help="exit 1 when the target is missed")
    args = parser.parse_args()

    commands = _commands()
    times: dict[str, list[float]] = {name: [] for name in commands}
    for command in commands.values():  # one warm-up each: page cache, .pyc files
        _time(command)
    order = list(commands.items())
    for round_ in range(args.rounds):
        shift = round_ % len(order)
        for name, command in order[shift:] + order[:shift]:
            times[name].append(_time(command))

    baseline = statistics.median(times["python -c pass (baseline)"])
    print(f"{'command':<30} {'min':>8} {'median':>8}  vs baseline ({args.rounds} rounds)")
    for name, samples in times.items():
        median = statistics.median(samples)
        print(f"{name:<30} {min(samples):>7.3f}s {median:>7.3f}s  x{median / baseline:.1f}")
    help_times, base_times = times["imagegen --help"], times["python -c pass (baseline)"]
    help_median = statistics.median(help_times)
    # The CLI's own share, round by round: what is left after the interpreter's start.
    own = statistics.median(h - b for h, b in zip(help_times, base_times, strict=True))
    met = help_median <= TARGET_HELP_S
    verdict = "met" if met else "MISSED"
    print(
        f"imagegen --help median {help_median:.3f}s (the CLI's own share {own:.3f}s): "
        f"target {TARGET_HELP_S}s {verdict}"
    )
    return 0 if met or not args.check else 1


if __name__ == "__main__":
    sys.exit(main())
