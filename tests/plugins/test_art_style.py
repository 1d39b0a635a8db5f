"""art_style: a shipped list of styles, drawn as a pure function of the seed."""

from __future__ import annotations

import json
from importlib.resources import files

import pytest

from imagegen.errors import InvalidRequest
from imagegen.plugins import PluginContext
from imagegen.settings import Settings
from imagegen_plugins.art_style import ArtStylePlugin, load_styles
from tests.plugins.conftest import NOW


def _context(settings: Settings, gid: str, seed: int, **options: object) -> PluginContext:
    return PluginContext(gid, None, NOW, "UTC", seed, settings, options=options, plugin="art_style")


def test_the_shipped_list() -> None:
    raw = json.loads(files("imagegen_plugins").joinpath("data/art_styles.json").read_text("utf-8"))
    assert len(raw) >= 100
    assert all(
        set(row) == {"name", "description"} and row["name"] and len(row["description"]) > 10
        for row in raw
    )
    names = [row["name"].lower() for row in raw]
    assert len(set(names)) == len(names)
    assert len(load_styles()) == len(raw)


def test_same_seed_same_style_in_fresh_instances(settings: Settings) -> None:
    first = ArtStylePlugin(settings).contribute(_context(settings, "g1", 42))
    again = ArtStylePlugin(settings).contribute(_context(settings, "g1", 42))
    assert first == again
    assert first.data["style"] in first.text
    picks = {
        ArtStylePlugin(settings).contribute(_context(settings, "g", s)).data["style"]
        for s in range(20)
    }
    assert len(picks) > 5


def test_history_plays_no_part(settings: Settings) -> None:
    """Two replicas that saw different generations before draw alike for the same one."""
    busy = ArtStylePlugin(settings)
    for i in range(300):
        busy.contribute(_context(settings, f"other{i}", i % 7))
    for seed in range(50):
        fresh = ArtStylePlugin(settings).contribute(_context(settings, "g", seed))
        assert busy.contribute(_context(settings, "g", seed)) == fresh


def test_the_style_option_forces_one(settings: Settings) -> None:
    result = ArtStylePlugin(settings).contribute(_context(settings, "g", 1, style="ukiyo-E"))
    assert result.data == {"style": "Ukiyo-e", "forced": True}
    assert result.text.startswith("Ukiyo-e style, ")


def test_an_unknown_style_is_invalid(settings: Settings) -> None:
    with pytest.raises(InvalidRequest) as caught:
        ArtStylePlugin(settings).contribute(_context(settings, "g", 1, style="Blobism"))
    assert caught.value.fields == ["plugin_options.art_style.style"]
