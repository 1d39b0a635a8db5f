"""OllamaEnhancer: credentials in the host never shown; whatever Ollama sends, a clear failure."""

from __future__ import annotations

import base64
import json
import logging
import socket
import time

import pytest

from imagegen.enhance.llm import OllamaEnhancer
from imagegen.errors import DependencyUnavailable
from imagegen.modelspec import family_for
from imagegen.settings import Settings
from tests.fakes.ollama_server import Behaviour, FakeOllama, http_error, slow


def _secret_host(fake: FakeOllama) -> str:
    # The user-info is sent as Basic auth, which the fake (no proxy before it) ignores.
    return fake.url.replace("//", "//user:secret@") + "/"


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
    # The prompt's failure is its caller's to log (the stage logs the message checked above);
    # what is logged here (a retry's line) shows no credentials either.
    assert "secret" not in _logged(caplog)


async def test_check_hides_the_host_credentials(fake_ollama: FakeOllama) -> None:
    enhancer = _enhancer(fake_ollama)

    up = await enhancer.check()
    fake_ollama.stop()
    down = await enhancer.check()
    await enhancer.aclose()

    assert up["reachable"] is True and down["reachable"] is False
    assert up["host"] == f"http://***@127.0.0.1:{fake_ollama.port}/"
    assert "secret" not in json.dumps(up) + json.dumps(down)


async def test_check_of_an_ollama_that_never_answers_says_how_long_it_waited() -> None:
    """A port that takes connections but never answers (a hung Ollama) was reported as
    "TimeoutError: TimeoutError", naming neither the wait nor what it waited for."""
    with socket.create_server(("127.0.0.1", 0)) as hung:
        port = hung.getsockname()[1]
        settings = Settings(ollama_host=f"http://127.0.0.1:{port}", ollama_timeout=0.5)
        enhancer = OllamaEnhancer(settings, backoff=0.01)
        info = await enhancer.check()
        await enhancer.aclose()
    assert info["reachable"] is False
    assert info["error"] == "no answer within 0.5s"


@pytest.mark.parametrize(
    ("setting", "sent"),
    [
        (None, None),
        ("30m", "30m"),
        ("1h30m", "1h30m"),
        ("-1", -1),
        ("300", 300),
        ("-0.5", -0.5),
        # Ollama before v0.11.8 cut a number to whole seconds (0.5 was 0: unloaded after each
        # prompt); a duration string is read as written by every version.
        ("0.5", "0.5s"),
        (".9", "0.9s"),
        ("+2.25", "2.25s"),
        ("0.0000001", "0.0000001s"),  # time.ParseDuration takes no exponent (1e-07s)
    ],
)
async def test_keep_alive_is_sent_as_ollama_reads_it(
    fake_ollama: FakeOllama, setting: str | None, sent: object
) -> None:
    # api.Duration in Ollama's api/types.go: a JSON number is seconds (negative: always
    # loaded), a string is a Go duration, which needs a unit.
    fake_ollama.reply_with({"prompt": "a fox in the snow"})
    settings = Settings(ollama_host=fake_ollama.url, ollama_keep_alive=setting)
    enhancer = OllamaEnhancer(settings, backoff=0.01)
    await enhancer.write(prompt="a fox", contributions=[], seed=1, spec=family_for("tiny"))
    await enhancer.aclose()

    (body,) = fake_ollama.chat_requests
    assert body.get("keep_alive") == sent
    assert ("keep_alive" in body) is (setting is not None)


@pytest.mark.parametrize("value", ["", "300x", "5 minutes", "m", "1h-30m"])
def test_a_keep_alive_ollama_cannot_read_is_refused_naming_the_setting(value: str) -> None:
    with pytest.raises(ValueError, match="ollama_keep_alive"):
        Settings(ollama_keep_alive=value)


@pytest.mark.parametrize(
    "body",
    [b"[1]", b"null", b'"x"', b"5", b"[" * 100_000 + b"]" * 100_000],
    ids=["array", "null", "string", "number", "nested"],
)
@pytest.mark.parametrize("status", [200, 500])
async def test_a_body_that_is_no_chat_response_nor_error_object_is_unavailable(
    fake_ollama: FakeOllama, body: bytes, status: int
) -> None:
    """The ollama client reads an error body with ``json.loads(...).get``: an array, a
    string or a number there raised AttributeError (a 500 from enhance), and a body nested
    past the parser's depth RecursionError. Either is Ollama failing: the template answers."""
    fake_ollama.answer(Behaviour(status=status, body=body))
    enhancer = _enhancer(fake_ollama)
    with pytest.raises(DependencyUnavailable) as caught:
        await enhancer.write(prompt="a fox", contributions=[], seed=1, spec=family_for("tiny"))
    assert "unreadable" in caught.value.message or "Malformed" in caught.value.message
    await enhancer.aclose()


