"""Fixtures for the render tests: one tiny FLUX pipeline, built offline, shared by all."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from imagegen.models import EnhancedPrompt
from tests.render.tiny_files import FLUX_LORA_TARGETS, save_lora, save_pipeline


@pytest.fixture
def make_job() -> Callable[..., EnhancedPrompt]:
    """Build an :class:`EnhancedPrompt` for the tiny model; keyword arguments override."""

    def make(**overrides: Any) -> EnhancedPrompt:
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
        fields.update(overrides)
        return EnhancedPrompt(**fields)

    return make


@pytest.fixture(scope="session")
def lora_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ``lora_dir`` of :func:`backend`: the LoRAs it may load live in it."""
    return tmp_path_factory.mktemp("loras")


def _loaded(model: str, lora_root: Path) -> Iterator[Any]:
    """A CPU :class:`DiffusersBackend` with ``model`` loaded and ``lora_root`` configured."""
    pytest.importorskip("diffusers")
    from imagegen.render.diffusers_backend import DiffusersBackend
    from imagegen.settings import Settings

    backend = DiffusersBackend(Settings(device="cpu", lora_dir=lora_root))
    backend.load(model)
    yield backend
    backend.close()


@pytest.fixture(scope="session")
def backend(lora_root: Path) -> Iterator[Any]:
    """A CPU :class:`DiffusersBackend` with the tiny model loaded and ``lora_root`` configured."""
    yield from _loaded("tiny", lora_root)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny pipeline saved in diffusers' layout, in a directory named ``tiny``."""
    pytest.importorskip("diffusers")
    from imagegen.render.tiny import build_tiny_flux_pipeline

    return save_pipeline(build_tiny_flux_pipeline(), tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def lora_dir(lora_root: Path) -> Path:
    """A random LoRA for the tiny transformer, in diffusers' LoRA format, inside ``lora_root``."""
    pytest.importorskip("peft")
    from imagegen.render.tiny import build_tiny_flux_pipeline

    return save_lora(build_tiny_flux_pipeline(), lora_root / "sketchy", targets=FLUX_LORA_TARGETS)


@pytest.fixture(scope="session")
def klein_backend(lora_root: Path) -> Iterator[Any]:
    """A CPU :class:`DiffusersBackend` with the tiny FLUX.2 [klein] pipeline loaded."""
    yield from _loaded("tiny-klein", lora_root)


@pytest.fixture(scope="session")
def klein_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny [klein] pipeline saved in diffusers' layout."""
    pytest.importorskip("diffusers")
    from imagegen.render.tiny_klein import build_tiny_klein_pipeline

    return save_pipeline(
        build_tiny_klein_pipeline(), tmp_path_factory.mktemp("models") / "tiny-klein"
    )
