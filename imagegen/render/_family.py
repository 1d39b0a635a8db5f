"""What the model table decides for the diffusers backend: offline builds and call arguments."""

from __future__ import annotations

import inspect
from typing import Any

from imagegen.modelspec import MODELS, family_for
from imagegen.render._loading import Pipeline

__all__ = ["build_offline", "call_options"]


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