async def test_a_reply_trickled_past_the_timeout_ends_the_attempt_there(
    fake_ollama: FakeOllama,
) -> None:
    """httpx's timeout is per read: a reply sent a few bytes at a time, each read in time,
    held one attempt for as long as the sender liked. Each attempt ends at ollama_timeout."""
    fake_ollama.answer(Behaviour(trickle=0.1))  # ~400 bytes: 2.5 s in all
    settings = Settings(ollama_host=fake_ollama.url, ollama_timeout=0.5, ollama_retries=0)
    enhancer = OllamaEnhancer(settings, backoff=0.01)
    started = time.monotonic()
    with pytest.raises(DependencyUnavailable) as caught:
        await enhancer.write(prompt="a fox", contributions=[], seed=1, spec=family_for("tiny"))
    assert time.monotonic() - started < 1.5, "the attempt outlived ollama_timeout"
    assert "no reply within 0.5s" in caught.value.message
    await enhancer.aclose()


async def test_an_error_page_is_logged_cut_on_every_attempt(
    fake_ollama: FakeOllama, caplog: pytest.LogCaptureFixture
) -> None:
    """A proxy before Ollama answers its own 502 page: 200 KB of HTML was logged whole on
    each attempt, and again in the reason of the fallback."""
    page = "<html>\n<head><title>502 Bad Gateway</title></head>\n" + "x" * 200_000 + "</html>"
    fake_ollama.answer(Behaviour(status=502, body=page.encode()))
    enhancer = _enhancer(fake_ollama)
    with (
        caplog.at_level(logging.INFO, logger="imagegen.enhance"),
        pytest.raises(DependencyUnavailable) as caught,
    ):
        await enhancer.write(prompt="a fox", contributions=[], seed=1, spec=family_for("tiny"))
    await enhancer.aclose()

    # The retry, at INFO; the fallback's reason is the error's message, which its caller logs.
    records = [record for record in caplog.records if record.name == "imagegen.enhance"]
    lines = [record.getMessage() for record in records]
    assert [record.levelname for record in records] == ["INFO"], lines
    assert all(len(line) < 600 for line in lines), max(map(len, lines))
    assert len(caught.value.message) < 600
    for said in [*lines, caught.value.message]:
        assert "502 Bad Gateway" in said and "(status code: 502)" in said


@pytest.mark.parametrize(
    ("error", "hinted"),
    [
        ("model 'llama3.2' not found", True),  # server/routes.go, ChatHandler
        ('model "llama3.2" not found, try pulling it first', True),  # handleScheduleError
        ("404 page not found", False),  # not Ollama's chat (a wrong path in the host)
        ("/model/api/chat not found", False),  # a proxy's, of a host with a path in it
        ("no route for /v1/model: not found", False),
    ],
)
async def test_a_model_not_pulled_says_how_to_pull_it(
    fake_ollama: FakeOllama, error: str, hinted: bool
) -> None:
    """In the error, and so in the stage's warning, which logs its message."""
    fake_ollama.answer(http_error(404, error))
    enhancer = _enhancer(fake_ollama)
    with pytest.raises(DependencyUnavailable) as caught:
        await enhancer.write(prompt="a fox", contributions=[], seed=1, spec=family_for("tiny"))
    await enhancer.aclose()

    said = caught.value.message
    assert ("ollama pull llama3.2" in said) is hinted, said


async def test_loading_a_model_not_pulled_says_how_to_pull_it(fake_ollama: FakeOllama) -> None:
    fake_ollama.models.clear()  # a load of it is a 404 (server/routes.go, ChatHandler)
    enhancer = _enhancer(fake_ollama)
    with pytest.raises(DependencyUnavailable, match=r"ollama pull llama3\.2"):
        await enhancer.load()
    await enhancer.aclose()


