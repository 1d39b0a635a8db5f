"""DiffusersBackend on the real tiny FLUX pipeline: pixels, determinism, LoRA, errors."""

from __future__ import annotations

import io
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import huggingface_hub.constants
import numpy as np
import pytest
import torch
from PIL import Image

from imagegen.errors import DependencyUnavailable, InvalidRequest
from imagegen.models import EnhancedPrompt, LoraHint
from imagegen.render.base import RenderBackend
from imagegen.render.diffusers_backend import DiffusersBackend, select_device
from imagegen.render.png import read_png_text
from imagegen.render.tiny import T5_MAX_LENGTH
from imagegen.settings import Settings

MakeJob = Callable[..., EnhancedPrompt]


def _pixels(png: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(png)) as image:
        return np.asarray(image.convert("RGB"))


def test_implements_the_protocol(backend: DiffusersBackend) -> None:
    assert isinstance(backend, RenderBackend)
    assert backend.is_loaded("tiny")
    assert not backend.is_loaded("black-forest-labs/FLUX.1-dev")
    assert backend.load("tiny") == 0.0  # loaded once, then reused


@pytest.mark.parametrize(("width", "height"), [(256, 256), (256, 384), (384, 256)])
def test_renders_a_png_of_the_requested_size(
    backend: DiffusersBackend, make_job: MakeJob, width: int, height: int
) -> None:
    output = backend.render(make_job(width=width, height=height))

    assert output.png.startswith(b"\x89PNG\r\n\x1a\n")
    assert (output.width, output.height) == (width, height)
    with Image.open(io.BytesIO(output.png)) as image:
        assert image.size == (width, height)
        assert image.mode == "RGB"


def test_same_seed_gives_identical_bytes(backend: DiffusersBackend, make_job: MakeJob) -> None:
    job = make_job(seed=123)

    assert backend.render(job).png == backend.render(job).png


def test_the_png_strategy_setting_changes_the_bytes_not_the_pixels(
    backend: DiffusersBackend, make_job: MakeJob
) -> None:
    job = make_job(seed=5)
    pixels = backend.denoise_batch([job])
    rle = DiffusersBackend(Settings(device="cpu", png_compress_strategy="rle"))
    [default_png] = backend.encode_batch([job], pixels)
    [rle_png] = rle.encode_batch([job], pixels)

    assert rle_png.png != default_png.png
    assert np.array_equal(_pixels(rle_png.png), _pixels(default_png.png))
    assert read_png_text(rle_png.png) == read_png_text(default_png.png)


def test_png_threads_encode_the_same_pixels_and_text_in_parts(
    backend: DiffusersBackend, make_job: MakeJob
) -> None:
    job = make_job(seed=6)
    pixels = backend.denoise_batch([job])
    [alone] = backend.encode_batch([job], pixels)
    [parts] = DiffusersBackend(Settings(device="cpu", png_encode_threads=3)).encode_batch(
        [job], pixels
    )

    assert parts.png != alone.png  # another encoder wrote it
    assert np.array_equal(_pixels(parts.png), _pixels(alone.png))
    assert read_png_text(parts.png) == read_png_text(alone.png)


def test_different_seed_gives_different_pixels(
    backend: DiffusersBackend, make_job: MakeJob
) -> None:
    first = _pixels(backend.render(make_job(seed=1)).png)
    second = _pixels(backend.render(make_job(seed=2)).png)

    assert np.abs(first.astype(int) - second.astype(int)).mean() > 1.0


def test_matches_what_flux_pipeline_itself_decodes(
    backend: DiffusersBackend, make_job: MakeJob
) -> None:
    # The backend stops at the latents to time the VAE apart; the pixels must not change.
    job = make_job(seed=9, height=384)
    pipe = backend._pipelines["tiny"]
    expected = pipe(
        job.prompt,
        width=job.width,
        height=job.height,
        num_inference_steps=job.steps,
        guidance_scale=job.guidance,
        max_sequence_length=T5_MAX_LENGTH,
        generator=torch.Generator("cpu").manual_seed(job.seed),
    ).images[0]

    np.testing.assert_array_equal(_pixels(backend.render(job).png), np.asarray(expected))


def test_png_text_chunks_describe_the_generation(
    backend: DiffusersBackend, make_job: MakeJob
) -> None:
    job = make_job(prompt="夕暮れの灯台, a lighthouse", seed=77, generation_id="gen-77")

    text = read_png_text(backend.render(job).png)

    assert text["prompt"] == "夕暮れの灯台, a lighthouse"
    assert text["seed"] == "77"
    assert text["model"] == "tiny"
    assert "generation_id" not in text  # the same job under another id: the same file
    assert text["steps"] == "2"
    assert text["guidance"] == "3.5"


