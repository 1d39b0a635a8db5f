"""LoRA adapters: loaded once per model, cached by name, the least recently used dropped.

Only the LoRAs the operator configured are loaded: ``settings.loras`` and what lies inside
``settings.lora_dir``. A hint's ``path`` comes with the event, so loading whatever it names would
let any caller read files of this machine or fetch any repository from the Hub.

What the settings alone decide (:func:`check_loras`) needs no torch: the render stage refuses a
job for it before the job is admitted or queued. torch, diffusers and the Hub's client are
imported where adapters are loaded.
"""

from __future__ import annotations

import importlib.util
import logging
import re
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from imagegen.errors import DependencyUnavailable, InvalidRequest
from imagegen.models import MAX_LORAS, LoraHint
from imagegen.modelspec import family_for, looks_like_path
from imagegen.render._errors import INSTALL_HINT, field_error, first_line
from imagegen.settings import Settings

if TYPE_CHECKING:
    from imagegen.render._loading import Pipeline

__all__ = ["LoraAdapters", "check_lora_support", "check_loras", "missing_loras"]

log = logging.getLogger("imagegen.render")

_NOT_THERE_RETRY_AFTER = 30.0
"""Seconds before a job naming a configured LoRA whose file is not there is retried: a volume
still being mounted, or filled."""


def check_lora_support(model: str, pipe: Pipeline) -> None:
    """Raise unless ``pipe`` can take LoRA adapters.

    Raises:
        InvalidRequest: The model does not support LoRA adapters (field ``loras``).
        DependencyUnavailable: peft is not installed.
    """
    if not family_for(model).lora or not hasattr(pipe, "load_lora_weights"):
        raise _unsupported(model)
    if importlib.util.find_spec("peft") is None:
        raise DependencyUnavailable(f"LoRA adapters need peft: {INSTALL_HINT}")


def check_loras(settings: Settings, model: str, loras: Sequence[LoraHint]) -> None:
    """Refuse ``loras`` for a job of ``model`` for what ``settings`` alone decide: no pipeline,
    no torch, nothing opened. The refusals of :meth:`LoraAdapters.activate` and
    :func:`check_lora_support`, word for word, so a job gets the same 400 before its call as
    in it.

    Raises:
        InvalidRequest: ``model``'s family takes no LoRA adapters (``loras``); a LoRA is not
            configured on this service (``loras.<i>.path``); two name the same weights
            (``loras``).
    """
    if not loras:
        return
    if not family_for(model).lora:
        raise _unsupported(model)
    configured_sources(settings, loras)


def configured_sources(settings: Settings, loras: Sequence[LoraHint]) -> list[str]:
    """Where to load each of ``loras`` from, or an error naming every one not configured.

    Raises:
        InvalidRequest: as :func:`check_loras` says.
    """
    sources: list[str] = []
    errors: list[dict[str, str]] = []
    for index, lora in enumerate(loras):
        source = _configured(settings, lora.path)
        if source is None:
            # Neither the path nor whether it exists: the message must not tell either.
            message = f"LoRA {lora.name!r} is not configured on this render service"
            errors.append({"field": f"loras.{index}.path", "message": message})
        else:
            sources.append(source)
    if errors:
        raise InvalidRequest("; ".join(error["message"] for error in errors), errors=errors)
    # Paths that differ as written ("dir/", "dir/../dir") may still name the same weights.
    first: dict[str, str] = {}
    for lora, source in zip(loras, sources, strict=True):
        if source in first:
            message = f"LoRAs {first[source]!r} and {lora.name!r} are the same weights"
            raise field_error("loras", message)
        first[source] = lora.name
    return sources


def missing_loras(settings: Settings) -> list[str]:
    """The entries of ``settings.loras`` that name a file or directory that is not there (a
    Hub id is not looked for), and ``settings.lora_dir`` if it is not there."""
    missing = [
        entry
        for entry in settings.loras
        if looks_like_path(entry) and not Path(entry).expanduser().exists()
    ]
    if settings.lora_dir is not None and not settings.lora_dir.expanduser().is_dir():
        missing.append(str(settings.lora_dir))
    return missing


def _unsupported(model: str) -> InvalidRequest:
    return field_error("loras", f"model {model!r} does not support LoRA adapters")


