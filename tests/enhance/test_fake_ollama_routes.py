"""The fake Ollama routes requests as Ollama's gin router does (server/routes.go,
GenerateRoutes; gin v1.10.0's gin.go): ``/`` says it runs, a path Ollama has no route for is
gin's plain-text 404, a known path asked with another method its 405 (from v0.6.9), and the
enhance stage's client says nothing of pulling a model for a 404 of a wrong path."""

from __future__ import annotations

import re
import socket

import httpx
import pytest

from imagegen.enhance.llm import OllamaEnhancer
from imagegen.errors import DependencyUnavailable
from imagegen.modelspec import family_for
from imagegen.settings import Settings
from tests.fakes.ollama_server import FakeOllama

NOT_FOUND = (404, "404 page not found", "text/plain")


def _answer(fake: FakeOllama, method: str, path: str) -> tuple[int, str, str]:
    with httpx.Client(base_url=fake.url) as client:
        response = client.request(method, path, json={} if method == "POST" else None)
    return response.status_code, response.text, response.headers["content-type"]


@pytest.mark.parametrize("version", ["0.6.0", "0.7.0", "0.33.0"])
def test_the_root_says_ollama_is_running(version: str) -> None:
    """``r.GET("/", …)`` and ``r.HEAD("/", …)``: ``c.String(http.StatusOK, "Ollama is
    running")``, which probes and people read."""
    with FakeOllama(version=version) as fake:
        assert _answer(fake, "GET", "/") == (
            200,
            "Ollama is running",
            "text/plain; charset=utf-8",
        )
        with httpx.Client(base_url=fake.url) as client:
            head = client.head("/")
            assert head.status_code == 200 and head.content == b""
            assert head.headers["content-length"] == str(len("Ollama is running"))
            for path in ("/api/version", "/api/tags"):  # r.HEAD(...) routes too
                assert client.head(path).status_code == 200, path


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/x"),
        ("POST", "/x"),
        ("DELETE", "/x"),
        ("POST", "/model/api/chat"),  # a host configured with a path
        ("GET", "/model/api/tags"),
        ("GET", "/api/tags/more"),
    ],
)
def test_a_path_with_no_route_is_gins_plain_404(method: str, path: str) -> None:
    with FakeOllama(version="0.33.0") as fake:
        assert _answer(fake, method, path) == NOT_FOUND


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("GET", "/api/chat", "POST"),
        ("DELETE", "/api/chat", "POST"),
        ("POST", "/api/tags", "HEAD, GET"),
        ("PUT", "/", "HEAD, GET"),
        ("POST", "/api/version?x=1", "HEAD, GET"),  # the query aside
    ],
)
def test_a_known_path_asked_with_another_method(method: str, path: str, allow: str) -> None:
    """``r.HandleMethodNotAllowed = true`` from v0.6.9-rc0 (4090aca97): a 405 and an ``Allow``
    header (gin.go, handleHTTPRequest); before, the 404 of a path with no route."""
    with FakeOllama(version="0.7.0") as fake, httpx.Client(base_url=fake.url) as client:
        response = client.request(method, path)
        assert (response.status_code, response.text) == (405, "405 method not allowed")
        assert response.headers["content-type"] == "text/plain"
        assert response.headers["allow"] == allow
    with FakeOllama(version="0.6.8") as fake:
        assert _answer(fake, method, path) == NOT_FOUND


def test_a_connection_goes_on_after_a_head_and_an_error() -> None:
    """No body after a HEAD's head, and the body of a request with no route read: the kept-alive
    connection answers the next request."""
    requests = (
        b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n"
        b"DELETE /x HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}"
        b"GET /api/version HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    with (
        FakeOllama(version="0.7.0") as fake,
        socket.create_connection(("127.0.0.1", fake.port), timeout=5) as connection,
    ):
        connection.sendall(requests)
        received = b""
        while not received.endswith(b'{"version": "0.7.0"}'):
            chunk = connection.recv(4096)
            assert chunk, f"connection closed: {received!r}"
            received += chunk
    statuses = re.findall(rb"HTTP/1\.1 (\d{3}) ", received)
    assert statuses == [b"200", b"404", b"200"]
    assert b"Ollama is running" not in received
    assert b"\r\n\r\n404 page not found" in received


async def test_a_wrong_path_in_the_host_is_no_model_to_pull() -> None:
    """A host with a path (``http://host:11434/model``) sends every call to a path Ollama has
    no route for: gin's 404 names no model, and pulling one would not mend it."""
    with FakeOllama(version="0.33.0") as fake:
        settings = Settings(ollama_host=f"{fake.url}/model", ollama_timeout=2, ollama_retries=0)
        enhancer = OllamaEnhancer(settings, backoff=0.01)
        try:
            with pytest.raises(DependencyUnavailable) as wrote:
                await enhancer.write(
                    prompt="a fox", contributions=[], seed=1, spec=family_for("tiny")
                )
            with pytest.raises(DependencyUnavailable) as loaded:
                await enhancer.load()
        finally:
            await enhancer.aclose()
        assert {request.path for request in fake.requests} == {"/model/api/chat"}
    for said in (wrote.value.message, loaded.value.message):
        assert "404 page not found (status code: 404)" in said, said
        assert "ollama pull" not in said, said
