"""Render's settings that could never work are refused at start, naming their variables."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from imagegen.errors import ConfigurationError
from imagegen.settings import Settings


def _refusal(**settings: object) -> str:
    with pytest.raises(ValidationError) as caught:
        Settings(**settings)  # type: ignore[arg-type]
    # Named by their variables, as the CLI names them (the adapter names the fields).
    return ConfigurationError.of("", caught.value, name=Settings.variable).message


@pytest.mark.parametrize("timeout", [float("inf"), 1e300, float("nan"), 86_401.0])
def test_a_render_timeout_no_clock_can_wait_is_refused(timeout: float) -> None:
    assert "IMAGEGEN_RENDER_TIMEOUT" in _refusal(render_timeout=timeout)


def test_the_longest_render_timeout_is_a_day() -> None:
    assert Settings(render_timeout=86_400).render_timeout == 86_400


@pytest.mark.parametrize(("window_ms", "timeout"), [(10_000, 3), (3_000, 3)])
def test_a_batch_window_as_long_as_the_timeout_is_refused(window_ms: int, timeout: float) -> None:
    message = _refusal(
        render_batch_size=4, render_batch_window_ms=window_ms, render_timeout=timeout
    )
    assert "IMAGEGEN_RENDER_BATCH_WINDOW_MS" in message
    assert "IMAGEGEN_RENDER_TIMEOUT" in message


def test_a_batch_window_shorter_than_the_timeout_is_kept() -> None:
    settings = Settings(render_batch_size=4, render_batch_window_ms=2_999, render_timeout=3)
    assert settings.render_batch_window_ms == 2_999