def _configured(settings: Settings, path: str) -> str | None:
    """``path`` as loaded when the operator configured it, else None.

    An entry of ``settings.loras`` as written (or with ``~`` expanded, as the lora plugin
    gives it), or a file or directory inside ``settings.lora_dir`` once symlinks and ``..``
    are resolved: then its resolved path, so what is loaded is what was checked.
    """
    lora_dir = settings.lora_dir
    try:
        if any(path in (e, str(Path(e).expanduser())) for e in settings.loras):
            return path
        if lora_dir is None:
            return None
        root = lora_dir.expanduser().resolve()
        target = Path(path).expanduser().resolve()
        inside = target != root and target.is_relative_to(root) and target.exists()
    except (OSError, RuntimeError, ValueError):  # unreadable, a symlink loop, a NUL byte
        return None
    return str(target) if inside else None


class LoraAdapters:
    """The adapters loaded into each model's pipeline, by name, with where they came from.

    Args:
        settings: Reads ``loras`` and ``lora_dir`` (the LoRAs that may be loaded), and
            ``model_cache_dir`` and ``hf_token`` for adapters on the Hub.
    """

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._loaded: dict[str, dict[str, str]] = {}  # model -> adapter name -> source
        # Said as the backend is built, at start-up: the operator's mistake (or a volume not
        # mounted yet) is in the log before a job names it.
        for path in missing_loras(settings):
            log.warning("configured LoRA path does not exist: %s", path, extra={"path": path})

    def activate(self, model: str, pipe: Pipeline, loras: Sequence[LoraHint]) -> None:
        """Load adapters not loaded yet; make exactly ``loras`` active, with their weights.

        One that fails to load, whatever the error, is first deleted from every component
        that took part of it.

        Raises:
            InvalidRequest: A LoRA is not configured on this service (each one named by its
                field, ``loras.<i>.path``, as pydantic names it), or cannot be loaded; two
                name the same weights (``loras``), or holds no LoRA weights.
            DependencyUnavailable: A configured LoRA's file is not there (a volume not
                mounted yet: retried), or one on the Hub cannot be fetched.
        """
        # Every hint is checked before anything is opened: again here, as the stage checked it
        # before the call, for a backend used without the stage, and for a file removed since.
        sources = configured_sources(self._settings, loras)
        wanted = {lora.name: lora for lora in loras}
        loaded = self._loaded.setdefault(model, {})
        for index, (lora, source) in enumerate(zip(loras, sources, strict=True)):
            if loaded.get(lora.name) == source:
                loaded[lora.name] = loaded.pop(lora.name)  # most recently used last
                continue
            if lora.name in loaded:
                pipe.delete_adapters(lora.name)
                del loaded[lora.name]
            try:
                self._load(model, pipe, lora, source, field=f"loras.{index}.path")
            except BaseException:
                # Whatever failed (a refusal, a library's error, running out of memory, an
                # interrupt), no part of it stays loaded untracked: diffusers loads component
                # by component, and a name left in one would refuse this name ever after
                # ("Adapter name ... already in use").
                _unload(pipe, lora.name)
                raise
            loaded[lora.name] = source
        # Bound the memory adapters take: drop the least recently used ones this job does not
        # use. A job names at most MAX_LORAS, so as many stay loaded per model.
        unused = [name for name in loaded if name not in wanted]
        for name in unused[: max(0, len(loaded) - MAX_LORAS)]:
            pipe.delete_adapters(name)
            del loaded[name]
        pipe.set_adapters(list(wanted), adapter_weights=[lora.weight for lora in wanted.values()])
        pipe.enable_lora()

    def clear(self) -> None:
        """Forget every adapter (their pipelines are being dropped)."""
        self._loaded.clear()

    def _load(self, model: str, pipe: Pipeline, lora: LoraHint, path: str, *, field: str) -> None:
        import torch
        from huggingface_hub import is_offline_mode

        from imagegen.render._loading import hub_errors, hub_options

        source = Path(path).expanduser()
        load: Callable[..., None] = pipe.load_lora_weights
        if source.exists():
            location, options = (
                (source.parent, {"weight_name": source.name}) if source.is_file() else (source, {})
            )
            try:
                load(str(location), adapter_name=lora.name, **options)
            except torch.OutOfMemoryError:
                # A RuntimeError too, but the device's state, not the file's: retryable
                # (the backend's out-of-memory refusal), never a 400.
                raise
            except _UNLOADABLE as error:
                if _NO_LAYER_MATCHED in str(error):
                    raise _misfit(model, lora, field, _NONE_FITS) from error
                raise field_error(
                    field, f"LoRA {lora.name!r} cannot be loaded: {first_line(error)}"
                ) from error
        elif looks_like_path(path):
            # Configured by the operator (a path inside lora_dir exists, or is not configured),
            # so the job is fine: the file may come (a volume not mounted yet), and the job is
            # retried rather than failed for good.
            message = f"LoRA {lora.name!r} is configured but its file is not there: {path!r}"
            raise DependencyUnavailable(
                message,
                retry_after=_NOT_THERE_RETRY_AFTER,
                errors=[{"field": field, "message": message}],
            )
        else:
            with hub_errors(path, field=field, what=f"LoRA {lora.name!r}"):
                try:
                    load(path, adapter_name=lora.name, **hub_options(self._settings))
                except (ValueError, IndexError, TypeError) as error:
                    # Offline, diffusers cannot pick the weights file from the cache.
                    if isinstance(error, ValueError) and is_offline_mode():
                        raise DependencyUnavailable(
                            f"LoRA {lora.name!r} is on the Hub and HF_HUB_OFFLINE is set: "
                            "give a local path instead"
                        ) from error
                    if _NO_LAYER_MATCHED in str(error):
                        raise _misfit(model, lora, field, _NONE_FITS) from error
                    raise field_error(
                        field, f"LoRA {lora.name!r} cannot be loaded: {first_line(error)}"
                    ) from error
        # diffusers loads nothing, and says nothing, from a folder holding no LoRA weights (a
        # component's diffusion_pytorch_model.safetensors): its set_adapters would then fail.
        loaded = {name for names in pipe.get_list_adapters().values() for name in names}
        in_file = _lora_tensors(_weights_file(source)) if source.exists() else Counter()
        if lora.name not in loaded:
            if in_file:  # LoRA tensors, for components this pipeline does not load them into
                raise _misfit(model, lora, field, _not_applied(pipe, in_file) or _NONE_FITS)
            raise field_error(field, f"LoRA {lora.name!r} holds no LoRA weights")
        _check_fit(model, pipe, lora, in_file, field=field)


