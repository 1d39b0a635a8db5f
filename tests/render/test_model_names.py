"""What a model is taken for and what is said of it: a saved tiny pipeline in a folder of any
name, a pipeline whose text encoder lacks the layers its family reads, every served model in
``imagegen models list``, and the pinned revision an offline failure names."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from imagegen.errors import DependencyUnavailable, InvalidRequest
from imagegen.models import EnhancedPrompt
from imagegen.modelspec import MODELS, family_for
from imagegen.render.diffusers_backend import DiffusersBackend
from imagegen.settings import Settings
from tests.conftest import RunCli
from tests.render.tiny_files import save_pipeline

MakeJob = Callable[..., EnhancedPrompt]


def _pixels(png: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(png)) as image:
        return np.asarray(image.convert("RGB"))


def _saved_as(model: str, directory: Path) -> Path:
    from imagegen.render._family import build_offline

    pipe = build_offline(model)
    assert pipe is not None
    return save_pipeline(pipe, directory)


@pytest.fixture(scope="module")
def renamed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each tiny pipeline saved in a folder named like a published model of its class."""
    root = tmp_path_factory.mktemp("renamed")
    return {
        "tiny": _saved_as("tiny", root / "FLUX.1-dev-copy"),
        "tiny-klein": _saved_as("tiny-klein", root / "FLUX.2-klein-4B"),
    }


@pytest.mark.parametrize("model", ["tiny", "tiny-klein"])
def test_a_saved_tiny_pipeline_is_its_family_in_a_folder_of_any_name(
    renamed: dict[str, Path], model: str
) -> None:
    assert family_for(str(renamed[model])) is MODELS[model].family


@pytest.mark.parametrize(
    ("model", "fixture"), [("tiny", "backend"), ("tiny-klein", "klein_backend")]
)
def test_a_saved_tiny_pipeline_renders_from_a_folder_of_any_name(
    renamed: dict[str, Path],
    make_job: MakeJob,
    request: pytest.FixtureRequest,
    model: str,
    fixture: str,
) -> None:
    family = MODELS[model].family
    shape: dict[str, Any] = {"seed": 5, "steps": family.default_steps}
    shape["guidance"] = family.default_guidance
    from_disk = DiffusersBackend(Settings(device="cpu"))
    try:
        from_disk.load(str(renamed[model]))
        loaded = from_disk.render(make_job(model=str(renamed[model]), **shape))
    finally:
        from_disk.close()

    built = request.getfixturevalue(fixture).render(make_job(model=model, **shape))
    np.testing.assert_array_equal(_pixels(loaded.png), _pixels(built.png))


def test_the_command_line_renders_a_renamed_tiny_klein_with_its_family_defaults(
    renamed: dict[str, Path], cli: RunCli, tmp_path: Path
) -> None:
    from imagegen.render.png import read_png_text

    model = str(renamed["tiny-klein"])
    env = {"IMAGEGEN_MODEL": model, "IMAGEGEN_SERVED_MODELS": model}
    args = ["generate", "a fox", "--width", "256", "--height", "256", "--no-enhance", "--json"]
    result = cli(*args, env=env)
    assert result.returncode == 0, result.stderr
    image = json.loads(result.stdout)["image"]
    text = read_png_text((tmp_path / "output" / image["key"]).read_bytes())
    assert text["model"] == model
    assert text["steps"] == str(MODELS["tiny-klein"].family.default_steps)


def test_a_klein_whose_encoder_lacks_the_layers_read_is_an_invalid_request(
    tmp_path: Path,
) -> None:
    # The tiny [klein] with one more encoder layer: no tiny pipeline, so read as the published
    # [klein], whose layers 9, 18 and 27 this encoder does not have.
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from imagegen.render.tiny_klein import build_tiny_klein_pipeline

    pipe = build_tiny_klein_pipeline()
    fields = pipe.text_encoder.config.to_dict()
    fields.pop("layer_types", None)  # one per layer: drawn again from the depth
    pipe.text_encoder = Qwen3ForCausalLM(Qwen3Config(**{**fields, "num_hidden_layers": 4}))
    directory = save_pipeline(pipe, tmp_path / "shallow-klein")
    backend = DiffusersBackend(Settings(device="cpu"))

    with pytest.raises(InvalidRequest) as caught:
        backend.load(str(directory))

    assert caught.value.fields == ["model"]
    assert "\n" not in caught.value.message
    assert "9, 18, 27" in caught.value.message and "at least 27 layers" in caught.value.message
    assert not backend.is_loaded(str(directory))


