"""A LoRA for the render stage, picked now and then from the configured ones.

Candidates are the LoRAs in ``settings.lora_dir`` (a ``*.safetensors`` file, or a directory
holding diffusers' ``pytorch_lora_weights.safetensors``; hidden entries and ``lost+found`` are
no LoRAs), plus ``settings.loras`` (names of those, local paths or hub ids). A sidecar
``<name>.json`` next to a candidate may give its ``trigger`` word and ``weight``::

    {"trigger": "pixelart style", "weight": 0.8}

With probability ``settings.lora_probability`` (option ``probability``) one candidate is drawn
from the request's seed; the render stage loads it from the :class:`LoraHint`.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import re
from pathlib import Path
from typing import Any

from imagegen.models import Contribution, LoraHint
from imagegen.plugins import PluginContext
from imagegen.settings import Settings
from imagegen_plugins._options import option_float

__all__ = ["LoraPlugin", "find_loras", "lora_from_path"]

logger = logging.getLogger("imagegen.plugins")

_MAX_WEIGHT = 2.0
# The file diffusers' ``load_lora_weights`` reads from a directory given no ``weight_name``
# (``LORA_WEIGHT_NAME_SAFE`` in diffusers/loaders/lora_base.py); render loads a directory so.
_WEIGHTS_FILE = "pytorch_lora_weights.safetensors"
# Entries a file system or a tool puts beside the LoRAs: never one.
_NOT_LORAS = frozenset({"lost+found"})
# Entries left out (a folder without the weights file, a second file of one LoRA name): named
# once in the log, not at every draw.
_LEFT_OUT: set[str] = set()


def _left_out(entry: Path, why: str, *args: object) -> None:
    if str(entry) not in _LEFT_OUT:
        _LEFT_OUT.add(str(entry))
        logger.warning("lora_dir: %s left out: " + why, entry, *args)


def _safe_name(text: str) -> str:
    # A LoraHint's name: no "." either, which torch refuses in the adapter's module name.
    name = re.sub(r"[^A-Za-z0-9_-]+", "-", text).lstrip("_-")[:128]
    return name or "lora"


def _sidecar(path: Path) -> dict[str, Any]:
    try:
        if not path.is_file():
            return {}
        data = json.loads(path.read_text("utf-8"))
    except OSError as exc:
        # A folder named with 251 to 255 characters has a sidecar name longer than any file's
        # (NAME_MAX): it has none. pathlib's is_file() answers False only for ENOENT, ENOTDIR,
        # EBADF and ELOOP (CPython's Lib/pathlib.py, _IGNORED_ERRNOS) and raises the rest.
        if exc.errno != errno.ENAMETOOLONG:
            logger.warning("ignoring LoRA sidecar %s: %s", path, exc)
        return {}
    except ValueError as exc:
        logger.warning("ignoring LoRA sidecar %s: %s", path, exc)
        return {}
    if not isinstance(data, dict):
        logger.warning("ignoring LoRA sidecar %s: not a JSON object", path)
        return {}
    return data


def _hint(name: str, path: str, sidecar: dict[str, Any]) -> LoraHint:
    weight = sidecar.get("weight", 1.0)
    # NaN and infinities pass for floats; a NaN survives the clamp below and LoraHint refuses
    # it, which failed the whole plugin, every LoRA with it.
    if isinstance(weight, bool) or not isinstance(weight, int | float) or not math.isfinite(weight):
        logger.warning("LoRA %s: weight %r is not a number; using 1.0", name, weight)
        weight = 1.0
    trigger = sidecar.get("trigger")
    if not isinstance(trigger, str) or not trigger.strip():
        trigger = None
    return LoraHint(
        name=name,
        path=path,
        weight=min(max(float(weight), 0.0), _MAX_WEIGHT),
        trigger=None if trigger is None else trigger.strip()[:200],
    )


def lora_from_path(path: Path) -> LoraHint:
    """The LoRA stored at ``path`` (a ``.safetensors`` file or a directory), sidecar applied."""
    stem = path.name.removesuffix(".safetensors")
    return _hint(_safe_name(stem), str(path), _sidecar(path.parent / f"{stem}.json"))


def _is_lora(entry: Path) -> bool:
    """Whether ``entry`` holds weights render can load: not a hidden entry (``.cache``,
    ``.ipynb_checkpoints``), nor ``lost+found``, nor a folder without the weights file."""
    if entry.name.startswith(".") or entry.name in _NOT_LORAS:
        return False
    try:
        if entry.is_dir():
            if (entry / _WEIGHTS_FILE).is_file():
                return True
            _left_out(entry, "a folder without %s", _WEIGHTS_FILE)
            return False
        return entry.is_file() and entry.suffix == ".safetensors"
    except OSError as exc:  # a link to a name too long, a folder it may not search: no LoRA
        _left_out(entry, "%s", exc)
        return False


def _exists(path: Path) -> bool | None:
    """Whether ``path`` is there; None where it cannot be looked up (a folder on the way this
    process may not search), said in the log. A name longer than any file's is not there, as
    pathlib's ``exists()`` says of one missing: it answers False only for ENOENT, ENOTDIR,
    EBADF and ELOOP (CPython's Lib/pathlib.py, _IGNORED_ERRNOS) and raises the rest."""
    try:
        return path.exists()
    except OSError as exc:
        if exc.errno == errno.ENAMETOOLONG:
            return False
        # Taken as a hub id, a local LoRA would be offered under another name and fail the job.
        logger.warning("loras: %s left out: %s", path, exc)
        return None


def find_loras(directory: Path) -> list[LoraHint]:
    """The LoRAs in ``directory``, by name; an absent directory has none.

    Entries are read in sorted order: of two whose names make the same LoRA name
    (``ink.v2.safetensors``, ``ink-v2.safetensors``), the first is kept, the other named in
    the log once.
    """
    try:
        if not directory.is_dir():
            logger.warning("lora_dir %s is not a directory", directory)
            return []
        entries = sorted(directory.iterdir(), key=lambda path: path.name)
    except OSError as exc:  # one it may not read: as good as none, said at each draw
        logger.warning("lora_dir %s cannot be read: %s", directory, exc)
        return []
    found: dict[str, LoraHint] = {}
    for entry in entries:
        if not _is_lora(entry):
            continue
        hint = lora_from_path(entry)
        kept = found.setdefault(hint.name, hint)
        if kept is not hint:
            _left_out(entry, "%s is LoRA %s already", kept.path, hint.name)
    return sorted(found.values(), key=lambda hint: hint.name)


class LoraPlugin:
    """Adds, with some probability, a LoRA hint and its trigger word."""

    name = "lora"
    description = "Sometimes picks a LoRA from lora_dir/loras; adds its trigger word."
    option_names = ("probability",)

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # The disk is read only for configured LoRAs (the directory, local paths): without
        # any, a draw is arithmetic and runs on the event loop (see PromptPlugin).
        self.blocking = settings.lora_dir is not None or bool(settings.loras)

    def candidates(self) -> list[LoraHint]:
        """Every LoRA this plugin may pick, by name, without duplicates."""
        found: dict[str, LoraHint] = {}
        if self.settings.lora_dir is not None:
            # "~" expanded as render expands it (imagegen.render._lora); the settings refuse
            # one that names no home this process can find.
            lora_dir = self.settings.lora_dir.expanduser()
            found.update((hint.name, hint) for hint in find_loras(lora_dir))
        for entry in self.settings.loras:
            if entry in found:
                continue
            path = Path(entry).expanduser()
            exists = _exists(path)
            if exists is None:
                continue
            if exists:
                hint = lora_from_path(path)
            else:  # a hub id such as "user/repo"
                hint = _hint(_safe_name(entry.rstrip("/").rsplit("/", 1)[-1]), entry, {})
            found.setdefault(hint.name, hint)
        return sorted(found.values(), key=lambda hint: hint.name)

    def contribute(self, context: PluginContext) -> Contribution | None:
        """A drawn LoRA, or None when the draw says no or there is nothing to pick."""
        probability = option_float(
            context.options,
            self.name,
            "probability",
            self.settings.lora_probability,
            low=0.0,
            high=1.0,
        )
        rng = context.rng()
        if probability <= 0.0 or rng.random() >= probability:
            return None
        candidates = self.candidates()
        if not candidates:
            return None
        hint = rng.choice(candidates)
        return Contribution(
            plugin=self.name,
            text=hint.trigger or "",
            data={"lora": hint.name, "weight": hint.weight},
            loras=[hint],
        )
