"""The enhance stage's contract apart from Ollama: without the LLM, determinism, render
parameters, invalid requests, health, logs and imports."""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from imagegen.enhance import EnhanceStage
from imagegen.errors import InvalidRequest
from imagegen.models import MAX_LORAS, Contribution, LoraHint, derive_seed
from imagegen.modelspec import family_for
from imagegen.plugins import PluginSet
from imagegen.settings import Settings
from tests.enhance.conftest import NOW, MakeStage
from tests.enhance.conftest import request as _request
from tests.enhance.conftest import run as _run
from tests.fakes.ollama_server import (
    Behaviour,
    FakeOllama,
    http_error,
    not_json,
    slow,
)

ROOT = Path(__file__).resolve().parents[2]


# 3. Without the LLM


async def test_passthrough_makes_no_llm_call(stage: EnhanceStage, fake_ollama: FakeOllama) -> None:
    job = await _run(stage, enhance=False)
    assert fake_ollama.requests == []
    assert (job.enhancer, job.fallback) == ("passthrough", False)
    assert job.prompt.startswith("a red fox, soft morning light, ")
    assert "Thanksgiving" in job.prompt


async def test_passthrough_without_prompt_dreams_from_the_list(
    stage: EnhanceStage, fake_ollama: FakeOllama
) -> None:
    job = await _run(stage, enhance=False, prompt=None)
    assert fake_ollama.requests == []
    assert job.enhancer == "template" and job.dreamed and not job.fallback


async def test_plugins_can_be_chosen_per_request(stage: EnhanceStage) -> None:
    job = await _run(
        stage,
        enhance=False,
        plugins=["art_style"],
        plugin_options={"art_style": {"style": "Cubism"}},
    )
    assert [c.plugin for c in job.contributions] == ["art_style"]
    assert job.prompt.startswith("a red fox, Cubism style, ")
    assert (await _run(stage, enhance=False, plugins=[])).prompt == "a red fox"


# 4. Determinism and render parameters


@pytest.mark.parametrize("up", [True, False])
async def test_the_same_request_twice_is_the_same_job(
    make_stage: MakeStage, fake_ollama: FakeOllama, up: bool
) -> None:
    if not up:
        fake_ollama.stop()
    first = await _run(make_stage(), seed=None)
    again = await _run(make_stage(), seed=None)
    # All but when it was written (the memo keeps the first job, and its time, for redeliveries).
    assert first.enhanced_at is not None and again.enhanced_at is not None
    assert first.enhanced_at <= again.enhanced_at
    assert first.model_copy(update={"enhanced_at": None}) == again.model_copy(
        update={"enhanced_at": None}
    )
    if up:
        seeds = [r["options"]["seed"] for r in fake_ollama.chat_requests]
        assert seeds == [derive_seed("gen-1")] * 2


async def test_render_parameters(stage: EnhanceStage) -> None:
    request = _request(
        seed=None,
        width=512,
        height=768,
        metadata={"user": "u1"},
        requested_at="2026-01-02T03:04:05Z",
    )
    job = await stage.run(request, generation_id="gen-7", now=NOW)
    # The default model, FLUX.2 [klein] 4B, is step-distilled: 4 steps, guidance 1.
    assert (job.model, job.steps, job.guidance) == ("black-forest-labs/FLUX.2-klein-4B", 4, 1.0)
    assert (job.width, job.height, job.metadata) == (512, 768, {"user": "u1"})
    assert job.seed == derive_seed("gen-7")
    assert job.requested_at == datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    schnell = await _run(stage, model="black-forest-labs/FLUX.1-schnell")
    assert (schnell.steps, schnell.guidance) == (4, 0.0)
    explicit = await _run(stage, model="black-forest-labs/FLUX.1-schnell", steps=12, guidance=2)
    assert (explicit.steps, explicit.guidance) == (12, 2.0)
    assert (await _run(stage, model="tiny")).steps == family_for("tiny").default_steps


async def test_the_time_defaults_to_now(stage: EnhanceStage) -> None:
    before = datetime.now(UTC)
    job = await stage.run(_request(), generation_id="gen-1")
    assert before <= job.requested_at <= datetime.now(UTC)


async def test_lora_hints_are_collected(make_stage: MakeStage, tmp_path: Path) -> None:
    (tmp_path / "pixel.safetensors").write_bytes(b"\0")
    (tmp_path / "pixel.json").write_text('{"trigger": "pixelart", "weight": 0.6}')
    settings_overrides = {"lora_dir": tmp_path, "lora_probability": 1.0, "plugins": ["lora"]}
    job = await _run(make_stage(**settings_overrides), enhance=False)
    assert [(h.name, h.weight, h.trigger) for h in job.loras] == [("pixel", 0.6, "pixelart")]
    assert job.prompt == "a red fox, pixelart"


