"""Benchmarks: each prints our time against a baseline measured in the same run, as a ratio.

    python benchmarks/run.py [--repeat N]

- warm model: render with the model loaded once at start-up (what the render function does)
  against loading the pipeline for every request (what a naive handler does).
- redelivery: a redelivered ``prompt.enhanced`` answered from storage against rendering again.
- claim check: the ``image.rendered`` event against the same event carrying the PNG inline.

Uses the offline ``tiny`` model on the CPU; absolute numbers mean little, ratios are the point.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

from imagegen import GenerationRequest, ImageGenService, Settings
from imagegen.render.diffusers_backend import DiffusersBackend

NOW = datetime(2026, 11, 24, 12, tzinfo=UTC)


async def _median(fn: Callable[[int], Awaitable[object]], repeat: int) -> float:
    times = []
    for i in range(repeat):
        started = time.perf_counter()
        await fn(i)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _row(name: str, baseline: float, ours: float, unit: str = "s") -> None:
    ratio = baseline / ours
    print(f"{name:<34} baseline {baseline:>10.4f} {unit}  ours {ours:>10.4f} {unit}  x{ratio:,.1f}")


async def main(repeat: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(
            model="tiny",
            storage_url=str(Path(tmp) / "out"),
            ollama_host="http://127.0.0.1:9",
            ollama_retries=0,
        )
        async with ImageGenService(settings, preload=["tiny"]) as service:
            jobs = [
                await service.enhance(
                    GenerationRequest(
                        prompt=f"a lantern {i}", width=256, height=256, model="tiny", enhance=False
                    ),
                    now=NOW,
                )
                for i in range(repeat)
            ]

            # 1. Warm model against a load per request.
            async def naive(i: int) -> None:
                backend = DiffusersBackend(settings)
                await asyncio.to_thread(backend.load, "tiny")
                await asyncio.to_thread(backend.render, jobs[i])
                backend.close()

            async def warm(i: int) -> None:
                await service.render_png(jobs[i])

            _row(
                "render, warm model vs load each",
                await _median(naive, repeat),
                await _median(warm, repeat),
            )

            # 2. Redelivery answered from storage against rendering again.
            rendered = [await service.render(job) for job in jobs]

            async def again(i: int) -> None:
                await service.render_png(jobs[i])

            async def redelivered(i: int) -> None:
                await service.render(jobs[i])

            _row(
                "redelivered render vs re-render",
                await _median(again, repeat),
                await _median(redelivered, repeat),
            )

            # 3. Claim check: event size with a reference against the bytes inline.
            event = rendered[0].model_dump_json().encode()
            png = (Path(tmp) / "out" / rendered[0].key).read_bytes()
            inline = json.dumps(
                {**json.loads(event), "png": base64.b64encode(png).decode()}
            ).encode()
            _row("image.rendered event size", len(inline), len(event), unit="B")
            note = "(a 1024x1024 FLUX PNG is ~1.5 MB: inline, it would pass the 64 KiB event limit)"
            print(f"{'':<34} {note}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    asyncio.run(main(parser.parse_args().repeat))
