"""Pixels quantised and filtered where the pipeline made them: the same values, rows and file
as the host's encoder in parts makes (torch runs the same code on the CPU here)."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pytest
import torch
from diffusers.image_processor import VaeImageProcessor
from PIL import Image

from imagegen.render import diffusers_backend, png
from imagegen.render._device_png import (
    MODES,
    FilteredImage,
    filter_rows,
    filtered_images,
    to_uint8,
)
from imagegen.render.diffusers_backend import DiffusersBackend
from imagegen.render.png import encode_filtered_png, encode_png
from imagegen.settings import Settings


def _host_rows(image: np.ndarray) -> bytes:
    """What the host's encoder filters: ``(H, W, C)`` uint8, every row after the one above."""
    height, width, channels = image.shape
    return png._filter_rows(image.reshape(height, width * channels), None, channels)


def _photo_like(height: int = 64, width: int = 96, channels: int = 3) -> np.ndarray:
    """Gradients and noise, a flat band (Up wins there) and a black one (None wins: ties)."""
    y, x = np.mgrid[0:height, 0:width]
    noise = np.random.default_rng(2).integers(0, 6, (height, width))
    planes = [x * 2 + noise, y * 3 + noise, (x + y) + noise, x % 7 * 30][:channels]
    pixels = np.stack(planes, axis=-1)
    pixels[20:30] = 200
    pixels[40:45] = 0
    return pixels.astype(np.uint8)


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_rows_are_filtered_as_the_host_filters_them(channels: int) -> None:
    noise = np.random.default_rng(3).integers(0, 256, (32, 40, channels), dtype=np.uint8)
    for image in (_photo_like(channels=channels), noise):
        height, width, _ = image.shape
        pixels = torch.from_numpy(image).reshape(1, height, width * channels)
        assert filter_rows(pixels, channels)[0].numpy().tobytes() == _host_rows(image)


def test_each_image_of_a_batch_starts_from_black() -> None:
    # The second image's first row has black above it, not the first image's last row.
    images = [_photo_like(), _photo_like()[::-1].copy()]
    batch = torch.from_numpy(np.stack(images)).reshape(2, 64, 96 * 3)
    filtered = filter_rows(batch, 3).numpy()
    assert [rows.tobytes() for rows in filtered] == [_host_rows(image) for image in images]