class _ManyLoras:
    """A plugin naming more LoRAs than a job applies, and one file under two names."""

    name = "many_loras"
    description = "LoRA hints, too many"

    async def contribute(self, context: object) -> Contribution:
        hints = [LoraHint(name=n, path="/loras/one.safetensors") for n in ("twin", "twin2")]
        hints += [LoraHint(name=f"l{i}", path=f"/loras/{i}.safetensors") for i in range(12)]
        hints.append(LoraHint(name="l0", path="/loras/other.safetensors"))
        return Contribution(plugin=self.name, text="", loras=hints)


async def test_lora_hints_past_what_render_takes_are_left_out(
    make_stage: MakeStage, caplog: pytest.LogCaptureFixture
) -> None:
    settings = Settings(plugins=["many_loras"])
    plugins = PluginSet([_ManyLoras()], settings=settings)
    with caplog.at_level(logging.WARNING, logger="imagegen.enhance"):
        job = await _run(make_stage(plugins), enhance=False)
    # Each name and each path once, the first given kept, as many as a job applies.
    assert [h.name for h in job.loras] == ["twin"] + [f"l{i}" for i in range(MAX_LORAS - 1)]
    assert len({h.path for h in job.loras}) == MAX_LORAS
    assert "left out" in caplog.text


# 5. Invalid requests


async def test_a_model_not_served_is_refused_before_the_llm(
    make_stage: MakeStage, fake_ollama: FakeOllama
) -> None:
    stage = make_stage(served_models=["black-forest-labs/FLUX.2-klein-4B", "tiny"])
    for model in ("someone/other-model", "black-forest-labs/FLUX.1-schnell"):
        with pytest.raises(InvalidRequest) as caught:
            await _run(stage, model=model)
        assert caught.value.fields == ["model"]
        assert caught.value.errors[0]["message"] == (
            f"{model!r} is not served here; served (IMAGEGEN_SERVED_MODELS):"
            " black-forest-labs/FLUX.2-klein-4B, tiny"
        )
    assert fake_ollama.requests == []


@pytest.mark.parametrize(
    ("model", "width", "height", "fields"),
    [
        ("black-forest-labs/FLUX.2-klein-4B", 2048, 2048, []),
        ("black-forest-labs/FLUX.1-schnell", 2048, 1024, []),
        ("black-forest-labs/FLUX.1-schnell", 2048, 1040, ["width"]),
        ("black-forest-labs/FLUX.1-schnell", 1536, 1536, ["width"]),
    ],
)
async def test_the_family_bounds_the_pixels(
    make_stage: MakeStage,
    fake_ollama: FakeOllama,
    model: str,
    width: int,
    height: int,
    fields: list[str],
) -> None:
    # The request schema bounds each side (256-2048, multiples of 16); the family bounds
    # the area, so a model's own limit is refused before any LLM call.
    stage = make_stage()
    if not fields:
        assert (await _run(stage, model=model, width=width, height=height)).width == width
        return
    with pytest.raises(InvalidRequest) as caught:
        await _run(stage, model=model, width=width, height=height, enhance=False)
    assert caught.value.fields == fields
    assert "megapixels" in caught.value.errors[0]["message"]


async def test_every_problem_is_named(stage: EnhanceStage) -> None:
    with pytest.raises(InvalidRequest) as caught:
        await stage.run(
            _request(model="nope", plugins=["weather"]), generation_id="bad id!", now=NOW
        )
    assert caught.value.fields == ["generation_id", "model", "plugins"]


async def test_a_bad_plugin_option_is_invalid(stage: EnhanceStage) -> None:
    with pytest.raises(InvalidRequest) as caught:
        await _run(stage, plugin_options={"art_style": {"style": "Blobism"}})
    assert caught.value.fields == ["plugin_options.art_style.style"]


async def test_unknown_plugin_options_are_named_with_every_other_problem(
    stage: EnhanceStage,
) -> None:
    """A field enhance does not know is a 400 naming it (events.md), plugin options included:
    a misspelt option, or options for a plugin that is not enabled, were silently ignored."""
    options = {"art_style": {"styel": "Ukiyo-e"}, "art_styel": {"style": "Ukiyo-e"}}
    with pytest.raises(InvalidRequest) as caught:
        await stage.run(_request(model="nope", plugin_options=options), generation_id="g", now=NOW)
    assert caught.value.fields == [
        "model",
        "plugin_options.art_style.styel",
        "plugin_options.art_styel",
    ]


