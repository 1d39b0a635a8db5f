"""Loading pipelines from a local directory or the Hugging Face Hub, translating failures."""

from __future__ import annotations

import contextlib
import itertools
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# Before diffusers and transformers: their log lines, import-time warnings too, become JSON.
from imagegen.render import _libraries  # noqa: F401  # isort: skip

import diffusers
import torch
from huggingface_hub import hf_hub_download, is_offline_mode
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
)
from packaging.version import Version
from safetensors import SafetensorError

from imagegen._paths import NoHome, expanded
from imagegen.errors import DependencyUnavailable, InvalidRequest
from imagegen.modelspec import looks_like_path
from imagegen.render._errors import field_error, first_line
from imagegen.settings import Settings

__all__ = [
    "Pipeline",
    "hub_errors",
    "hub_options",
    "load_pipeline",
    "looks_like_path",
    "revision_said",
]

Pipeline = Any
"""A diffusers ``DiffusionPipeline``; diffusers' own hints resolve to placeholder classes."""

# diffusers 0.42 renamed ``torch_dtype`` to ``dtype``; older releases ignore ``dtype``.
_DTYPE_ARGUMENT = "dtype" if Version(diffusers.__version__).release >= (0, 42) else "torch_dtype"


def hub_options(settings: Settings, model: str | None = None) -> dict[str, Any]:
    """The Hub arguments of a download: ``settings.model_cache_dir`` and ``settings.hf_token``,
    and for a model, the revision pinned for it (:meth:`Settings.revision_for`)."""
    token = settings.hf_token
    cache_dir = settings.model_cache_dir
    options = {
        "cache_dir": str(cache_dir) if cache_dir is not None else None,
        "token": token.get_secret_value() if token is not None else None,
    }
    if model is not None:
        options["revision"] = settings.revision_for(model)
    return options


def revision_said(settings: Settings, model: str) -> str:
    """The revision ``model`` loads at, as a message says it, with where its pin is set: which
    snapshot the model cache must hold (:meth:`Settings.revision_for`)."""
    revision = settings.revision_for(model)
    if revision is None:
        return "revision main (not pinned)"
    where = "IMAGEGEN_MODEL_REVISIONS" if settings.model_revisions.get(model) else "the model table"
    return f"revision {revision} (pinned by {where})"


def load_pipeline(model: str, dtype: torch.dtype, settings: Settings) -> Pipeline:
    """Load a pipeline from a local directory or the Hub, translating failures.

    Raises:
        InvalidRequest: ``model`` names no text-to-image pipeline (field ``model``).
        DependencyUnavailable: The model is neither cached nor downloadable, or its files
            are damaged or incomplete.
    """
    try:
        local = expanded(model)
    except NoHome as exc:
        raise field_error("model", f"no such model directory: {model!r} ({exc})") from None
    if local.exists():
        if not (local / "model_index.json").is_file():
            raise field_error(
                "model",
                f"{model!r} is not a diffusers pipeline directory (no model_index.json)",
            )
        source, folder, remote = str(local), local, False
    elif looks_like_path(model):
        raise field_error("model", f"no such model directory: {model!r}")
    else:
        # Probe the one small file first: it tells a wrong id from an unreachable Hub.
        # Said at its revision: offline, the operator pulls that snapshot, no other.
        what = f"model {model!r} at {revision_said(settings, model)}"
        with hub_errors(model, field="model", what=what):
            index = hf_hub_download(model, "model_index.json", **hub_options(settings, model))
        source, folder, remote = model, Path(index).parent, True

    options = hub_options(settings, model) if remote else {}
    # Here, not at import: it imports every pipeline diffusers has, and the offline models
    # (``_family.build_offline``) need none of them.
    from diffusers.pipelines.auto_pipeline import AutoPipelineForText2Image
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    # Their bars on stderr are no log lines (a server's are JSON), and the command line shows
    # its own progress.
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    try:
        pipe: Pipeline = AutoPipelineForText2Image.from_pretrained(
            source, **{_DTYPE_ARGUMENT: dtype}, **options
        )
        _check_filled(pipe)
    except _DAMAGED + _MISREAD as error:
        raise _unloadable(model, folder, remote, error, settings) from error
    # Any other exception is no known way for files to fail: it goes up as it is, to be
    # logged with its traceback (``-v`` on the command line).
    return pipe


class _Unfilled(Exception):
    """A component's weights lack tensors its class has (:func:`_check_filled`)."""


