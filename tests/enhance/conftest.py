"""Fixtures for the enhance tests: a fake Ollama on loopback and stages wired to it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import pytest

from imagegen.enhance import EnhanceStage
from imagegen.models import GenerationRequest
from imagegen.plugins import PluginSet
from imagegen.settings import Settings
from tests.fakes.ollama_server import FakeOllama

__all__ = ["FakeOllama"]

MakeStage = Callable[..., EnhanceStage]
NOW = datetime(2026, 11, 24, 8, 15, tzinfo=UTC)


def request(**fields: object) -> GenerationRequest:
    """A valid request (a red fox, seed 1234) with ``fields`` changed."""
    return GenerationRequest.model_validate({"prompt": "a red fox", "seed": 1234, **fields})


async def run(stage: EnhanceStage, **fields: object):  # type: ignore[no-untyped-def]
    """``stage`` run on :func:`request` for generation ``gen-1`` at :data:`NOW`."""
    return await stage.run(request(**fields), generation_id="gen-1", now=NOW)


@pytest.fixture
def fake_ollama() -> Iterator[FakeOllama]:
    with FakeOllama() as fake:
        yield fake


@pytest.fixture
def settings(fake_ollama: FakeOllama) -> Settings:
    """Settings pointing at the fake, with short timeouts and one retry."""
    return Settings(
        ollama_host=fake_ollama.url,
        ollama_timeout=0.5,
        ollama_retries=1,
        plugins=["time_of_day", "holiday", "art_style"],
        timezone="UTC",
    )


@pytest.fixture
async def make_stage(settings: Settings) -> AsyncIterator[MakeStage]:
    """Builds stages (closed after the test): ``make_stage(**setting_overrides)``."""
    stages: list[EnhanceStage] = []

    def make(plugin_set: PluginSet | None = None, **overrides: Any) -> EnhanceStage:
        stage_settings = settings.model_copy(update=overrides) if overrides else settings
        plugin_set = plugin_set or PluginSet.from_settings(stage_settings)
        stage = EnhanceStage(stage_settings, plugin_set, backoff=0.01)
        stages.append(stage)
        return stage

    yield make
    for stage in stages:
        await stage.aclose()


@pytest.fixture
async def stage(make_stage: MakeStage) -> EnhanceStage:
    return make_stage()
