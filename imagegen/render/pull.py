"""Fetching models into the model cache ahead of time, for render pods that never download.

``imagegen models pull`` runs this in the Job that fills the model volume
(``knative/base/model-cache.yaml``); render pods then load from that volume with
``HF_HUB_OFFLINE=1``. Only what the pipeline loads is fetched (diffusers'
``DiffusionPipeline.download`` reads ``model_index.json`` and skips unused files, such as a
repository's single-file checkpoint), into the same cache layout ``from_pretrained`` reads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import is_offline_mode

from imagegen.errors import DependencyUnavailable, InvalidRequest
from imagegen.modelspec import MODELS
from imagegen.render._errors import first_line
from imagegen.render._loading import hub_errors, hub_options, looks_like_path, revision_said
from imagegen.settings import Settings

__all__ = ["PulledModel", "check_name", "hub_models", "incomplete", "needs_nothing", "pull"]


@dataclass(frozen=True)
class PulledModel:
    """A model in the cache: its Hub id, the revision asked for (None: ``main``), the snapshot
    directory and its size on disk."""

    model: str
    revision: str | None
    path: Path
    size_bytes: int


def hub_models(settings: Settings) -> list[str]:
    """The Hub models a render service of these settings may load, each once.

    The served models (the default among them); local directories and the models built offline
    (``tiny``, ``tiny-klein``) need no download.
    """
    names = dict.fromkeys([settings.model, *settings.served_models])
    return [name for name in names if not looks_like_path(name) and needs_nothing(name) is None]


def needs_nothing(model: str) -> str | None:
    """Why ``model`` needs no download (built offline, or a local directory); None if it does."""
    if model in MODELS and MODELS[model].offline:
        return "built offline"
    if model and Path(model).expanduser().is_dir():  # Path("") is ".", this folder
        return "a local directory"
    return None


def check_name(model: str) -> None:
    """Refuse a name that is no model before anything is fetched.

    Raises:
        InvalidRequest: ``model`` is empty, or names something here that is not a directory
            (field ``model``).
    """
    if not model.strip():
        raise InvalidRequest(
            "a model name is empty", errors=[{"field": "model", "message": "empty"}]
        )
    local = Path(model).expanduser()
    if local.exists() and not local.is_dir():
        why = "is a file here, not a pipeline directory or a Hub id"
        raise InvalidRequest(f"{model!r} {why}", errors=[{"field": "model", "message": why}])


def pull(model: str, settings: Settings) -> PulledModel:
    """Download one model's pipeline files, at its pinned revision, into the model cache.

    What is already in the cache is not fetched again; with ``HF_HUB_OFFLINE`` set, the cache
    alone must hold the model.

    Raises:
        InvalidRequest: ``model`` is empty, a file, no valid Hub id or names no repository
            (field ``model``).
        DependencyUnavailable: The Hub is unreachable or the model gated, and it is not cached.
    """
    from diffusers import DiffusionPipeline

    check_name(model)
    options = hub_options(settings, model)
    # Said at its revision: the snapshot the cache must hold for render, no other.
    what = f"model {model!r} at {revision_said(settings, model)}"
    with hub_errors(model, field="model", what=what):
        try:
            path = Path(DiffusionPipeline.download(model, **options))
        except OSError as error:
            # diffusers says why in a paragraph (an OSError of its own, with no errno: the Hub
            # could not be reached and the cache lacks the files); the fact fits in a line. An
            # OSError of the system (a full disk) says its own.
            if is_offline_mode():
                reason = "it is not in the cache and HF_HUB_OFFLINE is set"
            elif error.errno is None:
                reason = "it is not in the cache and the Hub cannot be reached"
            else:
                reason = first_line(error)
            raise DependencyUnavailable(f"{what} could not be downloaded: {reason}") from error
    if why := incomplete(path):
        raise DependencyUnavailable(
            f"{what} in the cache is incomplete: {why}; remove {path} and pull again"
        )
    # Snapshot files are links into the cache's blobs: count what they point at.
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return PulledModel(model, options["revision"], path, size)


_WEIGHTS = ("*.safetensors", "*.bin")


def incomplete(snapshot: Path) -> str | None:
    """What a pipeline snapshot lacks for render to load it, or None: read from its files'
    headers and sizes only, nothing of the weights loaded.

    Each component ``model_index.json`` names has its folder; a model component (one with a
    ``config.json``) has weights; every shard a ``*.index.json`` names is there; and each
    ``.safetensors`` file is as long as its header says (an 8-byte little-endian length, that
    many bytes of JSON, then the tensors up to the largest ``data_offsets`` end: the format's
    own layout, huggingface/safetensors).
    """
    try:
        index = json.loads((snapshot / "model_index.json").read_text())
    except (OSError, ValueError) as error:
        return f"model_index.json cannot be read ({first_line(error)})"
    if not isinstance(index, dict):
        return "model_index.json is no JSON object"
    for name, value in index.items():
        if name.startswith("_") or not (isinstance(value, list) and value and value[0]):
            continue  # metadata, or a component the pipeline goes without
        folder = snapshot / name
        if not folder.is_dir():
            return f"its {name} is missing"
        if (folder / "config.json").is_file() and not any(
            next(folder.glob(pattern), None) for pattern in _WEIGHTS
        ):
            return f"its {name} has no weights"
    for shards in snapshot.rglob("*.index.json"):
        try:
            named = set(json.loads(shards.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return f"{shards.relative_to(snapshot)} cannot be read"
        for shard in sorted(named):
            if not (shards.parent / str(shard)).is_file():
                return f"{shards.parent.relative_to(snapshot) / str(shard)} is missing"
    for weights in sorted(snapshot.rglob("*.safetensors")):
        if why := _unwhole_safetensors(weights):
            return f"{weights.relative_to(snapshot)} {why}"
    return None


def _unwhole_safetensors(path: Path) -> str | None:
    """Why a ``.safetensors`` file is not whole (cut short, no header), or None."""
    try:
        size = path.stat().st_size
        with path.open("rb") as file:
            head = file.read(8)
            if len(head) < 8:
                return "is cut short"
            length = int.from_bytes(head, "little")
            if length > size - 8:
                return "is cut short"
            header = json.loads(file.read(length))
    except (OSError, ValueError) as error:
        return f"cannot be read ({first_line(error)})"
    if not isinstance(header, dict):
        return "has no header"
    ends = [
        v["data_offsets"][1]
        for k, v in header.items()
        if k != "__metadata__" and isinstance(v, dict) and isinstance(v.get("data_offsets"), list)
    ]
    if 8 + length + max(ends, default=0) > size:
        return "is cut short"
    return None
