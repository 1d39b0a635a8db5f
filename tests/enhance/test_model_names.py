"""IMAGEGEN_OLLAMA_MODEL is a name Ollama takes, and the fake Ollama refuses the others as
Ollama does: both held to the cases of Ollama's own tests (types/model/name_test.go)."""

from __future__ import annotations

import httpx
import pytest
from pydantic import ValidationError

from imagegen.settings import MAX_OLLAMA_MODEL_CHARS, Settings
from tests.fakes.ollama_server import FakeOllama

PART80, PART350 = "a" * 80, "h" * 350

# types/model/name_test.go (ollama v0.12.6), testCases: names whose every part is given, so
# that ParseName's defaults change nothing, with their validity.
UPSTREAM = {
    "": False,
    "_why/_the/_lucky:_stiff": True,
    "h/n/m:t": True,
    "host/namespace/model:tag": True,
    f"{PART80}/{PART80}/{PART80}:{PART80}": True,
    f"{PART350}/{PART80}/{PART80}:{PART80}": True,
    "h/nn/mm:t": True,
    "n/m:": False,
    "@t": False,
    "m@d": False,
    "^": False,
    "mm:": False,
    "/nn/mm": False,
    "//": False,
    "//mm": False,
    "hh//": False,
    "//mm:@": False,
    "00@": False,
    "@": False,
    "-hh/nn/mm:tt": False,
    "hh/-nn/mm:tt": False,
    "hh/nn/-mm:tt": False,
    "hh/nn/mm:-tt": False,
    "host:https/namespace/model:tag": True,
    "host/name:space/model:tag": False,
}
# Names that ParseName fills in (registry.ollama.ai/library/?:latest) and so takes, and ones it
# refuses whatever it fills: a space, a part too long, a "." in a namespace, four parts.
TAKEN = [
    "llama3.2",
    "llama3.2:latest",
    "Llama3.2",
    "namespace/model:tag",
    "registry.example.com:5000/namespace/model:tag",
    "hf.co/bartowski/Llama-3.2-3B-Instruct-GGUF:Q4_K_M",
    "https://registry.ollama.ai/library/llama3.2",
    "gpt-oss:20b",
]
REFUSED = [
    "llama 3.2",
    " llama3.2",
    "llama3.2\n",
    "llama3.2:",
    ":latest",
    "ns.x/model",
    "a/b/c/d",
    "llama:3:2",
    "lläma",
    "a" * 81,
]


@pytest.mark.parametrize(("name", "valid"), [*UPSTREAM.items(), *((n, True) for n in TAKEN)])
def test_a_model_name_ollama_takes_is_taken(name: str, valid: bool) -> None:
    if valid and len(name) > MAX_OLLAMA_MODEL_CHARS:  # valid, but no job could name it
        with pytest.raises(ValidationError, match=f"longer than {MAX_OLLAMA_MODEL_CHARS}"):
            Settings(ollama_model=name)
    elif valid:
        assert Settings(ollama_model=name).ollama_model == name
    else:
        with pytest.raises(ValidationError, match="ollama_model"):
            Settings(ollama_model=name)


@pytest.mark.parametrize("name", REFUSED)
def test_a_model_name_ollama_refuses_is_refused_at_start_up(name: str) -> None:
    """ollama-python refuses an empty model itself (its ChatRequest), which was reported as
    Ollama's "unreadable response" and counted against it; Ollama answers any other invalid
    name with a 400 on every prompt."""
    with pytest.raises(ValidationError, match="not a model name Ollama takes"):
        Settings(ollama_model=name)


def test_an_empty_model_name_is_refused_as_empty() -> None:
    with pytest.raises(ValidationError, match="empty: give the model's name"):
        Settings(ollama_model="")


@pytest.mark.parametrize(("name", "valid"), [*UPSTREAM.items(), *((n, False) for n in REFUSED)])
def test_the_fake_refuses_a_name_ollama_refuses_before_looking_it_up(
    name: str, valid: bool
) -> None:
    """server/routes.go, ChatHandler (v0.12.6): ``model.ParseName``, then ``IsValid``, else a
    400 ``model is required``; only then is the model looked up (a 404 for one not pulled)."""
    fake = FakeOllama(version="0.12.6").start()
    try:
        for messages in ([{"role": "user", "content": "a fox"}], []):  # a chat, and a load
            answer = httpx.post(
                f"{fake.url}/api/chat",
                json={"model": name, "messages": messages, "stream": False},
            )
            if valid:
                assert answer.status_code == 404, answer.text  # not pulled
            else:
                assert (answer.status_code, answer.json()) == (
                    400,
                    {"error": "model is required"},
                )
    finally:
        fake.stop()


# internal/modelref/modelref.go (from v0.18.0), ParseRef: a name that has a source suffix
# (":cloud", ":local", a tag ending "-cloud") once its own is taken off names two sources, and
# is refused ("use either :local or :cloud, not both"); a single one is no part of the name.
TWO_SOURCES = ["llama3.2:local:cloud", "llama3.2:cloud:local", "x:cloud-cloud", "x:8b-cloud:local"]
ONE_SOURCE = ["gpt-oss:20b:cloud", "gpt-oss:120b-cloud", "llama3.2:local", "llama3.2:LOCAL"]


@pytest.mark.parametrize("name", TWO_SOURCES)
def test_a_model_name_with_two_sources_is_refused_at_start_up(name: str) -> None:
    with pytest.raises(ValidationError, match="not a model name Ollama takes"):
        Settings(ollama_model=name)


@pytest.mark.parametrize("name", ONE_SOURCE)
def test_a_model_name_with_one_source_is_taken(name: str) -> None:
    assert Settings(ollama_model=name).ollama_model == name
