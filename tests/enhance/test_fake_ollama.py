"""The fake Ollama keeps to the rules of Ollama's Go HTTP server: connections, loads,
thinking and num_predict."""

from __future__ import annotations

import socket
from typing import Any

import httpx
import pytest

from tests.fakes.ollama_server import FakeOllama, format_ignored, http_error, reply

REQUEST = b"GET /api/version HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


def _answer(connection: socket.socket) -> bytes:
    """One response: its head, then exactly Content-Length bytes of body."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = connection.recv(4096)
        assert chunk, f"connection closed mid-answer: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        body += connection.recv(4096)
    return head


def test_a_connection_serves_request_after_request_until_stopped() -> None:
    fake = FakeOllama().start()
    try:
        with socket.create_connection(("127.0.0.1", fake.port), timeout=5) as connection:
            for _ in range(2):
                connection.sendall(REQUEST)
                assert _answer(connection).startswith(b"HTTP/1.1 200")
            fake.stop()
            assert connection.recv(4096) == b"", "a stopped Ollama answers no kept-alive connection"
    finally:
        fake.stop()
    assert [r.path for r in fake.requests] == ["/api/version", "/api/version"]


def test_a_chat_without_messages_loads_the_model_as_ollamas_chat_handler_does() -> None:
    """server/routes.go, ChatHandler: an unknown model is a 404; no messages loads the model
    (``done_reason: "load"``, one JSON object), or unloads it with keep_alive 0; the first chat
    of a model not loaded loads it too."""
    fake = FakeOllama().start()
    try:
        with httpx.Client(base_url=fake.url) as client:
            missing = client.post("/api/chat", json={"model": "mistral", "messages": []})
            assert missing.status_code == 404
            assert missing.json() == {"error": "model 'mistral' not found"}
            # A chat for it too, before anything is scheduled: nothing is loaded, no reply.
            asked = _chat(client, "Mistral")
            assert asked.status_code == 404
            assert asked.json() == {"error": "model 'Mistral' not found"}
            assert fake.model_loads == []

            loaded = client.post("/api/chat", json={"model": "llama3.2", "messages": []})
            assert loaded.status_code == 200
            assert loaded.json()["done_reason"] == "load"
            assert loaded.json()["message"] == {"role": "assistant", "content": ""}
            chat = {"model": "llama3.2", "messages": [{"role": "user", "content": "a fox"}]}
            assert client.post("/api/chat", json={**chat, "stream": False}).status_code == 200
            assert fake.model_loads == [("llama3.2:latest", "load")], "loaded once"

            unload = {"model": "llama3.2:latest", "messages": [], "keep_alive": "0s"}
            assert client.post("/api/chat", json=unload).json()["done_reason"] == "unload"
            assert client.post("/api/chat", json={**chat, "stream": False}).status_code == 200
            assert fake.model_loads[-1] == ("llama3.2:latest", "chat"), "the chat loads it"

            fake.stop()  # the process ends: it comes back with nothing loaded
            fake.start()
            fake.loading = http_error(500, "llama runner process has terminated")
            failed = client.post("/api/chat", json={"model": "llama3.2", "messages": []})
            assert failed.status_code == 500
            assert failed.json() == {"error": "llama runner process has terminated"}
            assert len(fake.model_loads) == 2
    finally:
        fake.stop()


@pytest.mark.parametrize(
    ("version", "load_unloads", "chat_unloads"),
    [
        # api/types.go, Duration.UnmarshalJSON: a number cut to whole seconds before v0.11.8;
        # server/routes.go, ChatHandler: int(req.KeepAlive.Seconds()) == 0 expires the runner
        # of a load before v0.11.8 and from v0.12.0 until v0.12.4.
        ("0.6.0", {0, 0.5, "0s", "500ms", "0.9s"}, {0, 0.5, "0s"}),
        ("0.11.8", {0, "0s"}, {0, "0s"}),
        ("0.12.0", {0, 0.5, "0s", "500ms", "0.9s"}, {0, "0s"}),
        ("0.12.4", {0, "0s"}, {0, "0s"}),
    ],
)
def test_keep_alive_is_read_as_ollama_at_each_version_reads_it(
    version: str, load_unloads: set[object], chat_unloads: set[object]
) -> None:
    fake = FakeOllama(version=version).start()
    try:
        with httpx.Client(base_url=fake.url) as client:
            for keep_alive in (0, 0.5, 1.5, -0.5, "0s", "500ms", "0.9s", "1s", "-500ms"):
                load = {"model": "llama3.2", "messages": [], "keep_alive": keep_alive}
                answer = client.post("/api/chat", json=load).json()["done_reason"]
                assert (answer == "unload") is (keep_alive in load_unloads), keep_alive
                assert _chat(client, "llama3.2", keep_alive=keep_alive).status_code == 200
                loads = len(fake.model_loads)
                assert _chat(client, "llama3.2").status_code == 200
                reloaded = len(fake.model_loads) > loads
                assert reloaded is (keep_alive in chat_unloads), keep_alive
    finally:
        fake.stop()


def _chat(client: httpx.Client, model: str, **fields: Any) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "a fox"}], "stream": False}
    return client.post("/api/chat", json={**body, **fields})


def test_think_is_read_as_ollamas_chat_handler_reads_it() -> None:
    """api/types.go, ThinkValue: a bool or "high", "medium", "low"; server/routes.go,
    ChatHandler: unset is on for a model that can think, and on is refused for one that
    cannot."""
    fake = FakeOllama(models=("llama3.2:latest", "qwen3:latest")).start()
    fake.thinking_models.add("qwen3:latest")
    fake.answer(reply({"prompt": "a fox"}, thinking="hmm, a fox"))
    try:
        with httpx.Client(base_url=fake.url) as client:
            for think in (None, True, "high"):
                fields = {} if think is None else {"think": think}
                thought = _chat(client, "qwen3", **fields).json()
                assert thought["message"]["thinking"] == "hmm, a fox"
            for model in ("qwen3", "llama3.2"):
                plain = _chat(client, model, think=False).json()
                assert plain["message"] == {"role": "assistant", "content": '{"prompt": "a fox"}'}
            assert "thinking" not in _chat(client, "llama3.2").json()["message"]
            refused = _chat(client, "llama3.2", think=True)
            assert refused.status_code == 400
            assert refused.json() == {"error": '"llama3.2" does not support thinking'}
            for bad in ("max", 3):
                assert _chat(client, "qwen3", think=bad).status_code == 400
    finally:
        fake.stop()


def test_think_is_read_with_the_body_before_the_model_is_looked_up() -> None:
    """server/routes.go, ChatHandler (ollama fb3076099): ``ShouldBindJSON`` reads ``think``
    (api/types.go, ThinkValue.UnmarshalJSON) before ``getModel``, so a bad one is a 400 even
    for a model Ollama does not have, or a load; a model that cannot think is refused thinking
    after the lookup and an unload, but before ``scheduleRunner``: nothing loads or answers."""
    fake = FakeOllama(models=("llama3.2:latest",)).start()
    fake.enqueue(reply("kept for the next chat"))
    try:
        with httpx.Client(base_url=fake.url) as client:
            unknown = _chat(client, "mistral", think="max")
            assert unknown.status_code == 400
            assert unknown.json() == {
                "error": 'invalid think value: "max" (must be "high", "medium", "low", true, '
                "or false)"
            }
            assert _chat(client, "mistral", think=3).json() == {
                "error": 'think must be a boolean or string ("high", "medium", "low", true, '
                "or false)"
            }
            load = {"model": "llama3.2", "messages": []}
            assert client.post("/api/chat", json={**load, "think": "max"}).status_code == 400
            assert _chat(client, "mistral", think=True).status_code == 404, "then the model"

            for refused in (
                _chat(client, "llama3.2", think="low"),
                client.post("/api/chat", json={**load, "think": True}),
            ):
                assert refused.status_code == 400
                assert refused.json() == {"error": '"llama3.2" does not support thinking'}
            assert fake.model_loads == [], "refused before the model is scheduled"
            unload = {**load, "keep_alive": 0, "think": True}
            assert client.post("/api/chat", json=unload).json()["done_reason"] == "unload"

            kept = _chat(client, "llama3.2", think=False).json()
            assert kept["message"]["content"] == "kept for the next chat", "nothing generated"
    finally:
        fake.stop()


def test_think_max_is_accepted_from_the_release_that_added_it() -> None:
    """api/types.go, ThinkValue.UnmarshalJSON: "max" from c2ebb4d57 (v0.21.3-rc0, released in
    v0.22.0), a level like the others: thinking on, checked against no model but whether it
    can think."""
    fake = FakeOllama(models=("llama3.2:latest", "gpt-oss:20b"), version="0.21.2").start()
    fake.thinking_models.add("gpt-oss:20b")
    fake.answer(reply({"prompt": "a fox"}, thinking="hmm, a fox"))
    try:
        with httpx.Client(base_url=fake.url) as client:
            assert _chat(client, "gpt-oss:20b", think="max").status_code == 400
            for version in ("0.21.3-rc0", "0.22.0", "0.33.0-rc2"):
                fake.version = version
                thought = _chat(client, "gpt-oss:20b", think="max").json()
                assert thought["message"]["thinking"] == "hmm, a fox"
                refused = _chat(client, "llama3.2", think="max")
                assert refused.json() == {"error": '"llama3.2" does not support thinking'}
                assert _chat(client, "gpt-oss:20b", think="MAX").json() == {
                    "error": 'invalid think value: "MAX" (must be "high", "medium", "low", '
                    '"max", true, or false)'
                }
    finally:
        fake.stop()


def test_thinking_and_the_reply_share_num_predict() -> None:
    """runner/ollamarunner/runner.go: a sequence ends once numPredicted >= numPredict, with
    done_reason "length"; the thinking is generated first, from the same budget."""
    fake = FakeOllama(models=("qwen3:latest",)).start()
    fake.thinking_models.add("qwen3:latest")
    fake.answer(reply("one two three four", thinking="a b c d e f"))
    try:
        with httpx.Client(base_url=fake.url) as client:

            def answer(num_predict: int, **fields: Any) -> Any:
                options = {"num_predict": num_predict}
                return _chat(client, "qwen3", options=options, **fields).json()

            spent = answer(4)
            assert spent["message"] == {"role": "assistant", "content": "", "thinking": "a b c d"}
            assert (spent["done_reason"], spent["eval_count"]) == ("length", 4)
            cut = answer(8)
            assert cut["message"]["content"] == "one two"
            assert (cut["done_reason"], cut["eval_count"]) == ("length", 8)
            whole = answer(10)
            assert (whole["done_reason"], whole["eval_count"]) == ("stop", 10)
            unlimited = answer(-1, think=False)
            assert unlimited["message"] == {"role": "assistant", "content": "one two three four"}
            assert unlimited["done_reason"] == "stop"
    finally:
        fake.stop()


FENCED = '```json\n{"prompt": "a fox"}\n```'


def test_format_is_applied_as_ollamas_chat_handler_applies_it() -> None:
    """server/routes.go, ChatHandler: a model that can think and has a built-in parser is
    sampled with ``currentFormat = nil`` until thinking text is followed by content, so with
    think off its reply is not constrained; ``forceImmediate`` (v0.21.1 gemma4, v0.31.2 every
    parser with thinking support) applies it at once; before v0.12.4 it always applied."""
    models = ("llama3.2:latest", "qwen3:latest", "gemma4:latest", "hybrid:latest")
    fake = FakeOllama(models=models).start()
    fake.thinking_models.update(models[1:])
    fake.parsers.update(
        {"qwen3:latest": "qwen3-thinking", "gemma4:latest": "gemma4", "hybrid:latest": "qwen3"}
    )
    fake.answer(format_ignored(FENCED, {"prompt": "a fox"}))
    schema = {"type": "object", "properties": {"prompt": {"type": "string"}}}
    try:
        with httpx.Client(base_url=fake.url) as client:

            def content(version: str, model: str, **fields: Any) -> str:
                fake.version = version
                answer = _chat(client, model, **fields).json()
                return str(answer["message"]["content"])

            constrained = '{"prompt": "a fox"}'
            assert content("0.12.3", "qwen3", format=schema, think=False) == constrained
            assert content("0.12.4", "qwen3", format=schema, think=False) == FENCED
            assert content("0.12.4", "llama3.2", format=schema, think=False) == constrained
            assert content("0.12.4", "qwen3", think=False) == FENCED, "no format asked"
            assert content("0.21.1", "gemma4", format=schema, think=False) == constrained
            assert content("0.21.1", "qwen3", format=schema, think=False) == FENCED
            assert content("0.31.2", "qwen3", format=schema, think=False) == constrained
            assert content("0.31.2", "hybrid", format=schema, think=False) == FENCED
            fake.answer(format_ignored(FENCED, {"prompt": "a fox"}, thinking="hmm"))
            # Thinking text, then content: sampled again with the format.
            assert content("0.12.4", "qwen3", format=schema) == constrained
            fake.answer(format_ignored(FENCED, {"prompt": "a fox"}))
            assert content("0.12.4", "qwen3", format=schema) == FENCED, "thought nothing"
    finally:
        fake.stop()


def test_model_names_resolve_as_ollamas_parse_name() -> None:
    """types/model/name.go: ParseName fills host, namespace and tag from
    registry.ollama.ai/library/?:latest; EqualFold compares them case-insensitively."""
    fake = FakeOllama(models=("llama3.2:latest", "someone/mistral:7b")).start()
    try:
        with httpx.Client(base_url=fake.url) as client:
            for name in (
                "llama3.2",
                "library/llama3.2",
                "registry.ollama.ai/library/LLAMA3.2:latest",
                "someone/mistral:7b",
                "registry.ollama.ai/someone/mistral:7b",
            ):
                assert _chat(client, name).status_code == 200, name
            for name in (
                "llama3.2:1b",
                "someone/llama3.2",
                "mistral:7b",
                "other.ai/library/llama3.2",
            ):
                assert _chat(client, name).status_code == 404, name
    finally:
        fake.stop()


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (b"", "missing request body"),  # ShouldBindJSON: io.EOF
        (b"  \n", "missing request body"),
        (b"<html>", "invalid character '<' looking for beginning of value"),
        (b'{"model": "llama3.2"', "unexpected EOF"),
        (b"[]", "json: cannot unmarshal array into Go value of type api.ChatRequest"),
        (
            b'{"model": 5, "messages": []}',
            "json: cannot unmarshal number into Go struct field ChatRequest.model of type string",
        ),
        (b"null", "model is required"),  # decodes to an empty request
        (b'{"messages": []}', "model is required"),
        (b'{"model": "", "messages": [{"role": "user", "content": "a fox"}]}', "model is required"),
        (b'{"model": "llama 3.2", "messages": []}', "model is required"),
    ],
)
def test_a_malformed_chat_is_a_400_before_the_model_is_looked_up(body: bytes, error: str) -> None:
    """server/routes.go, ChatHandler: the body is bound (an empty one is "missing request
    body", one Go's decoder refuses is its error), then the name is parsed ("model is
    required" where it is no valid name), all before the model is looked up: none of these is
    the 404 of a model not pulled."""
    fake = FakeOllama(version="0.12.6").start()
    try:
        answer = httpx.post(
            f"{fake.url}/api/chat", content=body, headers={"Content-Type": "application/json"}
        )
    finally:
        fake.stop()
    assert (answer.status_code, answer.json()) == (400, {"error": error})
    assert fake.model_loads == []


CHAT = b'{"model": "llama3.2", "messages": [{"role": "user", "content": "a fox"}], "stream": false}'


@pytest.mark.parametrize(
    "body",
    [
        CHAT + b" trailing words",
        CHAT + b'{"model": 5}',
        CHAT + b"\n]",
        b"\r\n\t " + CHAT,
        CHAT.replace(b"a fox", b"a f\xffox"),  # invalid UTF-8 in a string: U+FFFD
    ],
    ids=["words", "a second value", "a stray bracket", "white space first", "invalid UTF-8"],
)
def test_a_chat_is_bound_from_its_first_json_value_alone(body: bytes) -> None:
    """gin's binding/json.go, ``decodeJSON``: ``json.NewDecoder(r).Decode`` reads the first
    JSON value, leaves what follows unread, and takes invalid UTF-8 in a string; Ollama answers
    the chat."""
    fake = FakeOllama().start()
    try:
        answer = httpx.post(
            f"{fake.url}/api/chat", content=body, headers={"Content-Type": "application/json"}
        )
    finally:
        fake.stop()
    assert answer.status_code == 200, answer.text
    assert fake.model_loads == [("llama3.2:latest", "chat")]


@pytest.mark.parametrize(
    "model",
    [
        "llama3.2:local:cloud",
        "llama3.2:cloud:local",
        "x:cloud-cloud",
        "x:8b-cloud:local",
        " y:local:LOCAL ",
    ],
)
def test_from_v0_18_a_name_with_two_sources_is_refused(model: str) -> None:
    """internal/modelref/modelref.go, ``ParseRef``: a name that still has a source suffix
    (``:cloud``, ``:local``, a ``-cloud`` tag) once its own is taken off is
    ``ErrConflictingSourceSuffix``, answered as it is (server/routes.go,
    ``writeModelRefParseError``); before v0.18.0 such a name is looked up as any other."""
    fake = FakeOllama(version="0.18.0", models=("x:8b", "x:cloud", "llama3.2:latest")).start()
    try:
        with httpx.Client(base_url=fake.url) as client:
            answer = _chat(client, model)
            assert (answer.status_code, answer.json()) == (
                400,
                {"error": f'use either :local or :cloud, not both: "{model.strip()}"'},
            )
            for taken in ("x:8b-cloud", "x:8b:cloud", "llama3.2:local"):
                assert _chat(client, taken).status_code == 200, taken
        fake.version = "0.17.7"
        with httpx.Client(base_url=fake.url) as client:
            assert _chat(client, "x:cloud-cloud").status_code == 404  # a tag, not pulled
    finally:
        fake.stop()


@pytest.mark.parametrize(
    ("model", "error"),
    [("", "model is required"), ("   ", "model is required"), ("llama 3.2", "invalid model name")],
)
def test_from_v0_18_only_an_empty_name_is_said_to_be_required(model: str, error: str) -> None:
    """server/routes.go at 799e51d41 (v0.18.0): ``parseAndValidateModelRef`` trims the name
    (internal/modelref, ``ParseRef``: "model is required" where nothing is left), and
    ``writeModelRefParseError`` answers an invalid one "invalid model name"."""
    fake = FakeOllama(version="0.18.0").start()
    try:
        with httpx.Client(base_url=fake.url) as client:
            answer = _chat(client, model)
            assert (answer.status_code, answer.json()) == (400, {"error": error})
            # The name trimmed, and a ":cloud" or ":local" suffix aside: found as it is.
            assert _chat(client, " llama3.2:local ").status_code == 200
    finally:
        fake.stop()


def test_a_proxy_wanting_authorization_answers_401_before_ollama() -> None:
    """With ``authorization`` set, a request without that header, or with another, gets the
    proxy's 401 and its Basic challenge (RFC 9110, 11.6.1), whatever it asks for."""
    fake = FakeOllama().start()
    fake.authorization = "Basic dXNlcjpwYXNz"
    chat = {"model": "llama3.2", "messages": [{"role": "user", "content": "a fox"}]}
    try:
        with httpx.Client(base_url=fake.url) as client:
            for headers in ({}, {"Authorization": "Basic b3RoZXI6cGFzcw=="}):
                for answer in (
                    client.get("/api/tags", headers=headers),
                    client.post("/api/chat", json={**chat, "stream": False}, headers=headers),
                ):
                    assert answer.status_code == 401
                    assert answer.headers["WWW-Authenticate"] == 'Basic realm="ollama"'
            client.headers["Authorization"] = "Basic dXNlcjpwYXNz"
            assert client.get("/api/tags").status_code == 200
            assert _chat(client, "llama3.2").status_code == 200
    finally:
        fake.stop()
    assert fake.model_loads == [("llama3.2:latest", "chat")]
