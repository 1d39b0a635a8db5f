"""How a failed Ollama attempt is retried: a body that is no chat response as Ollama failing
(the same seed, at any temperature), and a 429 or 503 after its ``Retry-After``, within the
write's deadline."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler
from typing import Any

import pytest

from imagegen.enhance.llm import MAX_RESPONSE_BYTES, OllamaEnhancer
from imagegen.errors import DependencyUnavailable
from imagegen.modelspec import family_for
from imagegen.settings import Settings
from tests.fakes.loopback import LoopbackServer
from tests.fakes.ollama_server import DEFAULT_PROMPT, Behaviour, FakeOllama, broken_body, reply

SPEC = family_for("tiny")

# 1. A body that is no chat response

UNREADABLE = {
    "proxy-page": Behaviour(body=b"<html><body>502 Bad Gateway</body></html>"),
    "json-cut-short": Behaviour(body=b'{"model": "llama3.2", "message": {"role": "assis'),
    "not-utf-8": Behaviour(body=b'{"model": "\xff\xfe\x80"}'),
    "no-chat-response": broken_body(),
    "ndjson": Behaviour(body=b'{"model": "llama3.2", "done": false}\n{"done": true}\n'),
    "past-the-cap": Behaviour(body=b" " * (MAX_RESPONSE_BYTES + 1)),
}


async def _write(settings: Settings, seed: int = 7) -> str:
    enhancer = OllamaEnhancer(settings, backoff=0.01)
    try:
        return await enhancer.write(prompt="a fox", contributions=[], seed=seed, spec=SPEC)
    finally:
        await enhancer.aclose()


@pytest.mark.parametrize("body", UNREADABLE.values(), ids=UNREADABLE.keys())
async def test_an_unreadable_body_is_retried_at_temperature_zero(
    fake_ollama: FakeOllama, body: Behaviour
) -> None:
    """Ollama (or a proxy before it) failed, as with a 5xx: the model wrote nothing, so the
    greedy sampling that makes another seed useless is no reason not to ask again."""
    fake_ollama.enqueue(body)
    fake_ollama.answer(reply())
    settings = Settings(ollama_host=fake_ollama.url, ollama_temperature=0)
    assert await _write(settings) == DEFAULT_PROMPT
    assert len(fake_ollama.chat_requests) == 2


@pytest.mark.parametrize("body", UNREADABLE.values(), ids=UNREADABLE.keys())
async def test_an_unreadable_body_is_retried_with_the_same_seed(
    fake_ollama: FakeOllama, body: Behaviour
) -> None:
    fake_ollama.enqueue(body)
    fake_ollama.answer(reply())
    settings = Settings(ollama_host=fake_ollama.url, ollama_temperature=0.8)
    assert await _write(settings) == DEFAULT_PROMPT
    assert [chat["options"]["seed"] for chat in fake_ollama.chat_requests] == [7, 7]


async def test_a_reply_the_model_wrote_still_takes_the_next_seed(fake_ollama: FakeOllama) -> None:
    fake_ollama.enqueue(reply("Sure! A fox, in the snow, I think?"), broken_body())
    fake_ollama.answer(reply())
    settings = Settings(ollama_host=fake_ollama.url, ollama_temperature=0.8)
    assert await _write(settings) == DEFAULT_PROMPT
    assert [chat["options"]["seed"] for chat in fake_ollama.chat_requests] == [7, 8, 8]


async def test_unreadable_bodies_every_time_fail_the_prompt_for_the_circuit(
    fake_ollama: FakeOllama,
) -> None:
    fake_ollama.answer(UNREADABLE["proxy-page"])
    settings = Settings(
        ollama_host=fake_ollama.url, ollama_temperature=0, ollama_breaker_threshold=1
    )
    enhancer = OllamaEnhancer(settings, backoff=0.01)
    try:
        with pytest.raises(DependencyUnavailable) as caught:
            await enhancer.write(prompt="a fox", contributions=[], seed=7, spec=SPEC)
        assert "unreadable response" in caught.value.message
        assert len(fake_ollama.chat_requests) == 3  # ollama_retries=2, as for a 5xx
        assert enhancer.breaker.state == "open"
    finally:
        await enhancer.aclose()


# 2. Retry-After


def _chat_response(prompt: str) -> bytes:
    """A whole non-streamed chat response (Ollama's api/types.go, ChatResponse)."""
    message = {"role": "assistant", "content": json.dumps({"prompt": prompt})}
    return json.dumps(
        {"model": "llama3.2", "message": message, "done": True, "done_reason": "stop"}
    ).encode()


class _Busy(BaseHTTPRequestHandler):
    """Ollama behind a proxy that sheds load: each chat answered with the next of ``script``
    (a status and its headers; 200: a chat response), timed as it arrives.

    RFC 9110, section 10.2.3: ``Retry-After`` on a 503 is delay-seconds or an HTTP-date; RFC
    6585, section 4: a 429 may carry one too.
    """

    protocol_version = "HTTP/1.1"
    script: list[tuple[int, dict[str, str]]]
    arrived: list[float]
    lock: threading.Lock
    delay = 0.0  # seconds before each answer that is no chat response

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        with self.lock:
            self.arrived.append(time.monotonic())
            status, headers = self.script.pop(0) if self.script else (200, {})
        if status != 200:
            time.sleep(self.delay)
        body = _chat_response(DEFAULT_PROMPT) if status == 200 else b'{"error": "busy"}'
        self.send_response(status)
        for name, value in {"Content-Type": "application/json", **headers}.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def _serve(handler: type[BaseHTTPRequestHandler]) -> LoopbackServer:
    return LoopbackServer(handler, name="busy-ollama").start()  # a free port of the system's


@pytest.fixture
def busy() -> Iterator[tuple[str, list[tuple[int, dict[str, str]]], list[float]]]:
    """The URL of a :class:`_Busy`, its script (to fill) and its arrival times."""
    script: list[tuple[int, dict[str, str]]] = []
    arrived: list[float] = []
    attributes = {"script": script, "arrived": arrived, "lock": threading.Lock()}
    server = _serve(type("Handler", (_Busy,), attributes))
    try:
        yield server.url, script, arrived
    finally:
        server.stop()


Busy = tuple[str, list[tuple[int, dict[str, str]]], list[float]]


async def test_retry_after_is_waited_before_the_next_attempt(busy: Busy) -> None:
    url, script, arrived = busy
    script.append((503, {"Retry-After": "2"}))
    assert await _write(Settings(ollama_host=url)) == DEFAULT_PROMPT  # backoff: 0.01 s
    assert len(arrived) == 2
    assert arrived[1] - arrived[0] >= 1.95  # the clock's and the loop's slack


async def test_the_backoff_is_waited_where_retry_after_is_shorter(busy: Busy) -> None:
    url, script, arrived = busy
    script.append((429, {"Retry-After": "0"}))
    enhancer = OllamaEnhancer(Settings(ollama_host=url), backoff=0.5)
    try:
        await enhancer.write(prompt="a fox", contributions=[], seed=7, spec=SPEC)
    finally:
        await enhancer.aclose()
    assert len(arrived) == 2 and arrived[1] - arrived[0] >= 0.45


def _in(seconds: float) -> str:
    return format_datetime(datetime.now(UTC) + timedelta(seconds=seconds), usegmt=True)


@pytest.mark.parametrize(
    ("status", "retry_after"),
    [(503, lambda: "3600"), (429, lambda: _in(3600))],
    ids=["seconds", "http-date"],
)
async def test_a_retry_after_past_the_deadline_falls_back_at_once(
    busy: Busy, status: int, retry_after: Callable[[], str]
) -> None:
    """Waiting until the deadline cuts the wait short only holds the request: the write ends
    at once, as it would then."""
    url, script, arrived = busy
    script.append((status, {"Retry-After": retry_after()}))
    settings = Settings(ollama_host=url, ollama_timeout=5)  # a deadline of 15 s and the waits
    started = time.monotonic()
    with pytest.raises(DependencyUnavailable) as caught:
        await _write(settings)
    assert time.monotonic() - started < 1.0
    assert len(arrived) == 1
    said = caught.value.message.partition(f"(status code: {status}); Retry-After: ")[2]
    assert said in ("3600s", "3599s")  # a date: whole seconds


async def test_a_retry_after_within_the_deadline_is_waited_to_a_second_try(busy: Busy) -> None:
    """Only the wait that reaches the deadline ends the write: one that leaves time is
    waited, though longer than any backoff."""
    url, script, arrived = busy
    script.append((503, {"Retry-After": _in(2)}))  # a date: whole seconds, 1 to 2 s from now
    assert await _write(Settings(ollama_host=url, ollama_timeout=5)) == DEFAULT_PROMPT
    assert len(arrived) == 2 and arrived[1] - arrived[0] >= 0.9


async def test_a_wait_that_leaves_no_whole_attempt_falls_back_at_once(busy: Busy) -> None:
    """A wait that ends before the deadline but leaves the next attempt less than
    ``ollama_timeout`` is not waited either: that attempt would be cut short and its end told
    as a reply slower than ``ollama_timeout``. The 503 that asked for the wait is the reason."""
    url, script, arrived = busy
    # A deadline of 15.03 s (three attempts of 5 s, waits of 0.01 s and 0.02 s): a wait of
    # 14 s ends within it, leaving about a second for the second attempt.
    script.append((503, {"Retry-After": "14"}))
    started = time.monotonic()
    with pytest.raises(DependencyUnavailable) as caught:
        await _write(Settings(ollama_host=url, ollama_timeout=5))
    assert time.monotonic() - started < 1.0
    assert len(arrived) == 1
    assert "(status code: 503); Retry-After: 14s" in caught.value.message
    assert "no reply within" not in caught.value.message


async def test_a_backoff_leaves_each_retry_its_whole_timeout() -> None:
    """The deadline counts every attempt at ``ollama_timeout`` and every backoff's wait, so
    attempts that fail late, each most of its timeout, are retried to the last all the same."""
    script = [(503, {}), (503, {}), (200, {})]
    arrived: list[float] = []
    attributes = {"script": script, "arrived": arrived, "lock": threading.Lock(), "delay": 0.8}
    server = _serve(type("Handler", (_Busy,), attributes))
    try:
        settings = Settings(ollama_host=server.url, ollama_timeout=1, ollama_retries=2)
        enhancer = OllamaEnhancer(settings, backoff=0.5)  # waits of 0.5 s and 1 s
        try:
            prompt = await enhancer.write(prompt="a fox", contributions=[], seed=7, spec=SPEC)
        finally:
            await enhancer.aclose()
    finally:
        server.stop()
    assert prompt == DEFAULT_PROMPT
    assert len(arrived) == 3
