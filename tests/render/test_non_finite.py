"""Pixels that are not numbers, on the real tiny pipelines: refused, never stored black.

In float16 (GPUs before Ampere) FLUX.2 [klein]'s Qwen3 text encoder overflows; here its input
embedding of one token is made NaN, so every prompt with that token is poisoned as an
overflow poisons it, and the others are not."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from imagegen.errors import ConfigurationError
from imagegen.models import EnhancedPrompt
from imagegen.render.diffusers_backend import DiffusersBackend
from imagegen.settings import Settings

MakeJob = Callable[..., EnhancedPrompt]
POISON = "~"
"""The token whose embedding is NaN: a prompt that has it makes NaN pixels."""


def _poisoned(model: str, **settings: Any) -> DiffusersBackend:
    backend = DiffusersBackend(Settings(device="cpu", **settings))
    backend.load(model)
    pipe = backend._pipelines[model]
    # The encoder whose states the transformer reads: T5 for FLUX.1, Qwen3 for [klein].
    encoder = getattr(pipe, "text_encoder_2", None) or pipe.text_encoder
    tokenizer = getattr(pipe, "tokenizer_2", None) or pipe.tokenizer
    [token] = set(tokenizer(f"a {POISON} kite").input_ids) - set(tokenizer("a kite").input_ids)
    with torch.no_grad():
        encoder.get_input_embeddings().weight[token] = float("nan")
    return backend


@pytest.fixture(params=["tiny", "tiny-klein"])
def poisoned(request: pytest.FixtureRequest) -> Iterator[DiffusersBackend]:
    backend = _poisoned(request.param, png_encode_threads=2)
    yield backend
    backend.close()


def _job(make_job: MakeJob, backend: DiffusersBackend, **overrides: Any) -> EnhancedPrompt:
    [model] = backend._pipelines
    guidance = {"guidance": 1.0} if model == "tiny-klein" else {}
    return make_job(model=model, **guidance, **overrides)


@pytest.mark.parametrize("on_device", [False, True], ids=["host", "device"])
def test_non_finite_pixels_are_refused_as_the_deployment_s_fault(
    poisoned: DiffusersBackend,
    make_job: MakeJob,
    on_device: bool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # On the host the pipeline's floats are checked before they are quantised; on CUDA (forced
    # here on the CPU) its tensor is, before its rows are filtered.
    poisoned.filter_on_device = on_device
    [model] = poisoned._pipelines
    job = _job(make_job, poisoned, generation_id="nan-1", prompt=f"a {POISON} kite")
    with (
        caplog.at_level(logging.ERROR, logger="imagegen.render"),
        pytest.raises(ConfigurationError) as refused,
    ):
        poisoned.render(job)
    error = refused.value
    assert error.status == 503 and error.retryable
    assert error.message.startswith(f"{model} made non-finite pixels (NaN) in the image")
    assert "in float32 on cpu" in error.message
    assert error.fields == ["IMAGEGEN_DEVICE"]
    [record] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert record.generation_ids == ["nan-1"]  # type: ignore[attr-defined]
    # A prompt without the token is untouched.
    assert poisoned.render(_job(make_job, poisoned, prompt="a kite")).png


def test_in_float16_the_refusal_says_to_use_a_gpu_with_bfloat16(
    poisoned: DiffusersBackend, make_job: MakeJob
) -> None:
    # What a GPU before Ampere runs in (_device.select_device); said, not rendered, here.
    poisoned._target = (torch.device("cpu"), torch.float16)
    with pytest.raises(ConfigurationError, match="in float16 on cpu") as refused:
        poisoned.render(_job(make_job, poisoned, prompt=f"a {POISON} kite"))
    assert "a GPU with bfloat16 (Ampere or newer), or set IMAGEGEN_DEVICE=cpu" in str(refused.value)


def test_in_a_batch_only_the_poisoned_job_fails_and_nothing_black_is_stored(
    make_job: MakeJob, tmp_path: Path
) -> None:
    from imagegen.render.stage import RenderStage
    from imagegen.storage import LocalStorage

    backend = _poisoned("tiny-klein")
    calls: list[int] = []
    denoise = backend._denoise_and_decode

    def counted(pipe: Any, jobs: list[EnhancedPrompt], progress: Any) -> Any:
        calls.append(len(jobs))
        return denoise(pipe, jobs, progress)

    backend._denoise_and_decode = counted  # type: ignore[method-assign]
    settings = Settings(render_batch_size=2, render_batch_window_ms=2000)
    stage = RenderStage(settings, LocalStorage(tmp_path), lambda: backend)
    clean = _job(make_job, backend, generation_id="clean-1", prompt="a kite", seed=1)
    nan = _job(make_job, backend, generation_id="nan-2", prompt=f"a {POISON} kite", seed=2)

    async def both() -> tuple[Any, Any]:
        return await asyncio.gather(stage.render(clean), stage.render(nan), return_exceptions=True)

    try:
        stored, refused = asyncio.run(both())
    finally:
        backend.close()
    assert calls == [2, 1, 1], "the batch, then each alone"
    assert isinstance(refused, ConfigurationError)
    assert not isinstance(stored, BaseException)
    pngs = sorted(path.name for path in tmp_path.rglob("*.png"))
    assert pngs == [Path(stored.key).name]
