"""An Ollama response is read up to a cap: a body past it is no chat response, never read whole.

Against the fake Ollama (bodies with a ``Content-Length``, as it sends them, streamed or not)
and a server that sends its body chunked, as Go's ``net/http`` does for a body past its
buffer (``server.go``, ``chunkWriter``): the real client, the enhancer's transport, real HTTP.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from imagegen._http import BodyTooLarge
from imagegen.enhance import EnhanceStage
from imagegen.enhance.llm import MAX_RESPONSE_BYTES, OllamaEnhancer, fallback_reason
from imagegen.errors import DependencyUnavailable
from imagegen.modelspec import family_for
from imagegen.settings import Settings
from tests.enhance.conftest import MakeStage
from tests.enhance.conftest import run as _run
from tests.fakes.ollama_server import Behaviour, FakeOllama

SPEC = family_for("black-forest-labs/FLUX.1-schnell")
# A usable prompt past the cap: read whole, it would be cut to the budget and taken.
HUGE = "a red fox in the snow, " * (2 * MAX_RESPONSE_BYTES // 23)


def chat_response(prompt: str) -> Behaviour:
    """A whole chat response holding ``prompt``, past ``num_predict``, as no Ollama sends it
    (the fake keeps to ``num_predict``): sent as it is, with its ``Content-Length``."""
    message = {"role": "assistant", "content": json.dumps({"prompt": prompt})}
    body = {"model": "llama3.2", "message": message, "done": True, "done_reason": "stop"}
    return Behaviour(body=json.dumps(body).encode())


async def test_a_reply_past_the_cap_falls_back_as_an_unreadable_one(
    stage: EnhanceStage, fake_ollama: FakeOllama
) -> None:
    fake_ollama.answer(chat_response(HUGE))
    job = await _run(stage)
    assert (job.fallback, job.enhancer) == (True, "template")


async def test_a_reply_within_the_cap_is_taken(
    stage: EnhanceStage, fake_ollama: FakeOllama
) -> None:
    fake_ollama.answer(chat_response(HUGE[: MAX_RESPONSE_BYTES // 2]))
    job = await _run(stage)
    assert job.fallback is False and job.prompt.startswith("a red fox in the snow")


async def test_a_reply_past_the_cap_counts_against_ollama(fake_ollama: FakeOllama) -> None:
    """Unlike a reply that holds no prompt, it is no answer of Ollama's: the circuit counts it."""
    fake_ollama.answer(chat_response(HUGE))
    settings = Settings(ollama_host=fake_ollama.url, ollama_retries=0)
    enhancer = OllamaEnhancer(settings.model_copy(update={"ollama_breaker_threshold": 1}))
    try:
        with pytest.raises(DependencyUnavailable) as caught:
            await enhancer.write(prompt="a fox", contributions=[], seed=1, spec=SPEC)
        assert fallback_reason(caught.value) == "malformed_reply"
        assert "over the 1048576 bytes allowed" in caught.value.message
        assert enhancer.breaker.state == "open"
    finally:
        await enhancer.aclose()


async def test_a_streamed_reply_past_the_cap_is_refused(fake_ollama: FakeOllama) -> None:
    fake_ollama.answer(chat_response(HUGE))
    enhancer = OllamaEnhancer(Settings(ollama_host=fake_ollama.url))
    try:
        stream = await enhancer.client.chat(
            model="llama3.2", messages=[{"role": "user", "content": "a fox"}], stream=True
        )
        with pytest.raises(BodyTooLarge):
            async for _ in stream:
                pass
    finally:
        await enhancer.aclose()


class _Chunked(BaseHTTPRequestHandler):
    """Ollama's chat response, sent chunked, far past the cap; records what it got to send."""

    protocol_version = "HTTP/1.1"
    total = 64 * MAX_RESPONSE_BYTES
    sent: list[int]

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:  # /api/tags, for the warm-up: no model
        self._chunked([json.dumps({"models": []}).encode()])

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        head = b'{"model": "llama3.2", "message": {"role": "assistant", "content": "'
        piece = b"a red fox " * 6554  # 64 KiB
        pieces = [head] + [piece] * (self.total // len(piece))
        pieces.append(b'"}, "done": true, "done_reason": "stop"}')
        self._chunked(pieces)

    def _chunked(self, pieces: list[bytes]) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        sent = 0
        try:
            for piece in pieces:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                sent += len(piece)
            self.wfile.write(b"0\r\n\r\n")
        except OSError:  # the client closed the connection
            pass
        finally:
            self.sent.append(sent)


@contextmanager
def _serving(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    """``handler`` served on a free loopback port: its URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture
def chunked() -> Iterator[tuple[str, list[int]]]:
    sent: list[int] = []
    with _serving(type("Handler", (_Chunked,), {"sent": sent})) as url:
        yield url, sent


async def test_a_chunked_reply_is_read_no_further_than_the_cap(
    make_stage: MakeStage, chunked: tuple[str, list[int]]
) -> None:
    url, sent = chunked
    stage = make_stage(ollama_host=url, ollama_retries=0)
    job = await _run(stage)
    assert (job.fallback, job.enhancer) == (True, "template")
    for _ in range(100):  # the handler ends once its write fails
        if sent:
            break
        await __import__("asyncio").sleep(0.05)
    assert sent and sent[0] < _Chunked.total // 4  # the connection was closed, not drained


class _Encoded(BaseHTTPRequestHandler):
    """Ollama's chat response under a ``Content-Encoding`` its body is not in: ``br`` (which
    the enhancer's transport does not decode) or a gzip that is not gzip; counts the chats."""

    protocol_version = "HTTP/1.1"
    coding: str
    body: bytes
    chats: list[int]

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.chats.append(1)
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Encoding", self.coding)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)


@pytest.fixture(params=[("br", b"\x0b\x02\x80hello"), ("gzip", b"not gzip at all")])
def encoded(request: pytest.FixtureRequest) -> Iterator[tuple[str, list[int]]]:
    coding, body = request.param
    chats: list[int] = []
    handler = type("Handler", (_Encoded,), {"coding": coding, "body": body, "chats": chats})
    with _serving(handler) as url:
        yield url, chats


async def test_a_reply_that_cannot_be_decoded_is_an_unreadable_one(
    encoded: tuple[str, list[int]],
) -> None:
    """Counted as a reply past the cap is: a malformed reply by its label, retried, and a
    failure for the circuit (the seed it is retried with: tests/enhance/test_retry_rules.py)."""
    url, chats = encoded
    settings = Settings(ollama_host=url, ollama_retries=2, ollama_temperature=0.8)
    enhancer = OllamaEnhancer(settings.model_copy(update={"ollama_breaker_threshold": 1}))
    try:
        with pytest.raises(DependencyUnavailable) as caught:
            await enhancer.write(prompt="a fox", contributions=[], seed=1, spec=SPEC)
        assert fallback_reason(caught.value) == "malformed_reply"
        assert "unreadable response" in caught.value.message
        assert len(chats) == 3  # a sampled reply is asked for again, as one past the cap
        assert enhancer.breaker.state == "open"
    finally:
        await enhancer.aclose()