_DAMAGED: tuple[type[Exception], ...] = (OSError, SafetensorError, _Unfilled)
"""What files that are there but cannot be loaded raise, whichever library reads them:

- ``OSError``: a file missing or unreadable; diffusers' ``load_state_dict``
  (diffusers/models/model_loading_utils.py), which reads its own models' weights, raises it
  for a Git LFS pointer too (and a ``ValueError`` for other weights it cannot parse, told
  from a malformed ``model_index.json`` by :func:`incomplete`).
- ``SafetensorError``: transformers opens a component's weights with ``safe_open``
  (``PreTrainedModel._load_pretrained_model``, transformers/modeling_utils.py) and lets what
  it raises through: a file cut short, empty or an LFS pointer fails its header checks
  (huggingface/safetensors, bindings/python/src/lib.rs, a plain ``Exception`` subclass).
- ``_Unfilled``: tensors missing from a component's weights, found once the pipeline is built.
"""

_MISREAD: tuple[type[Exception], ...] = (ValueError, KeyError, TypeError, AttributeError)
"""What diffusers raises for files it reads without checking their shape (a
``model_index.json`` that is ``{}``, a list, a null class name): damage where
:func:`incomplete` sees it, else no text-to-image pipeline."""


def _check_filled(pipe: Pipeline) -> None:
    """Refuse a pipeline a component of which lacks tensors its weights file should hold.

    diffusers builds each model on the meta device and fills it from the weights
    (``ModelMixin.from_pretrained``, diffusers/models/modeling_utils.py): a tensor the file
    does not have is only warned about, and stays on the meta device, where moving the
    pipeline to its device fails (torch's ``Module.to``: "Cannot copy out of meta tensor").
    transformers initialises what it did not find instead (:func:`_not_loaded`).

    Raises:
        _Unfilled: Naming the component and its first missing tensors.
    """
    for name, component in pipe.components.items():
        if not isinstance(component, torch.nn.Module):
            continue
        tensors = itertools.chain(component.named_parameters(), component.named_buffers())
        empty = [key for key, tensor in tensors if tensor.is_meta] or _not_loaded(component)
        if empty:
            shown = ", ".join(empty[:3]) + (f" and {len(empty) - 3} more" if len(empty) > 3 else "")
            raise _Unfilled(f"its {name}'s weights lack {shown}")


def _not_loaded(component: torch.nn.Module) -> list[str]:
    """The parameters of a transformers model (a text encoder) its weights file did not fill.

    transformers 5 loads no tensor the file lacks: it initialises it (at random, or to a
    default) and logs a report, and the text encoder then reads every prompt wrongly, with no
    error. Each tensor it loads it marks ``_is_hf_initialized`` (``set_param_for_module``,
    transformers/core_model_loading.py), the mark ``_initialize_missing_keys``
    (transformers/modeling_utils.py) reads to pick what to initialise: a parameter without it
    was made up. Tied weights (one tensor under two names, the file holding either) are marked
    by ``mark_tied_weights_as_initialized``, and ``tie_weights`` points both names at the one
    loaded; what a model declares optional (``_keys_to_ignore_on_load_missing``, matched as
    ``_adjust_missing_and_unexpected_keys`` matches it) is left out, as the report leaves it
    out. The file's tensor names are not compared: transformers renames them as it loads
    (CLIP's, saved with ``text_model.`` or without). Buffers are not looked at: non-persistent
    ones are never saved, and a cast replaces a buffer's tensor, mark and all.

    Nor is a language model's head (``get_output_embeddings``: Qwen3's ``lm_head`` in FLUX.2
    [klein]) unless its tensor is the input embeddings' too (tied): a pipeline reads the text
    encoder's hidden states, never its logits, so a published text encoder may leave the head
    out (Qwen3-8B's is not tied) and still read every prompt as it was trained to.
    """
    from transformers import PreTrainedModel

    if not isinstance(component, PreTrainedModel):
        return []
    patterns = component._keys_to_ignore_on_load_missing or ()
    ignored = re.compile("|".join(f"({pattern})" for pattern in patterns)) if patterns else None
    unread = _head_only(component)
    return [
        key
        for key, parameter in component.named_parameters()
        if not getattr(parameter, "_is_hf_initialized", False)
        and id(parameter) not in unread
        and (ignored is None or ignored.search(key) is None)
    ]


