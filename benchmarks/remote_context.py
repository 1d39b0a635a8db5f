"""What the remote_context plugin adds to each enhance request.

Runs time_of_day, holiday and art_style in-process, as the enhance stage runs its plugins for
a request, with and without ``remote_context`` reading a JSON object from a loopback endpoint,
in interleaved rounds (the first variant rotates); and, for comparison, the plugin sending
through httpx's own transport (httpcore) instead of aiohttp (docs/adr/0012). Prints min and
median per request and the ratios.

    python benchmarks/remote_context.py [--rounds 6] [--requests 20]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
from _cli import count  # noqa: E402
from _harness import rotated  # noqa: E402

from imagegen.plugins import PluginSet  # noqa: E402
from imagegen.settings import Settings  # noqa: E402
from imagegen_plugins.remote_context import RemoteContextPlugin  # noqa: E402
from tests.plugins.conftest import NOW, JsonEndpoint  # noqa: E402

THREE = ["time_of_day", "holiday", "art_style"]
"""The plugins every variant runs: the only difference between them is ``remote_context``."""


async def measure(rounds: int, requests: int, url: str) -> dict[str, list[float]]:
    plain = PluginSet.from_settings(Settings(plugins=THREE))
    remote = PluginSet.from_settings(Settings(remote_context_url=url, plugins=THREE))
    remote.enable("remote_context")
    settings = Settings(remote_context_url=url, plugins=THREE)
    over_httpcore = PluginSet.from_settings(settings)
    over_httpcore.add(RemoteContextPlugin(settings, transport=httpx.AsyncHTTPTransport()))

    async def run(plugins: PluginSet) -> None:
        contributions = await plugins.run(generation_id="g", seed=1, now=NOW)
        assert "remote_context" in [c.plugin for c in contributions] or plugins is plain

    variants: dict[str, Callable[[], Awaitable[None]]] = {
        "without remote_context": lambda: run(plain),
        "with remote_context": lambda: run(remote),
        "with it over httpcore": lambda: run(over_httpcore),
    }
    for variant in variants.values():  # calendars built, modules imported, client made
        await variant()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for i in range(rounds):
        for name in rotated(list(variants), i):
            started = time.perf_counter()
            for _ in range(requests):
                await variants[name]()
            times[name].append((time.perf_counter() - started) / requests)
    await remote.aclose()
    await over_httpcore.aclose()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=count, default=6)
    parser.add_argument("--requests", type=count, default=20)
    args = parser.parse_args()
    with JsonEndpoint() as endpoint:
        times = asyncio.run(measure(args.rounds, args.requests, endpoint.at("/context")))
    base = times["without remote_context"]
    for name, values in times.items():
        ratio_min = min(values) / min(base)
        ratio_median = statistics.median(values) / statistics.median(base)
        print(
            f"{name:28s} min {min(values) * 1e3:7.2f} ms  median"
            f" {statistics.median(values) * 1e3:7.2f} ms  vs without: {ratio_min:6.2f}x (min),"
            f" {ratio_median:6.2f}x (median)"
        )


if __name__ == "__main__":
    main()
