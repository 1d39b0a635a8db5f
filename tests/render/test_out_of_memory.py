"""A pipeline call that runs out of accelerator memory, on the real tiny pipeline.

The allocation failure is raised where the pipeline call is made, as torch raises it
(``torch.OutOfMemoryError``, "CUDA out of memory. Tried to allocate ..."): no GPU here."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from imagegen.errors import DependencyUnavailable
from imagegen.models import EnhancedPrompt

MakeJob = Callable[..., EnhancedPrompt]


@dataclass
class Memory:
    """The most images one pipeline call has the memory for; the sizes of the calls made."""

    most: int = 1
    calls: list[int] = field(default_factory=list)


@pytest.fixture
def memory(monkeypatch: pytest.MonkeyPatch) -> Memory:
    from imagegen.render.diffusers_backend import DiffusersBackend

    real = DiffusersBackend._denoise_and_decode
    memory = Memory()

    def allocating(self: Any, pipe: Any, jobs: list[EnhancedPrompt], progress: Any) -> Any:
        memory.calls.append(len(jobs))
        if len(jobs) > memory.most:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, pipe, jobs, progress)

    monkeypatch.setattr(DiffusersBackend, "_denoise_and_decode", allocating)
    return memory


def test_a_call_that_does_not_fit_is_a_retryable_refusal(
    backend: Any, make_job: MakeJob, memory: Memory, caplog: pytest.LogCaptureFixture
) -> None:
    memory.most = 0
    jobs = [make_job(generation_id=f"m{i}", seed=40 + i) for i in range(3)]
    for batch, what in ((jobs, "a batch of 3"), (jobs[:1], "one image")):
        with (
            caplog.at_level("WARNING", logger="imagegen.render"),
            pytest.raises(DependencyUnavailable) as refused,
        ):
            backend.render_batch(batch)
        assert refused.value.retryable and refused.value.status == 503
        assert refused.value.message == f"out of cpu memory rendering {what} at 256x256 tiny"
        assert f"out of memory for {what} at 256x256 tiny" in caplog.text


def test_a_refusal_holds_none_of_the_memory_of_the_call_that_failed(
    backend: Any, make_job: MakeJob, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tensors a call allocated before it ran out are freed before the cache is given
    back, and the refusal, which the stage holds while it runs a batch's jobs alone, keeps
    no traceback that would hold them."""
    import weakref

    from imagegen.render.diffusers_backend import DiffusersBackend

    held: list[weakref.ref[Any]] = []
    alive_at_empty_cache: list[bool] = []

    def allocating(self: Any, pipe: Any, jobs: list[EnhancedPrompt], progress: Any) -> Any:
        latents = torch.zeros(1024, 1024)  # what the call had allocated when it ran out
        held.append(weakref.ref(latents))
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    real_empty = DiffusersBackend._empty_cache

    def empty_cache(self: Any) -> None:
        alive_at_empty_cache.append(held[-1]() is not None)
        real_empty(self)

    monkeypatch.setattr(DiffusersBackend, "_denoise_and_decode", allocating)
    monkeypatch.setattr(DiffusersBackend, "_empty_cache", empty_cache)
    with pytest.raises(DependencyUnavailable) as refused:
        backend.render_batch([make_job(generation_id="held-1")])
    assert alive_at_empty_cache == [False]
    assert refused.value.__context__ is None and refused.value.__cause__ is None


async def test_a_batch_that_does_not_fit_is_rendered_one_image_at_a_time(
    backend: Any, make_job: MakeJob, memory: Memory, tmp_path: Path
) -> None:
    """The stage runs a failed batch's jobs alone: each fits, and is bit-exact."""
    import asyncio

    from imagegen.render.stage import RenderStage
    from imagegen.settings import Settings
    from imagegen.storage import LocalStorage

    settings = Settings(render_batch_size=3, render_batch_window_ms=2000)
    stage = RenderStage(settings, LocalStorage(tmp_path), lambda: backend)
    jobs = [make_job(generation_id=f"k{i}", prompt=f"a kite {i}", seed=50 + i) for i in range(3)]
    outputs = await asyncio.gather(*(stage.render_png(job) for job in jobs))
    assert memory.calls == [3, 1, 1, 1], "the batch, then each alone"
    assert [o.png for o in outputs] == [backend.render(job).png for job in jobs]


@pytest.fixture
def lora_backend(lora_dir: Path) -> Any:
    """A CPU backend of its own, whose tiny pipeline may take the LoRA ``lora_dir``."""
    from imagegen.render.diffusers_backend import DiffusersBackend
    from imagegen.settings import Settings

    backend = DiffusersBackend(Settings(device="cpu", lora_dir=lora_dir.parent))
    backend.load("tiny")
    yield backend
    backend.close()


@pytest.mark.parametrize("where", ["load_lora_weights", "set_adapters"])
def test_a_lora_that_does_not_fit_is_a_retryable_refusal(
    lora_backend: Any,
    lora_dir: Path,
    make_job: MakeJob,
    monkeypatch: pytest.MonkeyPatch,
    where: str,
) -> None:
    """torch's OutOfMemoryError is a RuntimeError, which a LoRA file that cannot be loaded
    raises too: loading or activating adapters out of memory is the device's state, not the
    request's, and is refused as a call that does not fit is."""
    from imagegen.models import LoraHint

    pipe = lora_backend._pipelines["tiny"]
    emptied: list[bool] = []
    real_empty = type(lora_backend)._empty_cache

    def allocating(*args: Any, **kwargs: Any) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 MiB")

    def empty_cache(self: Any) -> None:
        emptied.append(True)
        real_empty(self)

    monkeypatch.setattr(pipe, where, allocating)
    monkeypatch.setattr(type(lora_backend), "_empty_cache", empty_cache)
    job = make_job(generation_id="lora-1", loras=[LoraHint(name="sketchy", path=str(lora_dir))])
    with pytest.raises(DependencyUnavailable) as refused:
        lora_backend.render(job)
    assert refused.value.retryable and refused.value.status == 503
    assert refused.value.message == "out of cpu memory rendering one image at 256x256 tiny"
    assert emptied == [True]
    monkeypatch.undo()  # the device has the memory again: the same job renders
    assert lora_backend.render(job).png
