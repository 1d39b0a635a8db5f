"""The ``png`` rows: a 1024² PNG encoded in parts on several threads against Pillow's encoder;
and the GPU script's PNG lines, for the image a model rendered."""

from __future__ import annotations

import os
import time
from typing import Any

from _harness import Comparison, interleave

SIZE = 1024


def photo_like(size: int = SIZE, seed: int = 0) -> Any:
    """A stand-in for a rendered image, made offline: smooth noise at four scales, a little
    grain. Its PNG compresses like a photograph's (docs/rendering.md#png-encoding)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    total = np.zeros((size, size, 3))
    for scale in (4, 16, 64, 256):
        coarse = rng.random((size // scale + 1, size // scale + 1, 3))
        layer = Image.fromarray((coarse * 255).astype(np.uint8))
        layer = layer.resize((size + scale, size + scale), Image.Resampling.BICUBIC)
        total += np.asarray(layer, dtype=np.float64)[:size, :size] * scale
    total = total / total.max() * 255 + rng.normal(0, 3, total.shape)
    return Image.fromarray(np.clip(total, 0, 255).astype(np.uint8))


def png(rounds: int) -> list[Comparison]:
    from imagegen.render.png import encode_png

    image = photo_like()
    threads = min(4, os.cpu_count() or 1)
    sizes: dict[str, int] = {}

    def timed(label: str, **options: Any) -> float:
        started = time.perf_counter()
        sizes[label] = len(encode_png(image, text={"prompt": "a lighthouse"}, **options))
        return time.perf_counter() - started

    rows = []
    for strategy in ("default", "rle"):
        label = f"{strategy} x{threads}"
        baseline, project = interleave(
            rounds,
            lambda: timed("pillow"),
            lambda s=strategy, la=label: timed(la, strategy=s, threads=threads),
        )
        rows.append(
            Comparison(
                f"png: {SIZE}² {strategy} in parts on {threads} threads vs Pillow (default)",
                "s",
                "lower",
                None,
                baseline,
                project,
                note=f"(files: Pillow {sizes['pillow'] // 1024} KiB,"
                f" in parts {sizes[label] // 1024} KiB)",
            )
        )
    return rows


PNG_THREADS = (1, 4)
"""``IMAGEGEN_PNG_ENCODE_THREADS`` values the PNG line compares (1: Pillow's encoder)."""


def png_costs(image: Any, size: int, rounds: int, *, level: int) -> dict[str, tuple[float, int]]:
    """The PNG of one rendered ``image`` per strategy and thread count, at zlib ``level``
    (render's ``IMAGEGEN_PNG_COMPRESS_LEVEL``): (best seconds, bytes)."""
    from imagegen.render.png import encode_png

    def encode(strategy: Any, threads: int) -> bytes:
        return encode_png(image, text={}, level=level, strategy=strategy, threads=threads)

    return _timed(f"PNG at {size}²", encode, PNG_THREADS, rounds)


def pipeline_output(image: Any, device: Any, dtype: Any) -> Any:
    """A PIL ``image`` as a pipeline's ``"pt"`` output: ``(1, C, H, W)`` in [0, 1], in
    ``dtype`` (bfloat16 on CUDA) on ``device``."""
    import numpy as np
    import torch

    pixels = torch.from_numpy(np.asarray(image.convert("RGB")).copy())
    return (pixels.permute(2, 0, 1)[None].float() / 255).to(device=device, dtype=dtype)


def filtered_png_costs(
    images: Any, size: int, rounds: int, *, level: int
) -> dict[str, tuple[float, int]]:
    """The same PNGs from a pipeline's ``"pt"`` output ``images`` (one image, on its device,
    in its dtype), the rows filtered there first, as render does on CUDA with more than one
    thread (``_device_png``): (best seconds, bytes), the filtering included."""
    import torch

    from imagegen.render._device_png import filtered_images
    from imagegen.render.png import encode_filtered_png

    device = images.device.type
    if device == "cuda":
        torch.cuda.synchronize()  # each encoding ends on the host: nothing is left queued

    def encode(strategy: Any, threads: int) -> bytes:
        [filtered] = filtered_images(images) or []
        return encode_filtered_png(
            filtered.rows,
            mode=filtered.mode,
            text={},
            level=level,
            strategy=strategy,
            threads=threads,
        )

    return _timed(f"PNG at {size}², rows filtered on {device}", encode, PNG_THREADS[1:], rounds)


def _timed(
    label: str, encode: Any, thread_counts: tuple[int, ...], rounds: int
) -> dict[str, tuple[float, int]]:
    """``encode(strategy, threads)`` timed per strategy and thread count, printed on one line."""
    from typing import get_args

    from imagegen.render.png import PngStrategy

    costs = {}
    for strategy in get_args(PngStrategy):
        for threads in thread_counts:
            times = []
            for _ in range(max(rounds, 1)):
                started = time.perf_counter()
                png = encode(strategy, threads)
                times.append(time.perf_counter() - started)
            costs[f"{strategy} x{threads}"] = (min(times), len(png))
    print(
        f"{label}: "
        + ", ".join(
            f"{name} {t * 1000:.0f} ms {n / 1024:.0f} KiB" for name, (t, n) in costs.items()
        )
    )
    return costs