def test_progress_is_reported_once_per_step(backend: DiffusersBackend, make_job: MakeJob) -> None:
    calls: list[tuple[int, int]] = []

    backend.render(make_job(steps=3), progress=lambda step, total: calls.append((step, total)))

    assert calls == [(1, 3), (2, 3), (3, 3)]


def test_a_progress_report_that_raises_ends_the_call_at_that_step_undecoded(
    backend: DiffusersBackend, make_job: MakeJob, monkeypatch: pytest.MonkeyPatch
) -> None:
    """How the render stage interrupts a call (its batcher closed): what the report of a step
    raises ends the pipeline's loop there, with no decode of the half-denoised latents, and
    leaves the pipeline as it was for the next call."""
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL

    job = make_job(steps=6)
    before = backend.render(job).png

    class Stop(BaseException):
        pass

    reported: list[int] = []
    decoded: list[int] = []
    decode = AutoencoderKL.decode

    def counted(self: AutoencoderKL, *args: Any, **kwargs: Any) -> Any:
        decoded.append(1)
        return decode(self, *args, **kwargs)

    def progress(step: int, total: int) -> None:
        reported.append(step)
        if step == 2:
            raise Stop

    monkeypatch.setattr(AutoencoderKL, "decode", counted)
    with pytest.raises(Stop):
        backend.render(job, progress=progress)

    assert reported == [1, 2] and decoded == []
    assert backend.render(job).png == before and decoded == [1]


def test_a_render_leaves_no_progress_bar_thread(
    backend: DiffusersBackend, make_job: MakeJob
) -> None:
    # The pipeline makes a (disabled) tqdm bar per call; a bar starts tqdm's monitor thread.
    backend.render(make_job(steps=1))

    assert "tqdm_monitor" not in {thread.name for thread in threading.enumerate()}


def test_timings_split_the_phases(backend: DiffusersBackend, make_job: MakeJob) -> None:
    timings = backend.render(make_job()).timings

    assert set(timings) == {"denoise", "decode", "encode", "total"}
    assert all(value > 0 for value in timings.values())
    phases = timings["denoise"] + timings["decode"] + timings["encode"]
    assert phases <= timings["total"]


