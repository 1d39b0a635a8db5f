"""A tiny, randomly initialised FLUX pipeline, built offline, for tests and local runs.

The components mirror diffusers' own ``get_dummy_components`` in
``tests/pipelines/flux/test_pipeline_flux.py``, with two differences: the tokenizers are built
here from a vocabulary written in code (nothing is downloaded), and the VAE downsamples by 8
like the real one, so any width and height that is a multiple of 16 renders at that size.

The pixels mean nothing; what matters is that the real ``FluxPipeline`` code runs end to end
(prompt encoding, packing, the scheduler, the VAE) in well under a second on a CPU.
"""

from __future__ import annotations

import string

# Before diffusers and transformers: their log lines become JSON.
from imagegen.render import _libraries  # noqa: F401  # isort: skip

# Imported from their modules, not the package root, whose lazy exports type checkers resolve
# to placeholder classes.
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from diffusers.models.transformers.transformer_flux import FluxTransformer2DModel
from diffusers.pipelines.flux.pipeline_flux import FluxPipeline
from diffusers.schedulers.scheduling_flow_match_euler_discrete import (
    FlowMatchEulerDiscreteScheduler,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

from imagegen.render._tiny import TRANSFORMER_SHAPE, VAE_SHAPE, byte_alphabet, finish, seeded

__all__ = ["CLIP_MAX_LENGTH", "T5_MAX_LENGTH", "build_tiny_flux_pipeline"]

CLIP_MAX_LENGTH = 77
"""CLIP's context, as in the real model: prompts are padded or cut to 77 tokens."""

T5_MAX_LENGTH = 256
"""The tokenizer's ``model_max_length`` for T5; FLUX passes its own ``max_sequence_length``."""

_HIDDEN = 32  # width shared by both text encoders and the transformer's text inputs
# Widths in multiples of 16 floats keep every text-encoder and transformer tensor a multiple
# of 64 bytes, so a saved file's alignment carries over to all its tensors.
_FEED_FORWARD = 64

# FLUX.1-dev's scheduler configuration: a flow-matching Euler scheduler whose shift grows with
# the number of image tokens.
_SCHEDULER_CONFIG = {
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
}


def _clip_tokenizer() -> CLIPTokenizer:
    """A byte-level BPE tokenizer in CLIP's format: every byte is a token, there are no merges.

    Any text, in any script, maps to distinct ids, so different prompts give different images.
    """
    alphabet = byte_alphabet()
    tokens = alphabet + [f"{char}</w>" for char in alphabet] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=CLIP_MAX_LENGTH)


def _t5_tokenizer() -> T5Tokenizer:
    """A unigram tokenizer in T5's format over single characters and word-initial letters.

    Characters outside printable ASCII and Latin-1 map to ``<unk>``; CLIP still tells them apart.
    """
    characters = string.ascii_letters + string.digits + string.punctuation
    characters += "".join(chr(code) for code in range(0xC0, 0x100))
    vocab: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [(f"▁{char}", -3.0) for char in characters]
    vocab += [(char, -4.0) for char in characters]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=T5_MAX_LENGTH)


def build_tiny_flux_pipeline(seed: int = 0) -> FluxPipeline:
    """Build a tiny FLUX pipeline with weights drawn from ``seed``; no file or network is read.

    Args:
        seed: Seeds the random initialisation of every component: the same seed builds the
            same weights.

    Returns:
        A float32 ``FluxPipeline`` on the CPU, with guidance embedding like FLUX.1-dev.
    """
    # 1. Tokenizers: built in code, deterministic by construction
    tokenizer = _clip_tokenizer()
    tokenizer_2 = _t5_tokenizer()

    # 2. Text encoders, sized to the tokenizers above
    clip_config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=_HIDDEN,
        intermediate_size=_FEED_FORWARD,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=CLIP_MAX_LENGTH,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        projection_dim=_HIDDEN,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
    )
    text_encoder = seeded(lambda: CLIPTextModel(clip_config), seed)
    t5_config = T5Config(
        vocab_size=len(tokenizer_2),
        d_model=_HIDDEN,
        d_kv=8,
        d_ff=_FEED_FORWARD,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu",
        pad_token_id=tokenizer_2.pad_token_id,
        eos_token_id=tokenizer_2.eos_token_id,
    )
    text_encoder_2 = seeded(lambda: T5EncoderModel(t5_config), seed)

    # 3. Transformer: the rotary axes must add up to the attention head size
    transformer = seeded(
        lambda: FluxTransformer2DModel(
            **TRANSFORMER_SHAPE,
            joint_attention_dim=_HIDDEN,
            pooled_projection_dim=_HIDDEN,
            guidance_embeds=True,
            axes_dims_rope=(4, 4, 8),
        ),
        seed,
    )

    # 4. VAE, with FLUX.1's latent scaling
    vae = seeded(
        lambda: AutoencoderKL(**VAE_SHAPE, shift_factor=0.0609, scaling_factor=1.5035), seed
    )

    # 5. Scheduler
    scheduler = FlowMatchEulerDiscreteScheduler(**_SCHEDULER_CONFIG)

    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    return finish(pipe, (text_encoder, text_encoder_2, transformer, vae))
