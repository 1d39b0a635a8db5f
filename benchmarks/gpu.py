"""GPU benchmark of the served model: each fast-path option on and off, batching, start-up.

    python benchmarks/gpu.py [--model ID] [--sizes 512 1024] [--rounds 3] [--budget 510]
    python benchmarks/gpu.py --random-weights DIR [...]   # FLUX.2 [klein] 4B's shapes, offline
    python benchmarks/gpu.py --device cpu --model tiny --sizes 256 --rounds 1  # a smoke run

Runs where CUDA is present (elsewhere it says so and exits 2, unless ``--device cpu`` asks for
a smoke run, where the fast-path options apply nothing), stops starting new parts once
``--budget`` seconds have passed and interrupts one still running a minute later, so it ends
within 10 minutes. The model must be in the
Hugging Face cache (``IMAGEGEN_MODEL_CACHE_DIR`` / ``HF_HOME``): nothing is downloaded. Where
the weights cannot be had, ``--random-weights DIR`` writes the default model's architecture with
random weights to DIR (``_random_klein``) and times that: the same shapes, the same cost.

Prints, for the model (default: ``IMAGEGEN_MODEL``), each part on its own: a failing option
or part is reported and the rest run on (the exit status is then 1). Each part sets every
fast-path setting to what it names, the rest off (``FAST_PATH_OFF``), whatever ``IMAGEGEN_*``
the environment sets, and prints them:

1. service overhead: ``DiffusersBackend.render`` (PNG included) against the pipeline's own call
   with the same arguments and output type (target <= 1.05x), in interleaved rounds, and what
   the PNG alone costs at that size with each ``IMAGEGEN_PNG_COMPRESS_STRATEGY``, on 1 and 4
   threads (encode time, file size), and on 4 threads with the rows filtered on the device
   first, as render does on CUDA;
2. batched against unbatched pixels: max abs difference and PSNR per batch size;
3. process start to ``/readyz`` of the render function with regional compile and warm-up,
   with a cold and then a warm compile cache;
4. latency (min, median) and images/s at each size for: bf16 alone, + fused QKV,
   + regional compile, + fp8 (compute capability 8.9+, torchao installed), and all of them
   (each stopped after ``--option-limit`` seconds; each size compiled from a fresh state and
   empty caches); images/s of a batch of 4 too, and the peak GPU memory; at 1024², the target
   (<= 0.35 s per image) met or not.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import io
import itertools
import math
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

STARTED = time.perf_counter()
"""A run's clock starts at the script's import, before torch's (seconds with CUDA), so the
budget holds for the whole process."""

from _cli import count, exit_on_sigterm  # noqa: E402
from _harness import Served, interleave  # noqa: E402
from _png import filtered_png_costs, pipeline_output, png_costs  # noqa: E402

OPTIONS: dict[str, dict[str, Any]] = {
    "bf16": {},
    "+fused qkv": {"render_fuse_qkv": True},
    "+regional compile": {"render_compile": "regional"},
    "+fp8": {"render_fp8": True},
    "all": {"render_fuse_qkv": True, "render_compile": "regional", "render_fp8": True},
}
FAST_PATH_OFF: dict[str, Any] = {
    "render_fuse_qkv": False,
    "render_compile": "off",
    "render_fp8": False,
    "render_compile_cache_dir": None,
    "loras": [],
    "lora_dir": None,
}
"""Every setting the CUDA fast path reads (``imagegen/render/_fastpath.py``; LoRAs turn fusing
and compiling off), off: each row runs with the options it names on top of these, whatever
``IMAGEGEN_*`` the environment sets (``IMAGEGEN_RENDER_COMPILE=regional`` must not compile
the bf16 row)."""
PARTS = ("overhead", "tolerance", "startup", "options")
"""In the order they run: the options table, whose compiles take longest and vary most, last."""
GRACE = 60.0
"""Seconds a part started before ``--budget`` ran out may take past it: the default budget, 510,
ends every run 30 s short of 10 minutes (room for CUDA's teardown and the last lines)."""
TARGET_SIZE, TARGET_SECONDS = 1024, 0.35
"""Per image through render, the default model at 1024² on an H100-class GPU."""


def _job(model: str, size: int, seed: int, steps: int, guidance: float) -> Any:
    from imagegen.models import EnhancedPrompt

    return EnhancedPrompt(
        generation_id=f"gpu-{size}-{seed}",
        prompt=f"a lighthouse on a cliff at dusk, view {seed}",
        enhancer="passthrough",
        model=model,
        width=size,
        height=size,
        steps=steps,
        guidance=guidance,
        seed=seed,
        requested_at=datetime.now(UTC),
    )


def _pixels(png: bytes) -> Any:
    import numpy as np
    from PIL import Image

    with Image.open(io.BytesIO(png)) as image:
        return np.asarray(image.convert("RGB")).astype(np.int16)


def _synchronize(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _settings(args: argparse.Namespace, **options: Any) -> Any:
    """Render's settings for a row: the fast path off (:data:`FAST_PATH_OFF`), ``options`` on."""
    from imagegen.settings import Settings

    chosen = {**FAST_PATH_OFF, **options}
    return Settings(model=args.model, served_models=[args.model], device=args.device, **chosen)


def fast_path(settings: Any) -> str:
    """The fast-path settings a row ran with, as a line: ``render_fuse_qkv=False ...``."""
    return " ".join(f"{name}={getattr(settings, name)!r}" for name in FAST_PATH_OFF)


def _unloadable(args: argparse.Namespace) -> str | None:
    """Why no part may load ``args.model`` here (doctor's model check: not in the model
    cache, which the script never downloads to, or an incomplete snapshot or directory), as
    one line; None where it loads. Said once, rather than by every part in turn."""
    from imagegen.cli.doctor import _model_check

    check = _model_check(_settings(args))
    if check.status == "ok":
        return None
    if "not in the model cache" in check.summary:
        said = (
            f"model {args.model} is not in the local cache and the benchmark runs offline:"
            f" pull it first (imagegen models pull {args.model})"
        )
    else:  # incomplete, or no model at all; the script's flag names the model, not the variable
        summary = check.summary.replace(f"IMAGEGEN_MODEL={args.model}", f"--model {args.model}")
        said = f"{summary.rstrip('.')}: {check.next_step.replace('IMAGEGEN_MODEL', '--model')}"
        said = said.rstrip(".")
    return f"benchmarks/gpu.py: {said}; or time the same shapes: --random-weights DIR"


def _backend(args: argparse.Namespace, label: str, **options: Any) -> Any:
    """A backend for the row ``label``, its fast-path settings printed."""
    from imagegen.render.diffusers_backend import DiffusersBackend

    settings = _settings(args, **options)
    print(f"{label}: {fast_path(settings)}")
    return DiffusersBackend(settings)


COMPILE_CACHES = ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")
"""Where Inductor and Triton keep compiled kernels on disk (the environment names them)."""


@contextlib.contextmanager
def fresh_compile_state() -> Iterator[None]:
    """Compile as a new process with empty caches would: torch's compiled code and its caches
    in memory reset, Inductor's and Triton's on-disk caches in a new temporary folder; the
    environment is given back afterwards. Harmless where nothing compiles (``--device cpu``)."""
    import torch

    saved = {name: os.environ.get(name) for name in COMPILE_CACHES}
    with tempfile.TemporaryDirectory(prefix="gpu-bench-compile-") as directory:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(directory) / "inductor")
        os.environ["TRITON_CACHE_DIR"] = str(Path(directory) / "triton")
        torch.compiler.reset()
        try:
            yield
        finally:
            torch.compiler.reset()
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


def options_table(args: argparse.Namespace, steps: int, guidance: float) -> None:
    """Part 4: latency and images/s with each option (the backend is closed after each)."""
    import torch

    capable = args.device == "cuda" and torch.cuda.get_device_capability() >= (8, 9)
    for name, options in OPTIONS.items():
        if args.over_budget(name):
            return
        if options.get("render_fp8") and not capable:
            if len(options) == 1:
                print(f"{name:<20} (skipped: fp8 needs CUDA compute capability 8.9+)")
                continue
            # The other options together are still worth a row on a GPU without fp8.
            name = f"{name} but fp8"
            options = {k: v for k, v in options.items() if k != "render_fp8"}
        with reported(name, args.failures, limit=min(args.option_limit, args.time_left())):
            option_rows(args, name, options, steps, guidance)


def option_rows(
    args: argparse.Namespace, name: str, options: dict[str, Any], steps: int, guidance: float
) -> None:
    """One option's rows: load, then per size the first render, the rest, a batch of 4.

    Each size compiles (where the option compiles) from a fresh state, as a process serving
    that size alone would: no graph or kernel of another option or size is reused, and no
    graph made dynamic by having seen the other size.
    """
    import torch

    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    # The compile caches are fresh_compile_state's: render_compile_cache_dir stays None.
    backend = _backend(args, name, **options)
    try:
        load = backend.load(args.model)
        print(f"{name:<20} load {load:6.1f} s  applied: {backend.fast_path[args.model]}")
        for size in args.sizes:
            with fresh_compile_state():
                started = time.perf_counter()
                backend.render(_job(args.model, size, 0, steps, guidance))  # compiles, if it does
                first = time.perf_counter() - started
                times = []
                for i in range(args.rounds):
                    started = time.perf_counter()
                    backend.render(_job(args.model, size, i + 1, steps, guidance))
                    times.append(time.perf_counter() - started)
                # A new batch shape compiles again: the first batch is not the one timed.
                backend.render_batch(
                    [_job(args.model, size, 20 + i, steps, guidance) for i in range(4)]
                )
                batch = [_job(args.model, size, 10 + i, steps, guidance) for i in range(4)]
                started = time.perf_counter()
                backend.render_batch(batch)
                batched_rate = len(batch) / (time.perf_counter() - started)
            target = ""
            if size == TARGET_SIZE:
                verdict = "met" if min(times) <= TARGET_SECONDS else "not met"
                target = f"  (target <= {TARGET_SECONDS} s: {verdict})"
            print(
                f"    {size}²: first {first:6.2f} s  min {min(times):6.3f} s"
                f"  median {statistics.median(times):6.3f} s  {1 / min(times):5.2f} img/s"
                f"  batch of 4: {batched_rate:5.2f} img/s{target}"
            )
        if args.device == "cuda":
            print(f"    peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    finally:
        backend.close()


def offline(message: str) -> str:
    """``message`` with the Hub's offline switch said as this script's own: it runs offline
    (the tests' helpers it imports set ``HF_HUB_OFFLINE``), whether its user set it or not."""
    return message.replace("HF_HUB_OFFLINE is set", "the benchmark runs offline")


class PartTimeout(Exception):
    """A part ran past its time limit (``--option-limit``)."""


@contextlib.contextmanager
def reported(what: str, failures: list[str], limit: float | None = None) -> Iterator[None]:
    """Run a part; a failure is printed, added to ``failures``, and the benchmark goes on.

    A failure's message is printed in its first line and, for a served function's log, its
    last ten. With ``limit`` (seconds), a part still running then is interrupted (SIGALRM, in
    the main thread): a compile that never ends must not cost the parts after it.
    """
    started = time.perf_counter()
    timed = limit is not None and threading.current_thread() is threading.main_thread()

    def expire(signum: int, frame: Any) -> None:
        raise PartTimeout(f"past its {limit:g} s limit")

    previous = signal.signal(signal.SIGALRM, expire) if timed else None
    if timed:
        signal.setitimer(signal.ITIMER_REAL, limit)
    try:
        yield
    except Exception as error:  # one option failing must not lose the others' figures
        lines = offline(str(error)).strip().splitlines() or [""]
        print(f"{what}: failed: {type(error).__name__}: {lines[0]}")
        for line in lines[1:][-10:]:
            print(f"    {line[:300]}")
        failures.append(what)
    finally:
        if timed:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
        print(f"({what}: {time.perf_counter() - started:.0f} s)", flush=True)


def raw_call(backend: Any, job: Any) -> Callable[[], Any]:
    """The pipeline's own call for ``job``, with the arguments render passes it.

    Its output type too: on CUDA with more than one PNG thread render asks for ``"pt"`` (the
    pixels stay on the device, quantised and filtered there), elsewhere the default ``"pil"``.
    The call returns its image (a PIL image, or a ``(C, H, W)`` tensor) once the device's
    work has ended.
    """
    import torch

    from imagegen.render._family import call_options

    pipe = backend._pipelines[job.model]
    parameters = inspect.signature(pipe.__call__).parameters
    kwargs: dict[str, Any] = {
        "prompt": job.prompt,
        "width": job.width,
        "height": job.height,
        "num_inference_steps": job.steps,
        **call_options(pipe, job.model),
    }
    if "guidance_scale" in parameters:
        kwargs["guidance_scale"] = job.guidance
    if backend._filters_on_device() and "output_type" in parameters:
        kwargs["output_type"] = "pt"  # as render's call (diffusers_backend.render_batch)
    device = backend.device.type

    def call() -> Any:
        generator = torch.Generator("cuda" if device == "cuda" else "cpu").manual_seed(job.seed)
        image = pipe(**kwargs, generator=generator).images[0]
        _synchronize(device)
        return image

    return call


def host_image(output: Any, rounds: int) -> Any:
    """The raw call's image as a PIL image. A ``"pt"`` output is converted as diffusers'
    ``"pil"`` output is (to the host, then quantised there), the conversion timed (best of
    ``rounds``) and printed: what the pipeline's default output would add to its call."""
    import torch
    from diffusers.image_processor import VaeImageProcessor

    if not isinstance(output, torch.Tensor):
        return output
    times = []
    for _ in range(max(rounds, 1)):
        started = time.perf_counter()
        [image] = VaeImageProcessor.numpy_to_pil(VaeImageProcessor.pt_to_numpy(output[None]))
        times.append(time.perf_counter() - started)
    print(f'    the "pt" output as a PIL image (what "pil" adds): {min(times) * 1000:.0f} ms')
    return image


def phases(backend: Any, job: Any, timings: dict[str, float], rounds: int) -> dict[str, float]:
    """Where render's best call went: the text encoder (timed alone, best of ``rounds``), the
    rest of the denoising, the VAE decode and the PNG; printed and returned in seconds."""
    from imagegen.render._family import call_options

    pipe = backend._pipelines[job.model]
    accepted = inspect.signature(pipe.encode_prompt).parameters
    options = {k: v for k, v in call_options(pipe, job.model).items() if k in accepted}
    device = backend.device.type
    encoder = []
    for _ in range(max(rounds, 1)):
        _synchronize(device)
        started = time.perf_counter()
        pipe.encode_prompt(prompt=job.prompt, device=backend.device, **options)
        _synchronize(device)
        encoder.append(time.perf_counter() - started)
    split = {
        "text encoder": min(encoder),
        "denoising": max(timings["denoise"] - min(encoder), 0.0),
        "decode": timings["decode"],
        "png": timings["encode"],
    }
    shown = ", ".join(f"{name} {seconds:.3f} s" for name, seconds in split.items())
    print(f"    render's best, by phase: {shown}")
    return split


def overhead(backend: Any, args: argparse.Namespace, steps: int, guidance: float) -> float:
    """Part 1: render (PNG encode included) against the pipeline's call; the min/min ratio.

    Interleaved rounds, the side that goes first alternating; each round's two sides render
    the same job.
    """
    size = max(args.sizes)
    seeds = {"raw": itertools.count(), "render": itertools.count()}
    timings = []

    def pipeline_alone() -> float:
        call = raw_call(backend, _job(args.model, size, next(seeds["raw"]), steps, guidance))
        _synchronize(args.device)
        started = time.perf_counter()
        call()
        return time.perf_counter() - started

    def through_render() -> float:
        job = _job(args.model, size, next(seeds["render"]), steps, guidance)
        _synchronize(args.device)
        started = time.perf_counter()
        timings.append(backend.render(job).timings)
        return time.perf_counter() - started

    pipeline_alone(), through_render()  # the first pair warms both paths up
    timings.clear()
    raw, served = interleave(args.rounds, pipeline_alone, through_render)
    ratio = min(served) / min(raw)
    print(
        f"overhead at {size}²: pipeline {min(raw):.3f} s, render {min(served):.3f} s,"
        f" ratio {ratio:.3f}x (min against min; target <= 1.05x)"
    )
    job = _job(args.model, size, 0, steps, guidance)
    phases(backend, job, timings[served.index(min(served))], args.rounds)
    output = raw_call(backend, job)()
    image = host_image(output, args.rounds)
    level = backend._settings.png_compress_level  # render's own
    png_costs(image, size, args.rounds, level=level)
    # What render filters: the pipeline's own tensor where it asks for one, else the same
    # pixels in the pipeline's dtype on its device.
    if image is output:
        pixels = pipeline_output(image, backend.device, backend.dtype)
    else:
        pixels = output[None]
    filtered_png_costs(pixels, size, args.rounds, level=level)
    return ratio


def tolerance(
    backend: Any, args: argparse.Namespace, steps: int, guidance: float, sizes: Sequence[int]
) -> list[tuple[int, int, float]]:
    """Part 2: (batch size, max abs difference, min PSNR) of batched against alone renders."""
    size = min(args.sizes)
    jobs = [_job(args.model, size, 100 + i, steps, guidance) for i in range(max(sizes))]
    alone = [_pixels(backend.render(job).png) for job in jobs]
    rows = []
    for k in sizes:
        worst, psnr = 0, math.inf
        for index, output in enumerate(backend.render_batch(jobs[:k])):
            diff = abs(_pixels(output.png) - alone[index])
            worst = max(worst, int(diff.max()))
            mse = float((diff.astype("float64") ** 2).mean())
            psnr = min(psnr, math.inf if mse == 0 else 10 * math.log10(255**2 / mse))
        print(f"batch of {k} vs alone at {size}²: max abs {worst}, min PSNR {psnr:.1f} dB")
        rows.append((k, worst, psnr))
    return rows


def startup_env(args: argparse.Namespace, tmp: Path) -> dict[str, str]:
    """The served render's environment for part 3: regional compile and the warm-up, the rest
    of the fast path off (:data:`FAST_PATH_OFF`) whatever this environment sets."""
    env = {
        name: value
        for name, value in os.environ.items()
        if name not in ("IMAGEGEN_LORAS", "IMAGEGEN_LORA_DIR")
    }
    return {
        **env,
        "IMAGEGEN_MODEL": args.model,
        "IMAGEGEN_SERVED_MODELS": args.model,
        "IMAGEGEN_DEVICE": args.device,
        "IMAGEGEN_STORAGE_URL": str(tmp / "out"),
        "IMAGEGEN_RENDER_WARMUP": "true",
        "IMAGEGEN_RENDER_FUSE_QKV": "false",
        "IMAGEGEN_RENDER_FP8": "false",
        "IMAGEGEN_RENDER_COMPILE": "regional",
        "IMAGEGEN_RENDER_COMPILE_CACHE_DIR": str(tmp / "compile-cache"),
        # Triton's cache beside it, never one the environment names: cold means empty.
        "TRITON_CACHE_DIR": str(tmp / "triton-cache"),
    }


def startup(args: argparse.Namespace) -> None:
    """Part 3: render start to ``/readyz`` (regional compile, warm-up): cold, then warm cache."""
    with tempfile.TemporaryDirectory() as directory:
        tmp = Path(directory)
        env = startup_env(args, tmp)
        shown = " ".join(
            f"{name}={env[name]}"
            for name in (
                "IMAGEGEN_RENDER_FUSE_QKV",
                "IMAGEGEN_RENDER_COMPILE",
                "IMAGEGEN_RENDER_FP8",
            )
        )
        print(f"render start-up: {shown}, no LoRAs")
        for cache in ("cold", "warm"):
            if args.over_budget(f"start-up, {cache} cache"):
                return
            server = Served("render", env, log_dir=tmp, threads=4)
            try:
                seconds = server.ready_after(timeout=300)
            finally:
                server.stop()
            print(f"render start -> /readyz, {cache} compile cache: {seconds:6.1f} s")


def main(argv: Sequence[str] | None = None, started: float | None = None) -> int:
    """``started``: the run's clock (``STARTED`` run as a script); else it starts here."""
    began = time.perf_counter() if started is None else started
    import torch

    from imagegen.modelspec import family_for
    from imagegen.settings import Settings

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default: IMAGEGEN_MODEL")
    parser.add_argument(
        "--random-weights",
        type=Path,
        metavar="DIR",
        help="time FLUX.2 [klein] 4B's architecture with random weights, written to DIR",
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--rounds", type=count, default=3)
    parser.add_argument("--budget", type=float, default=510.0)
    parser.add_argument(
        "--option-limit", type=float, default=180.0, help="seconds one option's rows may take"
    )
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--batch-sizes", type=count, nargs="+", default=[2, 4])
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("benchmarks/gpu.py needs a CUDA GPU; none here.", file=sys.stderr)
        return 2
    if args.random_weights is not None:
        if not (args.random_weights / "model_index.json").is_file():
            from _random_klein import build_random_klein

            seconds = build_random_klein(args.random_weights, device=args.device)
            print(f"FLUX.2 [klein] 4B, random weights, written in {seconds:.0f} s")
        args.model = str(args.random_weights)
    args.model = args.model or Settings().model

    def over_budget(part: str) -> bool:
        if time.perf_counter() - began > args.budget:
            print(f"(skipped: {part}; past the {args.budget:g} s budget)")
            return True
        return False

    def time_left() -> float:
        """Seconds until the run's end: ``--budget`` plus the grace a part started late gets."""
        return max(1.0, args.budget + GRACE - (time.perf_counter() - began))

    args.over_budget = over_budget
    args.time_left = time_left
    args.failures = []
    spec = family_for(args.model)
    steps, guidance = spec.default_steps, spec.default_guidance
    where = torch.cuda.get_device_name() if args.device == "cuda" else "CPU (smoke run)"
    png = Settings()
    print(
        f"{where}, torch {torch.__version__}, {args.model}, {steps} steps;"
        f" render's PNG: {png.png_compress_strategy}, level {png.png_compress_level},"
        f" {png.png_encode_threads} thread(s)"
    )
    unloadable = _unloadable(args)
    if unloadable:
        print(unloadable, file=sys.stderr)
        return 2

    if {"overhead", "tolerance"} & set(args.parts):
        with reported("bf16 backend", args.failures, limit=time_left()):
            backend = _backend(args, "bf16 backend")  # bf16 on CUDA, no other option
            try:
                print(f"bf16 load {backend.load(args.model):.1f} s")
                if "overhead" in args.parts and not over_budget("overhead"):
                    with reported("overhead", args.failures):
                        overhead(backend, args, steps, guidance)
                if "tolerance" in args.parts and not over_budget("batch tolerance"):
                    with reported("batch tolerance", args.failures):
                        tolerance(backend, args, steps, guidance, args.batch_sizes)
            finally:
                backend.close()
    if "startup" in args.parts and not over_budget("start-up"):
        with reported("start-up", args.failures, limit=time_left()):
            startup(args)
    if "options" in args.parts:
        options_table(args, steps, guidance)
    print(f"total {time.perf_counter() - began:.0f} s")
    if args.failures:
        print(f"failed: {', '.join(args.failures)}")
        return 1
    return 0


if __name__ == "__main__":
    exit_on_sigterm()  # a timeout's SIGTERM stops the served render, removes the directories
    sys.exit(main(started=STARTED))