def test_lora_changes_the_image_and_is_removed_afterwards(
    backend: DiffusersBackend, make_job: MakeJob, lora_dir: Path
) -> None:
    pipe = backend._pipelines["tiny"]
    plain = make_job(seed=5)
    styled = make_job(seed=5, loras=[LoraHint(name="sketchy", path=str(lora_dir), weight=1.0)])
    half = make_job(seed=5, loras=[LoraHint(name="sketchy", path=str(lora_dir), weight=0.5)])
    before = backend.render(plain)

    with_lora = backend.render(styled)
    adapters = pipe.get_list_adapters()
    with_half = backend.render(half)
    after = backend.render(plain)

    base = _pixels(before.png).astype(int)
    full_change = np.abs(_pixels(with_lora.png).astype(int) - base).mean()
    half_change = np.abs(_pixels(with_half.png).astype(int) - base).mean()
    assert 0 < half_change < full_change
    assert after.png == before.png
    assert "lora" in with_lora.timings
    assert read_png_text(with_lora.png)["loras"] == "sketchy:1"
    # Cached by name: the second job reused the adapter instead of loading it again.
    assert "sketchy" in adapters["transformer"]
    assert pipe.get_list_adapters() == adapters


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`:UserWarning")
def test_lora_weights_file_is_accepted(
    backend: DiffusersBackend, make_job: MakeJob, lora_dir: Path
) -> None:
    weights = lora_dir / "pytorch_lora_weights.safetensors"
    job = make_job(seed=5, loras=[LoraHint(name="sketchy-file", path=str(weights), weight=1.0)])
    by_directory = make_job(seed=5, loras=[LoraHint(name="sketchy", path=str(lora_dir))])

    assert (
        _pixels(backend.render(job).png).tolist()
        == _pixels(backend.render(by_directory).png).tolist()
    )


def test_a_configured_lora_not_there_is_retried(make_job: MakeJob, lora_dir: Path) -> None:
    # A fresh model: the first adapter it loads comes enabled. The operator listed the file
    # (a volume not mounted yet, say): the job is fine, and is retried.
    gone = "/no/such/lora.safetensors"
    backend = DiffusersBackend(Settings(device="cpu", lora_dir=lora_dir.parent, loras=[gone]))
    backend.load("tiny")
    found = LoraHint(name="sketchy", path=str(lora_dir))
    missing = LoraHint(name="gone", path=gone)
    before = backend.render(make_job(seed=6))

    with pytest.raises(DependencyUnavailable, match="configured but its file is not there"):
        backend.render(make_job(loras=[found, missing]))

    # The adapter that did load before the failure is not left active.
    assert backend.render(make_job(seed=6)).png == before.png


def test_rendering_a_model_not_loaded_names_the_model_field(
    backend: DiffusersBackend, make_job: MakeJob
) -> None:
    with pytest.raises(InvalidRequest) as caught:
        backend.render(make_job(model="black-forest-labs/FLUX.1-dev"))

    assert caught.value.fields == ["model"]


def test_loads_a_saved_pipeline_from_a_directory(
    backend: DiffusersBackend, make_job: MakeJob, tiny_dir: Path
) -> None:
    from_disk = DiffusersBackend(Settings(device="cpu"))
    assert from_disk.load(str(tiny_dir)) > 0
    try:
        loaded = from_disk.render(make_job(model=str(tiny_dir), seed=11))
    finally:
        from_disk.close()

    assert not from_disk.is_loaded(str(tiny_dir))
    built = backend.render(make_job(seed=11))
    np.testing.assert_array_equal(_pixels(loaded.png), _pixels(built.png))


@pytest.mark.parametrize("model", ["./no/such/model", "/no/such/model", "a/b/c"])
def test_unknown_local_path_is_an_invalid_request(model: str) -> None:
    with pytest.raises(InvalidRequest, match="no such model directory") as caught:
        DiffusersBackend(Settings(device="cpu")).load(model)

    assert caught.value.fields == ["model"]


def test_a_directory_that_is_not_a_pipeline_is_an_invalid_request(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequest, match=r"model_index\.json") as caught:
        DiffusersBackend(Settings(device="cpu")).load(str(tmp_path))

    assert caught.value.fields == ["model"]


def test_invalid_hub_id_is_an_invalid_request() -> None:
    with pytest.raises(InvalidRequest) as caught:
        DiffusersBackend(Settings(device="cpu")).load("not a valid id!")

    assert caught.value.fields == ["model"]


def test_uncached_model_offline_is_retryable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    backend = DiffusersBackend(Settings(device="cpu", model_cache_dir=tmp_path))

    with pytest.raises(DependencyUnavailable) as caught:
        backend.load("black-forest-labs/FLUX.1-schnell")

    assert caught.value.retryable
    assert "\n" not in caught.value.message
    assert "HF_HUB_OFFLINE" in caught.value.message
    assert not backend.is_loaded("black-forest-labs/FLUX.1-schnell")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_without_cuda_is_unavailable() -> None:
    backend = DiffusersBackend(Settings(device="cuda"))

    with pytest.raises(DependencyUnavailable, match="cuda"):
        backend.load("tiny")
    with pytest.raises(DependencyUnavailable):
        select_device("cuda")
    assert backend.describe()["device"].startswith("unavailable")


def test_cpu_runs_in_float32() -> None:
    assert select_device("cpu") == (torch.device("cpu"), torch.float32)


def test_describe_reports_versions_and_device(backend: DiffusersBackend) -> None:
    info: dict[str, Any] = backend.describe()

    assert info["torch"] == torch.__version__
    assert info["device"] == "cpu"
    assert info["dtype"] == "float32"
    assert "tiny" in info["loaded"]
    assert set(info) >= {"diffusers", "cuda", "mps", "device_setting"}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_tiny_renders_in_bfloat16_on_cuda(make_job: MakeJob) -> None:
    backend = DiffusersBackend(Settings(device="cuda"))
    backend.load("tiny")
    try:
        job = make_job(seed=3, height=384)
        first, second = backend.render(job), backend.render(job)
    finally:
        backend.close()

    assert backend.describe()["dtype"] == "bfloat16"
    assert (first.width, first.height) == (256, 384)
    assert first.png == second.png


def test_a_model_index_that_is_no_json_object_is_damage_not_a_bad_name(
    tiny_dir: Path, tmp_path: Path
) -> None:
    # What pull checks: a file of the model that cannot be what it is, said by name.
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_dir, broken)
    (broken / "model_index.json").write_text("[]")
    with pytest.raises(DependencyUnavailable, match=r"model_index\.json is no JSON object"):
        DiffusersBackend(Settings(device="cpu")).load(str(broken))


@pytest.mark.parametrize("index", ["{}", '{"_class_name": null}'])
def test_a_model_index_of_another_shape_is_an_invalid_request(
    tiny_dir: Path, tmp_path: Path, index: str
) -> None:
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_dir, broken)
    (broken / "model_index.json").write_text(index)
    with pytest.raises(InvalidRequest, match="not a text-to-image pipeline") as caught:
        DiffusersBackend(Settings(device="cpu")).load(str(broken))
    assert caught.value.fields == ["model"]


def test_loading_a_pipeline_draws_no_progress_bar(
    tiny_dir: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    # A server's stderr holds JSON log lines only; the command line shows its own progress.
    capfd.readouterr()
    backend = DiffusersBackend(Settings(device="cpu"))
    try:
        backend.load(str(tiny_dir))
    finally:
        backend.close()
    assert "Loading pipeline components" not in capfd.readouterr().err