def test_any_small_image_filters_the_same() -> None:
    # Every shape up to 6 x 7, each in random bytes and in bytes that tie the candidates or
    # wrap at 128 (where a byte's distance from zero is largest).
    rng = np.random.default_rng(5)
    for height in range(1, 7):
        for width in range(1, 8):
            shape = (height, width, 3)
            patterns = [
                rng.integers(0, 256, shape, dtype=np.uint8),
                np.zeros(shape, dtype=np.uint8),
                np.full(shape, 255, dtype=np.uint8),
                (np.indices(shape).sum(axis=0) % 2 * 128).astype(np.uint8),
            ]
            for image in patterns:
                pixels = torch.from_numpy(image).reshape(1, height, width * 3)
                assert filter_rows(pixels, 3)[0].numpy().tobytes() == _host_rows(image), shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantised_values_are_diffusers_pil_values(dtype: torch.dtype) -> None:
    # k / 510 is at or next to every half level (x 255 = k / 2), where rounding decides.
    halves = torch.arange(0, 511, dtype=torch.float64) / 510
    count = 3 * 16 * 32 - len(halves) - 2
    random = torch.rand(count, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    values = torch.cat([halves, random, torch.tensor([0.0, 1.0], dtype=torch.float64)])
    images = values.reshape(1, 3, 16, 32).to(dtype)
    pil = VaeImageProcessor.numpy_to_pil(VaeImageProcessor.pt_to_numpy(images))[0]
    assert np.array_equal(to_uint8(images)[0].numpy(), np.asarray(pil))


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_the_file_is_the_host_encoders_byte_for_byte(channels: int) -> None:
    image = _photo_like(channels=channels)
    mode = MODES[channels]
    tensor = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    [filtered] = filtered_images(tensor) or []
    assert (filtered.width, filtered.height, filtered.mode) == (96, 64, mode)
    text = {"prompt": "夕暮れの灯台", "seed": "3"}
    pil = Image.fromarray(image.squeeze(-1) if channels == 1 else image, mode)
    for strategy in ("default", "rle"):
        made = encode_filtered_png(filtered.rows, mode=mode, text=text, strategy=strategy)
        assert made == encode_png(pil, text=text, strategy=strategy, threads=2)


def test_rows_that_do_not_fit_the_mode_are_refused() -> None:
    rows = np.zeros((4, 1 + 10), dtype=np.uint8)
    with pytest.raises(ValueError, match="do not fit mode RGB"):
        encode_filtered_png(rows, mode="RGB", text={})
    with pytest.raises(ValueError, match="not P"):
        encode_filtered_png(rows, mode="P", text={})


@pytest.mark.parametrize("model", ["tiny", "tiny-klein"])
def test_a_render_filtered_on_the_device_is_the_same_file(model: str, make_job: Any) -> None:
    # On CUDA with the encoder in parts, render filters on the device; forced here on the CPU,
    # for both pipeline families (FLUX.2 [klein] is the default model's).
    jobs = [
        make_job(generation_id=f"d{i}", seed=i, prompt=f"a lantern {i}", model=model)
        for i in range(2)
    ]
    made = {}
    for on_device in (False, True):
        backend = DiffusersBackend(Settings(device="cpu", png_encode_threads=2))
        backend.load(model)
        backend.filter_on_device = on_device
        pixels = backend.denoise_batch(jobs)
        kinds = {type(image) for image in pixels.images}
        assert kinds == ({FilteredImage} if on_device else {Image.Image})
        made[on_device] = [output.png for output in backend.encode_batch(jobs, pixels)]
        backend.close()
    assert made[True] == made[False]
    assert made[True][0] != made[True][1]


def test_a_device_that_cannot_filter_gives_the_same_files_and_is_not_asked_again(
    make_job: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    jobs = [make_job(generation_id=f"f{i}", seed=i, prompt=f"a lantern {i}") for i in range(2)]
    backend = DiffusersBackend(Settings(device="cpu", png_encode_threads=2))
    backend.load("tiny")
    try:
        backend.filter_on_device = False
        expected = [output.png for output in backend.render_batch(jobs)]
        calls = []

        def refuse(images: torch.Tensor) -> None:
            calls.append(images.shape)
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 MiB")

        monkeypatch.setattr(diffusers_backend, "filtered_images", refuse)
        backend.filter_on_device = True
        with caplog.at_level(logging.WARNING, logger="imagegen.render"):
            made = [output.png for output in backend.render_batch(jobs)]
        assert made == expected
        assert backend.filter_on_device is False
        assert "filtered on the host from now on" in caplog.text
        assert "OutOfMemoryError" in caplog.text
        assert [output.png for output in backend.render_batch(jobs)] == expected
        assert len(calls) == 1, "the device was asked again"
    finally:
        backend.close()


def test_a_listed_or_unbatched_output_is_filtered_and_other_channel_counts_stay_pil() -> None:
    images = [torch.from_numpy(_photo_like()).permute(2, 0, 1).float() / 255 for _ in range(2)]
    expected = _host_rows(_photo_like())
    backend = DiffusersBackend(Settings(device="cpu", png_encode_threads=2))
    for output in (images, images[0], torch.stack(images)):
        host = backend._host_images(output)
        assert all(isinstance(image, FilteredImage) for image in host)
        assert [image.rows.tobytes() for image in host] == [expected] * len(host)
    two = torch.stack(images)[:, :2]  # grey and alpha: the host's encoder takes no such rows
    [first, _] = backend._host_images(two)
    assert isinstance(first, Image.Image) and first.mode == "LA"
    assert np.array_equal(np.asarray(first), _photo_like()[..., :2])
