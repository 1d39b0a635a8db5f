"""``imagegen models pull`` fills the model cache; render then loads from it, offline.

No Hub here: the cache is laid out as the Hub client lays it out (``models--org--name`` with a
snapshot and ``refs/main``), holding the tiny pipeline, and ``HF_HUB_OFFLINE`` is set (the
tests' conftest), as on a render pod.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from imagegen.cli import main
from imagegen.errors import DependencyUnavailable
from imagegen.render._loading import load_pipeline
from imagegen.render.pull import hub_models
from imagegen.render.tiny import build_tiny_flux_pipeline
from imagegen.settings import Settings
from tests.render.tiny_files import save_pipeline

MODEL = "example-org/pulled-model"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    repo = root / f"models--{MODEL.replace('/', '--')}"
    save_pipeline(build_tiny_flux_pipeline(), repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return root


def imagegen(*args: str, cache: Path, monkeypatch: pytest.MonkeyPatch) -> int:
    """Run the CLI in this process (its entry point, errors included); return the exit code."""
    monkeypatch.setenv("IMAGEGEN_MODEL_CACHE_DIR", str(cache))
    try:
        main(list(args))
    except SystemExit as exit:
        return int(exit.code or 0)
    return 0


def test_pull_finds_a_cached_model_without_the_hub(
    cache: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert imagegen("models", "pull", MODEL, "--json", cache=cache, monkeypatch=monkeypatch) == 0
    [pulled] = json.loads(capsys.readouterr().out)
    assert pulled["model"] == MODEL
    snapshot = cache / f"models--{MODEL.replace('/', '--')}" / "snapshots" / COMMIT
    assert Path(pulled["path"]) == snapshot
    assert pulled["size_bytes"] > 10_000


def test_pull_of_a_model_that_is_not_there_is_one_line(
    cache: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code = imagegen("models", "pull", "example-org/missing", cache=cache, monkeypatch=monkeypatch)
    assert code != 0
    [line] = capsys.readouterr().err.strip().splitlines()[-1:]
    assert line.startswith("imagegen: error:") and "example-org/missing" in line
    assert "could not be downloaded" in line


def test_pulling_several_reports_each_and_fails_at_the_end(
    cache: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # One missing before and one after the model that is there: that one is pulled and said,
    # each failure said in its line, and the command fails at its end.
    names = ["example-org/missing-1", MODEL, "example-org/missing-2"]
    assert imagegen("models", "pull", *names, cache=cache, monkeypatch=monkeypatch) == 1
    said = capsys.readouterr()
    assert said.out.startswith(f"{MODEL} @ ") and "missing" not in said.out
    errors = [line for line in said.err.splitlines() if line.startswith("imagegen: error:")]
    assert len(errors) == 2
    assert "missing-1" in errors[0] and "missing-2" in errors[1]


def _broken_copy(cache: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A cache of its own holding a copy of the pulled model: (the cache, its snapshot)."""
    import shutil

    copy = tmp_path / "cache"
    shutil.copytree(cache, copy)
    return copy, copy / f"models--{MODEL.replace('/', '--')}" / "snapshots" / COMMIT


@pytest.mark.parametrize(
    ("damage", "said"),
    [
        ("cut", "transformer/diffusion_pytorch_model.safetensors is cut short"),
        ("no-vae", "its vae is missing"),
        ("no-weights", "its transformer has no weights"),
        ("no-shard", "transformer/diffusion_pytorch_model-00002-of-00002.safetensors is missing"),
    ],
)
def test_a_snapshot_render_cannot_load_fails_the_pull(
    cache: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    damage: str,
    said: str,
) -> None:
    import shutil

    broken, snapshot = _broken_copy(cache, tmp_path)
    weights = snapshot / "transformer" / "diffusion_pytorch_model.safetensors"
    if damage == "cut":  # a download cut short, kept
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
    elif damage == "no-vae":
        shutil.rmtree(snapshot / "vae")
    elif damage == "no-weights":
        weights.unlink()
    else:  # an index naming a second shard that never came
        shard = "diffusion_pytorch_model-00002-of-00002.safetensors"
        index = {"metadata": {}, "weight_map": {"a": weights.name, "b": shard}}
        (weights.parent / "diffusion_pytorch_model.safetensors.index.json").write_text(
            json.dumps(index)
        )
    assert imagegen("models", "pull", MODEL, cache=broken, monkeypatch=monkeypatch) == 1
    [line] = capsys.readouterr().err.strip().splitlines()[-1:]
    assert line.startswith("imagegen: error:") and "is incomplete" in line and said in line


def test_a_whole_snapshot_is_complete(cache: Path) -> None:
    from imagegen.render.pull import incomplete

    assert incomplete(cache / f"models--{MODEL.replace('/', '--')}" / "snapshots" / COMMIT) is None


