"""What an LLM answers that is no prompt, and thinking models: never the image's prompt,
and never the same attempt twice."""

from __future__ import annotations

import json

import pytest

from imagegen.enhance import EnhanceStage
from imagegen.enhance.llm import build_messages
from imagegen.modelspec import family_for
from tests.enhance.conftest import MakeStage
from tests.enhance.conftest import run as _run
from tests.fakes.ollama_server import FakeOllama, format_ignored, http_error, reply

THINKING = "Okay, the user wants a fox in the snow, so let me think about the light " * 40


@pytest.mark.parametrize(
    "said",
    [
        "...",  # the placeholder of an example, echoed
        "N/A",
        "I'm sorry, but I can't help with that request.",
        "As an AI language model, I cannot create images, but here is a fox.",
    ],
)
async def test_a_reply_that_describes_no_image_falls_back(
    stage: EnhanceStage, fake_ollama: FakeOllama, said: str
) -> None:
    fake_ollama.reply_with({"prompt": said})
    job = await _run(stage)
    assert (job.fallback, job.enhancer) == (True, "template")
    assert job.prompt.startswith("a red fox")
    assert len(fake_ollama.chat_requests) == 2  # retried once (ollama_retries=1), then given up


@pytest.mark.parametrize(
    "said",
    [
        "一只毛色鲜红的小狐狸蜷缩在白雪覆盖的白桦林中央、柔和的晨光、水彩画风格",
        "Рыжая лиса спит в заснеженном березовом лесу, мягкий утренний свет, акварель",
        "雪の白樺林で眠る赤い狐、柔らかな朝の光、水彩画 fox",
    ],
    ids=["chinese", "russian", "japanese"],
)
async def test_a_reply_not_in_english_is_retried_then_falls_back(
    stage: EnhanceStage, fake_ollama: FakeOllama, said: str
) -> None:
    """The prompt is asked for in English, which FLUX's encoders read: a reply in another
    script was the image's prompt, and CLIP read little of it."""
    fake_ollama.reply_with({"prompt": said})
    job = await _run(stage)
    assert (job.fallback, job.enhancer) == (True, "template")
    assert len(fake_ollama.chat_requests) == 2  # retried once with the next seed
    seeds = [chat["options"]["seed"] for chat in fake_ollama.chat_requests]
    assert seeds == [1234, 1235]


@pytest.mark.parametrize(
    "said",
    [
        "a red fox asleep in a snowy birch forest, soft morning light, watercolor",
        "a portrait of Hokusai (葛飾北斎) at his desk, Mount Fuji (富士山) behind, ukiyo-e",
    ],
    ids=["english", "english-with-names"],
)
async def test_a_request_in_another_language_gets_the_english_reply(
    stage: EnhanceStage, fake_ollama: FakeOllama, said: str
) -> None:
    fake_ollama.reply_with({"prompt": said})
    job = await _run(stage, prompt="一只睡在雪中的红狐狸")
    assert (job.fallback, job.enhancer) == (False, "ollama:llama3.2")
    assert job.prompt.startswith(said.split(",")[0])


def test_the_system_prompt_shows_no_placeholder_to_echo() -> None:
    [system, _] = build_messages("a red fox", [], family_for("tiny"))
    assert "..." not in system["content"] and '"prompt"' in system["content"]


async def test_thinking_is_turned_off(stage: EnhanceStage, fake_ollama: FakeOllama) -> None:
    # A model that can think thinks unless told not to (server/routes.go, ChatHandler), and its
    # thinking spends num_predict before the reply: here all of it.
    fake_ollama.thinking_models.add("llama3.2:latest")
    fake_ollama.answer(reply({"prompt": "a red fox in the snow"}, thinking=THINKING))
    job = await _run(stage)
    assert (job.prompt, job.fallback) == ("a red fox in the snow", False)
    [chat] = fake_ollama.chat_requests
    assert chat["think"] is False


