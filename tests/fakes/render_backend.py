"""A render backend without a model, and the jobs the render tests give a backend."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from imagegen.models import EnhancedPrompt
from imagegen.render.base import ProgressCallback, RenderOutput
from tests.fakes.images import gradient_png

__all__ = ["CountingBackend", "ReadyBackend", "enhanced_prompt"]


def enhanced_prompt(**overrides: Any) -> EnhancedPrompt:
    """A job for the tiny model, as enhance sends it; keyword arguments override its fields."""
    fields: dict[str, Any] = {
        "generation_id": "gen-1",
        "prompt": "a lighthouse at dusk",
        "enhancer": "passthrough",
        "model": "tiny",
        "width": 256,
        "height": 256,
        "steps": 2,
        "guidance": 3.5,
        "seed": 42,
        "requested_at": datetime(2025, 1, 1, tzinfo=UTC),
    }
    return EnhancedPrompt(**{**fields, **overrides})


class ReadyBackend:
    """Every model is loaded at once and nothing is held; a subclass says how a job renders."""

    def load(self, model: str) -> float:
        return 0.0

    def is_loaded(self, model: str) -> bool:
        return True

    def close(self) -> None:
        pass


class CountingBackend(ReadyBackend):
    """Renders a real PNG of the job's size; counts the renders."""

    def __init__(self) -> None:
        self.renders = 0

    def render(
        self, job: EnhancedPrompt, *, progress: ProgressCallback | None = None
    ) -> RenderOutput:
        self.renders += 1
        # Every phase a diffusers render times, each of the longest a render writes.
        timings = dict.fromkeys(("lora", "denoise", "decode", "encode", "total"), 1234.5678)
        png = gradient_png(job.width, job.height)
        return RenderOutput(png=png, width=job.width, height=job.height, timings=timings)
