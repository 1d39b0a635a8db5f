"""A render backend without a model, and the jobs the render tests give a backend."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from imagegen.models import EnhancedPrompt

__all__ = ["ReadyBackend", "enhanced_prompt"]


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
