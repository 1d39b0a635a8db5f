"""The render-backend contract. Implementations may import torch; this module must not."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from imagegen.models import EnhancedPrompt

__all__ = [
    "BatchRenderBackend",
    "ProgressCallback",
    "RenderBackend",
    "RenderOutput",
    "TwoPhaseRenderBackend",
]

ProgressCallback = Callable[[int, int], None]
"""Called as ``progress(step, total_steps)`` after each denoising step."""


@dataclass(frozen=True)
class RenderOutput:
    """A rendered image, PNG-encoded, with per-phase timings in seconds."""

    png: bytes
    width: int
    height: int
    timings: dict[str, float] = field(default_factory=dict)


@runtime_checkable
class RenderBackend(Protocol):
    """Turns an :class:`EnhancedPrompt` into pixels.

    ``load`` and ``render`` block (they run torch) and are called from a worker thread, one
    call at a time per backend: a pipeline is not safe to use from two threads at once.
    """

    def load(self, model: str) -> float:
        """Load ``model`` (id, local path or ``tiny``) once; return the seconds it took."""
        ...

    def is_loaded(self, model: str) -> bool:
        """Whether ``model`` is loaded and ready to render."""
        ...

    def render(
        self, job: EnhancedPrompt, *, progress: ProgressCallback | None = None
    ) -> RenderOutput:
        """Render ``job`` reproducibly from ``job.seed``; the PNG carries prompt, seed, model."""
        ...

    def close(self) -> None:
        """Release the loaded models and accelerator memory."""
        ...


@runtime_checkable
class BatchRenderBackend(RenderBackend, Protocol):
    """A backend that can render compatible jobs as one call (see ``batching.batch_key``)."""

    def render_batch(
        self, jobs: list[EnhancedPrompt], *, progress: ProgressCallback | None = None
    ) -> list[RenderOutput]:
        """Render ``jobs`` together, one output per job in order; each from its own seed."""
        ...


@runtime_checkable
class TwoPhaseRenderBackend(BatchRenderBackend, Protocol):
    """A batching backend whose call splits into the pipeline's part and the encoding.

    The stage holds the pipeline only for :meth:`denoise_batch`; :meth:`encode_batch` (PNG
    encoding on the CPU) runs after the pipeline is handed to the next call, so the two overlap.
    ``render_batch(jobs)`` is ``encode_batch(jobs, denoise_batch(jobs))``.
    """

    def denoise_batch(
        self, jobs: list[EnhancedPrompt], *, progress: ProgressCallback | None = None
    ) -> Any:
        """Run the pipeline for ``jobs``; return what :meth:`encode_batch` turns into PNGs."""
        ...

    def encode_batch(self, jobs: list[EnhancedPrompt], pixels: Any) -> list[RenderOutput]:
        """The PNGs of ``pixels`` from :meth:`denoise_batch`, one output per job in order."""
        ...
