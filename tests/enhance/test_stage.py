"""The enhance stage against a fake Ollama on loopback: the real client, real HTTP."""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from imagegen.enhance import EnhanceStage, PromptReply, estimate_tokens
from imagegen.enhance._template import DREAM_SUBJECTS
from imagegen.errors import DependencyUnavailable, InvalidRequest
from imagegen.models import GenerationRequest, derive_seed
from imagegen.modelspec import family_for
from imagegen.plugins import PluginSet
from imagegen.settings import Settings
from tests.enhance.conftest import MakeStage
from tests.fakes.ollama_server import (
    FakeOllama,
    broken_body,
    http_error,
    missing_fields,
    not_json,
    reply,
    slow,
)

NOW = datetime(2026, 11, 24, 8, 15, tzinfo=UTC)
ROOT = Path(__file__).resolve().parents[2]


def _request(**fields: object) -> GenerationRequest:
    return GenerationRequest.model_validate({"prompt": "a red fox", "seed": 1234, **fields})


async def _run(stage: EnhanceStage, **fields: object):  # type: ignore[no-untyped-def]
    return await stage.run(_request(**fields), generation_id="gen-1", now=NOW)


# 1. A working Ollama


async def test_the_llm_writes_the_prompt(stage: EnhanceStage, fake_ollama: FakeOllama) -> None:
    fake_ollama.reply_with({"prompt": "a red fox in a snowy forest, soft morning light"})
    job = await _run(stage)
    assert job.prompt == "a red fox in a snowy forest, soft morning light"
    assert job.enhancer == "ollama:llama3.2"
    assert (job.fallback, job.dreamed, job.original_prompt) == (False, False, "a red fox")
    assert [c.plugin for c in job.contributions] == ["time_of_day", "holiday", "art_style"]


async def test_the_request_carries_schema_seed_and_model(
    stage: EnhanceStage, fake_ollama: FakeOllama
) -> None:
    await _run(stage, seed=987)
    [sent] = fake_ollama.chat_requests
    assert sent["model"] == "llama3.2"
    assert sent["format"] == PromptReply.model_json_schema()
    assert sent["options"]["seed"] == 987
    assert sent["options"]["temperature"] == 0.8
    assert sent["stream"] is False
    system, user = sent["messages"]
    assert system["role"] == "system" and "JSON" in system["content"]
    assert "a red fox" in user["content"]
    assert "soft morning light" in user["content"]  # the plugins' context reaches the LLM


async def test_markdown_preamble_and_quotes_are_cleaned(
    stage: EnhanceStage, fake_ollama: FakeOllama
) -> None:
    fake_ollama.reply_with(
        {"prompt": 'Here is your prompt:\n\n**"A red fox** in the snow,\n*soft* light."'}
    )
    assert (await _run(stage)).prompt == "A red fox in the snow, soft light."


async def test_long_replies_are_trimmed_to_the_budget(
    stage: EnhanceStage, fake_ollama: FakeOllama
) -> None:
    subject = "a red fox " + "with a remarkably bushy tail " * 20
    details = ", ".join(f"intricate detail {i} in the background" for i in range(150))
    fake_ollama.reply_with({"prompt": f"{subject}, {details}"})
    # FLUX.1: CLIP reads the subject (77 tokens), T5 the whole prompt (256 for schnell).
    schnell = await _run(stage, model="black-forest-labs/FLUX.1-schnell")
    spec = family_for(schnell.model)
    assert spec.subject_tokens is not None
    assert estimate_tokens(schnell.prompt) <= spec.prompt_tokens - spec.prompt_overhead
    assert estimate_tokens(schnell.prompt.split(",")[0]) <= spec.subject_tokens
    assert schnell.prompt.startswith("a red fox with a remarkably bushy tail")
    # FLUX.2 [klein] (the default): one Qwen3 window of 512 tokens, the subject kept whole.
    klein = await _run(stage)
    spec = family_for(klein.model)
    assert (klein.model, spec.subject_tokens) == ("black-forest-labs/FLUX.2-klein-4B", None)
    assert estimate_tokens(klein.prompt) <= spec.prompt_tokens - spec.prompt_overhead
    assert klein.prompt.startswith(subject + ",")  # the whole subject, untouched
    assert len(klein.prompt) > len(schnell.prompt)


async def test_the_llm_is_told_the_family_budget(
    stage: EnhanceStage, fake_ollama: FakeOllama
) -> None:
    fake_ollama.reply_with({"prompt": "a red fox"})
    await _run(stage)
    await _run(stage, model="black-forest-labs/FLUX.1-schnell")
    klein, schnell = (r["messages"][0]["content"] for r in fake_ollama.chat_requests)
    assert "FLUX.2 [klein]" in klein and "at most 166 words in all" in klein
    assert "subject in a short first clause, then" in klein  # no CLIP: no subject limit
    assert "FLUX.1 [schnell]" in schnell and "first clause of at most 25 words" in schnell
    assert "at most 85 words in all" in schnell


