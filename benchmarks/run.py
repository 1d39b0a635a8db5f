"""Benchmarks of the throughput goals: each row against a baseline measured in the same run.

    python benchmarks/run.py [--rounds N] [--only ROW ...] [--quick]

Rows (``--only`` takes their keys):

- ``burst``: 64 render requests at once, the client honouring ``Retry-After``, against the same
  64 one at a time; unbatched (target >= 0.95x) and batched 8 at a time (>= 1.8x).
- ``ceiling``: the pipeline called with 8 prompts against 8 calls of one (the most batching
  can give on this machine; no target).
- ``ollama-down``: enhance's median latency with Ollama refusing connections (default
  retries, circuit breaker) against an Ollama that answers at once (<= 1.2x); its mean and 95th
  percentile, and the same three with Ollama accepting connections and never answering (1 s
  ``ollama_timeout``), one at a time and 8 at once to the served function (no targets).
- ``startup``: enhance and persist, process start to ``/readyz``, against a bare
  functions-framework hello (<= 1.3x); from the same starts, process start to the first reply
  (sent as soon as ``/readyz`` answers) against the hello's, and the first reply 1 s after
  ``/readyz`` (the background warm-up done) against the next reply (no targets); and the floor,
  a hello that reads one setting with pydantic-settings, against the bare hello (no target).
- ``overhead``: one render over HTTP against the pipeline's own ``__call__`` (<= 1.10x, min),
  with the library's default PNG settings and with the prod overlay's; min and median over
  every call of every round, not over rounds.
- ``rate``: requests/s of enhance (instant Ollama) and persist at concurrency 8, against a
  hello at 8; the target is 3x their rate before this work (89 and 59 req/s against a hello's
  1,160), as a fraction of the hello's, judged only where other processes took at most 10 % of
  the machine's CPU in every round (under load the hello's rate falls more than a stage's). And
  the server's CPU time per request in the same rounds (no target).
- ``first-image``: a fresh process's wait for the first prompt and the loaded model, loading
  while the prompt is written against enhancing, then loading; with Ollama down (default
  retries: the offline ``imagegen generate``) and with an Ollama taking 2 s (no target).
- ``png``: a 1024² image's PNG in parts on up to 4 threads, each strategy, against Pillow's
  encoder at the default strategy (no target; file sizes in the note).

Everything uses the offline ``tiny`` model on the CPU. Rounds interleave baseline and project
(the first of each round alternates); each row prints min and median of both and the ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from _cli import count, exit_on_sigterm, output_of
from _harness import Comparison, Served, interleave, rotated, served
from _ollama_down import ollama_down
from _png import png
from _rate import rate
from _startup import startup
from _workload import SIZE, STEPS, render_job, served_env, set_torch_threads, torch_threads

# -- burst -------------------------------------------------------------------------------------


async def _post_honouring_retry_after(
    client: httpx.AsyncClient, url: str, body: dict[str, Any], refused: list[int]
) -> None:
    while True:
        response = await client.post(url, json=body)
        if response.status_code != 429:
            response.raise_for_status()
            return
        refused.append(int(response.headers["Retry-After"]))
        await asyncio.sleep(float(response.headers["Retry-After"]))


def _burst(url: str, count: int, *, at_once: bool, refused: list[int]) -> float:
    async def run() -> float:
        prefix = uuid.uuid4().hex[:8]
        limits = httpx.Limits(max_connections=count)
        async with httpx.AsyncClient(timeout=600, limits=limits) as client:
            bodies = [render_job(f"b-{prefix}-{i}", f"a lantern {i}") for i in range(count)]
            started = time.perf_counter()
            if at_once:
                await asyncio.gather(
                    *(_post_honouring_retry_after(client, url, b, refused) for b in bodies)
                )
            else:
                for body in bodies:
                    await _post_honouring_retry_after(client, url, body, refused)
            return time.perf_counter() - started

    return asyncio.run(run())


def burst(rounds: int, tmp: Path, count: int) -> list[Comparison]:
    rows = []
    for label, batch, target in (("unbatched", "1", 0.95), ("batched x8", "8", 1.8)):
        env = served_env(tmp / f"burst-{batch}", IMAGEGEN_RENDER_BATCH_SIZE=batch)
        with served("render", env, log_dir=tmp, threads=count + 8) as render:
            # One request first, as after any start: the pod has timed a render.
            _burst(render.url, 1, at_once=False, refused=[])
            refused: list[int] = []
            baseline, project = interleave(
                rounds,
                lambda url=render.url: _burst(url, count, at_once=False, refused=[]),
                lambda url=render.url, r=refused: _burst(url, count, at_once=True, refused=r),
            )
        note = f"429s: {len(refused)}" + (
            f", Retry-After {sorted(set(refused))}" if refused else ""
        )
        rows.append(
            Comparison(
                f"burst: {count} renders at once vs one at a time, {label}",
                "s",
                "higher",
                target,
                baseline,
                project,
                note=note,
            )
        )
    return rows


# -- ceiling -----------------------------------------------------------------------------------


def ceiling(rounds: int, k: int = 8) -> list[Comparison]:
    import torch

    from imagegen.render.tiny import build_tiny_flux_pipeline

    torch.set_num_threads(torch_threads())
    pipe = build_tiny_flux_pipeline()
    pipe.set_progress_bar_config(disable=True)
    prompts = [f"a lantern {i}" for i in range(k)]

    def call(prompt: str | list[str]) -> None:
        n = len(prompt) if isinstance(prompt, list) else 1
        generators = [torch.Generator().manual_seed(i) for i in range(n)]
        pipe(
            prompt=prompt,
            max_sequence_length=256,
            width=SIZE,
            height=SIZE,
            num_inference_steps=STEPS,
            generator=generators if n > 1 else generators[0],
        )

    def one_by_one() -> float:
        started = time.perf_counter()
        for prompt in prompts:
            call(prompt)
        return time.perf_counter() - started

    def together() -> float:
        started = time.perf_counter()
        call(prompts)
        return time.perf_counter() - started

    call(prompts[0])  # first-call initialisation out of the way
    baseline, project = interleave(rounds, one_by_one, together)
    return [
        Comparison(
            f"ceiling: pipe(prompt=[{k} prompts]) vs {k} calls",
            "s",
            "higher",
            None,
            baseline,
            project,
            note="(what batching can give here)",
        )
    ]


# -- first-image -------------------------------------------------------------------------------


def first_image(rounds: int, tmp: Path) -> list[Comparison]:
    import sys

    from tests.fakes.ollama_server import FakeOllama, reply
    from tests.functions.servers import free_port

    script = Path(__file__).with_name("_first_image.py")

    def wait(mode: str, ollama: str) -> float:
        storage = tmp / f"first-{uuid.uuid4().hex[:8]}"
        command = [sys.executable, str(script), mode, str(storage), ollama]
        return float(output_of(command, what=f"first image, {mode}").split()[-1])

    rows = []
    # A local LLM writing a prompt takes seconds, in a process of its own; 2 s here.
    writer = FakeOllama().start()
    writer.answer(reply(delay=2.0))
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens: connection refused
    try:
        for label, ollama in (("Ollama down", down), ("Ollama answering in 2 s", writer.url)):
            baseline, project = interleave(
                rounds,
                lambda o=ollama: wait("sequential", o),
                lambda o=ollama: wait("overlapped", o),
            )
            rows.append(
                Comparison(
                    f"first image: prompt and model, loaded while enhancing vs after it, {label}",
                    "s",
                    "lower",
                    None,
                    baseline,
                    project,
                )
            )
    finally:
        writer.stop()
    return rows


# -- overhead ----------------------------------------------------------------------------------


def overhead(rounds: int, tmp: Path, per_round: int) -> list[Comparison]:
    import torch

    from imagegen.render.tiny import build_tiny_flux_pipeline

    torch.set_num_threads(torch_threads())
    pipe = build_tiny_flux_pipeline()
    pipe.set_progress_bar_config(disable=True)

    def direct() -> list[float]:
        times = []
        for i in range(per_round):
            started = time.perf_counter()
            pipe(
                prompt=f"a lantern {i}",
                max_sequence_length=256,  # what render passes for the tiny model
                width=SIZE,
                height=SIZE,
                num_inference_steps=STEPS,
                generator=torch.Generator().manual_seed(7),
            ).images[0]
            times.append(time.perf_counter() - started)
        return times

    # The library's default PNG settings, and the prod overlay's (knative/overlays/prod/
    # config.yaml): what a deployment's renders pay for their PNG.
    prod_png = {"IMAGEGEN_PNG_COMPRESS_STRATEGY": "rle", "IMAGEGEN_PNG_ENCODE_THREADS": "4"}
    with (
        served("render", served_env(tmp / "overhead"), log_dir=tmp) as render,
        served("render", served_env(tmp / "overhead-prod", **prod_png), log_dir=tmp) as prod,
        httpx.Client() as client,
    ):

        def over_http(server: Served) -> list[float]:
            times = []
            for i in range(per_round):
                body = render_job(f"o-{uuid.uuid4().hex[:8]}", f"a lantern {i}")
                started = time.perf_counter()
                client.post(server.url, json=body, timeout=600).raise_for_status()
                times.append(time.perf_counter() - started)
            return times

        # Every call counts, each its own figure: a row's min is the fastest call, its median
        # the median call of all rounds (each round runs the arms' calls in turn).
        arms: list[tuple[str, Callable[[], list[float]]]] = [
            ("direct", direct),
            ("default", lambda: over_http(render)),
            ("prod", lambda: over_http(prod)),
        ]
        for _, measure in arms:  # first calls out of the way
            measure()
        measured: dict[str, list[float]] = {name: [] for name, _ in arms}
        for round_ in range(rounds):
            for name, measure in rotated(arms, round_):
                measured[name].extend(measure())
    return [
        Comparison(
            f"overhead: render over HTTP (stored PNG{label}) vs the pipeline's __call__",
            "s",
            "lower",
            1.10,
            measured["direct"],
            measured[arm],
        )
        for arm, label in (("default", ""), ("prod", ", the prod overlay's rle on 4 threads"))
    ]


ROWS = [
    "burst",
    "ceiling",
    "ollama-down",
    "startup",
    "overhead",
    "rate",
    "first-image",
    "png",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=count, default=3)
    parser.add_argument("--quick", action="store_true", help="one round, small counts (smoke)")
    parser.add_argument("--only", nargs="+", choices=ROWS)
    parser.add_argument("--torch-threads", type=count, default=1)
    args = parser.parse_args()
    set_torch_threads(args.torch_threads)
    os.environ["OMP_NUM_THREADS"] = str(torch_threads())
    logging.basicConfig(level=logging.ERROR)
    logging.getLogger("imagegen").setLevel(logging.ERROR)
    rounds = 1 if args.quick else args.rounds
    chosen = set(args.only or ROWS)
    started = datetime.now(UTC)
    print(
        f"{started:%Y-%m-%d %H:%M} UTC, {os.cpu_count()} CPUs, load average"
        f" {os.getloadavg()[0]:.1f} at the start; {rounds} rounds,"
        f" {torch_threads()} torch thread(s)",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as directory:
        tmp = Path(directory)
        rows: list[Comparison] = []

        def run(key: str, measure: Any) -> None:
            if key in chosen:
                for row in measure():
                    row.print()
                    rows.append(row)

        run("burst", lambda: burst(rounds, tmp, 8 if args.quick else 64))
        run("ceiling", lambda: ceiling(rounds))
        # Quick: still enough requests that the median falls after the circuit opens (3 fail),
        # and over two for each of the 8 sent at once: the 8 first wait their timeout, the rest
        # not; an odd count, so the median is one of the rest, not the mean of one of each.
        run(
            "ollama-down",
            lambda: ollama_down(rounds, tmp, 7 if args.quick else 20, 17 if args.quick else 32),
        )
        run("startup", lambda: startup(rounds, tmp))
        # 15 calls a side per round: with 5, the ratio landed anywhere from 1.08x to 1.8x from run
        # to run on a shared 2-core host; with 15, 1.23x to 1.51x (PNG alone: 10-12 ms of 55-70).
        run("overhead", lambda: overhead(rounds, tmp, 2 if args.quick else 15))
        run("rate", lambda: rate(rounds, tmp, 16 if args.quick else 100))
        run("first-image", lambda: first_image(rounds, tmp))
        run("png", lambda: png(rounds))
    print()
    targeted = [r for r in rows if r.has_target]
    print(f"{sum(r.met() for r in targeted)} of {len(targeted)} targets met ({rounds} rounds)")
    print(f"load average {os.getloadavg()[0]:.1f} at the end")
    print()
    print("| row | baseline (best / median) | project (best / median) | ratio | target |")
    print("| --- | --- | --- | --- | --- |")
    for row in rows:
        print(row.markdown())


if __name__ == "__main__":
    exit_on_sigterm()  # a timeout's SIGTERM stops the served functions, removes the directory
    main()
