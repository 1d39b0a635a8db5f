"""A LoRA made for another model is refused, not applied in part: diffusers loads the tensors
whose layers the model has and only warns of the others (``_maybe_warn_for_unhandled_keys``,
diffusers/utils/peft_utils.py)."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from imagegen.errors import InvalidRequest
from imagegen.models import EnhancedPrompt, LoraHint
from imagegen.render.diffusers_backend import DiffusersBackend

MakeJob = Callable[..., EnhancedPrompt]
WEIGHTS = "pytorch_lora_weights.safetensors"


def _pixels(png: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(png)) as image:
        return np.asarray(image.convert("RGB"))


def _renamed(lora_dir: Path, target: Path, rename: Callable[[str], str]) -> Path:
    """A copy of the LoRA in ``lora_dir`` in ``target``, each tensor named ``rename(name)``."""
    target.mkdir(exist_ok=True)
    with safe_open(lora_dir / WEIGHTS, framework="pt") as file:
        tensors = {rename(name): file.get_tensor(name) for name in file.keys()}  # noqa: SIM118
        save_file(tensors, target / WEIGHTS, metadata=file.metadata())
    return target


def _adapters(backend: DiffusersBackend, model: str) -> set[str]:
    pipe = backend._pipelines[model]
    return {name for names in pipe.get_list_adapters().values() for name in names}


def test_a_lora_of_another_family_is_refused_and_not_left_loaded(
    klein_backend: DiffusersBackend, make_job: MakeJob, lora_dir: Path
) -> None:
    # Made for FLUX.1: its double-stream blocks' projections have the names FLUX.2's have, its
    # single-stream ones' (to_q, to_k, to_v) are fused into one in FLUX.2.
    job = make_job(model="tiny-klein", guidance=1.0, seed=31)
    plain = _pixels(klein_backend.render(job).png)
    hint = LoraHint(name="flux-one", path=str(lora_dir))

    with pytest.raises(InvalidRequest) as caught:
        klein_backend.render(make_job(model="tiny-klein", guidance=1.0, seed=31, loras=[hint]))

    message = (
        "LoRA 'flux-one' does not fit model 'tiny-klein': 6 of its 20 LoRA tensors are for"
        " layers the model does not have (transformer)"
    )
    assert caught.value.errors == [{"field": "loras.0.path", "message": message}]
    assert caught.value.status == 400
    assert "flux-one" not in _adapters(klein_backend, "tiny-klein")
    np.testing.assert_array_equal(_pixels(klein_backend.render(job).png), plain)


def test_a_lora_some_of_whose_layers_the_model_lacks_is_refused(
    backend: DiffusersBackend, make_job: MakeJob, lora_root: Path, lora_dir: Path
) -> None:
    partial = _renamed(
        lora_dir,
        lora_root / "partial",
        lambda name: name.replace("single_transformer_blocks", "other_blocks"),
    )

    with pytest.raises(InvalidRequest) as caught:
        backend.render(make_job(loras=[LoraHint(name="partial", path=str(partial))]))

    message = (
        "LoRA 'partial' does not fit model 'tiny': 6 of its 20 LoRA tensors are for layers"
        " the model does not have (transformer)"
    )
    assert caught.value.errors == [{"field": "loras.0.path", "message": message}]
    assert "partial" not in _adapters(backend, "tiny")


@pytest.mark.parametrize(
    "rename",
    [
        # No layer of the transformer has these names: peft refuses ("Target modules ... not
        # found in the base model", peft/tuners/tuners_utils.py, BaseTuner.inject_adapter).
        pytest.param(lambda name: name.replace("blocks.0", "blocks.7"), id="no-such-layers"),
        # A component this pipeline does not have: diffusers loads nothing, and says nothing.
        pytest.param(lambda name: name.replace("transformer.", "unet.", 1), id="other-component"),
    ],
)
def test_a_lora_none_of_whose_layers_the_model_has_is_refused(
    backend: DiffusersBackend,
    make_job: MakeJob,
    lora_root: Path,
    lora_dir: Path,
    rename: Callable[[str], str],
) -> None:
    foreign = _renamed(lora_dir, lora_root / "foreign", rename)

    with pytest.raises(InvalidRequest) as caught:
        backend.render(make_job(loras=[LoraHint(name="foreign", path=str(foreign))]))

    message = "LoRA 'foreign' does not fit model 'tiny': none of its layers is in the model"
    assert caught.value.errors == [{"field": "loras.0.path", "message": message}]
    assert "foreign" not in _adapters(backend, "tiny")
    assert backend.render(make_job(seed=5)).png


def test_a_lora_for_the_text_encoder_too_is_applied_whole(
    make_job: MakeJob, lora_root: Path
) -> None:
    # Its text encoder's layers under the names CLIP's had before transformers 5
    # ("text_model." first), which transformers renames as it loads them: all of it applies.
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    from imagegen.render.tiny import build_tiny_flux_pipeline
    from imagegen.settings import Settings
    from tests.render.tiny_files import FLUX_LORA_TARGETS, save_lora

    pipe = build_tiny_flux_pipeline()
    config = LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    inject_adapter_in_model(config, pipe.text_encoder)
    layers = {
        f"text_model.{name}": tensor
        for name, tensor in get_peft_model_state_dict(pipe.text_encoder).items()
    }
    path = save_lora(pipe, lora_root / "both", targets=FLUX_LORA_TARGETS)
    with safe_open(path / WEIGHTS, framework="pt") as file:
        tensors = {name: file.get_tensor(name) for name in file.keys()}  # noqa: SIM118
    tensors |= {f"text_encoder.{name}": tensor for name, tensor in layers.items()}
    save_file(tensors, path / WEIGHTS)

    backend = DiffusersBackend(Settings(device="cpu", lora_dir=lora_root))
    backend.load("tiny")
    try:
        assert backend.render(make_job(loras=[LoraHint(name="both", path=str(path))])).png
        pipe = backend._pipelines["tiny"]
        assert pipe.get_list_adapters() == {"transformer": ["both"], "text_encoder": ["both"]}
    finally:
        backend.close()
