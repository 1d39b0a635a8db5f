"""What each model family needs: default steps and guidance, and its prompt budget.

Pure data, safe to import anywhere (enhance uses it to size prompts without torch).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ModelSpec", "spec_for"]


@dataclass(frozen=True)
class ModelSpec:
    """Defaults and limits of one model family.

    Attributes:
        default_steps: Denoising steps when a request gives none.
        default_guidance: Guidance scale when a request gives none (schnell ignores it).
        clip_tokens: CLIP's budget: the subject should fit in it.
        t5_tokens: T5's budget (``max_sequence_length``) for the whole prompt.
    """

    family: str
    default_steps: int
    default_guidance: float
    clip_tokens: int = 77
    t5_tokens: int = 512


_SCHNELL = ModelSpec("flux-schnell", default_steps=4, default_guidance=0.0, t5_tokens=256)
_DEV = ModelSpec("flux-dev", default_steps=28, default_guidance=3.5, t5_tokens=512)
_TINY = ModelSpec("tiny", default_steps=2, default_guidance=3.5, t5_tokens=256)


def spec_for(model: str) -> ModelSpec:
    """The spec of ``model`` (hub id, local path or ``tiny``); unknown models get dev's."""
    name = model.lower()
    if name == "tiny" or name.endswith("/tiny") or "tiny-flux" in name:
        return _TINY
    if "schnell" in name:
        return _SCHNELL
    return _DEV
