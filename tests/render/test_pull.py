"""``imagegen models pull`` fills the model cache; render then loads from it, offline.

No Hub here: the cache is laid out as the Hub client lays it out (``models--org--name`` with a
snapshot and ``refs/main``), holding the tiny pipeline, and ``HF_HUB_OFFLINE`` is set (the
tests' conftest), as on a render pod.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from imagegen.cli import main
from imagegen.errors import DependencyUnavailable
from imagegen.render._loading import load_pipeline
from imagegen.render.pull import hub_models
from imagegen.render.tiny import build_tiny_flux_pipeline
from imagegen.settings import Settings
from tests.render.fake_hub import FakeHub
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


def test_pull_of_a_name_whose_home_cannot_be_found_is_one_line(
    cache: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``~user`` of no such user expands to nothing: it crashed with pathlib's RuntimeError."""
    code = imagegen("models", "pull", "~nosuchuser/model", cache=cache, monkeypatch=monkeypatch)
    assert code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "imagegen: error: '~nosuchuser/model': ~ names no home directory this process can find"
    ]


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


def _cut(file: Path) -> None:
    """``file`` cut to half its length, as a download cut short."""
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])


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
        ("bad-config", "transformer/config.json cannot be read (Expecting value"),
        ("bad-scheduler", "scheduler/scheduler_config.json is no JSON object"),
        ("dangling-config", "vae/config.json is missing"),
        # Files render reads whole, though no config: a tokenizer's failed generate as no
        # text-to-image pipeline, and a pull passed it.
        ("cut-tokenizer", "tokenizer/tokenizer.json cannot be read (Expecting value"),
        ("no-scheduler-config", "scheduler/scheduler_config.json is missing"),
        ("no-model-config", "vae/config.json is missing"),
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
    elif damage == "bad-config":  # render would fail on it; the pull passed it
        (weights.parent / "config.json").write_text("")
    elif damage == "bad-scheduler":
        (snapshot / "scheduler" / "scheduler_config.json").write_text("[]")
    elif damage == "dangling-config":  # a link whose blob is gone
        (snapshot / "vae" / "config.json").unlink()
        (snapshot / "vae" / "config.json").symlink_to("../../../blobs/gone")
    elif damage == "cut-tokenizer":
        _cut(snapshot / "tokenizer" / "tokenizer.json")
    elif damage == "no-scheduler-config":
        (snapshot / "scheduler" / "scheduler_config.json").unlink()
    elif damage == "no-model-config":  # weights without the config that says their shapes
        (snapshot / "vae" / "config.json").unlink()
    else:  # an index naming a second shard that never came
        shard = "diffusion_pytorch_model-00002-of-00002.safetensors"
        index = {"metadata": {}, "weight_map": {"a": weights.name, "b": shard}}
        (weights.parent / "diffusion_pytorch_model.safetensors.index.json").write_text(
            json.dumps(index)
        )
    assert imagegen("models", "pull", MODEL, cache=broken, monkeypatch=monkeypatch) == 1
    [line] = capsys.readouterr().err.strip().splitlines()[-1:]
    assert line.startswith("imagegen: error:") and "is incomplete" in line and said in line
    # Offline, nothing can be fetched in its place: the line says where a pull repairs it.
    assert line.endswith("pull it where the Hub can be reached (HF_HUB_OFFLINE unset) to repair it")


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
        (OSError(5, "Input/output error"), "[Errno 5] Input/output error"),
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


