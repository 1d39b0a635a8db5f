"""The enhance stage against a fake Ollama on loopback: the real client, real HTTP."""

from __future__ import annotations

import logging
import time

import pytest

from imagegen.enhance import EnhanceStage, PromptReply, estimate_tokens
from imagegen.enhance._template import DREAM_SUBJECTS
from imagegen.errors import DependencyUnavailable
from imagegen.modelspec import family_for
from tests.enhance.conftest import NOW, MakeStage
from tests.enhance.conftest import request as _request
from tests.enhance.conftest import run as _run
from tests.fakes.ollama_server import (
    Behaviour,
    FakeOllama,
    broken_body,
    http_error,
    missing_fields,
    not_json,
    reply,
    slow,
)

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
    # Over every budget, yet within num_predict (Ollama cuts a longer reply: done_reason length).
    details = ", ".join(f"intricate detail {i} in the background" for i in range(60))
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


@pytest.mark.parametrize(
    ("model", "prompt"),
    [
        *(("black-forest-labs/FLUX.1-schnell", p) for p in ("猫" * 300, "x" * 1500, "😀" * 300)),
        (None, "猫" * 600),  # FLUX.2 [klein]: 500 tokens
        (None, "😀" * 600),
    ],
)
async def test_a_long_prompt_without_spaces_is_cut_not_emptied(
    stage: EnhanceStage, model: str | None, prompt: str
) -> None:
    job = await _run(stage, prompt=prompt, enhance=False, width=256, height=256, model=model)
    spec = family_for(job.model)
    assert job.prompt and prompt.startswith(job.prompt.split(",")[0])
    assert estimate_tokens(job.prompt) <= spec.prompt_tokens - spec.prompt_overhead


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
        async for part in await client.chat(
            model="llama3.2", messages=[{"role": "user", "content": "a fox"}], stream=True
        )
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


# 3. What a failure logs: one warning a prompt, none a request the open circuit answers


def _warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [record for record in caplog.records if record.levelno >= logging.WARNING]


@pytest.mark.parametrize(
    ("behaviour", "cause", "retried"),
    [
        (None, "ConnectionError", True),  # connection refused
        (http_error(503), "(status code: 503)", True),
        (http_error(404, "model 'llama3.2' not found"), "ollama pull llama3.2", False),
        (reply({"prompt": "I'm sorry, but I can't help with that."}), "MalformedReply", True),
    ],
)
async def test_a_failed_prompt_is_one_warning_with_its_cause_and_generation_id(
    make_stage: MakeStage,
    fake_ollama: FakeOllama,
    caplog: pytest.LogCaptureFixture,
    behaviour: Behaviour | None,
    cause: str,
    retried: bool,
) -> None:
    """The fallback's warning says it all: the cause, the host (its credentials hidden) and
    the generation; an attempt that is retried is INFO, and the enhancer's error is not logged
    apart from it."""
    if behaviour is None:
        fake_ollama.stop()
    else:
        fake_ollama.answer(behaviour)
    # The user-info is sent as Basic auth, which the fake (no proxy before it) ignores.
    host = fake_ollama.url.replace("//", "//user:secret@") + "/"
    stage = make_stage(ollama_host=host)
    with caplog.at_level(logging.DEBUG, logger="imagegen.enhance"):
        job = await _run(stage)

    assert job.fallback is True
    [warning] = _warnings(caplog)
    said = warning.getMessage()
    assert said.startswith("enhance: ") and said.endswith("; using the template prompt")
    assert cause in said and f"at http://***@127.0.0.1:{fake_ollama.port}/" in said
    assert getattr(warning, "generation_id", None) == "gen-1"
    assert "secret" not in caplog.text
    attempts = [r for r in caplog.records if r.getMessage().startswith("Ollama attempt 1 failed")]
    assert [r.levelname for r in attempts] == (["INFO"] if retried else [])


async def test_requests_the_open_circuit_answers_log_no_warning(
    make_stage: MakeStage, fake_ollama: FakeOllama, caplog: pytest.LogCaptureFixture
) -> None:
    """The opening is one warning; each fallback after it is counted (the metric, the span
    event) and logged at DEBUG, not warned again for the whole outage."""
    fake_ollama.stop()
    stage = make_stage(ollama_breaker_threshold=1, ollama_breaker_cooldown=60)
    with caplog.at_level(logging.DEBUG, logger="imagegen.enhance"):
        await _run(stage)  # fails, and opens the circuit
        assert [r.getMessage().split(" (")[0] for r in _warnings(caplog)] == [
            "circuit ollama: closed -> open",
            "enhance: the LLM is unavailable",
        ]
        caplog.clear()
        jobs = [await stage.run(_request(), generation_id=f"gen-{n}", now=NOW) for n in range(2, 5)]

    assert all(job.fallback for job in jobs) and fake_ollama.chat_requests == []
    assert _warnings(caplog) == []
    said = [r for r in caplog.records if "circuit_open" in r.getMessage()]
    assert [(r.levelname, getattr(r, "generation_id", None)) for r in said] == [
        ("DEBUG", "gen-2"),
        ("DEBUG", "gen-3"),
        ("DEBUG", "gen-4"),
    ]