# 6. Health, logs, imports


async def test_check(stage: EnhanceStage, fake_ollama: FakeOllama) -> None:
    info = await stage.check()
    assert info["reachable"] is True and info["model_available"] is True
    assert info["models"] == ["llama3.2:latest"]
    assert info["plugins"] == ["time_of_day", "holiday", "art_style"]
    assert [r.path for r in fake_ollama.requests] == ["/api/tags"]
    fake_ollama.stop()
    down = await stage.check()
    assert down["reachable"] is False and "error" in down


async def test_check_names_a_missing_model(make_stage: MakeStage) -> None:
    info = await make_stage(ollama_model="mistral").check()
    assert info["reachable"] is True and info["model_available"] is False


async def test_warm_up_warms_the_plugins_and_says_what_ollama_has(
    make_stage: MakeStage, fake_ollama: FakeOllama, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="imagegen.enhance"):
        assert await make_stage().warm_up() == ["holiday"]
        assert await make_stage(ollama_model="mistral").warm_up() == ["holiday"]
        fake_ollama.stop()
        assert await make_stage().warm_up() == ["holiday"]
    # Where Ollama has the model it loads it (a chat without messages); where not, nothing.
    assert [r.path for r in fake_ollama.requests] == ["/api/tags", "/api/chat", "/api/tags"]
    assert fake_ollama.chat_requests == [], "no prompt is asked for"
    [load] = fake_ollama.load_requests
    assert load["model"] == "llama3.2" and load["messages"] == [] and load["stream"] is False
    mine = [r for r in caplog.records if r.name.startswith("imagegen.enhance")]
    said = [(r.levelname, r.getMessage()) for r in mine]
    host = fake_ollama.url
    assert said[0][0] == "INFO"
    assert re.fullmatch(
        rf"Ollama at {re.escape(host)} has llama3\.2, loaded in \d+\.\d s", said[0][1]
    )
    assert said[1] == (
        "WARNING",
        f"Ollama at {host} has no model mistral: prompts come from the template until it is pulled",
    )
    assert said[2][0] == "WARNING" and said[2][1].startswith(f"Ollama at {host} does not answer")
    assert said[2][1].endswith(": prompts come from the template until it does")


async def test_warm_up_of_an_ollama_that_never_answers_says_how_long_it_waited(
    make_stage: MakeStage, caplog: pytest.LogCaptureFixture
) -> None:
    with socket.create_server(("127.0.0.1", 0)) as hung:  # takes connections, never answers
        host = f"http://127.0.0.1:{hung.getsockname()[1]}"
        with caplog.at_level(logging.WARNING, logger="imagegen.enhance"):
            await make_stage(ollama_host=host).warm_up()
    assert (
        f"Ollama at {host} does not answer (no answer within 0.5s): prompts come from the"
        " template until it does"
    ) in [r.getMessage() for r in caplog.records]


async def test_warm_up_loads_the_model_with_the_configured_keep_alive(
    make_stage: MakeStage, fake_ollama: FakeOllama
) -> None:
    for keep_alive in ("30m", "-1", "1s", "1.5", "-0.5", "-500ms"):
        await make_stage(ollama_keep_alive=keep_alive).warm_up()
    sent = [r["keep_alive"] for r in fake_ollama.load_requests]
    assert sent == ["30m", -1, "1s", "1.5s", -0.5, "-500ms"]


async def test_after_the_warm_up_the_first_prompt_finds_the_model_loaded(
    make_stage: MakeStage, fake_ollama: FakeOllama
) -> None:
    stage = make_stage()
    await stage.warm_up()
    job = await _run(stage, prompt="a fox")
    assert job.fallback is False
    assert fake_ollama.model_loads == [("llama3.2:latest", "load")], "not by the prompt"


async def test_unloaded_after_each_prompt_each_prompt_loads_the_model(
    make_stage: MakeStage, fake_ollama: FakeOllama
) -> None:
    stage = make_stage(ollama_keep_alive="0")
    await stage.warm_up()
    for prompt in ("a fox", "an owl"):
        assert (await _run(stage, prompt=prompt)).fallback is False
    assert fake_ollama.model_loads == [("llama3.2:latest", "chat")] * 2