def _check_fit(
    model: str, pipe: Pipeline, lora: LoraHint, in_file: Counter[str], *, field: str
) -> None:
    """Refuse ``lora`` unless ``pipe`` took every LoRA tensor of its file (the caller unloads
    it).

    diffusers loads the tensors whose layers the model has, and only warns of the others
    (``_maybe_warn_for_unhandled_keys``, diffusers/utils/peft_utils.py): a LoRA made for another
    model family, whose layer names partly agree, would change the image in part. Nor does it
    load a component its pipeline's LoRA loader leaves out (``_lora_loadable_modules``: FLUX.2
    [klein]'s takes the transformer alone, FLUX.1's not its T5 encoder), and transformers
    leaves a text encoder's DoRA magnitudes out (:func:`_applied_tensors`), each with no error.
    Compared where the file is in diffusers' own format, its tensors (``lora_A``, ``lora_B``,
    DoRA's ``lora_magnitude_vector``) named by component (``in_file``, :func:`_lora_tensors`):
    other formats (kohya, XLabs, ai-toolkit) are renamed as diffusers converts them, and its
    converters refuse the keys they do not know. A LoRA from the Hub, or a directory holding
    several weights files, is refused only when none of its layers is in the model.
    """
    if not in_file.keys() & pipe.components.keys():
        return
    if why := _not_applied(pipe, in_file):
        raise _misfit(model, lora, field, why)
    present, filled = _applied_tensors(pipe, lora.name)
    total = in_file.total()
    # More tensors than layers to take them: names the model does not have.
    lacking = {
        part: in_file[part] - present[part] for part in in_file if in_file[part] > present[part]
    }
    if lacking:
        why = (
            f"{sum(lacking.values())} of its {total} LoRA tensors are for layers the"
            f" model does not have ({', '.join(lacking)})"
        )
        raise _misfit(model, lora, field, why)
    unfilled = {
        part: present[part] - filled[part] for part in in_file if present[part] > filled[part]
    }
    if unfilled:
        why = (
            f"{sum(unfilled.values())} of its {total} LoRA tensors, for layers the model has,"
            f" were not loaded ({', '.join(unfilled)})"
        )
        raise _misfit(model, lora, field, why)


def _not_applied(pipe: Pipeline, in_file: Counter[str]) -> str:
    """Why ``in_file`` does not fit where it names components of ``pipe`` that its pipeline's
    LoRA loader does not load LoRAs into (diffusers skips their tensors, saying nothing), else
    ''."""
    loadable = type(pipe)._lora_loadable_modules
    skipped = [part for part in in_file if part in pipe.components and part not in loadable]
    if not skipped:
        return ""
    return (
        f"it holds tensors for {', '.join(skipped)}, which this model's LoRA loader does not apply"
    )


