"""Batched renders on the real tiny pipeline: alone bit-exact, together within the tolerance."""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image

from imagegen.models import EnhancedPrompt
from imagegen.render.batching import BATCHED_MAX_ABS_DIFF, BATCHED_MIN_PSNR

MakeJob = Callable[..., EnhancedPrompt]


def _pixels(png: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(png)) as image:
        return np.asarray(image.convert("RGB")).astype(np.int16)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a - b).astype(np.float64) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


def test_a_batch_of_one_is_the_unbatched_render(backend: Any, make_job: MakeJob) -> None:
    job = make_job(seed=7)
    assert backend.render_batch([job])[0].png == backend.render(job).png


def test_a_batch_is_within_the_tolerance_of_each_job_alone(backend: Any, make_job: MakeJob) -> None:
    jobs = [
        make_job(generation_id=f"g{i}", prompt=f"a lighthouse, view {i}", seed=100 + i)
        for i in range(3)
    ]
    together = backend.render_batch(jobs)
    first = _pixels(together[0].png)
    for index, (job, batched) in enumerate(zip(jobs, together, strict=True)):
        alone = _pixels(backend.render(job).png)
        pixels = _pixels(batched.png)
        assert int(np.abs(pixels - alone).max()) <= BATCHED_MAX_ABS_DIFF
        assert _psnr(pixels, alone) >= BATCHED_MIN_PSNR
        if index:  # each image is its own seed's, not a neighbour's
            assert int(np.abs(pixels - first).max()) > BATCHED_MAX_ABS_DIFF


def test_each_image_keeps_its_own_text_chunks(backend: Any, make_job: MakeJob) -> None:
    from imagegen.render.png import read_png_text

    jobs = [make_job(generation_id=f"t{i}", seed=i, prompt=f"lamp {i}") for i in range(2)]
    texts = [read_png_text(o.png) for o in backend.render_batch(jobs)]
    assert [(t["prompt"], t["seed"]) for t in texts] == [("lamp 0", "0"), ("lamp 1", "1")]
