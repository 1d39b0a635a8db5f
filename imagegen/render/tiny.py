"""A tiny, randomly initialised FLUX pipeline, built offline, for tests and local runs.

The components mirror diffusers' own ``get_dummy_components`` in
``tests/pipelines/flux/test_pipeline_flux.py``, with two differences: the tokenizers are built
here from a vocabulary written in code (nothing is downloaded), and the VAE downsamples by 8
like the real one, so any width and height that is a multiple of 16 renders at that size.

The pixels mean nothing; what matters is that the real ``FluxPipeline`` code runs end to end
(prompt encoding, packing, the scheduler, the VAE, saving and loading) in well under a second
on a CPU.
"""

from __future__ import annotations

import string
import struct
from pathlib import Path

import torch

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
from tokenizers import pre_tokenizers
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

__all__ = [
    "CLIP_MAX_LENGTH",
    "T5_MAX_LENGTH",
    "align_tensor_data",
    "build_tiny_flux_pipeline",
    "save_tiny_flux_lora",
    "save_tiny_flux_pipeline",
]

CLIP_MAX_LENGTH = 77
"""CLIP's context, as in the real model: prompts are padded or cut to 77 tokens."""

T5_MAX_LENGTH = 256
"""The tokenizer's ``model_max_length`` for T5; FLUX passes its own ``max_sequence_length``."""

_TENSOR_ALIGNMENT = 64  # bytes; what torch's CPU allocator gives fresh tensors
_HIDDEN = 32  # width shared by both text encoders and the transformer's text inputs
# Widths in multiples of 16 floats keep every text-encoder and transformer tensor a multiple
# of 64 bytes, so a file's alignment carries over to all its tensors (see align_tensor_data).
_FEED_FORWARD = 64
_LATENT_CHANNELS = 4  # packed 2x2 by FLUX, hence the transformer's 16 input channels

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
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
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
    # The caller's random state is left as it was.
    with torch.random.fork_rng(devices=[]):
        return _build(seed)


def _build(seed: int) -> FluxPipeline:
    # 1. Tokenizers: built in code, deterministic by construction
    tokenizer = _clip_tokenizer()
    tokenizer_2 = _t5_tokenizer()

    # 2. Text encoders, sized to the tokenizers above
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
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
    )
    torch.manual_seed(seed)
    text_encoder_2 = T5EncoderModel(
        T5Config(
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
    )

    # 3. Transformer: the rotary axes must add up to the attention head size
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=_LATENT_CHANNELS * 4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=_HIDDEN,
        pooled_projection_dim=_HIDDEN,
        guidance_embeds=True,
        axes_dims_rope=(4, 4, 8),
    )

    # 4. VAE: four blocks give FluxPipeline a ``vae_scale_factor`` of 2 ** 3 = 8
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        latent_channels=_LATENT_CHANNELS,
        norm_num_groups=4,
        sample_size=256,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
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
    # Freshly built modules are in training mode (T5's dropout would make prompts random);
    # from_pretrained returns them in eval mode, and so must this.
    for module in (text_encoder, text_encoder_2, transformer, vae):
        module.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_flux_pipeline(path: str | Path, *, seed: int = 0) -> Path:
    """Build the tiny pipeline and save it in diffusers' layout, loadable by ``from_pretrained``.

    Args:
        path: The directory to write (created if missing).
        seed: Passed to :func:`build_tiny_flux_pipeline`.

    Returns:
        The directory written.
    """
    target = Path(path)
    build_tiny_flux_pipeline(seed).save_pretrained(target, safe_serialization=True)
    for weights in sorted(target.glob("*/*.safetensors")):
        align_tensor_data(weights)
    return target


def save_tiny_flux_lora(path: str | Path, *, seed: int = 1, rank: int = 4) -> Path:
    """Save a random LoRA for the tiny pipeline's transformer, in diffusers' LoRA format.

    The low-rank matrices are both random (not zero, as a freshly trained LoRA's would be), so
    loading it visibly changes the image. Needs ``peft``.

    Args:
        path: The directory to write; it receives ``pytorch_lora_weights.safetensors``.
        seed: Seeds the LoRA's weights.
        rank: The LoRA rank.

    Returns:
        The directory written, loadable with ``pipe.load_lora_weights(path)``.
    """
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    # 1. A fresh transformer with the same shapes; only the adapter's weights are kept
    transformer = build_tiny_flux_pipeline().transformer

    # 2. Random adapter on the attention projections of both block kinds
    torch.manual_seed(seed)
    config = LoraConfig(
        r=rank,
        lora_alpha=rank,
        target_modules=[
            "to_q",
            "to_k",
            "to_v",
            "to_out.0",
            "add_q_proj",
            "add_k_proj",
            "add_v_proj",
        ],
        init_lora_weights=False,
    )
    transformer.add_adapter(config)

    # 3. Save in the layout ``load_lora_weights`` reads
    target = Path(path)
    FluxPipeline.save_lora_weights(
        target,
        transformer_lora_layers=get_peft_model_state_dict(transformer),
        safe_serialization=True,
    )
    return target


def align_tensor_data(file: Path) -> None:
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
