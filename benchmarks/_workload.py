"""The workload every row of ``run.py`` shares: the tiny model on the CPU, one job shape."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

NOW = datetime(2026, 11, 24, 12, tzinfo=UTC)
# torch's intra-op threads, the same in this process and in every served function: on a shared
# machine, OpenMP threads spinning against other processes decide a comparison otherwise.
_TORCH_THREADS = [1]


def torch_threads() -> int:
    return _TORCH_THREADS[0]


def set_torch_threads(count: int) -> None:
    _TORCH_THREADS[0] = count


SIZE = 256
STEPS = 2


def render_job(gid: str, prompt: str = "a lantern in the fog") -> dict[str, Any]:
    return {
        "generation_id": gid,
        "prompt": prompt,
        "enhancer": "passthrough",
        "model": "tiny",
        "width": SIZE,
        "height": SIZE,
        "steps": STEPS,
        "guidance": 3.5,
        "seed": 7,
        "requested_at": NOW.isoformat(),
    }


def served_env(storage: Path, **extra: str) -> dict[str, str]:
    return {
        "OMP_NUM_THREADS": str(torch_threads()),
        "IMAGEGEN_MODEL": "tiny",
        "IMAGEGEN_SERVED_MODELS": "tiny",
        "IMAGEGEN_DEVICE": "cpu",
        "IMAGEGEN_STORAGE_URL": str(storage),
        "IMAGEGEN_LOG_LEVEL": "WARNING",
        **extra,
    }
