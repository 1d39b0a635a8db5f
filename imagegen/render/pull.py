"""Fetching models into the model cache ahead of time, for render pods that never download.

``imagegen models pull`` runs this in the Job that fills the model volume
(``knative/base/model-cache.yaml``); render pods then load from that volume with
``HF_HUB_OFFLINE=1``. Only what the pipeline loads is fetched (diffusers'
``DiffusionPipeline.download`` reads ``model_index.json`` and skips unused files, such as a
repository's single-file checkpoint), into the same cache layout ``from_pretrained`` reads.
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imagegen._paths import NoHome, expanded
from imagegen.errors import DependencyUnavailable, InvalidRequest
from imagegen.modelspec import MODELS, looks_like_path
from imagegen.render._errors import first_line
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


def is_offline_mode() -> bool:
    """Whether the Hub client may not reach the Hub (``HF_HUB_OFFLINE``): its own answer.

    The Hub client is imported here, not with this module: what needs none of it (the checks
    of names, :func:`incomplete`) works in an install without the render extra, where
    ``imagegen models list`` reads the model table.
    """
    from huggingface_hub import is_offline_mode as offline

    return bool(offline())


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
    if model and _local(model).is_dir():  # Path("") is ".", this folder
        return "a local directory"
    return None


def _local(model: str) -> Path:
    """``model`` as a path here, ``~`` expanded.

    Raises:
        InvalidRequest: ``~`` names no home this process can find (an unknown ``~user``, a
            user with no passwd entry and no ``HOME``) (field ``model``).
    """
    try:
        return expanded(model)
    except NoHome as exc:
        raise InvalidRequest(
            f"{model!r}: {exc}", errors=[{"field": "model", "message": str(exc)}]
        ) from None


def check_name(model: str) -> None:
    """Refuse a name that is no model before anything is fetched.

    Raises:
        InvalidRequest: ``model`` is empty, names something here that is not a directory, or
            starts with a ``~`` that names no home (field ``model``).
    """
    if not model.strip():
        raise InvalidRequest(
            "a model name is empty", errors=[{"field": "model", "message": "empty"}]
        )
    local = _local(model)
    if local.exists() and not local.is_dir():
        why = "is a file here, not a pipeline directory or a Hub id"
        raise InvalidRequest(f"{model!r} {why}", errors=[{"field": "model", "message": why}])


def pull(model: str, settings: Settings) -> PulledModel:
    """Download one model's pipeline files, at its pinned revision, into the model cache.

    What is already in the cache whole is not fetched again; a damaged file (see
    :func:`incomplete`) is removed with its blob and fetched anew. With ``HF_HUB_OFFLINE``
    set, the cache alone must hold the model.

    Raises:
        InvalidRequest: ``model`` is empty, a file, no valid Hub id or names no repository
            (field ``model``).
        DependencyUnavailable: The Hub is unreachable or the model gated, and it is not cached;
            or the snapshot is still not whole.
    """
    # Here, not at import: they import torch and diffusers, which checking a snapshot
    # (``imagegen models list``) does without.
    from imagegen.render._loading import hub_options, revision_said

    check_name(model)
    options = hub_options(settings, model)
    # Said at its revision: the snapshot the cache must hold for render, no other.
    what = f"model {model!r} at {revision_said(settings, model)}"
    # The Hub client fetches a file only where its snapshot lacks it, and links a snapshot's
    # file to a blob already there without reading it (huggingface_hub's
    # ``file_download.hf_hub_download``): a blob cut short or damaged stays so through any
    # number of pulls, and through removing the snapshot. So damaged files go, blob and link,
    # before the download, which then fetches them anew; and once more after it, for a
    # snapshot whose model_index.json was not there to find it by. What the download leaves
    # is checked whatever was removed: a file that could not go is still damaged.
    cached = _cached_snapshot(model, options)
    if cached is not None and is_offline_mode():
        _check_whole(cached, what)  # nothing can be fetched: what is there is the answer
    if cached is not None:
        _forget_damaged(cached, what)
    path = _download(model, options, what)
    if _forget_damaged(path, what):
        path = _download(model, options, what)
    _check_whole(path, what)
    # Snapshot files are links into the cache's blobs: count what they point at.
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return PulledModel(model, options["revision"], path, size)


def _check_whole(snapshot: Path, what: str) -> None:
    """Refuse a snapshot render could not load, saying how to mend it."""
    if why := incomplete(snapshot):
        if is_offline_mode():
            advice = "pull it where the Hub can be reached (HF_HUB_OFFLINE unset) to repair it"
        else:  # repaired once and still not whole: start that model's cache afresh
            advice = f"remove {snapshot.parent.parent} and pull again"
        raise DependencyUnavailable(f"{what} in the cache is incomplete: {why}; {advice}")


def _download(model: str, options: dict[str, Any], what: str) -> Path:
    """The pipeline's files fetched into the cache, where missing; their snapshot."""
    from diffusers import DiffusionPipeline

    from imagegen.render._loading import hub_errors

    with hub_errors(model, field="model", what=what):
        try:
            return Path(DiffusionPipeline.download(model, **options))
        except OSError as error:
            # diffusers says why in a paragraph (an OSError of its own, with no errno: the Hub
            # could not be reached and the cache lacks the files); the fact fits in a line. An
            # OSError of the system (a full disk) says its own.
            if is_offline_mode():
                reason = "it is not in the cache and HF_HUB_OFFLINE is set"
            elif error.errno is None:
                reason = "it is not in the cache and the Hub cannot be reached"
            elif error.errno in (errno.ENOSPC, errno.EDQUOT):
                where, variable = _cache_said(options)
                reason = (
                    f"{first_line(error)}; the model cache {where} ({variable}) is full: free"
                    f" space there, or set {variable} to a volume with room for the model"
                )
            else:
                reason = first_line(error)
            raise DependencyUnavailable(f"{what} could not be downloaded: {reason}") from error


