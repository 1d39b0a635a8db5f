"""Only configured LoRAs are loaded: settings.loras and what lies inside settings.lora_dir."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from imagegen.errors import InvalidRequest
from imagegen.models import EnhancedPrompt, LoraHint
from imagegen.render import stored_png
from imagegen.render.diffusers_backend import DiffusersBackend
from imagegen.settings import Settings
from imagegen.storage.base import GenerationKeys
from tests.fakes.render_backend import enhanced_prompt

MakeJob = Callable[..., EnhancedPrompt]
REFUSED = "LoRA 'evil' is not configured on this render service"


def _pixels(png: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(png)) as image:
        return np.asarray(image.convert("RGB"))


def _spy_on_loading(backend: DiffusersBackend, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The locations the tiny pipeline is asked to load LoRA weights from, from now on."""
    pipe = backend._pipelines["tiny"]
    calls: list[str] = []
    load = pipe.load_lora_weights

    def spy(location: str, *args: Any, **kwargs: Any) -> None:
        calls.append(str(location))
        load(location, *args, **kwargs)

    monkeypatch.setattr(pipe, "load_lora_weights", spy)
    return calls


@pytest.fixture
def load_calls(backend: DiffusersBackend, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    return _spy_on_loading(backend, monkeypatch)


@pytest.fixture
def outside(tmp_path: Path, lora_dir: Path) -> Path:
    """A loadable LoRA that is not inside the backend's lora_dir (nor in its loras)."""
    target = tmp_path / "stray-lora"
    target.mkdir()
    weights = "pytorch_lora_weights.safetensors"
    (target / weights).write_bytes((lora_dir / weights).read_bytes())
    return target


def _refused_paths(lora_root: Path, outside: Path) -> dict[str, str]:
    escape = lora_root / "escape"
    if not escape.is_symlink():
        escape.symlink_to(outside, target_is_directory=True)
    return {
        "absolute": "/etc/passwd",
        "absolute-missing": "/no/such/lora.safetensors",
        "outside-loadable": str(outside),
        "traversal": f"{lora_root}/../{outside.parent.name}/{outside.name}",
        "traversal-missing": f"{lora_root}/../no-such-lora",
        "symlink-out": str(escape),
        "lora-dir-itself": str(lora_root),
        "hub-id": "someone/evil-lora",
        "proc": "/proc/self/environ",
    }


@pytest.mark.parametrize(
    "case",
    [
        "absolute",
        "absolute-missing",
        "outside-loadable",
        "traversal",
        "traversal-missing",
        "symlink-out",
        "lora-dir-itself",
        "hub-id",
        "proc",
    ],
)
def test_unconfigured_loras_are_refused_before_loading(
    backend: DiffusersBackend,
    make_job: MakeJob,
    lora_root: Path,
    outside: Path,
    load_calls: list[str],
    case: str,
) -> None:
    path = _refused_paths(lora_root, outside)[case]

    with pytest.raises(InvalidRequest) as caught:
        backend.render(make_job(seed=3, loras=[LoraHint(name="evil", path=path)]))

    error = caught.value
    assert error.message == REFUSED  # the same whether the path exists or not
    assert error.errors == [{"field": "loras.0.path", "message": REFUSED}]
    body = json.dumps(error.to_dict())
    assert path not in body and outside.name not in body and "passwd" not in body
    assert load_calls == []


def test_one_unconfigured_lora_refuses_the_job_before_any_is_loaded(
    make_job: MakeJob, lora_dir: Path, outside: Path
) -> None:
    backend = DiffusersBackend(Settings(device="cpu", lora_dir=lora_dir.parent))
    backend.load("tiny")
    pipe = backend._pipelines["tiny"]
    loras = [
        LoraHint(name="sketchy", path=str(lora_dir)),
        LoraHint(name="evil", path=str(outside)),
        LoraHint(name="worse", path="/etc/shadow"),
    ]
    try:
        with pytest.raises(InvalidRequest) as caught:
            backend.render(make_job(loras=loras))

        assert caught.value.fields == ["loras.1.path", "loras.2.path"]
        assert pipe.get_list_adapters() == {}
    finally:
        backend.close()


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`:UserWarning")
def test_configured_loras_apply(
    make_job: MakeJob, lora_dir: Path, outside: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One inside lora_dir, named with a ".." that stays inside: loaded from its resolved path.
    # One in settings.loras as the operator wrote it ("~/..."); the lora plugin expands it.
    monkeypatch.setenv("HOME", str(outside.parent))
    settings = Settings(device="cpu", lora_dir=lora_dir.parent, loras=[f"~/{outside.name}"])
    in_dir = LoraHint(name="sketchy", path=f"{lora_dir}/../{lora_dir.name}")
    listed = LoraHint(name="listed", path=str(outside))
    backend = DiffusersBackend(settings)
    backend.load("tiny")
    load_calls = _spy_on_loading(backend, monkeypatch)
    try:
        plain = _pixels(backend.render(make_job(seed=4)).png).astype(int)
        styled = [
            _pixels(backend.render(make_job(seed=4, loras=[hint])).png).astype(int)
            for hint in (in_dir, listed)
        ]
    finally:
        backend.close()

    assert all(np.abs(image - plain).mean() > 0 for image in styled)
    assert load_calls == [str(lora_dir.resolve()), str(outside)]


def test_one_lora_s_weights_under_two_names_are_refused_before_loading(
    backend: DiffusersBackend, make_job: MakeJob, lora_dir: Path, load_calls: list[str]
) -> None:
    # The paths differ as written, not once resolved: the same weights, added up, loaded twice.
    loras = [
        LoraHint(name="sketchy", path=str(lora_dir)),
        LoraHint(name="again", path=f"{lora_dir}/../{lora_dir.name}"),
    ]

    with pytest.raises(InvalidRequest) as caught:
        backend.render(make_job(loras=loras))

    assert caught.value.fields == ["loras"]
    assert caught.value.message == "LoRAs 'sketchy' and 'again' are the same weights"
    assert load_calls == []


def test_a_lora_file_named_with_dots_is_applied_as_the_plugin_names_it(
    backend: DiffusersBackend, make_job: MakeJob, lora_root: Path, lora_dir: Path
) -> None:
    # torch refuses a "." in an adapter's name, so a LoraHint's name has none: the lora plugin
    # names "sketchy.v2.safetensors" without it, and render applies it.
    from imagegen_plugins.lora import find_loras

    weights = lora_dir / "pytorch_lora_weights.safetensors"
    dotted = lora_root / "sketchy.v2.safetensors"
    dotted.write_bytes(weights.read_bytes())
    try:
        hint = next(hint for hint in find_loras(lora_root) if hint.path == str(dotted))
        assert hint.name == "sketchy-v2"
        plain = _pixels(backend.render(make_job(seed=6)).png).astype(int)
        styled = _pixels(backend.render(make_job(seed=6, loras=[hint])).png).astype(int)
    finally:
        dotted.unlink()

    assert np.abs(styled - plain).mean() > 0


# -- The stage refuses what its settings decide before admission -----------------------------


async def _busy_stage(tmp_path: Path, **settings: Any) -> tuple[Any, Any, Any]:
    """A render stage with no queue (``render_queue_size=0``), its one call held running."""
    import asyncio

    from tests.render.test_batching import BatchingBackend, make_stage

    backend = BatchingBackend()
    backend.gate.clear()
    stage = make_stage(backend, tmp_path, render_queue_size=0, **settings)
    running = asyncio.ensure_future(stage.render(enhanced_prompt(generation_id="running")))
    await asyncio.to_thread(backend.running.wait, 10)
    return backend, stage, running


@pytest.mark.parametrize("accept_png", [False, True])
async def test_an_unconfigured_lora_is_refused_not_told_to_retry_while_the_pod_is_busy(
    tmp_path: Path, accept_png: bool
) -> None:
    """The job can never be rendered here: a 400 naming the LoRA, never a 429 with a
    Retry-After, and it takes no slot, nor waits in the queue."""
    from imagegen.errors import Overloaded

    backend, stage, running = await _busy_stage(tmp_path, loras=["ink"])
    evil = enhanced_prompt(generation_id="evil", loras=[LoraHint(name="evil", path="evil")])
    try:
        with pytest.raises(InvalidRequest) as caught:
            await (stage.render_png(evil) if accept_png else stage.render(evil))
        assert caught.value.errors == [{"field": "loras.0.path", "message": REFUSED}]
        # A configured LoRA passes the check, and is the 429 the full pod answers.
        ink = enhanced_prompt(generation_id="ink", loras=[LoraHint(name="ink", path="ink")])
        with pytest.raises(Overloaded):
            await stage.render(ink)
    finally:
        backend.gate.set()
        await running
        stage.close()
    assert backend.calls == [["running"]]
    assert not (tmp_path / stored_png.claim_key("evil")).exists()


async def test_loras_for_a_model_that_takes_none_are_refused_before_admission(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dataclasses import replace

    from imagegen.errors import Overloaded
    from imagegen.modelspec import family_for

    def without_loras(model: str) -> Any:  # a family that takes no LoRA adapters
        return replace(family_for(model), lora=False)

    monkeypatch.setattr("imagegen.render._lora.family_for", without_loras)
    backend, stage, running = await _busy_stage(tmp_path, loras=["ink"])
    ink = enhanced_prompt(generation_id="ink", loras=[LoraHint(name="ink", path="ink")])
    try:
        with pytest.raises(InvalidRequest) as caught:
            await stage.render(ink)
    finally:
        backend.gate.set()
        await running
        stage.close()
    assert not isinstance(caught.value, Overloaded)
    assert caught.value.fields == ["loras"]
    assert caught.value.message == "model 'tiny' does not support LoRA adapters"


async def test_a_job_its_call_refuses_for_a_lora_leaves_no_claim(tmp_path: Path) -> None:
    """A configured LoRA the call cannot load (weights gone bad, a Hub repository removed) is a
    400 from inside the call. Nothing of the job is stored, so the same id may still be
    rendered, by a corrected job of another day too, not refused as "already rendered"."""
    from datetime import timedelta

    from tests.render.test_batching import BatchingBackend, make_stage

    backend = BatchingBackend()
    backend.refuse = {"fixed"}  # the backend's refusal of the LoRA job, in its call
    stage = make_stage(backend, tmp_path, loras=["ink"])
    styled = enhanced_prompt(generation_id="fixed", loras=[LoraHint(name="ink", path="ink")])
    try:
        with pytest.raises(InvalidRequest):
            await stage.render(styled)
        assert backend.calls == [["fixed"]]
        assert not (tmp_path / stored_png.claim_key("fixed")).exists()
        backend.refuse = set()
        later = styled.requested_at + timedelta(days=1)
        corrected = styled.model_copy(update={"loras": [], "requested_at": later})
        rendered = await stage.render(corrected)
    finally:
        stage.close()
    assert rendered.key == GenerationKeys("fixed", later).image


def test_a_folder_holding_no_lora_weights_is_refused_naming_its_field(
    backend: DiffusersBackend, make_job: MakeJob, lora_root: Path, tiny_dir: Path
) -> None:
    # A diffusers component's folder: diffusers loads nothing from it and says nothing; its
    # set_adapters then failed the render with a ValueError, a 500.
    import shutil

    component = lora_root / "a-component"
    shutil.copytree(tiny_dir / "transformer", component, dirs_exist_ok=True)
    pipe = backend._pipelines["tiny"]
    try:
        with pytest.raises(InvalidRequest) as caught:
            backend.render(make_job(loras=[LoraHint(name="component", path=str(component))]))
    finally:
        shutil.rmtree(component)

    message = "LoRA 'component' holds no LoRA weights"
    assert caught.value.errors == [{"field": "loras.0.path", "message": message}]
    assert "component" not in {a for names in pipe.get_list_adapters().values() for a in names}
    # The pipeline renders on, with and without adapters.
    assert backend.render(make_job(seed=5)).png


def test_a_configured_lora_whose_file_is_not_there_is_retried_and_logged(
    make_job: MakeJob, tmp_path: Path, lora_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from imagegen.errors import DependencyUnavailable

    absent = tmp_path / "not-mounted-yet" / "ink.safetensors"
    settings = Settings(device="cpu", loras=[str(absent), "someone/hub-lora"])
    with caplog.at_level("WARNING", logger="imagegen.render"):
        backend = DiffusersBackend(settings)
    # One line at start-up, for the path alone: a Hub id is not looked for on disk.
    said = [r.getMessage() for r in caplog.records if r.name == "imagegen.render"]
    assert said == [f"configured LoRA path does not exist: {absent}"]
    backend.load("tiny")
    try:
        with pytest.raises(DependencyUnavailable) as caught:
            backend.render(make_job(loras=[LoraHint(name="ink", path=str(absent))]))
        # The volume comes: the same job renders.
        absent.parent.mkdir()
        absent.write_bytes((lora_dir / "pytorch_lora_weights.safetensors").read_bytes())
        assert backend.render(make_job(loras=[LoraHint(name="ink", path=str(absent))])).png
    finally:
        backend.close()

    error = caught.value
    assert error.retryable and error.status == 503 and error.retry_after == 30
    assert error.fields == ["loras.0.path"]