def _unload(pipe: Pipeline, adapter: str) -> None:
    """Delete ``adapter`` from ``pipe`` if a component lists it: diffusers' ``delete_adapters``
    deletes it from every component its LoRA loader loads into."""
    if any(adapter in names for names in pipe.get_list_adapters().values()):
        pipe.delete_adapters(adapter)


_NO_LAYER_MATCHED = "not found in the base model"
"""What peft raises when no tensor of a LoRA names a layer of the model: "Target modules ...
not found in the base model" (``BaseTuner.inject_adapter``, peft/tuners/tuners_utils.py), a
``ValueError`` that diffusers' ``load_lora_adapter`` (diffusers/loaders/peft.py) lets through."""

_NONE_FITS = "none of its layers is in the model"

_UNLOADABLE: tuple[type[Exception], ...] = (
    OSError,
    ValueError,
    KeyError,
    RuntimeError,
    IndexError,
    TypeError,
)
"""What diffusers raises for a LoRA file it cannot load: unreadable, of another shape, or (an
``IndexError`` from ``get_peft_kwargs``, diffusers/utils/peft_utils.py) a text encoder part none
of whose layers the model has."""

_LORA_TENSOR = re.compile(r"\.(lora_[AB]\.(weight|bias)|lora_magnitude_vector)$")
"""A LoRA tensor as diffusers saves it: ``<component>.<layer>.lora_A.weight``
(``save_lora_weights``), the names peft gives a layer's two matrices, and a DoRA's
``<component>.<layer>.lora_magnitude_vector``."""


def _misfit(model: str, lora: LoraHint, field: str, why: str) -> InvalidRequest:
    return field_error(field, f"LoRA {lora.name!r} does not fit model {model!r}: {why}")


def _weights_file(source: Path) -> Path | None:
    """The file diffusers reads for a LoRA at ``source`` where it leaves no doubt: ``source``
    itself, or a directory's one ``.safetensors`` file, or its one named as diffusers saves
    LoRAs (``_best_guess_weight_name``, diffusers/loaders/lora_base.py); else None."""
    if source.is_file():
        return source
    files = list(source.glob("*.safetensors"))
    files = [f for f in files if f.name.endswith(_DIFFUSERS_WEIGHTS)] or files
    return files[0] if len(files) == 1 else None


_DIFFUSERS_WEIGHTS = "pytorch_lora_weights.safetensors"


def _lora_tensors(weights: Path | None) -> Counter[str]:
    """How many LoRA tensors ``weights`` names per component, read from its header alone; none
    for a file safetensors cannot read (diffusers said why as it loaded it, or read a
    pickle)."""
    from safetensors import SafetensorError, safe_open

    if weights is None:
        return Counter()
    try:
        with safe_open(weights, framework="pt") as file:
            names = list(file.keys())
    except (OSError, SafetensorError):
        return Counter()
    return Counter(name.split(".", 1)[0] for name in names if _LORA_TENSOR.search(name))


def _applied_tensors(pipe: Pipeline, adapter: str) -> tuple[Counter[str], Counter[str]]:
    """How many LoRA tensors of ``adapter`` each component of ``pipe`` holds, and how many of
    those its loader filled from the file.

    peft names them ``<layer>.lora_A.<adapter>.weight`` and
    ``<layer>.lora_magnitude_vector.<adapter>.weight`` (``LoraLayer.update_layer``,
    peft/tuners/lora/layer.py). Counted, not named: transformers may rename a text encoder's
    layers as it loads them. A text encoder's are loaded by transformers (``load_adapter``,
    transformers/integrations/peft.py), which marks each tensor it fills
    ``_is_hf_initialized`` (as :func:`imagegen.render._loading._not_loaded` reads it) and
    initialises the others with no error: a DoRA's magnitudes, which peft's renaming
    (``build_peft_weight_mapping``) gives no ``.weight``. Where it marks none (a release that
    loads through peft), all count as filled.
    """
    import torch
    from transformers import PreTrainedModel

    own = re.compile(
        rf"\.(lora_[AB]\.{re.escape(adapter)}\.(weight|bias)"
        rf"|lora_magnitude_vector\.{re.escape(adapter)}\.weight)$"
    )
    present: Counter[str] = Counter()
    filled: Counter[str] = Counter()
    for part, component in pipe.components.items():
        if not isinstance(component, torch.nn.Module):
            continue
        tensors = [t for name, t in component.named_parameters() if own.search(name)]
        marked = [t for t in tensors if getattr(t, "_is_hf_initialized", False)]
        present[part] = len(tensors)
        by_transformers = isinstance(component, PreTrainedModel) and bool(marked)
        filled[part] = len(marked) if by_transformers else len(tensors)
    return present, filled
