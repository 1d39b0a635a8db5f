"""GPU benchmark of the served model: each fast-path option on and off, batching, start-up.

    python benchmarks/gpu.py [--model ID] [--sizes 512 1024] [--rounds 3] [--budget 540]

Runs only where CUDA is present (elsewhere it says so and exits 2) and stops starting new
parts once ``--budget`` seconds have passed, so it ends within 10 minutes. The model must be
in the Hugging Face cache (``IMAGEGEN_MODEL_CACHE_DIR`` / ``HF_HOME``): nothing is downloaded.

Prints, for the model (default: ``IMAGEGEN_MODEL``):

1. latency (min, median) and images/s at each size for: bf16 alone, + fused QKV,
   + regional compile, + fp8 (compute capability 8.9+, torchao installed), and all of them;
   images/s of a batch of 4 too;
2. service overhead: ``DiffusersBackend.render`` (PNG included) against the pipeline's own call;
3. batched against unbatched pixels: max abs difference and PSNR per batch size;
4. process start to ``/readyz`` of the render function with regional compile and warm-up,
   with a cold and then a warm compile cache.
"""

from __future__ import annotations

import argparse
import io
import math
import os
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from _harness import Served

OPTIONS: dict[str, dict[str, Any]] = {
    "bf16": {},
    "+fused qkv": {"render_fuse_qkv": True},
    "+regional compile": {"render_compile": "regional"},
    "+fp8": {"render_fp8": True},
    "all": {"render_fuse_qkv": True, "render_compile": "regional", "render_fp8": True},
}


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


def main() -> int:
    import torch

    from imagegen.modelspec import family_for
    from imagegen.render.diffusers_backend import DiffusersBackend
    from imagegen.settings import Settings

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=Settings().model)
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--budget", type=float, default=540.0)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("benchmarks/gpu.py needs a CUDA GPU; none here.", file=sys.stderr)
        return 2
    began = time.perf_counter()

    def over_budget(part: str) -> bool:
        if time.perf_counter() - began > args.budget:
            print(f"(skipped: {part}; past the {args.budget:g} s budget)")
            return True
        return False

    spec = family_for(args.model)
    steps, guidance = spec.default_steps, spec.default_guidance
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {args.model}, {steps} steps")

    # 1. Each option on its own, then all together.
    capable = torch.cuda.get_device_capability() >= (8, 9)
    baseline_backend: DiffusersBackend | None = None
    for name, options in OPTIONS.items():
        if over_budget(name):
            break
        if options.get("render_fp8") and not capable:
            print(f"{name:<20} (skipped: fp8 needs compute capability 8.9+)")
            continue
        backend = DiffusersBackend(
            Settings(model=args.model, served_models=[args.model], device="cuda", **options)
        )
        load = backend.load(args.model)
        print(f"{name:<20} load {load:6.1f} s  applied: {backend.fast_path[args.model]}")
        for size in args.sizes:
            started = time.perf_counter()
            backend.render(_job(args.model, size, 0, steps, guidance))  # compiles, if it does
            first = time.perf_counter() - started
            times = []
            for i in range(args.rounds):
                started = time.perf_counter()
                backend.render(_job(args.model, size, i + 1, steps, guidance))
                times.append(time.perf_counter() - started)
            batch = [_job(args.model, size, 10 + i, steps, guidance) for i in range(4)]
            started = time.perf_counter()
            backend.render_batch(batch)
            batched_rate = len(batch) / (time.perf_counter() - started)
            print(
                f"    {size}²: first {first:6.2f} s  min {min(times):6.3f} s"
                f"  median {statistics.median(times):6.3f} s  {1 / min(times):5.2f} img/s"
                f"  batch of 4: {batched_rate:5.2f} img/s"
            )
        if name == "bf16":
            baseline_backend = backend
        else:
            backend.close()
            torch.cuda.empty_cache()

    assert baseline_backend is not None
    # 2. Service overhead: render (PNG encode included) against the pipeline's own call.
    if not over_budget("overhead"):
        pipe = baseline_backend._pipelines[args.model]
        size = max(args.sizes)
        raw, served = [], []
        for i in range(args.rounds):
            generator = torch.Generator("cuda").manual_seed(i)
            torch.cuda.synchronize()
            started = time.perf_counter()
            pipe(
                prompt="a lighthouse",
                width=size,
                height=size,
                num_inference_steps=steps,
                guidance_scale=guidance,
                generator=generator,
                max_sequence_length=spec.t5_tokens,
            ).images[0]
            torch.cuda.synchronize()
            raw.append(time.perf_counter() - started)
            started = time.perf_counter()
            baseline_backend.render(_job(args.model, size, i, steps, guidance))
            served.append(time.perf_counter() - started)
        print(
            f"overhead at {size}²: pipeline {min(raw):.3f} s, render {min(served):.3f} s,"
            f" ratio {min(served) / min(raw):.3f}x (target <= 1.05x)"
        )

    # 3. Batched against unbatched pixels, bf16.
    if not over_budget("batch tolerance"):
        size = min(args.sizes)
        jobs = [_job(args.model, size, 100 + i, steps, guidance) for i in range(4)]
        alone = [_pixels(baseline_backend.render(job).png) for job in jobs]
        for k in (2, 4):
            outputs = baseline_backend.render_batch(jobs[:k])
            worst, psnr = 0, math.inf
            for index, output in enumerate(outputs):
                diff = abs(_pixels(output.png) - alone[index])
                worst = max(worst, int(diff.max()))
                mse = float((diff.astype("float64") ** 2).mean())
                psnr = min(psnr, math.inf if mse == 0 else 10 * math.log10(255**2 / mse))
            print(f"batch of {k} vs alone at {size}²: max abs {worst}, min PSNR {psnr:.1f} dB")
    baseline_backend.close()

    # 4. Start-up to ready with regional compile and warm-up: cold, then warm compile cache.
    if not over_budget("start-up"):
        with tempfile.TemporaryDirectory() as directory:
            tmp = Path(directory)
            env = {
                **os.environ,
                "IMAGEGEN_MODEL": args.model,
                "IMAGEGEN_ALLOWED_MODELS": args.model,
                "IMAGEGEN_DEVICE": "cuda",
                "IMAGEGEN_STORAGE_URL": str(tmp / "out"),
                "IMAGEGEN_RENDER_WARMUP": "true",
                "IMAGEGEN_RENDER_COMPILE": "regional",
                "IMAGEGEN_RENDER_COMPILE_CACHE_DIR": str(tmp / "compile-cache"),
            }
            for cache in ("cold", "warm"):
                if over_budget(f"start-up, {cache} cache"):
                    break
                server = Served("render", env, log_dir=tmp, threads=4)
                try:
                    seconds = server.ready_after(timeout=300)
                finally:
                    server.stop()
                print(f"render start -> /readyz, {cache} compile cache: {seconds:6.1f} s")
    print(f"total {time.perf_counter() - began:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
