"""The ``rate`` row: requests/s of enhance and persist at concurrency 8 against a hello's."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
from _harness import Comparison, interleave, served
from _workload import NOW, render_job, served_env


def _rate(url: str, bodies: list[dict[str, Any]], concurrency: int) -> float:
    async def run() -> float:
        queue = list(bodies)
        async with httpx.AsyncClient(timeout=60) as client:

            async def worker() -> None:
                while queue:
                    body = queue.pop()
                    (await client.post(url, json=body)).raise_for_status()

            started = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            return len(bodies) / (time.perf_counter() - started)

    return asyncio.run(run())


def _stored_images(storage: Path, count: int) -> list[dict[str, Any]]:
    """``count`` rendered images for persist: one tiny render, stored under ``count`` ids."""
    from imagegen import ImageGenService, Settings
    from imagegen.models import EnhancedPrompt
    from imagegen.storage.base import GenerationKeys

    async def run() -> list[dict[str, Any]]:
        settings = Settings(model="tiny", device="cpu", storage_url=str(storage))
        images = []
        async with ImageGenService(settings, preload=["tiny"]) as service:
            source = await service.render(EnhancedPrompt(**render_job("source")))
            png = await service.storage.get(source.key)
            for i in range(count):
                gid = f"p-{i:05d}-{uuid.uuid4().hex[:6]}"
                key = GenerationKeys(gid, NOW).image
                stored = await service.storage.put(key, png, content_type="image/png")
                job = source.prompt.model_copy(update={"generation_id": gid})
                image = source.model_copy(
                    update={
                        "generation_id": gid,
                        "key": key,
                        "location": stored.location,
                        "prompt": job,
                    }
                )
                images.append(image.model_dump(mode="json"))
        return images

    return asyncio.run(run())


def rate(rounds: int, tmp: Path, requests: int, concurrency: int = 8) -> list[Comparison]:
    from tests.fakes.ollama_server import FakeOllama

    fake = FakeOllama().start()
    rows = []
    targets = {"enhance": 3 * 89 / 1160, "persist": 3 * 59 / 1160}
    try:
        env = served_env(tmp / "rate", IMAGEGEN_OLLAMA_HOST=fake.url)
        images = _stored_images(tmp / "rate", requests * rounds)
        with (
            served("hello", env, log_dir=tmp, threads=concurrency + 4) as hello,
            served("enhance", env, log_dir=tmp, threads=concurrency + 4) as enhance,
            served("persist", env, log_dir=tmp, threads=concurrency + 4) as persist,
        ):
            hello_bodies = [{"n": i} for i in range(requests)]
            _rate(hello.url, hello_bodies, concurrency)  # warm
            for stage, server in (("enhance", enhance), ("persist", persist)):
                batches = iter(
                    [images[i * requests : (i + 1) * requests] for i in range(rounds)]
                    if stage == "persist"
                    else [
                        [{"prompt": f"a fox {uuid.uuid4().hex[:8]}", "model": "tiny"}] * requests
                        for _ in range(rounds)
                    ]
                )
                baseline, project = interleave(
                    rounds,
                    lambda: _rate(hello.url, hello_bodies, concurrency),
                    lambda s=server, b=batches: _rate(s.url, next(b), concurrency),
                )
                rows.append(
                    Comparison(
                        f"rate: {stage} at concurrency {concurrency} vs a hello at {concurrency}",
                        "req/s",
                        "higher",
                        round(targets[stage], 3),
                        baseline,
                        project,
                        note="(target: 3x the rate before, as a share of the hello's)",
                    )
                )
    finally:
        fake.stop()
    return rows
