"""A tiny, randomly initialised FLUX.2 [klein] pipeline, built offline, for tests and local runs.

The components follow diffusers' own ``get_dummy_components`` in
``tests/pipelines/flux2/test_pipeline_flux2_klein.py`` (a ``Flux2Transformer2DModel`` without
guidance embedding, a ``Qwen3ForCausalLM`` text encoder, an ``AutoencoderKLFlux2``), with three
differences: the tokenizer is built here, with Qwen3's chat template, from a vocabulary written
in code (diffusers' test downloads one); the VAE downsamples by 8 like the real one, so any
width and height that is a multiple of 16 renders at that size; and the pipeline is marked
step-distilled like the published [klein] checkpoints.

The pixels mean nothing; what matters is that the real ``Flux2KleinPipeline`` code runs end to
end (chat-templated prompt encoding, packing, the scheduler, the VAE's batch-norm statistics,
saving and loading) in well under a second on a CPU.
"""

from __future__ import annotations

from pathlib import Path

import torch

# Imported from their modules, not the package root, whose lazy exports type checkers resolve
# to placeholder classes.
from diffusers.models.autoencoders.autoencoder_kl_flux2 import AutoencoderKLFlux2
from diffusers.models.transformers.transformer_flux2 import Flux2Transformer2DModel
from diffusers.pipelines.flux2.pipeline_flux2_klein import Flux2KleinPipeline
from diffusers.schedulers.scheduling_flow_match_euler_discrete import (
    FlowMatchEulerDiscreteScheduler,
)
from tokenizers import pre_tokenizers
from transformers import Qwen3Config, Qwen3ForCausalLM
from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

from imagegen.modelspec import TINY_FLUX2_KLEIN
from imagegen.render.tiny import align_tensor_data

__all__ = ["build_tiny_klein_pipeline", "save_tiny_klein_lora", "save_tiny_klein_pipeline"]

_HIDDEN = 16  # the text encoder's width; the transformer reads three of its layers stacked
_LATENT_CHANNELS = 4  # patchified 2x2 by FLUX.2, hence the transformer's 16 input channels
# The pipeline stacks these hidden states (0 is the embeddings): three, like the real model's
# (9, 18, 27), from a three-layer encoder.
_LAYERS = TINY_FLUX2_KLEIN.text_encoder_layers or (1, 2, 3)

# Qwen3's chat template, reduced to what Flux2KleinPipeline uses: user turns, the generation
# prompt, and the empty thinking block that ``enable_thinking=False`` asks for.
_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)
_LORA_GAIN = 8.0
_SPECIAL = ["<|im_start|>", "<|im_end|>", "<think>", "</think>"]


def _qwen_tokenizer() -> Qwen2Tokenizer:
    """A byte-level BPE tokenizer in Qwen's format: every byte is a token, there are no merges.

    Any text, in any script, maps to distinct ids, so different prompts give different images.
    """
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: index for index, token in enumerate([*alphabet, "<|endoftext|>", *_SPECIAL])}
    return Qwen2Tokenizer(
        vocab=vocab,
        merges=[],
        model_max_length=TINY_FLUX2_KLEIN.prompt_tokens,
        chat_template=_CHAT_TEMPLATE,
        additional_special_tokens=_SPECIAL,
    )


def build_tiny_klein_pipeline(seed: int = 0) -> Flux2KleinPipeline:
    """Build a tiny FLUX.2 [klein] pipeline with weights drawn from ``seed``; reads no file.

    Args:
        seed: Seeds the random initialisation of every component: the same seed builds the
            same weights.

    Returns:
        A float32 ``Flux2KleinPipeline`` on the CPU.
    """
    # The caller's random state is left as it was.
    with torch.random.fork_rng(devices=[]):
        return _build(seed)


def _build(seed: int) -> Flux2KleinPipeline:
    # 1. Tokenizer: built in code, deterministic by construction
    tokenizer = _qwen_tokenizer()

    # 2. Text encoder, sized to the tokenizer; as many layers as the pipeline reads
    torch.manual_seed(seed)
    text_encoder = Qwen3ForCausalLM(
        Qwen3Config(
            vocab_size=len(tokenizer),
            hidden_size=_HIDDEN,
            intermediate_size=32,
            num_hidden_layers=max(_LAYERS),
            num_attention_heads=2,
            num_key_value_heads=2,
            head_dim=16,
            max_position_embeddings=TINY_FLUX2_KLEIN.prompt_tokens,
            tie_word_embeddings=True,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=None,
        )
    )

    # 3. Transformer: the rotary axes (one per coordinate T, H, W, L) add up to the head size
    torch.manual_seed(seed)
    transformer = Flux2Transformer2DModel(
        patch_size=1,
        in_channels=_LATENT_CHANNELS * 4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=_HIDDEN * len(_LAYERS),
        timestep_guidance_channels=256,
        axes_dims_rope=(4, 4, 4, 4),
        guidance_embeds=False,
    )

    # 4. VAE: four blocks give the pipeline a ``vae_scale_factor`` of 2 ** 3 = 8
    torch.manual_seed(seed)
    vae = AutoencoderKLFlux2(
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
    )

    pipe = Flux2KleinPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
        is_distilled=True,
    )
    # Freshly built modules are in training mode (the VAE's batch norm would update its
    # statistics on every decode); from_pretrained returns them in eval mode, and so must this.
    for module in (text_encoder, transformer, vae):
        module.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_klein_pipeline(path: str | Path, *, seed: int = 0) -> Path:
    """Build the tiny [klein] pipeline and save it in diffusers' layout (``from_pretrained``).

    Args:
        path: The directory to write (created if missing).
        seed: Passed to :func:`build_tiny_klein_pipeline`.

    Returns:
        The directory written.
    """
    target = Path(path)
    build_tiny_klein_pipeline(seed).save_pretrained(target, safe_serialization=True)
    for weights in sorted(target.glob("*/*.safetensors")):
        align_tensor_data(weights)
    return target


def save_tiny_klein_lora(path: str | Path, *, seed: int = 1, rank: int = 4) -> Path:
    """Save a random LoRA for the tiny [klein] transformer, in diffusers' LoRA format.

    Both low-rank matrices are random (a freshly trained LoRA's B is zero), so loading it
    visibly changes the image. Needs ``peft``.

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
    transformer = build_tiny_klein_pipeline().transformer

    # 2. Random adapter on the attention projections of both block kinds (the single-stream
    #    blocks fuse q, k, v and the MLP input into one projection)
    torch.manual_seed(seed)
    config = LoraConfig(
        r=rank,
        lora_alpha=rank,
        target_modules=["to_q", "to_k", "to_v", "to_out.0", "to_qkv_mlp_proj"],
        init_lora_weights=False,
    )
    transformer.add_adapter(config)
    # The tiny transformer's own projections are small: a stronger adapter shows in pixels.
    with torch.no_grad():
        for name, parameter in transformer.named_parameters():
            if "lora_B" in name:
                parameter.mul_(_LORA_GAIN)

    # 3. Save in the layout ``load_lora_weights`` reads
    target = Path(path)
    Flux2KleinPipeline.save_lora_weights(
        target,
        transformer_lora_layers=get_peft_model_state_dict(transformer),
        safe_serialization=True,
    )
    return target
