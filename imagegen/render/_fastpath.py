"""The CUDA fast path: options applied to a loaded pipeline's transformer, each behind a setting.

Nothing here runs off CUDA: on the CPU and on MPS a pipeline renders exactly as loaded. On CUDA
the pipeline already runs in bfloat16 (``_device``); these options trade start-up time, memory
or exactness for speed (docs/rendering.md says which costs what):

- ``render_fuse_qkv``: one matmul for the query, key and value projections (diffusers'
  ``fuse_qkv_projections``); same maths, different float rounding. The separate projections
  it copies are then dropped where the attention never calls them again.
- ``render_fp8``: fp8 weights and activations through torchao, on GPUs with fp8 tensor cores
  (compute capability 8.9+: Ada, Hopper); about half the transformer's memory, lower precision.
- ``render_compile``: ``torch.compile``; ``regional`` compiles the transformer's repeated
  blocks once each (diffusers' ``compile_repeated_blocks``), ``full`` the whole transformer.
- ``render_compile_cache_dir``: Inductor's cache on a persistent volume, so a warm start loads
  compiled kernels instead of compiling them again.

Where LoRAs are configured (``loras``, ``lora_dir``) neither fusing nor compiling is applied:
peft adapts the separate query, key and value projections, which a fused transformer no longer
calls (the adapters would change nothing), and every new set of adapters changes the blocks a
full-graph compile guards on, until torch's recompile limit (8) fails every render after it.

Importing this module imports torch.
"""

from __future__ import annotations

import importlib
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from imagegen.settings import Settings

__all__ = ["FP8_MIN_CAPABILITY", "apply_fast_path", "fuse_qkv", "use_compile_cache"]

log = logging.getLogger("imagegen.render")

FP8_MIN_CAPABILITY = (8, 9)
"""fp8 tensor cores: Ada (8.9) and Hopper (9.0) onwards."""

# Processors that, once their module's ``fused_projections`` is set, project through
# ``to_qkv`` and ``to_added_qkv`` alone (``_get_qkv_projections`` in diffusers'
# models/transformers/transformer_flux.py and transformer_flux2.py); others, the legacy
# ``attention_processor`` ones among them, may still call ``to_q``, which is then kept.
_CALLS_FUSED_ONLY = frozenset(
    {
        "diffusers.models.transformers.transformer_flux.FluxAttnProcessor",
        "diffusers.models.transformers.transformer_flux2.Flux2AttnProcessor",
        "diffusers.models.transformers.transformer_flux2.Flux2KVAttnProcessor",
    }
)
# What diffusers' ``AttentionModuleMixin.fuse_projections`` (models/attention.py) concatenates.
_UNFUSED = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")


def apply_fast_path(pipe: Any, settings: Settings, device: torch.device) -> list[str]:
    """Apply the enabled options to ``pipe`` on ``device``; return the names of those applied.

    Off CUDA, or for a pipeline without a transformer, nothing is applied.
    """
    transformer = getattr(pipe, "transformer", None)
    if device.type != "cuda" or transformer is None:
        return []
    applied: list[str] = []
    loras = bool(settings.loras or settings.lora_dir)
    for wanted, option in (
        (settings.render_fuse_qkv, "IMAGEGEN_RENDER_FUSE_QKV"),
        (settings.render_compile != "off", "IMAGEGEN_RENDER_COMPILE"),
    ):
        if wanted and loras:
            log.warning("%s is not applied: LoRAs are configured (docs/rendering.md)", option)
    # Fuse before quantising (the fused projection is quantised as one) and compile last.
    if settings.render_fuse_qkv and not loras:
        fuse_qkv(transformer)
        applied.append("fused_qkv")
    if settings.render_fp8 and _quantize_fp8(transformer, device):
        applied.append("fp8")
    if settings.render_compile != "off" and not loras:
        if settings.render_compile_cache_dir is not None:
            use_compile_cache(settings.render_compile_cache_dir)
        if settings.render_compile == "regional":
            transformer.compile_repeated_blocks(fullgraph=True)
        else:
            transformer.compile(fullgraph=True)
        applied.append(f"compile_{settings.render_compile}")
    log.info("CUDA fast path: %s", ", ".join(applied) or "none")
    return applied


def fuse_qkv(transformer: Any) -> int:
    """Fuse ``transformer``'s query, key and value projections; return the parameters freed.

    diffusers' ``fuse_projections`` copies the projections into ``to_qkv`` (and the text
    stream's into ``to_added_qkv``) and keeps the originals: 4.0 GiB more in bfloat16 on
    FLUX.1, 0.5 GiB on FLUX.2 [klein] 4B. Where a module's processor never calls them once
    fused, they are dropped, so fusing costs no memory there. Unfusing
    (``unfuse_qkv_projections``) would then leave that module without projections; nothing
    here asks for it.
    """
    transformer.fuse_qkv_projections()
    freed = 0
    for module in transformer.modules():
        if not getattr(module, "fused_projections", False):
            continue
        processor = type(getattr(module, "processor", None))
        if f"{processor.__module__}.{processor.__qualname__}" not in _CALLS_FUSED_ONLY:
            continue
        for name in _UNFUSED:
            projection = getattr(module, name, None)
            if isinstance(projection, torch.nn.Module):
                freed += sum(p.numel() for p in projection.parameters())
                delattr(module, name)
    return freed


def use_compile_cache(directory: Path) -> bool:
    """Keep Inductor's compiled kernels (and Triton's) under ``directory``, if it is writable.

    Inductor reads ``TORCHINDUCTOR_CACHE_DIR`` whenever it compiles, and puts Triton's cache
    beneath it unless ``TRITON_CACHE_DIR`` says otherwise; its FX graph cache is on by default.
    A directory that cannot be written (a read-only model volume, say) is logged and left
    alone: the pod compiles into Inductor's default cache, as without the setting, rather than
    failing its start on every compile.

    Returns:
        Whether the cache is ``directory``.
    """
    try:
        directory.mkdir(parents=True, exist_ok=True)
        # Written to, not asked (os.access): a read-only mount or a foreign owner says no here.
        tempfile.TemporaryFile(dir=directory).close()
    except OSError as error:
        log.warning(
            "compile cache %s is not writable (%s): compiling without a persistent cache",
            directory,
            error,
        )
        return False
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(directory)
    # On by default in recent torch; said for the older ones the render extra admits.
    os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
    os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "1")
    return True


def _quantize_fp8(transformer: Any, device: torch.device) -> bool:
    capability = torch.cuda.get_device_capability(device)
    if capability < FP8_MIN_CAPABILITY:
        log.warning("fp8 needs compute capability 8.9+; this GPU has %d.%d", *capability)
        return False
    try:
        quantization = importlib.import_module("torchao.quantization")
    except ImportError:
        log.warning("fp8 needs torchao (pip install 'imagegen[fp8]'); running in bfloat16")
        return False
    # Its weights alone: torchao's config would otherwise set the process's Inductor options
    # to its own liking (set_inductor_config, True by default: coordinate-descent tuning of
    # every kernel compiled after, float32 matmuls at "high"; torchao/quantization/quant_api.py,
    # recommended_inductor_config_setter), which every later compile would pay for.
    config = quantization.Float8DynamicActivationFloat8WeightConfig(set_inductor_config=False)
    quantization.quantize_(transformer, config)
    return True