def _head_only(model: Any) -> set[int]:
    """The ids of the parameters of ``model``'s output embeddings (a transformers model's LM
    head) that are not its input embeddings' too: compared by identity, as tied weights are one
    tensor under two names."""
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Module):
        return set()
    # get_output_embeddings returned one, so get_input_embeddings does not raise.
    inputs = model.get_input_embeddings()
    tied = {id(p) for p in inputs.parameters()} if isinstance(inputs, torch.nn.Module) else set()
    return {id(p) for p in head.parameters()} - tied


def _unloadable(
    model: str, folder: Path, remote: bool, error: Exception, settings: Settings
) -> DependencyUnavailable | InvalidRequest:
    """Why ``model``, whose files are in ``folder``, did not load, in one line.

    A damaged or missing file is said by name, read from the files' headers (what
    ``imagegen models pull`` checks): diffusers' own message names it only inside a paragraph
    of paths, and says a file of the cache that does not parse is not there.
    """
    # Here: pull reads this module's helpers as it is imported.
    from imagegen.render.pull import incomplete

    why = incomplete(folder)
    if remote:
        what = f"model {model!r} at {revision_said(settings, model)}"
        pull = f"imagegen models pull {model}"
        if why is not None:
            if is_offline_mode():
                failed = " and HF_HUB_OFFLINE is set"
            else:
                # Online, diffusers falls back on the cache when the Hub cannot be reached (its
                # OSError raised from the client's error): that failure is the root of the
                # chain, and why the missing files were not fetched.
                root: BaseException = error
                while (under := root.__cause__ or root.__context__) is not None:
                    root = under
                failed = (
                    f" and could not be downloaded ({first_line(root)})"
                    if isinstance(error, OSError) and root is not error
                    else ""
                )
            return DependencyUnavailable(
                f"{what} in the local cache cannot be loaded ({why}){failed}: pull it"
                f" ({pull}), which fetches what is missing and replaces what is damaged"
            )
        if isinstance(error, OSError):
            if is_offline_mode():
                return DependencyUnavailable(
                    f"{what} is not in the local cache and HF_HUB_OFFLINE is set: pull it first"
                    f" ({pull})"
                )
            return DependencyUnavailable(
                f"{what} could not be downloaded: {first_line(error).rstrip('.')};"
                f" pull it first ({pull})"
            )
        if isinstance(error, _DAMAGED):
            # Damage the headers do not show: a pull, which replaces what they show, would not
            # mend it.
            return DependencyUnavailable(
                f"{what} in the local cache cannot be loaded: {_damage(error)}"
            )
    elif why is not None or isinstance(error, _DAMAGED):
        # Files that cannot be read are no mistake of the name: the model cannot load.
        return DependencyUnavailable(f"{model!r} cannot be loaded: {why or _damage(error)}")
    # A model_index.json of another shape ({}, a list, a null class name) raises KeyError,
    # TypeError or AttributeError: diffusers reads it without checking.
    return InvalidRequest(
        f"{model!r} is not a text-to-image pipeline: {type(error).__name__}: {first_line(error)}",
        errors=[{"field": "model", "message": "not a text-to-image pipeline"}],
    )


def _damage(error: Exception) -> str:
    """What ``error``, one of :data:`_DAMAGED`, says of the files, in a few words."""
    if isinstance(error, SafetensorError):  # which file, transformers does not say
        return f"a weights file cannot be read ({first_line(error)})"
    return first_line(error)


@contextlib.contextmanager
def hub_errors(repo_id: str, *, field: str, what: str) -> Iterator[None]:
    """Translate Hugging Face Hub failures into imagegen errors with one-line messages."""
    try:
        yield
    except HFValidationError as error:
        raise field_error(field, f"{what}: not a local path nor a valid Hub id") from error
    except GatedRepoError as error:
        raise DependencyUnavailable(
            f"{what} is gated: accept its licence on the Hub and set IMAGEGEN_HF_TOKEN"
        ) from error
    except RepositoryNotFoundError as error:
        raise field_error(
            field,
            f"{what}: no such repository on the Hub (private ones need IMAGEGEN_HF_TOKEN)",
        ) from error
    except LocalEntryNotFoundError as error:
        reason = "HF_HUB_OFFLINE is set" if is_offline_mode() else "the Hub is unreachable"
        raise DependencyUnavailable(
            f"{what} is not in the local cache and {reason}: pull it first"
            f" (imagegen models pull {repo_id})"
        ) from error
    except HfHubHTTPError as error:
        if error.response is not None and error.response.status_code in (400, 404):
            raise field_error(field, f"{what}: {first_line(error)}") from error
        raise DependencyUnavailable(f"{what}: the Hub failed: {first_line(error)}") from error
