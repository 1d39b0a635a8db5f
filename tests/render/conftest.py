"""Fixtures for the render tests: one tiny FLUX pipeline, built offline, shared by all."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from imagegen.models import EnhancedPrompt
from tests.fakes.render_backend import enhanced_prompt
from tests.render.tiny_files import FLUX_LORA_TARGETS, save_lora, save_pipeline


@pytest.fixture
def make_job() -> Callable[..., EnhancedPrompt]:
    """Build an :class:`EnhancedPrompt` for the tiny model; keyword arguments override."""
    return enhanced_prompt


@pytest.fixture(scope="session")
def lora_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ``lora_dir`` of :func:`backend`: the LoRAs it may load live in it."""
    return tmp_path_factory.mktemp("loras")


def _loaded(model: str, lora_root: Path) -> Iterator[Any]:
    """A CPU :class:`DiffusersBackend` with ``model`` loaded and ``lora_root`` configured."""
    from imagegen.render.diffusers_backend import DiffusersBackend
    from imagegen.settings import Settings

    backend = DiffusersBackend(Settings(device="cpu", lora_dir=lora_root))
    backend.load(model)
    yield backend
    backend.close()


def _saved(model: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The offline pipeline ``model`` names, saved in diffusers' layout in a directory so named."""
    from imagegen.render._family import build_offline

    pipe = build_offline(model)
    assert pipe is not None, f"{model} is not built offline"
    return save_pipeline(pipe, tmp_path_factory.mktemp("models") / model)


@pytest.fixture(scope="session")
def backend(lora_root: Path) -> Iterator[Any]:
    """A CPU :class:`DiffusersBackend` with the tiny model loaded and ``lora_root`` configured."""
    yield from _loaded("tiny", lora_root)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny pipeline saved in diffusers' layout, in a directory named ``tiny``."""
    return _saved("tiny", tmp_path_factory)


@pytest.fixture(scope="session")
def lora_dir(lora_root: Path) -> Path:
    """A random LoRA for the tiny transformer, in diffusers' LoRA format, inside ``lora_root``."""
    from imagegen.render.tiny import build_tiny_flux_pipeline

    return save_lora(build_tiny_flux_pipeline(), lora_root / "sketchy", targets=FLUX_LORA_TARGETS)


@pytest.fixture(scope="session")
def klein_backend(lora_root: Path) -> Iterator[Any]:
    """A CPU :class:`DiffusersBackend` with the tiny FLUX.2 [klein] pipeline loaded."""
    yield from _loaded("tiny-klein", lora_root)


@pytest.fixture(scope="session")
def klein_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny [klein] pipeline saved in diffusers' layout."""
    return _saved("tiny-klein", tmp_path_factory)
