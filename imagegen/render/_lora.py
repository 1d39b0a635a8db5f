"""LoRA adapters: loaded once per model, cached by name, the least recently used dropped."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Sequence
from pathlib import Path

from huggingface_hub import is_offline_mode

from imagegen.errors import DependencyUnavailable
from imagegen.models import LoraHint
from imagegen.render._errors import INSTALL_HINT, field_error, first_line
from imagegen.render._loading import Pipeline, hub_errors, hub_options, looks_like_path
from imagegen.settings import Settings

__all__ = ["MAX_ADAPTERS", "LoraAdapters", "check_lora_support"]

MAX_ADAPTERS = 8  # LoRA adapters kept loaded per model; the least recently used go first


def check_lora_support(model: str, pipe: Pipeline) -> None:
    """Raise unless ``pipe`` can take LoRA adapters.

    Raises:
        InvalidRequest: The model does not support LoRA adapters (field ``loras``).
        DependencyUnavailable: peft is not installed.
    """
    if not hasattr(pipe, "load_lora_weights"):
        raise field_error("loras", f"model {model!r} does not support LoRA adapters")
    if importlib.util.find_spec("peft") is None:
        raise DependencyUnavailable(f"LoRA adapters need peft: {INSTALL_HINT}")


class LoraAdapters:
    """The adapters loaded into each model's pipeline, by name, with where they came from.

    Args:
        settings: Reads ``model_cache_dir`` and ``hf_token`` for adapters on the Hub.
    """

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._loaded: dict[str, dict[str, str]] = {}  # model -> adapter name -> source

    def activate(self, model: str, pipe: Pipeline, loras: Sequence[LoraHint]) -> None:
        """Load adapters not loaded yet; make exactly ``loras`` active, with their weights."""
        wanted = {lora.name: lora for lora in loras}
        loaded = self._loaded.setdefault(model, {})
        for index, lora in enumerate(loras):
            if loaded.get(lora.name) == lora.path:
                loaded[lora.name] = loaded.pop(lora.name)  # most recently used last
                continue
            if lora.name in loaded:
                pipe.delete_adapters(lora.name)
                del loaded[lora.name]
            self._load(pipe, lora, field=f"loras[{index}].path")
            loaded[lora.name] = lora.path
        # Bound the memory adapters take: drop the least recently used ones this job does not use.
        unused = [name for name in loaded if name not in wanted]
        for name in unused[: max(0, len(loaded) - MAX_ADAPTERS)]:
            pipe.delete_adapters(name)
            del loaded[name]
        pipe.set_adapters(list(wanted), adapter_weights=[lora.weight for lora in wanted.values()])
        pipe.enable_lora()

    def clear(self) -> None:
        """Forget every adapter (their pipelines are being dropped)."""
        self._loaded.clear()

    def _load(self, pipe: Pipeline, lora: LoraHint, *, field: str) -> None:
        source = Path(lora.path).expanduser()
        load: Callable[..., None] = pipe.load_lora_weights
        if source.exists():
            location, options = (
                (source.parent, {"weight_name": source.name}) if source.is_file() else (source, {})
            )
            try:
                load(str(location), adapter_name=lora.name, **options)
            except (OSError, ValueError, KeyError, RuntimeError) as error:
                raise field_error(
                    field, f"LoRA {lora.name!r} cannot be loaded: {first_line(error)}"
                ) from error
            return
        if looks_like_path(lora.path):
            raise field_error(field, f"LoRA {lora.name!r}: no such file or directory {lora.path!r}")
        with hub_errors(lora.path, field=field, what=f"LoRA {lora.name!r}"):
            try:
                load(lora.path, adapter_name=lora.name, **hub_options(self._settings))
            except ValueError as error:
                if is_offline_mode():  # diffusers cannot pick the weights file from the cache
                    raise DependencyUnavailable(
                        f"LoRA {lora.name!r} is on the Hub and HF_HUB_OFFLINE is set: "
                        "give a local path instead"
                    ) from error
                raise field_error(
                    field, f"LoRA {lora.name!r} cannot be loaded: {first_line(error)}"
                ) from error
