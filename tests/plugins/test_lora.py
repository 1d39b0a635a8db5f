"""lora: candidates from lora_dir (files, directories, sidecars) and settings.loras."""

from __future__ import annotations

import errno
import json
import logging
import os
from pathlib import Path

import pytest

from imagegen.errors import InvalidRequest
from imagegen.plugins import PluginContext
from imagegen.settings import Settings
from imagegen_plugins import lora
from imagegen_plugins.lora import LoraPlugin, find_loras
from tests.plugins.conftest import NOW


@pytest.fixture
def lora_dir(tmp_path: Path) -> Path:
    root = tmp_path / "loras"
    root.mkdir()
    (root / "pixel-art.safetensors").write_bytes(b"\0" * 16)
    (root / "pixel-art.json").write_text(json.dumps({"trigger": "pixelart style", "weight": 0.7}))
    (root / "watercolor.safetensors").write_bytes(b"\0" * 16)
    (root / "watercolor.json").write_text("{not json")
    (root / "heavy.safetensors").write_bytes(b"\0" * 16)
    (root / "heavy.json").write_text(json.dumps({"weight": 9}))
    (root / "sketch").mkdir()
    (root / "sketch" / "pytorch_lora_weights.safetensors").write_bytes(b"\0" * 16)
    (root / "README.txt").write_text("not a LoRA")
    return root


def _context(settings: Settings, seed: int, **options: object) -> PluginContext:
    return PluginContext("g", None, NOW, "UTC", seed, settings, options=options, plugin="lora")


def test_candidates(lora_dir: Path) -> None:
    settings = Settings(
        lora_dir=lora_dir,
        loras=["sketch", "someone/cool-lora", str(lora_dir / "heavy.safetensors")],
    )
    by_name = {h.name: h for h in LoraPlugin(settings).candidates()}
    assert sorted(by_name) == ["cool-lora", "heavy", "pixel-art", "sketch", "watercolor"]
    assert (by_name["pixel-art"].trigger, by_name["pixel-art"].weight) == ("pixelart style", 0.7)
    assert (by_name["watercolor"].trigger, by_name["watercolor"].weight) == (
        None,
        1.0,
    )  # bad sidecar
    assert by_name["heavy"].weight == 2.0  # clamped
    assert by_name["sketch"].path == str(lora_dir / "sketch")
    assert by_name["cool-lora"].path == "someone/cool-lora"


@pytest.mark.parametrize("weight", ["NaN", "Infinity", "-Infinity"])
def test_a_weight_that_is_no_finite_number_is_one(lora_dir: Path, weight: str) -> None:
    """Python's JSON reader takes NaN and Infinity: such a weight survived the clamp, the
    hint refused it, and the whole plugin failed, every other LoRA with it."""
    (lora_dir / "pixel-art.json").write_text(f'{{"trigger": "pixelart style", "weight": {weight}}}')
    by_name = {h.name: h for h in LoraPlugin(Settings(lora_dir=lora_dir)).candidates()}
    assert by_name["pixel-art"].weight == 1.0 and by_name["pixel-art"].trigger == "pixelart style"
    assert "heavy" in by_name


