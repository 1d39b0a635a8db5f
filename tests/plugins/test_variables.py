"""A plugin's own environment variables: declared, they draw no warning of an unknown setting."""

from __future__ import annotations

from pathlib import Path

import pytest

from imagegen.settings import Settings
from tests.plugins.sample_plugins import install_distribution


@pytest.fixture
def installed_keyed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A distribution 'keyed-plugin' whose plugin 'weather' declares IMAGEGEN_WEATHER_KEY, and
    one whose entry point cannot be loaded."""
    install_distribution(
        tmp_path,
        "keyed-plugin",
        {
            "weather": "tests.plugins.sample_plugins:KeyedPlugin",
            "broken": "no_such_module_here:Plugin",
        },
    )
    monkeypatch.syspath_prepend(str(tmp_path))


_GIVEN = {"IMAGEGEN_WEATHER_KEY": "secret", "IMAGEGEN_MODLE": "tiny", "WEATHER_UNITS": "metric"}


def test_a_variable_no_setting_or_plugin_reads_is_warned_of() -> None:
    assert Settings.unknown_variables(environ=_GIVEN, dotenv=None) == [
        "IMAGEGEN_MODLE is no setting (ignored); did you mean IMAGEGEN_MODEL?",
        "IMAGEGEN_WEATHER_KEY is no setting (ignored)",
    ]


@pytest.mark.usefixtures("installed_keyed")
def test_a_variable_an_installed_plugin_declares_is_no_unknown_setting() -> None:
    assert Settings.unknown_variables(environ=_GIVEN, dotenv=None) == [
        "IMAGEGEN_MODLE is no setting (ignored); did you mean IMAGEGEN_MODEL?"
    ]