async def test_thinking_written_inline_is_not_the_reply(
    stage: EnhanceStage, fake_ollama: FakeOllama
) -> None:
    fake_ollama.reply_with('<think>\nThe user wants a fox.\n</think>\n\n{"prompt": "a red fox"}')
    job = await _run(stage)
    assert (job.prompt, job.fallback) == ("a red fox", False)


async def test_a_reply_cut_at_num_predict_is_retried_with_the_next_seed(
    stage: EnhanceStage, fake_ollama: FakeOllama
) -> None:
    # Too long for num_predict: the JSON is cut, done_reason "length". The same seed and
    # temperature would sample the same reply: the retry takes the next seed.
    fake_ollama.reply_with({"prompt": "a red fox " * 400})
    job = await _run(stage)
    assert job.fallback is True
    assert [chat["options"]["seed"] for chat in fake_ollama.chat_requests] == [1234, 1235]


async def test_a_malformed_reply_is_not_retried_at_temperature_zero(
    make_stage: MakeStage, fake_ollama: FakeOllama
) -> None:
    fake_ollama.reply_with({"prompt": "N/A"})
    job = await _run(make_stage(ollama_temperature=0.0))
    assert job.fallback is True
    assert len(fake_ollama.chat_requests) == 1  # greedy: another seed samples the same


async def test_a_connection_failure_is_retried_with_the_same_seed(
    stage: EnhanceStage, fake_ollama: FakeOllama
) -> None:
    fake_ollama.enqueue(http_error(503))
    fake_ollama.reply_with({"prompt": "a red fox, second try"})
    job = await _run(stage)
    assert job.fallback is False
    assert [chat["options"]["seed"] for chat in fake_ollama.chat_requests] == [1234, 1234]


FOX = "a red fox curled in fresh snow, soft dawn light"


@pytest.mark.parametrize(
    "written",
    [
        f'```json\n{{"prompt": "{FOX}"}}\n```',
        f'Here is your prompt:\n{{"prompt": "{FOX}"}}',
        f'{{"prompt": "{FOX}"}}\nLet me know if you want changes!',
        f'Here is your prompt in {{JSON}}:\n```\n{{"prompt": "{FOX}"}}\n```\nEnjoy!',
    ],
    ids=["fenced", "preamble", "sign-off", "braces-before-the-fence"],
)
async def test_json_that_ollama_did_not_constrain_is_read(
    make_stage: MakeStage, fake_ollama: FakeOllama, written: str
) -> None:
    """Ollama v0.12.4 to v0.31.1 samples a model that can think and has a built-in parser
    without ``format`` while no thinking text has appeared, and with ``think: false`` none
    does (server/routes.go, ChatHandler): the model writes JSON as it likes. Read as
    malformed, each such reply was retried, fell back, and three in a row opened the circuit
    of an Ollama that was answering."""
    fake_ollama.version = "0.12.4"
    fake_ollama.models.append("qwen3:latest")
    fake_ollama.thinking_models.add("qwen3:latest")
    fake_ollama.parsers["qwen3:latest"] = "qwen3-thinking"
    fake_ollama.answer(format_ignored(written, {"prompt": "constrained"}))
    stage = make_stage(ollama_model="qwen3", ollama_breaker_threshold=3)
    for _ in range(3):
        job = await _run(stage)
        assert (job.prompt, job.fallback, job.enhancer) == (FOX, False, "ollama:qwen3")
    assert len(fake_ollama.chat_requests) == 3, "one attempt each"
    assert stage.enhancer.breaker.state == "closed"


async def test_a_prompt_that_is_itself_the_json_object_is_unwrapped(
    stage: EnhanceStage, fake_ollama: FakeOllama
) -> None:
    fake_ollama.reply_with({"prompt": json.dumps({"prompt": FOX})})
    job = await _run(stage)
    assert (job.prompt, job.fallback) == (FOX, False)
