"""What the tiny pipelines share: a byte-level vocabulary, the VAE's shape, seeded building.

Both tiny pipelines (:mod:`imagegen.render.tiny`, :mod:`imagegen.render.tiny_klein`) mirror
diffusers' ``get_dummy_components`` for their model, with weights drawn from one seed and
tokenizers built in code, so nothing is downloaded.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import torch
from tokenizers import pre_tokenizers

__all__ = [
    "LATENT_CHANNELS",
    "TRANSFORMER_SHAPE",
    "VAE_SHAPE",
    "byte_alphabet",
    "finish",
    "seeded",
]

P = TypeVar("P")

LATENT_CHANNELS = 4
"""Packed (FLUX.1) or patchified (FLUX.2) 2x2, hence the transformers' 16 input channels."""

TRANSFORMER_SHAPE: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": LATENT_CHANNELS * 4,
    "num_layers": 1,
    "num_single_layers": 1,
    "attention_head_dim": 16,  # the rotary axes must add up to it
    "num_attention_heads": 2,
}
"""The keyword arguments both tiny transformers share: one block of each kind."""

VAE_SHAPE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    # Four blocks give the pipeline a ``vae_scale_factor`` of 2 ** 3 = 8, like the real VAEs:
    # any width and height that is a multiple of 16 renders at that size.
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (8, 8, 8, 8),
    "layers_per_block": 1,
    "latent_channels": LATENT_CHANNELS,
    "norm_num_groups": 4,
    "sample_size": 256,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}
"""The keyword arguments both tiny VAEs share."""


def byte_alphabet() -> list[str]:
    """The 256 byte-level BPE symbols: every byte a token, so any text maps to distinct ids."""
    return sorted(pre_tokenizers.ByteLevel.alphabet())


_SEEDING = threading.Lock()
"""Held while a module is built from a seed. Module constructors draw their initial weights
from torch's default generator, which is one per process: two builds at once (two services
starting in two threads) would draw from each other's sequence, and identical jobs would
render different images. ``fork_rng`` saves and restores that one state, so it needs the same
exclusion."""


def seeded(build: Callable[[], P], seed: int) -> P:
    """``build()`` with torch's generator seeded by ``seed``; the caller's random state is kept.

    One build at a time in the process, so its weights depend on ``seed`` alone.
    """
    with _SEEDING, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def finish(pipe: P, modules: Iterable[torch.nn.Module]) -> P:
    """``pipe`` as ``from_pretrained`` returns one: its modules in eval mode, no progress bar.

    Freshly built modules are in training mode: T5's dropout would make prompts random and
    the FLUX.2 VAE's batch norm would update its statistics on every decode.
    """
    for module in modules:
        module.eval()
    pipe.set_progress_bar_config(disable=True)  # type: ignore[attr-defined]
    return pipe
