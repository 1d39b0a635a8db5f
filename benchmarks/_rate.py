"""The ``rate`` row: requests/s of enhance and persist at concurrency 8 against a hello's."""

from __future__ import annotations

import asyncio
import contextlib
import os
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


def _cpu_seconds(pid: int) -> float:
    """CPU seconds of process ``pid`` and its children (gunicorn's worker), every thread's.

    ``utime`` and ``stime`` of each process's ``/proc/PID/stat`` (proc(5)): the whole thread
    group's, threads that have ended included, in clock ticks (10 ms where ``CLK_TCK`` is 100:
    about a tenth of a hello's hundred requests, a hundredth of a stage's).
    """
    pids = [pid]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError):  # gone meanwhile
                stat = Path(f"/proc/{entry.name}/stat").read_text().rsplit(")", 1)[1].split()
                if int(stat[1]) == pid:  # the parent's id: proc(5)
                    pids.append(int(entry.name))
    ticks = 0
    for each in pids:
        with contextlib.suppress(OSError, IndexError):  # a child that ended meanwhile
            # After the name: state, ppid, ... utime and stime are fields 14 and 15 of proc(5).
            stat = Path(f"/proc/{each}/stat").read_text().rsplit(")", 1)[1].split()
            ticks += int(stat[11]) + int(stat[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def _measured(
    url: str, pid: int, bodies: list[dict[str, Any]], concurrency: int
) -> tuple[float, float]:
    """(requests/s, the server's CPU milliseconds per request) over ``bodies``."""
    before = _cpu_seconds(pid)
    per_second = _rate(url, bodies, concurrency)
    return per_second, (_cpu_seconds(pid) - before) * 1000 / len(bodies)


def _stored_images(storage: Path, count: int) -> list[dict[str, Any]]:
    """``count`` rendered images for persist: one tiny render, stored under ``count`` ids."""
    from imagegen import ImageGenService, Settings
    from imagegen.models import EnhancedPrompt
    from imagegen.render import stored_png
    from imagegen.storage.base import GenerationKeys

    async def run() -> list[dict[str, Any]]:
        settings = Settings(model="tiny", device="cpu", storage_url=str(storage))
        images = []
        async with ImageGenService(settings, preload=["tiny"]) as service:
            source = await service.render(EnhancedPrompt(**render_job("source")))
            png = await service.storage.get(source.key)
            assert source.rendered_at is not None
            for i in range(count):
                gid = f"p-{i:05d}-{uuid.uuid4().hex[:6]}"
                key = GenerationKeys(gid, NOW).image
                job = source.prompt.model_copy(update={"generation_id": gid})
                # Stored as render stores it: persist checks the event against this metadata.
                meta = stored_png.metadata(
                    job,
                    source.sha256,
                    stored_png.fingerprint(job),
                    source.timings,
                    source.rendered_at,
                )
                stored = await service.storage.put(
                    key, png, content_type="image/png", metadata=meta
                )
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
                    lambda: _measured(hello.url, hello.pid, hello_bodies, concurrency),
                    lambda s=server, b=batches: _measured(s.url, s.pid, next(b), concurrency),
                )
                rows.append(
                    Comparison(
                        f"rate: {stage} at concurrency {concurrency} vs a hello at {concurrency}",
                        "req/s",
                        "higher",
                        targets[stage],
                        [per_second for per_second, _ in baseline],
                        [per_second for per_second, _ in project],
                        note="(target: 3x the rate before, as a share of the hello's)",
                    )
                )
                # The server's own CPU time per request: steadier than a rate on a shared
                # machine, where the client and other processes take the cores by turns.
                rows.append(
                    Comparison(
                        f"CPU per request: {stage} vs a hello, both at concurrency {concurrency}",
                        "ms",
                        "lower",
                        None,
                        [cpu for _, cpu in baseline],
                        [cpu for _, cpu in project],
                    )
                )
    finally:
        fake.stop()
    return rows
