"""The sample plugin of docs/plugins.md, as written there: its code installed under the entry
point its ``pyproject.toml`` lines declare, and served by the enhance function."""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.functions.clients import InProcessFunction
from tests.functions.conftest import base_env
from tests.plugins.sample_plugins import install_distribution

_PAGE = (ROOT / "docs" / "plugins.md").read_text()


def _block(language: str) -> str:
    """The page's first code block in ``language``."""
    found = re.search(rf"```{language}\n(.*?)```", _PAGE, flags=re.S)
    assert found is not None, f"no {language} block in docs/plugins.md"
    return found.group(1)


@pytest.fixture
def enhance(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[InProcessFunction]:
    """The enhance function with the sample enabled, installed as the page declares it."""
    declared = tomllib.loads(_block("toml"))["project"]["entry-points"]["imagegen.plugins"]
    assert declared == {"weather": "my_package.weather:WeatherPlugin"}
    site = tmp_path / "site"
    (site / "my_package").mkdir(parents=True)
    (site / "my_package" / "__init__.py").write_text("")
    (site / "my_package" / "weather.py").write_text(_block("python"))
    install_distribution(site, "my-weather-plugin", declared)
    monkeypatch.syspath_prepend(str(site))
    env = {**base_env(tmp_path / "store"), "IMAGEGEN_PLUGINS": "time_of_day,weather"}
    function = InProcessFunction("enhance", env, timeout=30)
    yield function
    function.close()


def test_the_documented_plugin_adds_the_sky_it_is_given_or_draws_one(
    enhance: InProcessFunction,
) -> None:
    given = enhance.post(
        "/",
        json={
            "prompt": "a calm lake",
            "enhance": False,
            "plugin_options": {"weather": {"sky": "light snow"}},
        },
    )
    assert given.status_code == 200, given.text
    [weather] = [c for c in given.json()["contributions"] if c["plugin"] == "weather"]
    assert weather["text"] == "light snow" and weather["data"] == {"sky": "light snow"}
    drawn = enhance.post("/", json={"prompt": "a calm lake", "enhance": False})
    assert drawn.status_code == 200, drawn.text
    [weather] = [c for c in drawn.json()["contributions"] if c["plugin"] == "weather"]
    assert weather["text"] in ("foggy weather", "clear skies", "light rain")


@pytest.mark.parametrize("sky", [5, "", "x" * 101, ["rain"]])
def test_the_documented_plugin_refuses_a_bad_sky_naming_the_option(
    enhance: InProcessFunction, sky: object
) -> None:
    answer = enhance.post(
        "/",
        json={
            "prompt": "a calm lake",
            "enhance": False,
            "plugin_options": {"weather": {"sky": sky}},
        },
    )
    assert answer.status_code == 400, answer.text
    assert [e["field"] for e in answer.json()["errors"]] == ["plugin_options.weather.sky"]