def _cached(root: Path, model: str, commit: str) -> None:
    """``model`` in a model cache at ``root``, as the Hub client lays it out: its
    ``model_index.json`` at ``commit``, which ``refs/main`` names."""
    repo = root / f"models--{model.replace('/', '--')}"
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "model_index.json").write_text('{"_class_name": "FluxPipeline"}')
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


def test_models_list_shows_every_served_model_with_what_is_known_of_it(
    renamed: dict[str, Path], cli: RunCli, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    _cached(cache, "example-org/pulled", "a" * 40)
    _cached(cache, "example-org/pinned", "b" * 40)
    saved = str(renamed["tiny-klein"])
    served = [
        "tiny",
        saved,
        "example-org/pulled",
        "example-org/pinned",  # cached at main, pinned at another commit
        "example-org/elsewhere",
        "./gone",
        "black-forest-labs/flux.1-schnell",  # a table id in another case
    ]
    env = {
        "IMAGEGEN_MODEL": "tiny",
        "IMAGEGEN_SERVED_MODELS": ",".join(served),
        "IMAGEGEN_MODEL_CACHE_DIR": str(cache),
        "IMAGEGEN_MODEL_REVISIONS": json.dumps({"example-org/pinned": "c" * 40}),
    }

    result = cli("models", "list", "--json", env=env)

    assert result.returncode == 0, result.stderr
    rows = {row["model"]: row for row in json.loads(result.stdout)}
    assert set(served) | set(MODELS) == set(rows)
    assert all(rows[name]["served"] for name in served)
    here = {name: rows[name]["here"] for name in served}
    assert here == {
        "tiny": "built offline",
        saved: "directory",
        "example-org/pulled": "cached",
        "example-org/pinned": "not cached",
        "example-org/elsewhere": "not cached",
        "./gone": "no directory",
        "black-forest-labs/flux.1-schnell": "not cached",
    }
    # What is known of each: the family read from the folder, the pin asked for, the table's
    # facts for its id in another case.
    assert rows[saved]["family"] == MODELS["tiny-klein"].family.title
    assert rows[saved]["in_table"] is False and rows[saved]["revision"] is None
    assert rows["example-org/pinned"]["revision"] == "c" * 40
    schnell = MODELS["black-forest-labs/FLUX.1-schnell"]
    assert rows["black-forest-labs/flux.1-schnell"]["in_table"] is True
    assert rows["black-forest-labs/flux.1-schnell"]["licence"] == schnell.licence
    assert rows["black-forest-labs/FLUX.1-schnell"]["served"] is False  # not by that name

    table = cli("models", "list", env={**env, "COLUMNS": "200"})
    assert table.returncode == 0, table.stderr
    lines = {line.split()[0]: line for line in table.stdout.splitlines() if line.strip()}
    for name in served:
        assert name in lines, name
    assert " yes " in lines["example-org/elsewhere"]
    assert "not in the table" in lines["example-org/elsewhere"]
    assert lines["./gone"].rstrip().endswith("no directory")


PINNED = "black-forest-labs/FLUX.2-klein-4B"


def _offline_env(tmp_path: Path) -> dict[str, str]:
    """The pinned default model served from an empty model cache, offline."""
    return {
        "IMAGEGEN_MODEL": PINNED,
        "IMAGEGEN_SERVED_MODELS": PINNED,
        "IMAGEGEN_MODEL_CACHE_DIR": str(tmp_path / "empty-cache"),
        "HF_HOME": str(tmp_path / "hf-home"),
        "HF_HUB_OFFLINE": "1",
    }


def _names_the_pin(message: str, model: str = PINNED, by: str = "the model table") -> None:
    revision = MODELS[PINNED].revision
    assert revision is not None
    assert f"model {model!r} at revision {revision} (pinned by {by})" in message, message
    assert f"imagegen models pull {model}" in message, message


def test_an_uncached_model_offline_names_its_pinned_revision_on_the_command_line(
    cli: RunCli, tmp_path: Path
) -> None:
    args = ["generate", "a fox", "--width", "256", "--height", "256", "--no-enhance"]
    result = cli(*args, env=_offline_env(tmp_path))

    assert result.returncode == 1
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("imagegen: error:")
    _names_the_pin(line)


def test_a_pin_of_the_settings_is_said_as_theirs(cli: RunCli, tmp_path: Path) -> None:
    revision = MODELS[PINNED].revision
    env = {**_offline_env(tmp_path), "IMAGEGEN_MODEL_REVISIONS": json.dumps({PINNED: revision})}

    result = cli("models", "pull", env=env)

    assert result.returncode == 1
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("imagegen: error:") and "could not be downloaded" in line
    assert f"at revision {revision} (pinned by IMAGEGEN_MODEL_REVISIONS)" in line


def test_an_unpinned_model_offline_is_said_at_main(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    settings = Settings(device="cpu", model_cache_dir=tmp_path)
    model = "black-forest-labs/FLUX.1-schnell"

    with pytest.raises(DependencyUnavailable) as caught:
        DiffusersBackend(settings).load(model)

    assert caught.value.retryable and "\n" not in caught.value.message
    assert f"model {model!r} at revision main (not pinned)" in caught.value.message
    assert f"imagegen models pull {model}" in caught.value.message


def test_a_snapshot_cached_in_part_offline_names_its_pinned_revision(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Its model_index.json alone: the probe finds it, the pipeline's components are not there.
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    revision = MODELS[PINNED].revision
    assert revision is not None
    snapshot = tmp_path / f"models--{PINNED.replace('/', '--')}" / "snapshots" / revision
    snapshot.mkdir(parents=True)
    index = {"_class_name": "Flux2KleinPipeline", "vae": ["diffusers", "AutoencoderKLFlux2"]}
    (snapshot / "model_index.json").write_text(json.dumps(index))

    with pytest.raises(DependencyUnavailable) as caught:
        DiffusersBackend(Settings(device="cpu", model_cache_dir=tmp_path)).load(PINNED)

    # Nothing was to be downloaded: what the cache lacks is said, and how to fill it.
    message = caught.value.message
    assert "\n" not in message and "could not be downloaded" not in message
    assert "(its vae is missing) and HF_HUB_OFFLINE is set: pull it" in message
    _names_the_pin(message)


def test_render_that_cannot_start_offline_names_the_pinned_revision(tmp_path: Path) -> None:
    from imagegen.events import PROMPT_ENHANCED
    from tests.fakes.render_backend import enhanced_prompt
    from tests.functions.clients import InProcessFunction
    from tests.functions.conftest import base_env
    from tests.functions.servers import post_event

    env = {**base_env(tmp_path / "store"), **_offline_env(tmp_path)}
    del env["IMAGEGEN_ALLOWED_MODELS"]
    job = enhanced_prompt(model=PINNED, generation_id="offline-1").model_dump(mode="json")
    # A handler on the function's logger itself: its logging set-up may stop records
    # propagating to the root, where caplog listens.
    kept: list[logging.LogRecord] = []
    handler = logging.Handler(logging.ERROR)
    handler.emit = kept.append  # type: ignore[method-assign]
    functions_log = logging.getLogger("imagegen.functions")
    functions_log.addHandler(handler)
    try:
        with InProcessFunction("render", env) as render:
            ready = render.get("/readyz")
            refused = post_event(render, PROMPT_ENHANCED, job, subject="offline-1")
    finally:
        functions_log.removeHandler(handler)

    assert ready.status_code == 503 and ready.json()["status"] == "start-up failed"
    assert refused.status_code == 503, refused.text
    assert refused.json()["retryable"] is True
    _names_the_pin(refused.json()["message"])
    # The function's log: the start-up's failure among its records.
    messages = [r.getMessage() for r in kept]
    [logged] = [m for m in messages if m.startswith("start-up failed")]
    _names_the_pin(logged)
