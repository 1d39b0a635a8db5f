"""A tiny, randomly initialised FLUX.2 [klein] pipeline, built offline, for tests and local runs.

The components follow diffusers' own ``get_dummy_components`` in
``tests/pipelines/flux2/test_pipeline_flux2_klein.py`` (a ``Flux2Transformer2DModel`` without
guidance embedding, a ``Qwen3ForCausalLM`` text encoder, an ``AutoencoderKLFlux2``), with three
differences: the tokenizer is built here, with Qwen3's chat template, from a vocabulary written
in code (diffusers' test downloads one); the VAE downsamples by 8 like the real one, so any
width and height that is a multiple of 16 renders at that size; and the pipeline is marked
step-distilled like the published [klein] checkpoints.

The pixels mean nothing; what matters is that the real ``Flux2KleinPipeline`` code runs end to
end (chat-templated prompt encoding, packing, the scheduler, the VAE's batch-norm statistics) in
well under a second on a CPU.
"""

from __future__ import annotations

# Imported from their modules, not the package root, whose lazy exports type checkers resolve
# to placeholder classes.
from diffusers.models.autoencoders.autoencoder_kl_flux2 import AutoencoderKLFlux2
from diffusers.models.transformers.transformer_flux2 import Flux2Transformer2DModel
from diffusers.pipelines.flux2.pipeline_flux2_klein import Flux2KleinPipeline
from diffusers.schedulers.scheduling_flow_match_euler_discrete import (
    FlowMatchEulerDiscreteScheduler,
)
from transformers import Qwen3Config, Qwen3ForCausalLM
from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

from imagegen.modelspec import TINY_FLUX2_KLEIN
from imagegen.render._tiny import TRANSFORMER_SHAPE, VAE_SHAPE, byte_alphabet, finish, seeded

__all__ = ["build_tiny_klein_pipeline"]

_HIDDEN = 16  # the text encoder's width; the transformer reads three of its layers stacked
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
_SPECIAL = ["<|im_start|>", "<|im_end|>", "<think>", "</think>"]


def _qwen_tokenizer() -> Qwen2Tokenizer:
    """A byte-level BPE tokenizer in Qwen's format: every byte is a token, there are no merges.

    Any text, in any script, maps to distinct ids, so different prompts give different images.
    """
    tokens = [*byte_alphabet(), "<|endoftext|>", *_SPECIAL]
    return Qwen2Tokenizer(
        vocab={token: index for index, token in enumerate(tokens)},
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
        A float32 ``Flux2KleinPipeline`` on the CPU, marked step-distilled.
    """
    # 1. Tokenizer: built in code, deterministic by construction
    tokenizer = _qwen_tokenizer()

    # 2. Text encoder, sized to the tokenizer; as many layers as the pipeline reads
    config = Qwen3Config(
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
    text_encoder = seeded(lambda: Qwen3ForCausalLM(config), seed)

    # 3. Transformer: the rotary axes (one per coordinate T, H, W, L) add up to the head size
    transformer = seeded(
        lambda: Flux2Transformer2DModel(
            **TRANSFORMER_SHAPE,
            joint_attention_dim=_HIDDEN * len(_LAYERS),
            timestep_guidance_channels=256,
            axes_dims_rope=(4, 4, 4, 4),
            guidance_embeds=False,
        ),
        seed,
    )

    # 4. VAE, with FLUX.2's batch-norm statistics in place of a fixed scaling
    vae = seeded(lambda: AutoencoderKLFlux2(**VAE_SHAPE), seed)

    pipe = Flux2KleinPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
        is_distilled=True,
    )
    return finish(pipe, (text_encoder, transformer, vae))
