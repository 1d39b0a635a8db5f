"""A LoRA made for another model is refused, not applied in part: diffusers loads the tensors
whose layers the model has and only warns of the others (``_maybe_warn_for_unhandled_keys``,
diffusers/utils/peft_utils.py)."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

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


def _random_lora(
    model: str,
    path: Path,
    *,
    parts: tuple[str, ...] = ("transformer", "text_encoder"),
    dora: bool = False,
) -> Path:
    """A random LoRA for ``parts`` of ``model``: its transformer's attention and its text
    encoder's query and value projections, in diffusers' format (each tensor named by its
    component, as ``save_lora_weights`` names them); a DoRA with ``dora``."""
    import torch
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    from imagegen.render._family import build_offline
    from tests.render.tiny_files import FLUX_LORA_TARGETS, KLEIN_LORA_TARGETS

    pipe = build_offline(model)
    targets = FLUX_LORA_TARGETS if model == "tiny" else KLEIN_LORA_TARGETS
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        config = LoraConfig(
            r=4, lora_alpha=4, target_modules=list(targets), init_lora_weights=False, use_dora=dora
        )
        pipe.transformer.add_adapter(config)
        layers = {"transformer": get_peft_model_state_dict(pipe.transformer)}
        if "text_encoder" in parts:
            config = LoraConfig(
                r=4,
                lora_alpha=4,
                target_modules=["q_proj", "v_proj"],
                init_lora_weights=False,
                use_dora=dora,
            )
            inject_adapter_in_model(config, pipe.text_encoder)
            layers["text_encoder"] = get_peft_model_state_dict(pipe.text_encoder)
    path.mkdir()
    tensors = {
        f"{part}.{name}": tensor.contiguous()
        for part in parts
        for name, tensor in layers[part].items()
    }
    save_file(tensors, path / WEIGHTS)
    return path


@pytest.fixture
def tiny_backend(lora_root: Path) -> Iterator[DiffusersBackend]:
    """A tiny backend of its own: its text encoder takes adapters no other test sees."""
    from imagegen.settings import Settings

    backend = DiffusersBackend(Settings(device="cpu", lora_dir=lora_root))
    backend.load("tiny")
    yield backend
    backend.close()


def test_a_lora_whose_text_encoder_part_fits_no_layer_leaves_nothing_loaded(
    tiny_backend: DiffusersBackend, make_job: MakeJob, lora_root: Path, lora_dir: Path
) -> None:
    # The transformer's part loads, then diffusers fails on the text encoder's (an IndexError
    # in get_peft_kwargs, which finds no rank for layers the model does not have).
    whole = _random_lora("tiny", lora_root / "te-whole")
    foreign = _renamed(
        whole,
        lora_root / "te-foreign",
        lambda name: (
            name.replace("layers.0", "layers.7").replace("layers.1", "layers.8")
            if name.startswith("text_encoder.")
            else name
        ),
    )
    healthy = make_job(seed=13, loras=[LoraHint(name="other", path=str(lora_dir))])
    expected = _pixels(tiny_backend.render(healthy).png)

    with pytest.raises(InvalidRequest) as caught:
        tiny_backend.render(make_job(loras=[LoraHint(name="x", path=str(foreign))]))

    message = "LoRA 'x' cannot be loaded: list index out of range"
    assert caught.value.errors == [{"field": "loras.0.path", "message": message}]
    assert caught.value.status == 400
    assert "x" not in _adapters(tiny_backend, "tiny")
    # The name is free again: a LoRA that fits loads under it, and only it applies.
    mended = make_job(seed=13, loras=[LoraHint(name="x", path=str(lora_dir))])
    np.testing.assert_array_equal(_pixels(tiny_backend.render(mended).png), expected)


def test_a_lora_load_that_runs_out_of_memory_leaves_nothing_loaded(
    tiny_backend: DiffusersBackend,
    make_job: MakeJob,
    lora_root: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import torch

    from imagegen.errors import DependencyUnavailable

    path = _random_lora("tiny", lora_root / "te-oom")
    pipe = tiny_backend._pipelines["tiny"]
    load = pipe.load_lora_weights

    def load_then_run_out(*args: Any, **kwargs: Any) -> None:
        load(*args, **kwargs)
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 MiB")

    monkeypatch.setattr(pipe, "load_lora_weights", load_then_run_out)
    job = make_job(loras=[LoraHint(name="x", path=str(path))])

    with pytest.raises(DependencyUnavailable) as caught:
        tiny_backend.render(job)

    assert caught.value.retryable and caught.value.status == 503
    assert "x" not in _adapters(tiny_backend, "tiny")
    monkeypatch.undo()  # the memory is there again: the same job renders
    assert tiny_backend.render(job).png
    assert pipe.get_list_adapters() == {"transformer": ["x"], "text_encoder": ["x"]}


@pytest.mark.parametrize("transformer", [True, False], ids=["and-transformer", "alone"])
def test_a_klein_lora_for_its_text_encoder_is_refused_as_never_applied(
    klein_backend: DiffusersBackend, make_job: MakeJob, lora_root: Path, transformer: bool
) -> None:
    # Flux2KleinPipeline's LoRA loader loads the transformer's tensors alone: the text
    # encoder's would be left out, saying nothing.
    parts = ("transformer", "text_encoder") if transformer else ("text_encoder",)
    path = _random_lora("tiny-klein", lora_root / f"klein-te-{transformer}", parts=parts)
    job = make_job(model="tiny-klein", guidance=1.0, loras=[LoraHint(name="x", path=str(path))])

    with pytest.raises(InvalidRequest) as caught:
        klein_backend.render(job)

    message = (
        "LoRA 'x' does not fit model 'tiny-klein': it holds tensors for text_encoder, which"
        " this model's LoRA loader does not apply"
    )
    assert caught.value.errors == [{"field": "loras.0.path", "message": message}]
    assert "x" not in _adapters(klein_backend, "tiny-klein")


def test_a_dora_whose_text_encoder_magnitudes_are_not_loaded_is_refused(
    tiny_backend: DiffusersBackend, make_job: MakeJob, lora_root: Path
) -> None:
    # transformers loads a text encoder's adapter under names peft renames: a DoRA's
    # magnitude vectors get no ".weight", and are initialised instead, with no error.
    path = _random_lora("tiny", lora_root / "te-dora", dora=True)

    with pytest.raises(InvalidRequest) as caught:
        tiny_backend.render(make_job(loras=[LoraHint(name="x", path=str(path))]))

    message = (
        "LoRA 'x' does not fit model 'tiny': 4 of its 42 LoRA tensors, for layers the model"
        " has, were not loaded (text_encoder)"
    )
    assert caught.value.errors == [{"field": "loras.0.path", "message": message}]
    assert "x" not in _adapters(tiny_backend, "tiny")


def test_a_dora_for_the_transformer_alone_is_applied_whole(
    tiny_backend: DiffusersBackend, make_job: MakeJob, lora_root: Path
) -> None:
    import torch

    path = _random_lora("tiny", lora_root / "dora", parts=("transformer",), dora=True)
    plain = _pixels(tiny_backend.render(make_job(seed=17)).png)

    job = make_job(seed=17, loras=[LoraHint(name="x", path=str(path))])
    changed = _pixels(tiny_backend.render(job).png)

    assert not np.array_equal(changed, plain)
    pipe = tiny_backend._pipelines["tiny"]
    assert pipe.get_list_adapters() == {"transformer": ["x"]}
    loaded = dict(pipe.transformer.named_parameters())
    with safe_open(path / WEIGHTS, framework="pt") as file:
        magnitudes = [name for name in file.keys() if name.endswith("lora_magnitude_vector")]  # noqa: SIM118
        assert magnitudes
        for name in magnitudes:
            layer = name.removeprefix("transformer.")
            assert torch.equal(loaded[f"{layer}.x.weight"].detach(), file.get_tensor(name)), name
