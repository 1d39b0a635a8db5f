"""The CUDA fast path: nothing changes off CUDA; on CUDA each option does what it says."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from imagegen.render._family import build_offline, call_options
from imagegen.render._fastpath import apply_fast_path, fuse_qkv, use_compile_cache
from imagegen.render.tiny import build_tiny_flux_pipeline
from imagegen.settings import Settings

EVERYTHING_ON = Settings(
    render_compile="regional", render_fuse_qkv=True, render_fp8=True, render_warmup=True
)


@pytest.fixture
def pipe() -> Any:
    return build_tiny_flux_pipeline()


def _compiled(module: torch.nn.Module) -> bool:
    return getattr(module, "_compiled_call_impl", None) is not None


def _fused(module: torch.nn.Module) -> bool:
    return any(getattr(m, "fused_projections", False) for m in module.modules())


@pytest.mark.parametrize("device", ["cpu", "mps"])
def test_off_cuda_nothing_is_applied(pipe: Any, device: str) -> None:
    assert apply_fast_path(pipe, EVERYTHING_ON, torch.device(device)) == []
    assert not _fused(pipe.transformer)
    assert not any(_compiled(m) for m in pipe.transformer.modules())


def test_regional_compile_wraps_each_repeated_block_and_only_those(pipe: Any) -> None:
    # torch.compile is lazy: wrapping the blocks compiles nothing until they run.
    settings = Settings(render_compile="regional")
    assert apply_fast_path(pipe, settings, torch.device("cuda")) == ["compile_regional"]
    blocks = [*pipe.transformer.transformer_blocks, *pipe.transformer.single_transformer_blocks]
    assert blocks and all(_compiled(block) for block in blocks)
    assert not _compiled(pipe.transformer)


def test_full_compile_wraps_the_transformer(pipe: Any) -> None:
    applied = apply_fast_path(pipe, Settings(render_compile="full"), torch.device("cuda"))
    assert applied == ["compile_full"]
    assert _compiled(pipe.transformer)


def test_fused_qkv_keeps_the_transformer_output(pipe: Any) -> None:
    transformer = pipe.transformer
    inputs = _transformer_inputs(transformer)
    with torch.inference_mode():
        before = transformer(**inputs, return_dict=False)[0]
    assert apply_fast_path(pipe, Settings(render_fuse_qkv=True), torch.device("cuda")) == [
        "fused_qkv"
    ]
    assert _fused(transformer)
    with torch.inference_mode():
        after = transformer(**inputs, return_dict=False)[0]
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("model", ["tiny", "tiny-klein"])
def test_fused_qkv_frees_the_projections_it_copied_and_renders_the_same(model: str) -> None:
    """diffusers' fusion keeps the separate projections (4.0 GiB more on FLUX.1 in bfloat16);
    the processors of FLUX.1 and FLUX.2 never call them once fused, so they are dropped."""
    pipe: Any = build_offline(model)
    transformer = pipe.transformer
    unfused = _parameters(transformer)
    before = _render(pipe, model)
    assert apply_fast_path(pipe, Settings(render_fuse_qkv=True), torch.device("cuda")) == [
        "fused_qkv"
    ]
    assert _fused(transformer)
    assert _parameters(transformer) == unfused
    fused = [m for m in transformer.modules() if getattr(m, "fused_projections", False)]
    assert fused and not any(hasattr(m, "to_q") or hasattr(m, "add_q_proj") for m in fused)
    np.testing.assert_allclose(_render(pipe, model), before, atol=1e-4)


def test_a_processor_that_may_call_the_separate_projections_keeps_them(pipe: Any) -> None:
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    class Unread(FluxAttnProcessor):
        """Not one of the processors read: it might call ``to_q`` once fused."""

    kept = pipe.transformer.transformer_blocks[0].attn
    kept.set_processor(Unread())  # type: ignore[no-untyped-call]
    before = _render(pipe, "tiny")
    freed = fuse_qkv(pipe.transformer)
    assert freed > 0 and kept.fused_projections
    assert all(hasattr(kept, name) for name in ("to_q", "to_k", "to_v", "add_q_proj"))
    np.testing.assert_allclose(_render(pipe, "tiny"), before, atol=1e-4)


@pytest.mark.parametrize("configured", [{"loras": "style-a"}, {"lora_dir": "/models/loras"}])
def test_with_loras_configured_neither_fusing_nor_compiling_is_applied(
    pipe: Any, configured: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A fused transformer never calls the projections peft adapts; and each new adapter set
    # is a recompile, past torch's limit of 8 a failure of every render (fullgraph=True).
    from imagegen.render import _fastpath

    said: list[str] = []
    monkeypatch.setattr(_fastpath.log, "warning", lambda message, *args: said.append(args[0]))
    settings = Settings(render_compile="regional", render_fuse_qkv=True, **configured)
    assert apply_fast_path(pipe, settings, torch.device("cuda")) == []
    assert not _fused(pipe.transformer)
    assert not any(_compiled(m) for m in pipe.transformer.modules())
    assert said == ["IMAGEGEN_RENDER_FUSE_QKV", "IMAGEGEN_RENDER_COMPILE"]


def test_the_compile_cache_goes_to_the_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    assert use_compile_cache(tmp_path / "inductor") is True
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "inductor")
    assert (tmp_path / "inductor").is_dir()
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    assert cache_dir() == str(tmp_path / "inductor")


def test_a_compile_cache_that_cannot_be_written_is_logged_and_left_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    blocker = tmp_path / "volume"
    blocker.write_text("a file where the directory would be")
    with caplog.at_level("WARNING", logger="imagegen.render"):
        assert use_compile_cache(blocker / "torch-compile") is False
    assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ
    [record] = [r for r in caplog.records if r.name == "imagegen.render"]
    assert "compiling without a persistent cache" in record.getMessage()
    assert str(blocker / "torch-compile") in record.getMessage()


class _Float8Config:
    """torchao 0.17's ``Float8DynamicActivationFloat8WeightConfig`` as far as render uses it:
    ``set_inductor_config`` is True unless said otherwise (torchao/quantization/quant_api.py)."""

    def __init__(self, *, set_inductor_config: bool = True) -> None:
        self.set_inductor_config = set_inductor_config


def _quantize(model: torch.nn.Module, config: _Float8Config) -> None:
    """torchao's ``quantize_`` for that config: where ``set_inductor_config`` holds, it first
    runs ``recommended_inductor_config_setter`` (quant_api.py; torchao/quantization/utils.py),
    which sets the process's Inductor options; then it quantises the weights (left out)."""
    if config.set_inductor_config:
        inductor = torch._inductor.config
        inductor.coordinate_descent_tuning = True
        inductor.coordinate_descent_check_all_directions = True
        torch.set_float32_matmul_precision("high")


