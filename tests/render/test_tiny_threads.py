"""The tiny pipelines built in several threads at once: the same weights as built alone."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
import torch

from imagegen.render.tiny import build_tiny_flux_pipeline
from imagegen.render.tiny_klein import build_tiny_klein_pipeline

_MODULES = ("transformer", "vae", "text_encoder")


def _weights(pipe: Any) -> dict[str, torch.Tensor]:
    return {
        f"{name}.{key}": tensor
        for name in _MODULES
        for key, tensor in getattr(pipe, name).state_dict().items()
    }


@pytest.mark.parametrize("build", [build_tiny_flux_pipeline, build_tiny_klein_pipeline])
def test_pipelines_built_at_once_in_threads_have_the_weights_of_one_built_alone(
    build: Callable[[], Any],
) -> None:
    """Two services starting together build their tiny model at once: identical jobs must
    still render identical images, so each build draws from its seed alone."""
    alone = _weights(build())
    built: list[dict[str, torch.Tensor]] = []
    start = threading.Barrier(3)

    def work() -> None:
        start.wait()
        built.append(_weights(build()))

    threads = [threading.Thread(target=work) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(built) == 3
    for weights in built:
        assert weights.keys() == alone.keys()
        assert all(torch.equal(weights[key], alone[key]) for key in alone)
