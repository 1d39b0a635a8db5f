"""The tiny FLUX pipeline: built offline, deterministic, and loadable by diffusers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline

from imagegen.render.tiny import CLIP_MAX_LENGTH, T5_MAX_LENGTH, build_tiny_flux_pipeline


def _pixels(pipe: Any, *, seed: int = 0, width: int = 256, height: int = 256) -> np.ndarray:
    image = pipe(
        "a lighthouse at dusk",
        width=width,
        height=height,
        num_inference_steps=2,
        guidance_scale=3.5,
        max_sequence_length=T5_MAX_LENGTH,
        generator=torch.Generator("cpu").manual_seed(seed),
    ).images[0]
    return np.asarray(image)


@pytest.fixture(scope="module")
def pipe() -> Any:
    return build_tiny_flux_pipeline()


def test_pixel_size_matches_the_request(pipe: Any) -> None:
    assert pipe.vae_scale_factor == 8  # so any multiple of 16 fits FLUX's 2x2 latent packing

    assert _pixels(pipe).shape == (256, 256, 3)
    assert _pixels(pipe, width=256, height=384).shape == (384, 256, 3)


def test_tokenizers_are_built_locally(pipe: Any) -> None:
    clip, t5 = pipe.tokenizer, pipe.tokenizer_2

    assert clip.model_max_length == CLIP_MAX_LENGTH
    assert t5.model_max_length == T5_MAX_LENGTH
    ids = clip("夕暮れ, a lighthouse").input_ids
    assert ids[0] == clip.bos_token_id and ids[-1] == clip.eos_token_id
    assert ids.count(clip.unk_token_id) == 1  # only the final <|endoftext|>: bytes cover all
    assert t5("a lighthouse").input_ids[-1] == t5.eos_token_id
    assert clip.pad_token is not None and t5.pad_token_id == 0


def test_same_seed_builds_the_same_weights(pipe: Any) -> None:
    again = build_tiny_flux_pipeline()
    other = build_tiny_flux_pipeline(seed=1)

    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        ours, theirs = getattr(pipe, name).state_dict(), getattr(again, name).state_dict()
        assert all(torch.equal(ours[key], theirs[key]) for key in ours), name
    assert not torch.equal(pipe.transformer.proj_out.weight, other.transformer.proj_out.weight)


def test_saved_and_reloaded_pipeline_renders_the_same_pixels(pipe: Any, tiny_dir: Path) -> None:
    reloaded = FluxPipeline.from_pretrained(tiny_dir)  # type: ignore[no-untyped-call]
    reloaded.set_progress_bar_config(disable=True)

    assert (tiny_dir / "model_index.json").is_file()
    np.testing.assert_array_equal(_pixels(reloaded, seed=3), _pixels(pipe, seed=3))
    np.testing.assert_array_equal(
        _pixels(reloaded, seed=4, height=384), _pixels(pipe, seed=4, height=384)
    )