def test_only_entries_holding_weights_are_candidates(
    lora_dir: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a file system or a tool leaves beside the LoRAs is none: drawn, it failed the
    generation for good (render cannot load it)."""
    monkeypatch.setattr(lora, "_LEFT_OUT", set())
    (lora_dir / "lost+found").mkdir()
    (lora_dir / ".cache" / "huggingface").mkdir(parents=True)
    (lora_dir / ".ipynb_checkpoints").mkdir()
    (lora_dir / ".ipynb_checkpoints" / "pytorch_lora_weights.safetensors").write_bytes(b"\0")
    (lora_dir / "._pixel-art.safetensors").write_bytes(b"\0")  # macOS's resource fork
    (lora_dir / "notes").mkdir()  # a folder, but no weights file render would load
    (lora_dir / "notes" / "todo.txt").write_text("train more")
    settings = Settings(lora_dir=lora_dir, lora_probability=1.0)
    with caplog.at_level(logging.WARNING, logger="imagegen.plugins"):
        for _ in range(3):
            names = [hint.name for hint in LoraPlugin(settings).candidates()]
            assert names == ["heavy", "pixel-art", "sketch", "watercolor"]
    [named] = [r.getMessage() for r in caplog.records if "notes" in r.getMessage()]
    assert "pytorch_lora_weights.safetensors" in named, "named once, with what it lacks"
    plugin = LoraPlugin(settings)
    drawn = [plugin.contribute(_context(settings, seed)) for seed in range(100)]
    assert {c.loras[0].name for c in drawn if c is not None} == set(names)


def test_two_files_of_one_name_keep_the_first_in_sorted_order(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A LoRA's name holds no "." ("ink.v2" is "ink-v2"): which of two such files was kept
    followed the directory's listing order, and the other vanished without a word."""
    monkeypatch.setattr(lora, "_LEFT_OUT", set())
    root = tmp_path / "loras"
    root.mkdir()
    for name in ("ink.v2.safetensors", "ink-v2.safetensors", "ink_v2.safetensors"):
        (root / name).write_bytes(b"\0")
    listed = Path.iterdir

    def reversed_listing(self: Path) -> list[Path]:
        return sorted(listed(self), reverse=True)

    with caplog.at_level(logging.WARNING, logger="imagegen.plugins"):
        first = find_loras(root)
        monkeypatch.setattr(Path, "iterdir", reversed_listing)
        again = find_loras(root)
    assert first == again
    assert [(h.name, Path(h.path).name) for h in first] == [
        ("ink-v2", "ink-v2.safetensors"),
        ("ink_v2", "ink_v2.safetensors"),
    ]
    [named] = [r.getMessage() for r in caplog.records]
    assert "ink.v2.safetensors" in named and "ink-v2" in named, "named once, not per listing"


def test_probability_one_always_picks(lora_dir: Path) -> None:
    settings = Settings(lora_dir=lora_dir, lora_probability=1.0)
    plugin = LoraPlugin(settings)
    results = [plugin.contribute(_context(settings, seed)) for seed in range(40)]
    assert all(r is not None and len(r.loras) == 1 for r in results)
    picked = {r.loras[0].name for r in results if r is not None}
    assert picked == {"heavy", "pixel-art", "sketch", "watercolor"}
    pixel = next(r for r in results if r is not None and r.loras[0].name == "pixel-art")
    assert pixel.text == "pixelart style"
    assert pixel.data == {"lora": "pixel-art", "weight": 0.7}
    assert plugin.contribute(_context(settings, 5)) == plugin.contribute(_context(settings, 5))


def test_probability_zero_never_picks(lora_dir: Path) -> None:
    settings = Settings(lora_dir=lora_dir, lora_probability=1.0)
    plugin = LoraPlugin(settings)
    assert all(plugin.contribute(_context(settings, s, probability=0)) is None for s in range(40))


def test_probability_in_between(lora_dir: Path) -> None:
    settings = Settings(lora_dir=lora_dir, lora_probability=0.5)
    picks = sum(
        LoraPlugin(settings).contribute(_context(settings, s)) is not None for s in range(200)
    )
    assert 60 < picks < 140


def test_nothing_to_pick(tmp_path: Path) -> None:
    settings = Settings(lora_dir=tmp_path / "missing", lora_probability=1.0)
    assert LoraPlugin(settings).contribute(_context(settings, 1)) is None


def test_a_bad_probability_is_invalid(lora_dir: Path) -> None:
    settings = Settings(lora_dir=lora_dir)
    with pytest.raises(InvalidRequest) as caught:
        LoraPlugin(settings).contribute(_context(settings, 1, probability=3))
    assert caught.value.fields == ["plugin_options.lora.probability"]


def test_it_runs_on_a_thread_only_when_it_may_read_the_disk(lora_dir: Path) -> None:
    assert LoraPlugin(Settings()).blocking is False  # no LoRA configured: a draw, no disk
    assert LoraPlugin(Settings(lora_dir=lora_dir)).blocking is True
    assert LoraPlugin(Settings(loras=["someone/cool-lora"])).blocking is True


# A file's name: at most 255 bytes on Linux's file systems (NAME_MAX, linux/limits.h).
NAME_MAX = 255


@pytest.mark.parametrize("length", [NAME_MAX - 4, NAME_MAX])
def test_a_folder_whose_sidecar_name_would_be_too_long_has_no_sidecar(
    lora_dir: Path, length: int
) -> None:
    """A folder LoRA's sidecar is ``<name>.json``: for a name of 251 to 255 characters that is
    longer than any file's name may be, and asking for it raised ``File name too long``, which
    failed the whole plugin at every draw, every LoRA with it."""
    folder = lora_dir / ("f" * length)
    folder.mkdir()
    (folder / "pytorch_lora_weights.safetensors").write_bytes(b"\0" * 16)
    for settings in (
        Settings(lora_dir=lora_dir, lora_probability=1.0),
        Settings(loras=[str(folder)], lora_probability=1.0),
    ):
        by_path = {h.path: h for h in LoraPlugin(settings).candidates()}
        hint = by_path[str(folder)]
        assert (hint.name, hint.weight, hint.trigger) == ("f" * 128, 1.0, None)
        drawn = {
            c.loras[0].path
            for seed in range(40)
            if (c := LoraPlugin(settings).contribute(_context(settings, seed))) is not None
        }
        assert str(folder) in drawn
    assert "pixel-art" in {h.name for h in LoraPlugin(Settings(lora_dir=lora_dir)).candidates()}


def test_an_entry_that_cannot_be_looked_at_is_left_out(
    lora_dir: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An entry whose look-up fails (a link to a name longer than any file's) is no LoRA, named
    once in the log; the others are drawn as before. A configured path whose name is longer
    than any file's is taken as one that is not there."""
    monkeypatch.setattr(lora, "_LEFT_OUT", set())
    (lora_dir / "broken.safetensors").symlink_to("b" * (NAME_MAX + 1))
    long_entry = str(lora_dir / ("l" * (NAME_MAX + 1)))
    settings = Settings(lora_dir=lora_dir, loras=[long_entry], lora_probability=1.0)
    with caplog.at_level(logging.WARNING, logger="imagegen.plugins"):
        for _ in range(2):
            hints = LoraPlugin(settings).candidates()
    assert [h.name for h in hints] == ["heavy", "l" * 128, "pixel-art", "sketch", "watercolor"]
    assert {h.path for h in hints if h.name == "l" * 128} == {long_entry}
    [named] = [r.getMessage() for r in caplog.records if "broken" in r.getMessage()]
    assert "File name too long" in named
    assert LoraPlugin(settings).contribute(_context(settings, 1)) is not None


def test_a_configured_path_that_may_not_be_looked_up_is_left_out(
    lora_dir: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A local LoRA behind a folder this process may not search (EACCES; simulated, as root may
    search any) is left out, named in the log, not offered as a hub id under another name."""
    locked = lora_dir / "locked"
    locked.mkdir()
    entry = locked / "ink.safetensors"
    entry.write_bytes(b"\0" * 16)
    real_stat = Path.stat

    def stat(self: Path, *, follow_symlinks: bool = True) -> os.stat_result:
        if self.parent == locked:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_stat(self, follow_symlinks=follow_symlinks)

    monkeypatch.setattr(Path, "stat", stat)
    settings = Settings(loras=[str(entry), str(lora_dir / "sketch")], lora_probability=1.0)
    with caplog.at_level(logging.WARNING, logger="imagegen.plugins"):
        hints = LoraPlugin(settings).candidates()
    assert [(h.name, h.path) for h in hints] == [("sketch", str(lora_dir / "sketch"))]
    [named] = [r.getMessage() for r in caplog.records]
    assert str(entry) in named
    assert "Permission denied" in named


def test_a_lora_dir_under_home_is_read_with_home_expanded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``~`` in lora_dir is the home directory, as render reads it."""
    (tmp_path / "loras").mkdir()
    (tmp_path / "loras" / "ink.safetensors").write_bytes(b"\0" * 16)
    monkeypatch.setenv("HOME", str(tmp_path))
    settings = Settings(lora_dir=Path("~/loras"), lora_probability=1.0)
    hints = LoraPlugin(settings).candidates()
    assert [(h.name, h.path) for h in hints] == [
        ("ink", str(tmp_path / "loras" / "ink.safetensors"))
    ]
    contribution = LoraPlugin(settings).contribute(_context(settings, 1))
    assert contribution is not None
    assert contribution.loras[0].path == str(tmp_path / "loras" / "ink.safetensors")
