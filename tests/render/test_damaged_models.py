"""A pipeline whose files are there but damaged is refused in one line naming what is wrong,
whichever library reads the damaged file: diffusers (the VAE, the transformer) or
transformers (the text encoders)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from imagegen.errors import DependencyUnavailable, InvalidRequest
from imagegen.render._loading import load_pipeline
from imagegen.render.diffusers_backend import DiffusersBackend
from imagegen.settings import Settings
from tests.conftest import RunCli

TEXT_ENCODER = Path("text_encoder") / "model.safetensors"
TEXT_ENCODER_2 = Path("text_encoder_2") / "model.safetensors"
VAE = Path("vae") / "diffusion_pytorch_model.safetensors"

# What a clone without git-lfs leaves in place of the weights (git-lfs docs/spec.md).
LFS_POINTER = (
    "version https://git-lfs.github.com/spec/v1\n"
    "oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\n"
    "size 147840\n"
)


def _copy(tiny_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_dir, tmp_path / "damaged"))


def _replace_in_header(weights: Path, old: bytes, new: bytes) -> None:
    """Change ``old`` to ``new`` (as long) in the JSON header of a ``.safetensors`` file: the
    file stays as long as its header says, as :func:`incomplete` checks."""
    assert len(old) == len(new)
    data = weights.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = data[8 : 8 + length]
    assert old in header
    weights.write_bytes(data[:8] + header.replace(old, new, 1) + data[8 + length :])


def _load(model: str) -> None:
    backend = DiffusersBackend(Settings(device="cpu"))
    try:
        backend.load(model)
    finally:
        backend.close()


@pytest.mark.parametrize("damage", ["empty", "lfs-pointer"])
def test_a_text_encoder_whose_weights_are_cut_short_is_said_by_name(
    tiny_dir: Path, tmp_path: Path, damage: str
) -> None:
    model = _copy(tiny_dir, tmp_path)
    (model / TEXT_ENCODER).write_text("" if damage == "empty" else LFS_POINTER)

    with pytest.raises(DependencyUnavailable) as caught:
        _load(str(model))

    assert caught.value.message == (
        f"{str(model)!r} cannot be loaded: text_encoder/model.safetensors is cut short"
    )


def test_a_text_encoder_whose_header_safetensors_refuses_is_said_as_damage(
    tiny_dir: Path, tmp_path: Path
) -> None:
    # Whole by its lengths (nothing for the pull's checks to see), but no dtype safetensors
    # knows: no mistake of the model's name either.
    model = _copy(tiny_dir, tmp_path)
    _replace_in_header(model / TEXT_ENCODER, b'"dtype":"F32"', b'"dtype":"X32"')

    with pytest.raises(DependencyUnavailable) as caught:
        _load(str(model))

    message = caught.value.message
    assert message.startswith(
        f"{str(model)!r} cannot be loaded: a weights file cannot be read (Error while"
        " deserializing header"
    ), message
    assert "\n" not in message


def test_weights_that_lack_a_tensor_are_said_before_the_pipeline_moves(
    tiny_dir: Path, tmp_path: Path
) -> None:
    # diffusers leaves the tensor it did not find on the meta device: moving the pipeline to
    # its device would fail with torch's "Cannot copy out of meta tensor".
    model = _copy(tiny_dir, tmp_path)
    _replace_in_header(model / VAE, b'"decoder.conv_in.bias"', b'"decoder.conv_in.bixs"')

    with pytest.raises(DependencyUnavailable) as caught:
        _load(str(model))

    assert caught.value.message == (
        f"{str(model)!r} cannot be loaded: its vae's weights lack decoder.conv_in.bias"
    )


def test_weights_in_the_model_cache_that_lack_a_tensor_are_no_call_to_pull(
    tiny_dir: Path, tmp_path: Path
) -> None:
    # A pull replaces only what the files' headers show damaged: it would not mend this.
    repo, commit = "example-org/damaged", "0123456789abcdef0123456789abcdef01234567"
    folder = tmp_path / "cache" / f"models--{repo.replace('/', '--')}"
    snapshot = Path(shutil.copytree(tiny_dir, folder / "snapshots" / commit))
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(commit)
    _replace_in_header(snapshot / VAE, b'"decoder.conv_in.bias"', b'"decoder.conv_in.bixs"')

    with pytest.raises(DependencyUnavailable) as caught:
        load_pipeline(repo, torch.float32, Settings(model_cache_dir=tmp_path / "cache"))

    assert caught.value.message == (
        f"model {repo!r} at revision main (not pinned) in the local cache cannot be loaded:"
        " its vae's weights lack decoder.conv_in.bias"
    )


def _rewrite(weights: Path, rename: Callable[[str], str | None]) -> None:
    """Save ``weights`` again with each tensor named ``rename(name)``, dropped where that is
    None: a whole file (its header agrees with its length)."""
    with safe_open(weights, framework="pt") as file:
        metadata = file.metadata()
        tensors = {name: file.get_tensor(name) for name in file.keys()}  # noqa: SIM118
    renamed = {rename(name): tensor for name, tensor in tensors.items()}
    save_file({name: t for name, t in renamed.items() if name is not None}, weights, metadata)


@pytest.mark.parametrize(
    ("pipeline", "weights", "dropped"),
    [
        ("tiny", TEXT_ENCODER, "final_layer_norm.weight"),
        ("tiny", TEXT_ENCODER_2, "encoder.block.0.layer.1.layer_norm.weight"),
        # Tied to lm_head, which the file does not hold either.
        ("tiny-klein", TEXT_ENCODER, "model.embed_tokens.weight"),
    ],
)
def test_a_text_encoder_whose_weights_lack_a_tensor_is_refused_naming_it(
    tiny_dir: Path, klein_dir: Path, tmp_path: Path, pipeline: str, weights: Path, dropped: str
) -> None:
    # transformers initialises what its file lacks instead of leaving it on the meta device:
    # loaded, the pipeline would read every prompt wrongly and render noise, with no error.
    model = _copy(tiny_dir if pipeline == "tiny" else klein_dir, tmp_path)
    _rewrite(model / weights, lambda name: None if name == dropped else name)

    with pytest.raises(DependencyUnavailable) as caught:
        _load(str(model))

    component = weights.parent.name
    assert caught.value.message == (
        f"{str(model)!r} cannot be loaded: its {component}'s weights lack {dropped}"
    )


def _untie(model: Path) -> None:
    """Make the [klein] text encoder at ``model`` one whose LM head is not its input embeddings
    (as Qwen3-8B's is not): its file, saved tied, holds no ``lm_head.weight``."""
    config_file = model / "text_encoder" / "config.json"
    config = json.loads(config_file.read_text())
    config["tie_word_embeddings"] = False
    config_file.write_text(json.dumps(config))
    with safe_open(model / TEXT_ENCODER, framework="pt") as file:
        assert "lm_head.weight" not in file.keys()  # noqa: SIM118


def test_a_text_encoder_whose_weights_lack_only_its_untied_lm_head_loads(
    klein_dir: Path, tmp_path: Path
) -> None:
    # The pipeline reads the text encoder's hidden states, never its logits.
    model = _copy(klein_dir, tmp_path)
    _untie(model)

    pipe = load_pipeline(str(model), torch.float32, Settings(device="cpu"))

    encoder = pipe.text_encoder
    assert encoder.lm_head.weight is not encoder.model.embed_tokens.weight
    healthy = load_pipeline(str(klein_dir), torch.float32, Settings(device="cpu"))
    for name, tensor in healthy.text_encoder.model.state_dict().items():
        assert torch.equal(encoder.model.state_dict()[name], tensor), name


@pytest.mark.parametrize("dropped", ["model.norm.weight", "model.embed_tokens.weight"])
def test_an_untied_text_encoder_whose_weights_lack_another_tensor_is_refused(
    klein_dir: Path, tmp_path: Path, dropped: str
) -> None:
    model = _copy(klein_dir, tmp_path)
    _untie(model)
    _rewrite(model / TEXT_ENCODER, lambda name: None if name == dropped else name)

    with pytest.raises(DependencyUnavailable) as caught:
        _load(str(model))

    assert caught.value.message == (
        f"{str(model)!r} cannot be loaded: its text_encoder's weights lack {dropped}"
    )


@pytest.mark.parametrize(
    ("weights", "rename"),
    [
        # T5's token embedding is one tensor under two names (shared, encoder.embed_tokens):
        # transformers ties whichever the file holds to the other.
        pytest.param(
            TEXT_ENCODER_2,
            lambda name: "encoder.embed_tokens.weight" if name == "shared.weight" else name,
            id="tied-tensor-under-its-other-name",
        ),
        # CLIP's names as transformers 4 saved them: transformers 5 renames them as it loads.
        pytest.param(TEXT_ENCODER, lambda name: f"text_model.{name}", id="clip-older-names"),
    ],
)
def test_a_text_encoder_whose_weights_are_named_otherwise_loads_them_all(
    tiny_dir: Path, tmp_path: Path, weights: Path, rename: Callable[[str], str]
) -> None:
    model = _copy(tiny_dir, tmp_path)
    _rewrite(model / weights, rename)

    pipe = load_pipeline(str(model), torch.float32, Settings(device="cpu"))

    healthy = load_pipeline(str(tiny_dir), torch.float32, Settings(device="cpu"))
    component = weights.parent.name
    loaded = getattr(pipe, component).state_dict()
    assert loaded.keys() == getattr(healthy, component).state_dict().keys()
    for name, tensor in getattr(healthy, component).state_dict().items():
        assert torch.equal(loaded[name], tensor), name


def test_a_home_that_cannot_be_found_is_refused_naming_the_model(tmp_path: Path) -> None:
    model = "~no-such-user-here/pipeline"
    with pytest.raises(RuntimeError):
        Path(model).expanduser()  # what pathlib does with it

    with pytest.raises(InvalidRequest) as caught:
        _load(model)

    assert caught.value.message == (
        f"no such model directory: {model!r} (~ names no home directory this process can find)"
    )
    assert caught.value.fields == ["model"]


def _generate(cli: RunCli, model: Path, *flags: str) -> tuple[int, list[str]]:
    env = {"IMAGEGEN_SERVED_MODELS": str(model), "IMAGEGEN_MODEL": str(model)}
    args = ["generate", "a fox", "--width", "256", "--height", "256", "--no-enhance"]
    result = cli(*args, "--plugins", "", *flags, env=env)
    return result.returncode, result.stderr.splitlines()


def test_a_damaged_text_encoder_is_one_line_on_the_command_line(
    cli: RunCli, tiny_dir: Path, tmp_path: Path
) -> None:
    model = _copy(tiny_dir, tmp_path)
    (model / TEXT_ENCODER).write_text(LFS_POINTER)

    code, lines = _generate(cli, model)

    # A failure, not a mistake of the input (2), nor an internal error.
    assert code == 1
    assert lines == [
        f"imagegen: error: {str(model)!r} cannot be loaded:"
        " text_encoder/model.safetensors is cut short"
    ]


def test_the_libraries_log_lines_are_shown_with_verbose_only(
    cli: RunCli, tiny_dir: Path, tmp_path: Path
) -> None:
    # diffusers logs an ERROR line for the weights it looked for (models/modeling_utils.py,
    # "An error occurred while trying to fetch"), then fails: the command's one line says it.
    model = _copy(tiny_dir, tmp_path)
    (model / VAE).unlink()
    said = f"imagegen: error: {str(model)!r} cannot be loaded: its vae has no weights"

    code, lines = _generate(cli, model)
    assert code == 1
    assert lines == [said]

    code, lines = _generate(cli, model, "-v")
    assert code == 1
    assert lines[-1] == said
    assert any(line.startswith("ERROR diffusers.") for line in lines), lines
