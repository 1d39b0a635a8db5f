"""What the model table decides for the diffusers backend: offline builds and call arguments."""

from __future__ import annotations

import inspect
from typing import Any

from imagegen.modelspec import MODELS, family_for
from imagegen.render._errors import field_error
from imagegen.render._loading import Pipeline

__all__ = ["build_offline", "call_options", "check_text_encoder"]


def build_offline(model: str) -> Pipeline | None:
    """The tiny pipeline ``model`` names, built on the spot; None for a model to load."""
    spec = MODELS.get(model)
    if spec is None or not spec.offline:
        return None
    if spec.family.pipeline == "Flux2KleinPipeline":
        from imagegen.render.tiny_klein import build_tiny_klein_pipeline

        return build_tiny_klein_pipeline()
    from imagegen.render.tiny import build_tiny_flux_pipeline

    return build_tiny_flux_pipeline()


def _encoder_layers(pipe: Pipeline, model: str) -> tuple[int, ...] | None:
    """The text encoder's hidden layers ``pipe`` stacks for ``model``: its family's, else the
    pipeline's own default; None for a pipeline that takes no such argument."""
    parameter = inspect.signature(pipe.__call__).parameters.get("text_encoder_out_layers")
    if parameter is None:
        return None
    family = family_for(model)
    layers = family.text_encoder_layers or parameter.default
    if not isinstance(layers, tuple | list) or not all(isinstance(n, int) for n in layers):
        return None
    return tuple(layers)


def check_text_encoder(pipe: Pipeline, model: str) -> None:
    """Refuse a loaded ``pipe`` whose text encoder lacks a layer its family reads.

    Flux2KleinPipeline stacks the hidden states of fixed layers (9, 18 and 27 for the published
    [klein]; diffusers' ``Flux2KleinPipeline.__call__``, ``text_encoder_out_layers``): an
    encoder with fewer would fail every render with an IndexError, so the model is refused
    once, at loading.

    Raises:
        InvalidRequest: The encoder is too shallow (field ``model``).
    """
    layers = _encoder_layers(pipe, model)
    config = getattr(getattr(pipe, "text_encoder", None), "config", None)
    depth = getattr(config, "num_hidden_layers", None)
    if not layers or not isinstance(depth, int) or max(layers) <= depth:
        return  # hidden states 0 (the embeddings) to depth
    family = family_for(model)
    raise field_error(
        "model",
        f"{model!r} is read as {family.title}, which stacks its text encoder's layers "
        f"{', '.join(map(str, layers))}, but its text encoder has {depth}: serve a pipeline "
        f"whose text encoder has at least {max(layers)} layers",
    )


def call_options(pipe: Pipeline, model: str) -> dict[str, Any]:
    """The family's arguments to ``pipe``: its prompt window, the encoder layers it reads."""
    parameters = inspect.signature(pipe.__call__).parameters
    family = family_for(model)
    options: dict[str, Any] = {}
    if "max_sequence_length" in parameters:
        options["max_sequence_length"] = family.prompt_tokens
    if family.text_encoder_layers is not None and "text_encoder_out_layers" in parameters:
        options["text_encoder_out_layers"] = family.text_encoder_layers
    return options