def test_fp8_quantises_the_weights_alone_leaving_the_compilers_options(
    pipe: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torchao would tune every kernel compiled after it (coordinate descent), the blocks'
    compile under ``IMAGEGEN_RENDER_COMPILE`` too, and change float32 matmuls process-wide."""
    import sys
    import types

    import torch._inductor.config

    quantization = types.ModuleType("torchao.quantization")
    quantization.Float8DynamicActivationFloat8WeightConfig = _Float8Config  # type: ignore[attr-defined]
    quantization.quantize_ = _quantize  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torchao", types.ModuleType("torchao"))
    monkeypatch.setitem(sys.modules, "torchao.quantization", quantization)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    inductor = torch._inductor.config
    monkeypatch.setattr(inductor, "coordinate_descent_tuning", False)
    monkeypatch.setattr(inductor, "coordinate_descent_check_all_directions", False)
    precision = torch.get_float32_matmul_precision()
    try:
        assert apply_fast_path(pipe, Settings(render_fp8=True), torch.device("cuda")) == ["fp8"]
        assert not inductor.coordinate_descent_tuning
        assert not inductor.coordinate_descent_check_all_directions
        assert torch.get_float32_matmul_precision() == precision
    finally:
        torch.set_float32_matmul_precision(precision)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fp8_on_a_gpu_that_has_it(pipe: Any) -> None:
    device = torch.device("cuda")
    pipe.to(device, dtype=torch.bfloat16)
    applied = apply_fast_path(pipe, Settings(render_fp8=True), device)
    capable = torch.cuda.get_device_capability(device) >= (8, 9)
    assert ("fp8" in applied) == capable


def _parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _render(pipe: Any, model: str) -> np.ndarray:
    """What ``pipe`` renders at 64² in two steps, as floats."""
    images = pipe(
        prompt="a lighthouse at dusk",
        width=64,
        height=64,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(7),
        output_type="np",
        **call_options(pipe, model),
    ).images
    return np.asarray(images)


def _transformer_inputs(transformer: Any) -> dict[str, Any]:
    config = transformer.config
    generator = torch.Generator().manual_seed(0)
    tokens, text = 16, 8
    return {
        "hidden_states": torch.randn(1, tokens, config.in_channels, generator=generator),
        "encoder_hidden_states": torch.randn(
            1, text, config.joint_attention_dim, generator=generator
        ),
        "pooled_projections": torch.randn(1, config.pooled_projection_dim, generator=generator),
        "timestep": torch.tensor([0.5]),
        "img_ids": torch.zeros(tokens, 3),
        "txt_ids": torch.zeros(text, 3),
        "guidance": torch.tensor([3.5]) if config.guidance_embeds else None,
    }
