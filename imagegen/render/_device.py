"""Choosing the device and dtype to render on."""

from __future__ import annotations

import torch

from imagegen.errors import DependencyUnavailable
from imagegen.settings import Settings

__all__ = ["select_device"]


def select_device(requested: str) -> tuple[torch.device, torch.dtype]:
    """The device and dtype to run on for the ``device`` setting.

    ``auto`` picks CUDA, then Apple's MPS, then the CPU. Accelerators run in bfloat16, the
    dtype FLUX is trained and released in (float16 overflows in its T5 encoder); the CPU runs
    float32. A GPU without native bfloat16 (before Ampere) gets float16.

    Raises:
        DependencyUnavailable: ``cuda`` or ``mps`` was asked for and is not available.
    """
    if requested in ("auto", "cuda") and torch.cuda.is_available():
        bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
        return torch.device("cuda"), torch.bfloat16 if bf16 else torch.float16
    if requested in ("auto", "mps") and torch.backends.mps.is_available():
        return torch.device("mps"), torch.bfloat16
    # Named as the user can change it: the variable, or the profile that set it.
    if requested == "cuda":
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU-only"
        raise DependencyUnavailable(
            f"{Settings.given_as('device', requested)} asks for a CUDA GPU, but none is usable:"
            f" torch {torch.__version__}, {build}"
        )
    if requested == "mps":
        raise DependencyUnavailable(
            f"{Settings.given_as('device', requested)} asks for Apple MPS, which is not available"
        )
    return torch.device("cpu"), torch.float32
