"""Number options: anything that is no finite number within bounds is the option's error."""

from __future__ import annotations

from typing import Any

import pytest

from imagegen.errors import ConfigurationError, InvalidRequest
from imagegen.plugins import PluginSet
from imagegen.settings import Settings
from tests.plugins.conftest import NOW

# (plugin, option, settings enabling it)
_NUMBER_OPTIONS = [
    ("lora", "probability", {"plugins": ["lora"], "loras": ["someone/cool-lora"]}),
    ("holiday", "horizon_days", {"plugins": ["holiday"], "holiday_countries": ["US"]}),
]
# What JSON may hold in a number's place: an integer too large for a float (JSON's integers
# have any length), and text a float reads as infinite or not a number.
_NO_NUMBERS = [
    pytest.param(10**400, id="400-digits"),
    pytest.param(-(10**400), id="minus-400-digits"),
    "1e999",
    "nan",
    "-inf",
]


@pytest.mark.parametrize(("plugin", "key", "enabling"), _NUMBER_OPTIONS)
@pytest.mark.parametrize("value", _NO_NUMBERS)
async def test_a_request_giving_no_finite_number_is_refused_naming_the_option(
    plugin: str, key: str, enabling: dict[str, Any], value: object
) -> None:
    plugins = PluginSet.from_settings(Settings(**enabling))
    with pytest.raises(InvalidRequest) as caught:
        await plugins.run(generation_id="g", seed=1, now=NOW, options={plugin: {key: value}})
    assert caught.value.status == 400
    assert caught.value.fields == [f"plugin_options.{plugin}.{key}"]
    assert len(caught.value.message) < 200, "the number is not quoted whole"


@pytest.mark.parametrize(("plugin", "key", "enabling"), _NUMBER_OPTIONS)
async def test_the_operators_huge_integer_is_the_settings_fault(
    plugin: str, key: str, enabling: dict[str, Any]
) -> None:
    settings = Settings(**enabling, plugin_options={plugin: {key: 10**400}})
    plugins = PluginSet.from_settings(settings)
    with pytest.raises(ConfigurationError) as caught:
        await plugins.run(generation_id="g", seed=1, now=NOW)
    assert caught.value.status == 503
    assert caught.value.fields == ["IMAGEGEN_PLUGIN_OPTIONS"]
    assert f"plugin_options.{plugin}.{key}" in caught.value.message