@pytest.mark.parametrize(
    ("setting", "listed"),
    [
        ("llama3.2", True),
        ("llama3.2:latest", True),
        ("library/llama3.2", True),
        ("registry.ollama.ai/library/llama3.2:latest", True),
        ("https://registry.ollama.ai/library/llama3.2", True),
        ("Llama3.2", True),  # Name.EqualFold: ASCII case aside
        ("llama3.2:1b", False),
        ("someone/llama3.2", False),
        ("example.com/library/llama3.2", False),
    ],
)
async def test_the_model_is_found_under_any_name_ollama_resolves_to_it(
    fake_ollama: FakeOllama, setting: str, listed: bool
) -> None:
    """types/model/name.go, ParseName: a name is filled in from registry.ollama.ai/library/
    ?:latest; ``library/llama3.2`` read as missing, and the warm-up was skipped."""
    settings = Settings(ollama_host=fake_ollama.url, ollama_model=setting, ollama_timeout=0.5)
    enhancer = OllamaEnhancer(settings, backoff=0.01)
    info = await enhancer.check()
    await enhancer.aclose()
    assert info["model_available"] is listed


def _basic(credentials: bytes) -> str:
    return "Basic " + base64.b64encode(credentials).decode()


async def test_user_info_in_the_host_is_sent_as_basic_auth_on_every_request(
    fake_ollama: FakeOllama, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An Ollama behind a proxy that wants Basic auth (nginx's auth_basic): ollama-python
    builds its base URL without the host's user-info, so no request carried it, each was
    answered 401, and every prompt took the template."""
    monkeypatch.setenv("OLLAMA_API_KEY", "a-bearer-token")  # the user-info is the one sent
    wanted = _basic(b"ollama user:p@ss/word")  # percent-encoded in the URL, decoded here
    fake_ollama.authorization = wanted
    host = fake_ollama.url.replace("//", "//ollama%20user:p%40ss%2Fword@")
    settings = Settings(ollama_host=host, ollama_timeout=2, ollama_retries=0)
    enhancer = OllamaEnhancer(settings, backoff=0.01)

    info = await enhancer.check()
    await enhancer.load()
    prompt = await enhancer.write(prompt="a fox", contributions=[], seed=1, spec=family_for("tiny"))
    await enhancer.aclose()

    assert info["reachable"] is True and info["model_available"] is True
    assert prompt.startswith("a red fox")
    assert [r.path for r in fake_ollama.requests] == ["/api/tags", "/api/chat", "/api/chat"]
    assert [r.headers.get("authorization") for r in fake_ollama.requests] == [wanted] * 3


async def test_a_proxy_refusing_the_credentials_never_sees_them_shown(
    fake_ollama: FakeOllama, caplog: pytest.LogCaptureFixture
) -> None:
    fake_ollama.authorization = _basic(b"user:another")
    enhancer = _enhancer(fake_ollama)  # user:secret

    with caplog.at_level(logging.DEBUG), pytest.raises(DependencyUnavailable) as caught:
        await enhancer.write(prompt="a fox", contributions=[], seed=1, spec=family_for("tiny"))
    info = await enhancer.check()
    await enhancer.aclose()

    assert "(status code: 401)" in caught.value.message
    assert info["reachable"] is False and "401" in str(info["error"])
    said = caught.value.message + json.dumps(info) + _logged(caplog)
    assert "secret" not in said and base64.b64encode(b"user:secret").decode() not in said


@pytest.mark.parametrize(
    "host",
    ["http://ollama:11434/?token=abc", "ollama:11434?token=abc", "http://ollama/#x", "ollama?"],
)
def test_a_host_with_a_query_is_refused_as_never_sent(host: str) -> None:
    """ollama-python's _parse_host keeps only the host, port and path: a token in the query
    would never reach the proxy that wants it."""
    with pytest.raises(ValueError, match="user-info") as caught:
        Settings(ollama_host=host)
    assert "ollama_host" in str(caught.value)


@pytest.mark.parametrize(
    ("host", "address", "port"),
    [
        ("127.0.0.1:34001", "127.0.0.1", 34001),
        (":34001", "127.0.0.1", 34001),
        ("0.0.0.0:34001", "0.0.0.0", 34001),
        ("ollama:11434", "ollama", 11434),
        ("ollama", "ollama", 11434),
        ("http://ollama", "ollama", 80),
        ("https://ollama.example/prefix/", "ollama.example", 443),
        ("http://user:secret@[::1]:8080", "::1", 8080),
    ],
)
def test_the_span_names_the_server_the_client_sends_to(host: str, address: str, port: int) -> None:
    """ollama-python reads a host without a scheme as host[:port] (``_parse_host``); read as a
    URL it named no server at all (``127.0.0.1:34001``'s scheme is ``127.0.0.1``)."""
    enhancer = OllamaEnhancer(Settings(ollama_host=host))
    attributes = enhancer._span_attributes(1, family_for("tiny"))
    assert (attributes.get("server.address"), attributes.get("server.port")) == (address, port)