@pytest.mark.parametrize(
    ("raised", "said"),
    [
        # diffusers' own OSError (no errno) when the Hub cannot be reached (its message a
        # paragraph that ends in advice about local_files_only): said in a line.
        (
            OSError(
                "Cannot load model example-org/missing: model is not cached locally and an"
                " error occurred while trying to fetch metadata from the Hub. Please check out"
                " the root cause in the stacktrace above. " + "x" * 400
            ),
            "it is not in the cache and the Hub cannot be reached",
        ),
        (OSError(28, "No space left on device"), "[Errno 28] No space left on device"),
    ],
)
def test_a_pull_that_fails_says_why_in_a_line(
    monkeypatch: pytest.MonkeyPatch, raised: OSError, said: str
) -> None:
    from diffusers import DiffusionPipeline

    from imagegen.render import pull as pulling

    def fails(*args: object, **kwargs: object) -> str:
        raise raised

    monkeypatch.setattr(DiffusionPipeline, "download", fails)
    monkeypatch.setattr(pulling, "is_offline_mode", lambda: False)  # the conftest sets it
    with pytest.raises(DependencyUnavailable) as caught:
        pulling.pull("example-org/missing", Settings())
    assert caught.value.message == (
        f"model 'example-org/missing' at revision main (not pinned) could not be downloaded: {said}"
    )


def test_the_pulled_cache_is_what_render_loads_offline(cache: Path) -> None:
    settings = Settings(model_cache_dir=cache)
    pipe = load_pipeline(MODEL, torch.float32, settings)
    assert type(pipe).__name__ == "FluxPipeline"


def test_hub_models_are_the_configured_hub_ids(tmp_path: Path) -> None:
    local = tmp_path / "local-model"
    local.mkdir()
    settings = Settings(
        model="org/a",
        served_models=["org/a", "tiny", "tiny-klein", str(local), "./relative", "org/b"],
    )
    assert hub_models(settings) == ["org/a", "org/b"]


def test_render_loads_the_pinned_revision_and_no_other(cache: Path) -> None:
    pinned = Settings(model_cache_dir=cache, model_revisions={MODEL: COMMIT})
    assert type(load_pipeline(MODEL, torch.float32, pinned)).__name__ == "FluxPipeline"

    other = Settings(model_cache_dir=cache, model_revisions={MODEL: "f" * 40})
    with pytest.raises(DependencyUnavailable, match="not in the local cache"):
        load_pipeline(MODEL, torch.float32, other)


def test_pull_reports_the_pinned_revision(
    cache: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("IMAGEGEN_MODEL_REVISIONS", json.dumps({MODEL: COMMIT}))
    assert imagegen("models", "pull", MODEL, "--json", cache=cache, monkeypatch=monkeypatch) == 0
    [pulled] = json.loads(capsys.readouterr().out)
    assert (pulled["model"], pulled["revision"]) == (MODEL, COMMIT)


def test_models_list_shows_the_table_and_what_is_served(
    cache: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("IMAGEGEN_MODEL", "tiny-klein")
    monkeypatch.setenv("IMAGEGEN_SERVED_MODELS", "tiny-klein")
    assert imagegen("models", "list", "--json", cache=cache, monkeypatch=monkeypatch) == 0
    rows = {row["model"]: row for row in json.loads(capsys.readouterr().out)}
    assert [m for m, row in rows.items() if row["served"]] == ["tiny-klein"]
    default = rows["black-forest-labs/FLUX.2-klein-4B"]
    assert (default["family"], default["licence"]) == ("FLUX.2 [klein]", "Apache-2.0")
    assert default["revision"] == "e7b7dc27f91deacad38e78976d1f2b499d76a294"
    # The table says the names as written: "[klein]" is no rich markup.
    assert imagegen("models", "list", cache=cache, monkeypatch=monkeypatch) == 0
    table = capsys.readouterr().out
    assert "[klein]" in table  # on a line of its own where the column wraps


def test_doctor_finds_a_pulled_model_in_the_cache(
    cache: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("IMAGEGEN_MODEL", MODEL)
    monkeypatch.setenv("IMAGEGEN_SERVED_MODELS", MODEL)
    monkeypatch.setenv("IMAGEGEN_OLLAMA_HOST", "http://127.0.0.1:9")
    imagegen("doctor", "--json", cache=cache, monkeypatch=monkeypatch)
    checks = {c["check"]: c for c in json.loads(capsys.readouterr().out)["checks"]}
    assert checks["model"] == {
        "check": "model",
        "status": "ok",
        "summary": f"Model {MODEL} is in the model cache.",
        "next_step": "",
    }