@pytest.mark.parametrize("keep_alive", ["0", "0s", "0h0m", "-0", "0.5", ".9", "500ms", "0.9s"])
async def test_warm_up_loads_nothing_where_ollama_unloads_after_each_prompt(
    keep_alive: str,
    make_stage: MakeStage,
    fake_ollama: FakeOllama,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A chat without messages and a zero keep_alive is how Ollama is told to unload; before
    v0.12.4, one under a second too (a load with 0.5 unloaded the model, logged as loaded), and
    after it the model would be gone within that second."""
    with caplog.at_level(logging.INFO, logger="imagegen.enhance"):
        await make_stage(ollama_keep_alive=keep_alive).warm_up()
    assert fake_ollama.load_requests == []
    assert f"Ollama at {fake_ollama.url} has llama3.2 (unloaded after each prompt)" in [
        r.getMessage() for r in caplog.records
    ]


async def test_a_model_that_fails_to_load_is_logged_and_the_first_prompt_loads_it(
    make_stage: MakeStage, fake_ollama: FakeOllama, caplog: pytest.LogCaptureFixture
) -> None:
    fake_ollama.loading = http_error(500, "llama runner process has terminated")
    stage = make_stage()
    with caplog.at_level(logging.WARNING, logger="imagegen.enhance"):
        assert await stage.warm_up() == ["holiday"]
    assert [r.getMessage() for r in caplog.records if r.name == "imagegen.enhance"] == [
        f"Ollama at {fake_ollama.url} did not load llama3.2: ResponseError: llama runner"
        " process has terminated (status code: 500); the first prompt waits for it"
    ]
    fake_ollama.loading = Behaviour(content="")  # it loads now: the prompt does it
    job = await _run(stage, prompt="a fox")
    assert job.fallback is False and job.enhancer == "ollama:llama3.2"
    assert fake_ollama.model_loads == [("llama3.2:latest", "chat")]


async def test_a_load_slower_than_the_timeout_is_logged_and_warm_up_ends(
    make_stage: MakeStage, fake_ollama: FakeOllama, caplog: pytest.LogCaptureFixture
) -> None:
    fake_ollama.loading = slow(5.0)  # still loading when the warm-up stops waiting
    with caplog.at_level(logging.WARNING, logger="imagegen.enhance"):
        assert await asyncio.wait_for(make_stage().warm_up(), 3) == ["holiday"]
    assert [r.getMessage() for r in caplog.records if r.name == "imagegen.enhance"] == [
        f"Ollama at {fake_ollama.url} did not load llama3.2: no answer within 0.5s;"
        " the first prompt waits for it"
    ]


async def test_warm_up_says_requests_fail_where_there_is_no_fallback(
    make_stage: MakeStage, fake_ollama: FakeOllama, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="imagegen.enhance"):
        await make_stage(ollama_model="mistral", enhance_fallback=False).warm_up()
    assert [r.getMessage() for r in caplog.records if r.name.startswith("imagegen.enhance")] == [
        f"Ollama at {fake_ollama.url} has no model mistral: requests are answered 503 until it"
        " is pulled"
    ]


@pytest.mark.parametrize("log_prompts", [True, False])
async def test_prompts_reach_info_logs_only_when_allowed(
    make_stage: MakeStage,
    fake_ollama: FakeOllama,
    caplog: pytest.LogCaptureFixture,
    log_prompts: bool,
) -> None:
    stage = make_stage(log_prompts=log_prompts)
    fake_ollama.enqueue(not_json("a secret birthday surprise, echoed"))  # logged as a retry
    with caplog.at_level(logging.DEBUG, logger="imagegen"):
        job = await _run(stage, prompt="a secret birthday surprise")
    text = "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.INFO)
    assert (job.prompt in text) is log_prompts
    assert "secret birthday" not in text  # neither the request nor a bad reply is echoed
    assert job.generation_id in text and "retrying" in text


def test_the_stage_never_imports_torch() -> None:
    code = (
        "import sys, imagegen.enhance, imagegen.plugins\n"
        "from imagegen.plugins import PluginSet\n"
        "from imagegen.settings import Settings\n"
        "PluginSet.from_settings(Settings())\n"
        "heavy = {m.split('.')[0] for m in sys.modules} & {'torch', 'diffusers', 'transformers'}\n"
        "assert not heavy, heavy\n"
    )
    env = {"PYTHONPATH": f"{ROOT}{':'}{ROOT / 'plugins'}", "PATH": "/usr/bin:/bin"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=ROOT)


def test_plugin_set_is_injectable(settings: Settings) -> None:
    plugins = PluginSet.from_settings(settings, names=["time_of_day"])
    stage = EnhanceStage(settings, plugins)
    assert stage.plugins is plugins
