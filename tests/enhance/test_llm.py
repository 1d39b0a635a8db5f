"""OllamaEnhancer: a host with credentials in it never shows them in errors, logs or health."""

from __future__ import annotations

import json
import logging

import pytest

from imagegen.enhance.llm import OllamaEnhancer
from imagegen.errors import DependencyUnavailable
from imagegen.modelspec import family_for
from imagegen.settings import Settings
from tests.fakes.ollama_server import Behaviour, FakeOllama, http_error, slow


def _secret_host(fake: FakeOllama) -> str:
    # Ollama's client drops the user-info and the query, so the fake still answers.
    return fake.url.replace("//", "//user:secret@") + "/?token=secret"


def _enhancer(fake: FakeOllama) -> OllamaEnhancer:
    settings = Settings(ollama_host=_secret_host(fake), ollama_timeout=0.5, ollama_retries=1)
    return OllamaEnhancer(settings, backoff=0.01)


def _logged(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(record.getMessage() for record in caplog.records)


@pytest.mark.parametrize("behaviour", [http_error(503), slow(2.0), None])
async def test_unavailable_error_hides_the_host_credentials(
    fake_ollama: FakeOllama, caplog: pytest.LogCaptureFixture, behaviour: Behaviour | None
) -> None:
    if behaviour is None:
        fake_ollama.stop()  # connection refused
    else:
        fake_ollama.answer(behaviour)
    enhancer = _enhancer(fake_ollama)

    with (
        caplog.at_level(logging.DEBUG),
        pytest.raises(DependencyUnavailable) as caught,
    ):
        await enhancer.write(prompt="a fox", contributions=[], seed=1, spec=family_for("tiny"))
    await enhancer.aclose()

    host = f"http://***@127.0.0.1:{fake_ollama.port}/"
    assert host in caught.value.message
    assert "secret" not in caught.value.message
    assert "secret" not in json.dumps(caught.value.to_dict())
    assert caplog.records and "secret" not in _logged(caplog)


async def test_check_hides_the_host_credentials(fake_ollama: FakeOllama) -> None:
    enhancer = _enhancer(fake_ollama)

    up = await enhancer.check()
    fake_ollama.stop()
    down = await enhancer.check()
    await enhancer.aclose()

    assert up["reachable"] is True and down["reachable"] is False
    assert up["host"] == f"http://***@127.0.0.1:{fake_ollama.port}/"
    assert "secret" not in json.dumps(up) + json.dumps(down)
