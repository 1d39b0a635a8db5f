"""The tiny pipelines and random LoRAs for them, saved in diffusers' layouts for loading tests."""

from __future__ import annotations

import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["FLUX_LORA_TARGETS", "KLEIN_LORA_TARGETS", "save_lora", "save_pipeline"]

_TENSOR_ALIGNMENT = 64  # bytes; what torch's CPU allocator gives fresh tensors

FLUX_LORA_TARGETS = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "add_q_proj",
    "add_k_proj",
    "add_v_proj",
)
"""The attention projections of both FLUX.1 block kinds."""

KLEIN_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "to_qkv_mlp_proj")
"""FLUX.2's: its single-stream blocks fuse q, k, v and the MLP input into one projection."""


def save_pipeline(pipe: Any, path: Path) -> Path:
    """Save ``pipe`` in diffusers' layout, loadable by ``from_pretrained``; return ``path``."""
    pipe.save_pretrained(path, safe_serialization=True)
    for weights in sorted(path.glob("*/*.safetensors")):
        _align_tensor_data(weights)
    return path


def save_lora(
    pipe: Any,
    path: Path,
    *,
    targets: Sequence[str],
    seed: int = 1,
    rank: int = 4,
    gain: float = 1.0,
) -> Path:
    """Save a random LoRA for ``pipe``'s transformer, in diffusers' LoRA format.

    Both low-rank matrices are random (a freshly trained LoRA's B is zero), so loading it
    visibly changes the image; ``gain`` scales B up for a transformer whose own projections
    are small. ``pipe`` is changed: pass a freshly built one. Needs ``peft``.

    Returns:
        ``path``, which holds ``pytorch_lora_weights.safetensors``, loadable with
        ``pipe.load_lora_weights(path)``.
    """
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    transformer = pipe.transformer
    config = LoraConfig(
        r=rank, lora_alpha=rank, target_modules=list(targets), init_lora_weights=False
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer.add_adapter(config)
    if gain != 1.0:
        with torch.no_grad():
            for name, parameter in transformer.named_parameters():
                if "lora_B" in name:
                    parameter.mul_(gain)
    type(pipe).save_lora_weights(
        path,
        transformer_lora_layers=get_peft_model_state_dict(transformer),
        safe_serialization=True,
    )
    return path


def _align_tensor_data(file: Path) -> None:
    """Pad a safetensors header with spaces so the tensor data starts 64-byte aligned.

    Loaded weights are memory-mapped views into the file. CPU matrix kernels take a different
    path for unaligned buffers and round the last bit differently, so weights read from an
    unaligned file give slightly different pixels than the same weights built in memory. The
    format allows trailing spaces in the header; every loader reads the padded file as before.
    """
    data = file.read_bytes()
    (header_size,) = struct.unpack("<Q", data[:8])
    header = data[8 : 8 + header_size].rstrip(b" ")
    header += b" " * (-(8 + len(header)) % _TENSOR_ALIGNMENT)
    file.write_bytes(struct.pack("<Q", len(header)) + header + data[8 + header_size :])