@pytest.mark.parametrize("variable", ["IMAGEGEN_MODEL_CACHE_DIR", "HF_HUB_CACHE", "HF_HOME"])
def test_a_pull_into_a_full_disk_says_which_cache_and_what_to_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, variable: str
) -> None:
    """It said "[Errno 28] No space left on device" alone: not which volume, nor that the
    cache can be moved."""
    from diffusers import DiffusionPipeline
    from huggingface_hub import constants

    from imagegen.render import pull as pulling

    def fails(*args: object, **kwargs: object) -> str:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(DiffusionPipeline, "download", fails)
    monkeypatch.setattr(pulling, "is_offline_mode", lambda: False)  # the conftest sets it
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(name, raising=False)
    where = str(tmp_path / "cache")
    # The Hub client reads its cache's path as it is imported (HF_HOME's "hub" without
    # HF_HUB_CACHE): set here as it would have read it.
    monkeypatch.setattr(constants, "HF_HUB_CACHE", where)
    if variable != "HF_HOME":
        monkeypatch.setenv(variable, where)

    with pytest.raises(DependencyUnavailable) as caught:
        pulling.pull("example-org/missing", Settings())

    assert caught.value.message == (
        "model 'example-org/missing' at revision main (not pinned) could not be downloaded:"
        f" [Errno 28] No space left on device; the model cache {where} ({variable}) is full:"
        f" free space there, or set {variable} to a volume with room for the model"
    )


def test_a_cache_that_cannot_be_written_is_said_in_a_line(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from diffusers import DiffusionPipeline

    from imagegen.render import pull as pulling

    broken, snapshot = _broken_copy(cache, tmp_path)
    weights = snapshot / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])

    def read_only(path: Path, missing_ok: bool = False) -> None:
        raise PermissionError(13, "Permission denied", str(path))

    def download(*args: object, **kwargs: object) -> str:
        raise AssertionError("downloaded")

    monkeypatch.setattr(Path, "unlink", read_only)  # a read-only volume
    monkeypatch.setattr(DiffusionPipeline, "download", download)
    monkeypatch.setattr(pulling, "is_offline_mode", lambda: False)  # the conftest sets it
    with pytest.raises(DependencyUnavailable) as caught:
        pulling.pull(MODEL, Settings(model_cache_dir=broken))
    assert caught.value.message == (
        f"model {MODEL!r} at revision main (not pinned) in the cache is damaged"
        " (transformer/diffusion_pytorch_model.safetensors is cut short) and cannot be"
        f" repaired: {weights} cannot be removed ([Errno 13] Permission denied: '{weights}');"
        " pull it where the cache can be written"
    )


def _damage(weights: Path, damage: str) -> None:
    data = weights.read_bytes()
    if damage == "cut":
        weights.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        weights.write_bytes(os.urandom(len(data)))
    elif damage == "flipped":  # its header's first bytes overwritten
        weights.write_bytes(data[:8] + b"x" * 32 + data[40:])
    elif damage == "empty":
        weights.write_bytes(b"")
    elif damage == "cut-tokenizer":
        _cut(weights.parent.parent / "tokenizer" / "tokenizer.json")
    else:  # its config no JSON
        (weights.parent / "config.json").write_text("{not json")


_DAMAGE_SAID = {
    "cut": "transformer/diffusion_pytorch_model.safetensors is cut short",
    "garbage": "transformer/diffusion_pytorch_model.safetensors is cut short",
    "flipped": "transformer/diffusion_pytorch_model.safetensors cannot be read",
    "empty": "transformer/diffusion_pytorch_model.safetensors is cut short",
    "bad-json": "transformer/config.json cannot be read",
    # Said as no text-to-image pipeline (JSONDecodeError), a refusal of the name.
    "cut-tokenizer": "tokenizer/tokenizer.json cannot be read",
}


@pytest.mark.parametrize("damage", list(_DAMAGE_SAID))
def test_damaged_cached_weights_are_said_by_name_not_as_a_download(
    cache: Path, tmp_path: Path, damage: str
) -> None:
    broken, snapshot = _broken_copy(cache, tmp_path)
    _damage(snapshot / "transformer" / "diffusion_pytorch_model.safetensors", damage)

    with pytest.raises(DependencyUnavailable) as caught:
        load_pipeline(MODEL, torch.float32, Settings(model_cache_dir=broken))

    message = caught.value.message
    assert message.startswith(
        f"model {MODEL!r} at revision main (not pinned) in the local cache cannot be loaded"
        f" ({_DAMAGE_SAID[damage]}"
    ), message
    assert message.endswith(
        f") and HF_HUB_OFFLINE is set: pull it (imagegen models pull {MODEL}), which fetches"
        " what is missing and replaces what is damaged"
    ), message
    assert "could not be downloaded" not in message and "\n" not in message