def _cache_said(options: dict[str, Any]) -> tuple[str, str]:
    """The model cache a download writes into, and the variable that puts it there:
    ``IMAGEGEN_MODEL_CACHE_DIR``, else the Hub client's cache (``HF_HUB_CACHE``, else
    ``HF_HOME``'s ``hub`` folder: huggingface_hub's ``constants.py``)."""
    if options["cache_dir"] is not None:
        return options["cache_dir"], Settings.variable("model_cache_dir")
    from huggingface_hub import constants

    hub = next((v for v in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE") if os.environ.get(v)), None)
    return constants.HF_HUB_CACHE, hub or "HF_HOME"


def _cached_snapshot(model: str, options: dict[str, Any]) -> Path | None:
    """The snapshot of ``model`` at its revision the cache holds, found by its
    model_index.json without reading it; None if there is none (or no such Hub id)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(
            model,
            "model_index.json",
            cache_dir=options["cache_dir"],
            revision=options["revision"],
        )
    except ValueError:  # no valid Hub id: the download says so
        return None
    return Path(found).parent if isinstance(found, str) else None


def _forget_damaged(snapshot: Path, what: str) -> bool:
    """Remove each damaged file of ``snapshot`` and the blob it links to, so a download
    fetches it anew; whether one was removed. Offline nothing is removed: nothing could be
    fetched in its place.

    Only what lies in the cache goes: a file reached through a component folder that links
    out of the snapshot (a folder shared with another model, the user's own) is left, and the
    check after the download says it is damaged.

    Raises:
        DependencyUnavailable: A damaged file or its blob cannot be removed (a read-only
            cache).
    """
    damaged = [(why, file) for why, file in _problems(snapshot) if file is not None]
    if not damaged or is_offline_mode():
        return False
    # Compared resolved: the cache may be reached through a link (its folder, its blobs
    # folder, or /tmp on macOS), and a snapshot's file resolves through every one of them.
    inside = snapshot.resolve()
    blobs = (snapshot.parent.parent / "blobs").resolve()
    removed = False
    for why, file in damaged:
        if not file.parent.resolve().is_relative_to(inside):
            continue
        # A snapshot's file is a link to ``../../blobs/<etag>`` (a copy where the system has
        # no links): the blob goes only if it lies in this repository's blobs folder.
        blob = file.resolve()
        try:
            if file.is_symlink() and blob.parent == blobs:
                blob.unlink(missing_ok=True)
            file.unlink(missing_ok=True)
        except OSError as error:
            raise DependencyUnavailable(
                f"{what} in the cache is damaged ({why}) and cannot be repaired:"
                f" {file} cannot be removed ({first_line(error)}); pull it where the cache"
                " can be written"
            ) from error
        removed = True
    return removed


_WEIGHTS = (".safetensors", ".bin")


def incomplete(snapshot: Path) -> str | None:
    """What a pipeline snapshot lacks for render to load it, or None: read from its files'
    headers and sizes only, nothing of the weights loaded.

    Each component ``model_index.json`` names has its folder, and that folder can be read; a
    model component (one with weights, or a ``config.json``) has both; a scheduler (a class
    named ``…Scheduler``) its ``scheduler_config.json``; every shard a ``*.index.json`` names
    is there; every JSON file of a component parses (``model_index.json``, and each
    ``config.json``, ``scheduler_config.json`` and ``tokenizer_config.json``, a JSON object);
    and each ``.safetensors`` file is as long as its header says (an 8-byte little-endian
    length, that many bytes of JSON, then the tensors up to the largest ``data_offsets`` end:
    the format's own layout, huggingface/safetensors).
    """
    return next((why for why, _ in _problems(snapshot)), None)


def _problems(snapshot: Path) -> Iterator[tuple[str, Path | None]]:
    """Each thing :func:`incomplete` finds wrong, with the file that is damaged (None where
    something is missing or cannot be read): what a download would fetch anew once that file
    is gone."""
    index = snapshot / "model_index.json"
    parsed, why = _parsed_json(index)
    if why:
        yield f"model_index.json {why}", index if os.path.lexists(index) else None
    components = parsed if isinstance(parsed, dict) else {}
    for name, value in components.items():
        if name.startswith("_") or not (isinstance(value, list) and value and value[0]):
            continue  # metadata, or a component the pipeline goes without
        # A folder that cannot be read (its mode, a link into one) raises at the first look
        # into it, where a missing file is False: the problem said, not a traceback.
        try:
            yield from _component_problems(snapshot / name, value)
        except OSError as error:
            yield f"its {name} cannot be read ({error.strerror or first_line(error)})", None
    for shards in sorted(snapshot.rglob("*.index.json")):
        try:
            named = set(json.loads(shards.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            yield f"{shards.relative_to(snapshot)} cannot be read", shards
            continue
        for shard in sorted(named):
            if not (shards.parent / str(shard)).is_file():
                yield f"{shards.parent.relative_to(snapshot) / str(shard)} is missing", None
    for weights in sorted(snapshot.rglob("*.safetensors")):
        if why := _unwhole_safetensors(weights):
            yield f"{weights.relative_to(snapshot)} {why}", weights


def _component_problems(folder: Path, value: list[Any]) -> Iterator[tuple[str, Path | None]]:
    """What is wrong in one component's ``folder``, ``value`` its entry in
    ``model_index.json`` (library, class).

    Raises:
        OSError: The folder cannot be read.
    """
    name = folder.name
    if not folder.is_dir():
        yield f"its {name} is missing", None
        return
    # Each name the folder holds, a link whose blob is gone among them: such a file is
    # missing, where a look for it by its target would pass over it.
    files = {entry.name: entry for entry in folder.iterdir()}
    weights = any(file.endswith(_WEIGHTS) for file in files)
    required = ["config.json"] if weights else []
    if len(value) > 1 and isinstance(value[1], str) and value[1].endswith("Scheduler"):
        required.append("scheduler_config.json")  # diffusers' SchedulerMixin.config_name
    for config in required:
        if config not in files:
            yield f"{name}/{config} is missing", None
    if "config.json" in files and not weights:
        yield f"its {name} has no weights", None
    for file, path in sorted(files.items()):
        if file.endswith(".json") and not file.endswith(".index.json"):  # shards: below
            _, why = _parsed_json(path, mapping=file in _CONFIGS)
            if why:
                yield f"{name}/{file} {why}", path


_CONFIGS = ("config.json", "scheduler_config.json", "tokenizer_config.json")
"""A component's configs: JSON objects, each read whole by what loads it."""

_MAX_JSON_BYTES = 64 * 2**20
"""The largest JSON file parsed to check it: a component's JSON files are small, a tokenizer's
``tokenizer.json`` the largest (about 11 MB, Qwen3's); one larger is left unread."""


def _parsed_json(path: Path, *, mapping: bool = True) -> tuple[Any, str | None]:
    """``path`` parsed, and why it is no JSON (missing, not JSON) or, where ``mapping``, no
    JSON object; (None, None) for a file over :data:`_MAX_JSON_BYTES`, left unread."""
    try:
        if path.stat().st_size > _MAX_JSON_BYTES:
            return None, None
        parsed = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None, "is missing"
    except (OSError, ValueError) as error:
        return None, f"cannot be read ({first_line(error, 100)})"
    return parsed, None if not mapping or isinstance(parsed, dict) else "is no JSON object"


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
