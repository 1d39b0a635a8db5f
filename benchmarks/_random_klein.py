"""FLUX.2 [klein] 4B with random weights: the published architecture, for timing offline.

A GPU machine that cannot reach the Hub can still time the default model: a pipeline's cost
depends on its shapes, not on its weights' values. The transformer and the Qwen3-4B text encoder
are built here with the configurations published in ``black-forest-labs/FLUX.2-klein-4B``
(``transformer/config.json``, ``text_encoder/config.json``), the VAE with
``AutoencoderKLFlux2``'s defaults (the FLUX.2 VAE's shape), and saved as a diffusers pipeline
directory, which render then loads like any other local model (``IMAGEGEN_MODEL=DIR``).

The tokenizer is the tiny pipeline's byte-level one: Flux2KleinPipeline pads every prompt to
its 512-token window, so the text encoder runs the same sequence length whatever the vocabulary.
The images are noise; latency, throughput, memory and start-up are those of the real model.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

TRANSFORMER: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 128,
    "out_channels": None,
    "num_layers": 5,
    "num_single_layers": 20,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 7680,  # three Qwen3-4B layers (9, 18, 27) stacked: 3 x 2560
    "timestep_guidance_channels": 256,
    "mlp_ratio": 3.0,
    "axes_dims_rope": (32, 32, 32, 32),
    "rope_theta": 2000,
    "eps": 1e-6,
    "guidance_embeds": False,
}
"""``FLUX.2-klein-4B/transformer/config.json``."""

TEXT_ENCODER: dict[str, Any] = {
    "vocab_size": 151936,
    "hidden_size": 2560,
    "intermediate_size": 9728,
    "num_hidden_layers": 36,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "max_position_embeddings": 40960,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1_000_000,
    "tie_word_embeddings": True,
}
"""Qwen3-4B's ``config.json``, the [klein] 4B text encoder."""

VAE: dict[str, Any] = {}
"""``AutoencoderKLFlux2``'s defaults are the FLUX.2 VAE's shape."""


def build_random_klein(
    directory: Path,
    *,
    device: str = "cuda",
    transformer: dict[str, Any] | None = None,
    text_encoder: dict[str, Any] | None = None,
    vae: dict[str, Any] | None = None,
) -> float:
    """Write a FLUX.2 [klein] pipeline with random bfloat16 weights to ``directory``.

    Args:
        directory: Where the pipeline directory goes (created).
        device: Where the weights are drawn: on CUDA, 8 billion of them take about a second.
        transformer: Overrides of :data:`TRANSFORMER` (a smaller model for tests).
        text_encoder: Overrides of :data:`TEXT_ENCODER`.
        vae: Overrides of :data:`VAE`.

    Returns:
        The seconds building and saving took.
    """
    import torch
    from diffusers.models.autoencoders.autoencoder_kl_flux2 import AutoencoderKLFlux2
    from diffusers.models.transformers.transformer_flux2 import Flux2Transformer2DModel
    from diffusers.pipelines.flux2.pipeline_flux2_klein import Flux2KleinPipeline
    from diffusers.schedulers.scheduling_flow_match_euler_discrete import (
        FlowMatchEulerDiscreteScheduler,
    )
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from imagegen.modelspec import FLUX2_KLEIN
    from imagegen.render._tiny import seeded
    from imagegen.render.tiny_klein import _qwen_tokenizer

    started = time.perf_counter()
    # 1. Tokenizer: the prompt window of the real model
    tokenizer = _qwen_tokenizer()
    tokenizer.model_max_length = FLUX2_KLEIN.prompt_tokens

    # 2. Components, drawn where they will run, then stored as the published weights are
    encoder_config = Qwen3Config(
        **{**TEXT_ENCODER, **(text_encoder or {})},
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    with torch.device(device):
        modules = {
            "text_encoder": seeded(lambda: Qwen3ForCausalLM(encoder_config), 0),
            "transformer": seeded(
                lambda: Flux2Transformer2DModel(**{**TRANSFORMER, **(transformer or {})}), 0
            ),
            "vae": seeded(lambda: AutoencoderKLFlux2(**{**VAE, **(vae or {})}), 0),
        }
    for module in modules.values():
        module.to(torch.bfloat16).eval()

    # 3. Saved as a pipeline directory: model_index.json names Flux2KleinPipeline
    pipe = Flux2KleinPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        tokenizer=tokenizer,
        is_distilled=True,
        **modules,
    )
    pipe.save_pretrained(directory)
    del pipe, modules
    if device == "cuda":
        torch.cuda.empty_cache()
    return time.perf_counter() - started