async def test_a_dream_without_prompt(stage: EnhanceStage, fake_ollama: FakeOllama) -> None:
    fake_ollama.reply_with({"prompt": "a lantern festival over a misty lake"})
    job = await _run(stage, prompt=None)
    assert (job.dreamed, job.original_prompt, job.fallback) == (True, None, False)
    assert job.prompt == "a lantern festival over a misty lake"
    user = fake_ollama.chat_requests[0]["messages"][1]["content"]
    assert "Dream up" in user and "time_of_day: soft morning light" in user
    assert "Thanksgiving" in user  # the holiday plugin's context


async def test_streaming_answers_work_too(fake_ollama: FakeOllama) -> None:
    import ollama

    fake_ollama.reply_with("a red fox in the snow")
    client = ollama.AsyncClient(host=fake_ollama.url)
    parts = [
        part.message.content
        async for part in await client.chat(model="m", messages=[], stream=True)
    ]
    await client.close()  # type: ignore[no-untyped-call]
    assert "".join(p or "" for p in parts) == "a red fox in the snow" and len(parts) > 2


# 2. A failing Ollama


@pytest.mark.parametrize(
    "behaviour", [not_json(), missing_fields(), broken_body(), http_error(500)]
)
async def test_bad_answers_are_retried_then_fall_back(
    stage: EnhanceStage, fake_ollama: FakeOllama, behaviour: object
) -> None:
    fake_ollama.answer(behaviour)  # type: ignore[arg-type]
    job = await _run(stage)
    assert len(fake_ollama.chat_requests) == 2  # ollama_retries=1
    assert (job.fallback, job.enhancer) == (True, "template")
    assert job.prompt.startswith("a red fox, soft morning light")


@pytest.mark.parametrize("behaviour", [not_json(), http_error(503), broken_body()])
async def test_one_bad_answer_is_retried(
    stage: EnhanceStage, fake_ollama: FakeOllama, behaviour: object
) -> None:
    fake_ollama.enqueue(behaviour)  # type: ignore[arg-type]
    fake_ollama.answer(reply({"prompt": "a red fox, second try"}))
    job = await _run(stage)
    assert (job.prompt, job.fallback) == ("a red fox, second try", False)
    assert len(fake_ollama.chat_requests) == 2


async def test_a_client_error_is_not_retried(stage: EnhanceStage, fake_ollama: FakeOllama) -> None:
    fake_ollama.answer(http_error(404, "model 'llama3.2' not found"))
    job = await _run(stage)
    assert job.fallback is True and len(fake_ollama.chat_requests) == 1


async def test_a_slow_reply_falls_back(stage: EnhanceStage, fake_ollama: FakeOllama) -> None:
    fake_ollama.answer(slow(5.0))
    started = time.monotonic()
    job = await _run(stage)
    assert time.monotonic() - started < 1.5  # ollama_timeout=0.5; a timeout is not retried
    assert job.fallback is True
    assert len(fake_ollama.chat_requests) == 1


async def test_ollama_down_falls_back(stage: EnhanceStage, fake_ollama: FakeOllama) -> None:
    fake_ollama.stop()
    job = await _run(stage)
    assert (job.fallback, job.enhancer) == (True, "template")
    assert job.prompt.startswith("a red fox")


async def test_down_without_fallback_is_retryable(
    make_stage: MakeStage, fake_ollama: FakeOllama
) -> None:
    fake_ollama.stop()
    stage = make_stage(enhance_fallback=False)
    with pytest.raises(DependencyUnavailable) as caught:
        await _run(stage)
    assert caught.value.retryable and caught.value.status == 503
    assert "llama3.2" in caught.value.message


async def test_a_dream_falls_back_to_a_shipped_subject(
    stage: EnhanceStage, fake_ollama: FakeOllama
) -> None:
    fake_ollama.stop()
    job = await _run(stage, prompt=None)
    assert job.dreamed and job.fallback
    assert any(job.prompt.startswith(subject) for subject in DREAM_SUBJECTS)
    again = await _run(stage, prompt=None)
    assert again.prompt == job.prompt


async def test_recovers_when_ollama_is_back(stage: EnhanceStage, fake_ollama: FakeOllama) -> None:
    fake_ollama.stop()
    assert (await _run(stage)).fallback is True
    fake_ollama.start()
    assert (await _run(stage)).fallback is False


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
    assert first == again
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
            f"{model!r} is not served here; served: black-forest-labs/FLUX.2-klein-4B, tiny"
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
