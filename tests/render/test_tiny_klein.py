"""The tiny FLUX.2 [klein] pipeline, alone and behind DiffusersBackend: the Flux2KleinPipeline
path end to end on a CPU (prompt template, pixels, determinism, reload, LoRA, PNG text)."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import Flux2KleinPipeline
from PIL import Image

from imagegen.models import EnhancedPrompt, LoraHint
from imagegen.modelspec import TINY_FLUX2_KLEIN
from imagegen.render.diffusers_backend import DiffusersBackend
from imagegen.render.png import read_png_text
from imagegen.render.tiny_klein import build_tiny_klein_pipeline
from imagegen.settings import Settings
from tests.render.tiny_files import KLEIN_LORA_TARGETS, save_lora

MakeJob = Callable[..., EnhancedPrompt]


def _klein_job(make_job: MakeJob, **overrides: Any) -> EnhancedPrompt:
    return make_job(**{"model": "tiny-klein", "guidance": 1.0, **overrides})


def _pixels(png: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(png)) as image:
        return np.asarray(image.convert("RGB"))


def _own_render(pipe: Any, job: EnhancedPrompt) -> np.ndarray:
    """What Flux2KleinPipeline renders for ``job`` when called directly."""
    image = pipe(
        prompt=job.prompt,
        width=job.width,
        height=job.height,
        num_inference_steps=job.steps,
        guidance_scale=job.guidance,
        max_sequence_length=TINY_FLUX2_KLEIN.prompt_tokens,
        text_encoder_out_layers=TINY_FLUX2_KLEIN.text_encoder_layers,
        generator=torch.Generator("cpu").manual_seed(job.seed),
    ).images[0]
    return np.asarray(image)


def test_is_the_real_klein_pipeline_step_distilled() -> None:
    pipe = build_tiny_klein_pipeline()

    assert isinstance(pipe, Flux2KleinPipeline)
    assert pipe.config.is_distilled  # like the published [klein] checkpoints
    assert pipe.vae_scale_factor == 8  # any multiple of 16 fits the 2x2 latent patches
    assert pipe.transformer.config.joint_attention_dim == (
        pipe.text_encoder.config.hidden_size * len(TINY_FLUX2_KLEIN.text_encoder_layers or ())
    )


def test_tokenizer_applies_qwen3_chat_template_offline() -> None:
    tokenizer = build_tiny_klein_pipeline().tokenizer
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "夕暮れ, a lighthouse"}],
        tokenize=False,
        add_generation_prompt=True,
        enable_thinking=False,
    )

    assert text == (
        "<|im_start|>user\n夕暮れ, a lighthouse<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )
    ids = tokenizer(text).input_ids
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")  # one token, not bytes
    assert tokenizer.unk_token_id not in ids[1:-1]  # bytes cover every script
    assert tokenizer.model_max_length == TINY_FLUX2_KLEIN.prompt_tokens


def test_same_seed_builds_the_same_weights() -> None:
    ours, again, other = (build_tiny_klein_pipeline(s) for s in (0, 0, 1))

    for name in ("transformer", "vae", "text_encoder"):
        mine, theirs = getattr(ours, name).state_dict(), getattr(again, name).state_dict()
        assert all(torch.equal(mine[key], theirs[key]) for key in mine), name
    assert not torch.equal(ours.transformer.proj_out.weight, other.transformer.proj_out.weight)


@pytest.mark.parametrize(("width", "height"), [(256, 256), (256, 384)])
def test_backend_renders_a_png_of_the_requested_size(
    klein_backend: DiffusersBackend, make_job: MakeJob, width: int, height: int
) -> None:
    output = klein_backend.render(_klein_job(make_job, width=width, height=height))

    assert (output.width, output.height) == (width, height)
    assert _pixels(output.png).shape == (height, width, 3)
    assert set(output.timings) == {"denoise", "decode", "encode", "total"}


def test_backend_is_reproducible_and_seed_dependent(
    klein_backend: DiffusersBackend, make_job: MakeJob
) -> None:
    job = _klein_job(make_job, seed=5)
    first = klein_backend.render(job).png

    assert klein_backend.render(job).png == first
    other = _pixels(klein_backend.render(_klein_job(make_job, seed=6)).png)
    assert np.abs(_pixels(first).astype(int) - other.astype(int)).mean() > 1.0


def test_backend_matches_what_the_pipeline_itself_renders(
    klein_backend: DiffusersBackend, make_job: MakeJob
) -> None:
    job = _klein_job(make_job, seed=9, height=384, prompt="a red fox in fresh snow")
    pipe = klein_backend._pipelines["tiny-klein"]

    np.testing.assert_array_equal(_pixels(klein_backend.render(job).png), _own_render(pipe, job))


def test_png_text_and_progress(klein_backend: DiffusersBackend, make_job: MakeJob) -> None:
    steps: list[tuple[int, int]] = []
    job = _klein_job(make_job, steps=3, seed=77, prompt="夕暮れの灯台")

    output = klein_backend.render(job, progress=lambda step, total: steps.append((step, total)))

    assert steps == [(1, 3), (2, 3), (3, 3)]
    text = read_png_text(output.png)
    assert (text["prompt"], text["model"], text["seed"]) == ("夕暮れの灯台", "tiny-klein", "77")
    assert (text["steps"], text["guidance"]) == ("3", "1")


def test_saved_and_reloaded_pipeline_renders_the_same_pixels(
    klein_backend: DiffusersBackend, make_job: MakeJob, klein_dir: Path
) -> None:
    reloaded = Flux2KleinPipeline.from_pretrained(klein_dir)  # type: ignore[no-untyped-call]
    reloaded.set_progress_bar_config(disable=True)
    job = _klein_job(make_job, seed=11, width=384)

    assert (klein_dir / "tokenizer" / "chat_template.jinja").is_file()
    assert reloaded.config.is_distilled
    np.testing.assert_array_equal(
        _own_render(reloaded, job), _pixels(klein_backend.render(job).png)
    )


def test_lora_changes_the_image_and_is_removed_afterwards(
    klein_backend: DiffusersBackend, make_job: MakeJob, lora_root: Path
) -> None:
    path = save_lora(
        build_tiny_klein_pipeline(),
        lora_root / "klein-sketch",
        targets=KLEIN_LORA_TARGETS,
        gain=8.0,
    )
    plain = _klein_job(make_job, seed=21)
    styled = _klein_job(make_job, seed=21, loras=[LoraHint(name="klein-sketch", path=str(path))])

    before = _pixels(klein_backend.render(plain).png)
    with_lora = _pixels(klein_backend.render(styled).png)

    assert np.abs(before.astype(int) - with_lora.astype(int)).mean() > 1.0
    np.testing.assert_array_equal(_pixels(klein_backend.render(plain).png), before)


def test_backend_loads_the_saved_pipeline_from_its_directory(
    klein_backend: DiffusersBackend, make_job: MakeJob, klein_dir: Path
) -> None:
    from_disk = DiffusersBackend(Settings(device="cpu"))
    try:
        from_disk.load(str(klein_dir))
        loaded = from_disk.render(_klein_job(make_job, model=str(klein_dir), seed=12))
    finally:
        from_disk.close()

    built = klein_backend.render(_klein_job(make_job, seed=12))
    np.testing.assert_array_equal(_pixels(loaded.png), _pixels(built.png))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_klein_renders_in_bfloat16_on_cuda(make_job: MakeJob) -> None:
    backend = DiffusersBackend(Settings(device="cuda"))
    backend.load("tiny-klein")
    try:
        job = _klein_job(make_job, seed=3, height=384)
        first, second = backend.render(job), backend.render(job)
        pipe = backend._pipelines["tiny-klein"]
        dtypes = {pipe.transformer.dtype, pipe.text_encoder.dtype, pipe.vae.dtype}
    finally:
        backend.close()

    assert dtypes == {torch.bfloat16}
    assert (first.width, first.height) == (256, 384)
    assert first.png == second.png
    assert _pixels(first.png).std() > 1.0  # not a blank image: bf16 did not overflow