def test_a_damaged_local_pipeline_is_said_once_as_a_failure(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    local = tmp_path / "local-model"
    shutil.copytree(cache / f"models--{MODEL.replace('/', '--')}" / "snapshots" / COMMIT, local)
    _damage(local / "transformer" / "diffusion_pytorch_model.safetensors", "cut")
    monkeypatch.setenv("IMAGEGEN_SERVED_MODELS", str(local))
    monkeypatch.setenv("IMAGEGEN_MODEL", str(local))
    args = ["generate", "a fox", "--width", "256", "--height", "256", "--no-enhance"]

    code = imagegen(*args, cache=cache, monkeypatch=monkeypatch)

    # Not a mistake of the input (2): the model cannot load, as docs/cli.md has a failure.
    assert code == 1
    [line] = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert line == (
        f"imagegen: error: {str(local)!r} cannot be loaded:"
        " transformer/diffusion_pytorch_model.safetensors is cut short"
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


@pytest.mark.parametrize(
    "damage", ["whole", "cut", "no-vae", "cut-tokenizer", "no-scheduler-config"]
)
def test_models_list_says_a_snapshot_render_cannot_load_is_incomplete(
    cache: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    damage: str,
) -> None:
    import shutil

    broken, snapshot = _broken_copy(cache, tmp_path)
    if damage == "cut":
        _damage(snapshot / "transformer" / "diffusion_pytorch_model.safetensors", "cut")
    elif damage == "no-vae":  # a pull cut short: its model_index.json is there
        shutil.rmtree(snapshot / "vae")
    elif damage == "cut-tokenizer":
        _cut(snapshot / "tokenizer" / "tokenizer.json")
    elif damage == "no-scheduler-config":
        (snapshot / "scheduler" / "scheduler_config.json").unlink()
    monkeypatch.setenv("IMAGEGEN_MODEL", "tiny")
    monkeypatch.setenv("IMAGEGEN_SERVED_MODELS", f"tiny,{MODEL}")
    assert imagegen("models", "list", "--json", cache=broken, monkeypatch=monkeypatch) == 0
    rows = {row["model"]: row for row in json.loads(capsys.readouterr().out)}
    assert rows[MODEL]["here"] == ("cached" if damage == "whole" else "incomplete")


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


# -- Against a Hub: the cache laid out by the Hub client, snapshot files linked to blobs -------


def _pull_from(hub: FakeHub, cache: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``imagegen models pull`` in a process of its own: the Hub client reads ``HF_ENDPOINT``
    and ``HF_HUB_OFFLINE`` as it is imported."""
    env = {
        **os.environ,
        "HF_ENDPOINT": hub.url,
        "HF_HUB_OFFLINE": "0",
        "TRANSFORMERS_OFFLINE": "0",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HOME": str(cache.parent / "hf-home"),
        "IMAGEGEN_MODEL_CACHE_DIR": str(cache),
    }
    command = [sys.executable, "-m", "imagegen.cli", "models", "pull", MODEL, *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture
def hub(cache: Path) -> Iterator[FakeHub]:
    snapshot = cache / f"models--{MODEL.replace('/', '--')}" / "snapshots" / COMMIT
    with FakeHub(snapshot, repo=MODEL, commit=COMMIT) as served:
        yield served


def _hub_cache(hub: FakeHub, cache: Path) -> Path:
    """``cache`` holding the hub's model as the Hub client lays it out
    (``huggingface_hub/file_download.py``): each file in ``blobs/``, named by the ETag the
    Hub sends for it, and linked from the snapshot by a relative link; its snapshot."""
    repo = cache / f"models--{MODEL.replace('/', '--')}"
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    snapshot = repo / "snapshots" / COMMIT
    for name, file in hub.files().items():
        blob = repo / "blobs" / hub.etag(name)
        blob.write_bytes(file.read_bytes())
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return snapshot


@pytest.mark.slow
def test_pull_fetches_damaged_blobs_anew(hub: FakeHub, tmp_path: Path) -> None:
    # The Hub client links a snapshot's file to the blob already there without reading it: a
    # blob cut short stayed so through every pull, and through removing the snapshot.
    from imagegen.render.pull import incomplete

    cache = tmp_path / "hub-cache"
    snapshot = _hub_cache(hub, cache)
    damaged = ["transformer/config.json", "transformer/diffusion_pytorch_model.safetensors"]
    whole = {name: (snapshot / name).read_bytes() for name in damaged}
    (snapshot / damaged[0]).resolve().write_text("{not json")
    cut = whole[damaged[1]]
    (snapshot / damaged[1]).resolve().write_bytes(cut[: len(cut) // 2])
    assert incomplete(snapshot) == "transformer/config.json cannot be read" + (
        " (Expecting property name enclosed in double quotes: line 1 column 2 (char 1))"
    )

    pulled = _pull_from(hub, cache)

    assert pulled.returncode == 0, pulled.stderr
    assert sorted(hub.downloads) == damaged  # those files alone, fetched anew
    assert incomplete(snapshot) is None
    assert all((snapshot / name).resolve().read_bytes() == whole[name] for name in damaged)


@pytest.mark.slow
@pytest.mark.parametrize("linked", ["cache", "blobs"])
def test_pull_repairs_a_cache_reached_through_a_link(
    hub: FakeHub, tmp_path: Path, linked: str
) -> None:
    # A volume mounted through a link, or /tmp on macOS: the blob a snapshot's file resolves
    # to is named by the real path, not the one the cache was given by.
    from imagegen.render.pull import incomplete

    real = tmp_path / "real-cache"
    cache = tmp_path / "hub-cache"
    if linked == "cache":
        real.mkdir()
        cache.symlink_to(real)
    snapshot = _hub_cache(hub, cache)
    if linked == "blobs":
        blobs = snapshot.parent.parent / "blobs"
        blobs.rename(real)
        blobs.symlink_to(real)
    name = "transformer/diffusion_pytorch_model.safetensors"
    whole = (snapshot / name).read_bytes()
    (snapshot / name).resolve().write_bytes(whole[: len(whole) // 2])

    pulled = _pull_from(hub, cache)
    again = _pull_from(hub, cache)

    assert pulled.returncode == 0, pulled.stderr
    assert again.returncode == 0, again.stderr
    assert hub.downloads == [name]
    assert incomplete(snapshot) is None
    assert (snapshot / name).read_bytes() == whole


@pytest.mark.slow
def test_pull_leaves_a_damaged_file_outside_the_cache(hub: FakeHub, tmp_path: Path) -> None:
    # A component folder linked to one of the user's own: what is in it is not the cache's to
    # remove, and the pull says it is damaged.
    import shutil

    cache = tmp_path / "hub-cache"
    snapshot = _hub_cache(hub, cache)
    outside = tmp_path / "shared-vae"
    shutil.copytree(snapshot / "vae", outside)
    shutil.rmtree(snapshot / "vae")
    (snapshot / "vae").symlink_to(outside)
    (outside / "config.json").write_text('{"edited": ')

    pulled = _pull_from(hub, cache)

    assert pulled.returncode == 1, pulled.stderr
    assert (outside / "config.json").read_text() == '{"edited": '
    [line] = [line for line in pulled.stderr.splitlines() if "error:" in line]
    assert "in the cache is incomplete: vae/config.json cannot be read" in line, line
    assert hub.downloads == []


@pytest.mark.slow
def test_a_partial_cache_the_hub_cannot_complete_says_both(hub: FakeHub, tmp_path: Path) -> None:
    # Online, the Hub unreachable (nothing listens on the port the load asks): the files the
    # cache lacks (a first load cut short) could not be fetched, and the line says so beside
    # what is missing.
    import shutil

    partial = tmp_path / "hub-cache"
    pulled = _pull_from(hub, partial)
    assert pulled.returncode == 0, pulled.stderr
    snapshot = partial / f"models--{MODEL.replace('/', '--')}" / "snapshots" / COMMIT
    shutil.rmtree(snapshot / "transformer")
    env = {
        **os.environ,
        "HF_ENDPOINT": "http://127.0.0.1:57101",
        "HF_HUB_OFFLINE": "0",
        "TRANSFORMERS_OFFLINE": "0",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HOME": str(tmp_path / "hf-home"),
        "IMAGEGEN_MODEL_CACHE_DIR": str(partial),
        "IMAGEGEN_MODEL": MODEL,
        "IMAGEGEN_SERVED_MODELS": MODEL,
    }
    args = ["generate", "a fox", "--width", "256", "--height", "256", "--no-enhance"]
    command = [sys.executable, "-m", "imagegen.cli", *args, "--output", str(tmp_path / "out")]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)

    assert done.returncode == 1, done.stderr
    [line] = [line for line in done.stderr.splitlines() if "error:" in line]
    assert line == (
        f"imagegen: error: model {MODEL!r} at revision main (not pinned) in the local cache"
        " cannot be loaded (its transformer is missing) and could not be downloaded"
        f" ([Errno 111] Connection refused): pull it (imagegen models pull {MODEL}), which"
        " fetches what is missing and replaces what is damaged"
    )


@pytest.mark.slow
def test_pull_fetches_a_damaged_tokenizer_and_a_missing_scheduler_config_anew(
    hub: FakeHub, tmp_path: Path
) -> None:
    # Neither was looked at: a tokenizer.json cut short stayed so through every pull, and a
    # snapshot without its scheduler's config was called whole.
    from imagegen.render.pull import incomplete

    cache = tmp_path / "hub-cache"
    snapshot = _hub_cache(hub, cache)
    tokenizer, scheduler = "tokenizer/tokenizer.json", "scheduler/scheduler_config.json"
    whole = {name: (snapshot / name).read_bytes() for name in (tokenizer, scheduler)}
    _cut((snapshot / tokenizer).resolve())
    (snapshot / scheduler).unlink()  # its blob left: linked again, not downloaded
    assert incomplete(snapshot) == f"{scheduler} is missing"

    pulled = _pull_from(hub, cache)

    assert pulled.returncode == 0, pulled.stderr
    assert hub.downloads == [tokenizer]
    assert incomplete(snapshot) is None
    assert all((snapshot / name).read_bytes() == data for name, data in whole.items())


@pytest.fixture
def full_disk(tmp_path: Path) -> Iterator[Path]:
    """A folder on a file system too small for the model (a 256 KiB tmpfs, the pipeline about
    800 KiB); skipped where no tmpfs can be mounted (not root)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "imagegen-test", str(disk)],
        capture_output=True,
        check=False,
    )
    if made.returncode != 0:
        pytest.skip(f"no tmpfs can be mounted here: {made.stderr.decode().strip()}")
    try:
        yield disk / "cache"
    finally:
        subprocess.run(["umount", str(disk)], check=True)


@pytest.mark.slow
def test_a_pull_into_a_full_disk_names_the_cache(hub: FakeHub, full_disk: Path) -> None:
    pulled = _pull_from(hub, full_disk)

    assert pulled.returncode == 1, pulled.stderr
    [line] = [line for line in pulled.stderr.splitlines() if "error:" in line]
    assert line == (
        f"imagegen: error: model {MODEL!r} at revision main (not pinned) could not be"
        f" downloaded: [Errno 28] No space left on device; the model cache {full_disk}"
        " (IMAGEGEN_MODEL_CACHE_DIR) is full: free space there, or set"
        " IMAGEGEN_MODEL_CACHE_DIR to a volume with room for the model"
    )


@pytest.fixture
def unreadable(cache: Path) -> Iterator[tuple[Path, list[str]]]:
    """A copy of the cache whose model's transformer folder is mode 000, where a user other
    than root can reach it, and the words that run a command as such a user.

    Root reads a folder whatever its mode, so as root the command runs as nobody (65534),
    through util-linux's ``setpriv``: the error is then the kernel's, where patching
    ``Path.is_file`` to raise would only say what this test expects of it. (``subprocess``'s
    own ``user=`` was refused the interpreter, under root's 0700 home, where ``setpriv`` was
    not.)
    """
    import shutil
    import tempfile

    as_user: list[str] = []
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("root reads every folder, and no setpriv runs a command as another user")
        as_user = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups"]

    with tempfile.TemporaryDirectory(prefix="imagegen-unreadable-") as made:
        root = Path(made)
        root.chmod(0o755)  # made 0700: nobody could reach what is in it
        copy = root / "cache"
        shutil.copytree(cache, copy)
        for folder in (copy, *copy.rglob("*")):
            if folder.is_dir():
                folder.chmod(0o755)
        (root / "out").mkdir(mode=0o777)
        (root / "out").chmod(0o777)
        snapshot = copy / f"models--{MODEL.replace('/', '--')}" / "snapshots" / COMMIT
        (snapshot / "transformer").chmod(0)
        try:
            yield copy, as_user
        finally:
            (snapshot / "transformer").chmod(0o755)  # for the folder to be removed


@pytest.mark.slow
def test_an_unreadable_component_is_said_not_a_traceback(
    unreadable: tuple[Path, list[str]],
) -> None:
    """``Path.is_file`` raises PermissionError (Python 3.11) in a folder that cannot be
    searched, where it is False for a missing file: models list, doctor, pull and generate
    each ended in a traceback."""
    copy, as_user = unreadable
    env = {
        **os.environ,
        "IMAGEGEN_MODEL_CACHE_DIR": str(copy),
        "IMAGEGEN_MODEL": MODEL,
        "IMAGEGEN_SERVED_MODELS": MODEL,
        "HF_HOME": str(copy.parent / "hf-home"),
        "XDG_DATA_HOME": str(copy.parent / "out"),
        "HOME": str(copy.parent / "out"),
    }

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        command = [*as_user, sys.executable, "-m", "imagegen.cli", *args]
        return subprocess.run(
            command, env=env, cwd=copy.parent, capture_output=True, text=True, timeout=120
        )

    said = "its transformer cannot be read (Permission denied)"
    listed = run("models", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert {row["model"]: row["here"] for row in json.loads(listed.stdout)}[MODEL] == "incomplete"

    doctor = run("doctor", "--json")
    assert "Traceback" not in doctor.stderr, doctor.stderr
    row = {row["check"]: row for row in json.loads(doctor.stdout)["checks"]}["model"]
    assert row["status"] == "error"
    assert row["summary"] == f"Model {MODEL} is incomplete in the model cache: {said}."

    pulled = run("models", "pull", MODEL)
    assert pulled.returncode == 1, pulled.stderr
    [line] = [line for line in pulled.stderr.splitlines() if "error:" in line]
    assert f"in the cache is incomplete: {said};" in line, line

    out = str(copy.parent / "out")
    args = ["--width", "256", "--height", "256", "--no-enhance", "--output", out]
    generated = run("generate", "a fox", *args)
    assert generated.returncode == 1, generated.stderr
    [line] = [line for line in generated.stderr.splitlines() if "error:" in line]
    assert f"in the local cache cannot be loaded ({said})" in line, line
