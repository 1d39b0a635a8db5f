"""What a request says of itself at the HTTP edge, as a served function (gunicorn) reads it: an
upgrade to WebSocket, a body shorter or longer than its ``Content-Length``, a ``ce-*`` header
given twice, a query parameter without a name, and structured data of ``null``. Every answer
is the functions' JSON; the dead-letter sink keeps what it is given."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import flask
import functions_framework
import pytest
from werkzeug.http import HTTP_STATUS_CODES

from imagegen.events import GENERATION_FAILED, GENERATION_REQUESTED
from tests.conftest import ROOT, isolated_settings
from tests.functions.conftest import base_env
from tests.functions.servers import FunctionServer, serving

MAX_BODY_BYTES = 1024 * 1024
"""The most a stage reads of a body (functions/_binding.py, ``MAX_BODY_BYTES``)."""
UPGRADE = [("Connection", "Upgrade"), ("Upgrade", "websocket")]
JSON = [("Content-Type", "application/json")]
STRUCTURED = [("Content-Type", "application/cloudevents+json")]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("store")


@pytest.fixture(scope="module")
def served(
    store: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, FunctionServer]]:
    logs = tmp_path_factory.mktemp("logs")
    env = {
        **isolated_settings(logs),
        **base_env(store),
        "IMAGEGEN_LEDGER_URL": str(logs / "ledger.db"),
    }
    with serving(("enhance", "ledger", "deadletter"), env, log_dir=logs) as servers:
        yield servers


class Answer:
    """One answer read off the socket: status, headers (names lower-cased) and body."""

    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body

    def json(self) -> Any:
        assert self.headers.get("content-type") == "application/json", (self.headers, self.body)
        return json.loads(self.body)

    def fields(self) -> list[str]:
        return [e["field"] for e in self.json()["errors"]]


def send(
    server: FunctionServer,
    method: str,
    path: str,
    headers: list[tuple[str, str]],
    body: bytes = b"",
    *,
    length: int | None = None,
    hang_up: bool = False,
    timeout: float = 30.0,
) -> Answer:
    """Send a request as written (``length``: the ``Content-Length`` it claims, by default its
    body's), hanging up the sending side after it if ``hang_up``; the answer, read up to its
    own ``Content-Length``, not the connection's end."""
    length = len(body) if length is None else length
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", f"Content-Length: {length}"]
    lines += [f"{name}: {value}" for name, value in headers]
    request = "\r\n".join(lines).encode() + b"\r\n\r\n" + body
    with socket.create_connection(("127.0.0.1", server.port), timeout=timeout) as sock:
        sock.sendall(request)
        if hang_up:
            sock.shutdown(socket.SHUT_WR)
        received = b""
        while b"\r\n\r\n" not in received:
            chunk = sock.recv(65536)
            assert chunk, f"no answer: {received!r}"
            received += chunk
        head, _, rest = received.partition(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        named = (line.partition(":") for line in header_lines)
        answer = {name.strip().lower(): value.strip() for name, _, value in named}
        while len(rest) < int(answer.get("content-length", 0)):
            chunk = sock.recv(65536)
            assert chunk, f"answer cut short: {received!r}"
            rest += chunk
    return Answer(int(status_line.split()[1]), answer, rest)


def event(event_type: str, event_id: str, *extra: tuple[str, str]) -> list[tuple[str, str]]:
    """A binary-mode event's headers, its data JSON."""
    return [
        ("ce-specversion", "1.0"),
        ("ce-type", event_type),
        ("ce-source", "/tests"),
        ("ce-id", event_id),
        *extra,
        *JSON,
    ]


def envelope(event_type: str, event_id: str, **members: Any) -> bytes:
    base = {"specversion": "1.0", "type": event_type, "source": "/tests", "id": event_id}
    return json.dumps({**base, **members}).encode()


def record(store: Path, event_id: str) -> dict[str, Any]:
    """The dead-letter sink's record of the event ``event_id``."""
    found: list[dict[str, Any]] = [
        json.loads(p.read_text()) for p in store.rglob("failures/**/*.json")
    ]
    [kept] = [r for r in found if r["event_id"] == event_id]
    return kept


# -- an upgrade to WebSocket ---------------------------------------------------------------


def test_a_request_to_upgrade_to_websocket_is_served_as_without_the_upgrade(
    served: dict[str, FunctionServer], store: Path
) -> None:
    """werkzeug's router refused it with its HTML 400 before any view; no function speaks
    WebSocket, and a server may ignore an Upgrade (RFC 9110, section 7.8)."""
    enhance, ledger, sink = served["enhance"], served["ledger"], served["deadletter"]
    prompt = json.dumps({"prompt": "a paper boat", "enhance": False}).encode()
    made = send(enhance, "POST", "/", UPGRADE + JSON, prompt)
    assert made.status == 200 and made.json()["original_prompt"] == "a paper boat"
    refused = send(enhance, "GET", "/", UPGRADE)
    assert refused.status == 405 and refused.headers["allow"] == "POST"
    assert refused.fields() == ["method"]
    for server in (enhance, ledger, sink):
        probe = send(server, "GET", "/healthz", UPGRADE)
        assert probe.status == 200 and probe.json()["stage"] == server.stage
        unknown = send(server, "GET", "/robots.txt", UPGRADE)
        assert unknown.status == 404 and unknown.json()["error"] == "not_found"
    history = send(ledger, "GET", "/generations", UPGRADE)
    assert history.status == 200 and "items" in history.json()
    letter = event(GENERATION_FAILED, "upgrade-1")
    assert send(sink, "POST", "/", UPGRADE + letter, b"{}").status == 202
    assert record(store, "upgrade-1")["attributes"]["id"] == "upgrade-1"


# -- errors werkzeug and Flask raise themselves ------------------------------------------


@pytest.fixture
def app() -> flask.Flask:
    """enhance's app as functions-framework makes it, not started (nothing served yet)."""
    source = ROOT / "functions" / "enhance.py"
    made = functions_framework.create_app("enhance", str(source))  # type: ignore[no-untyped-call]
    assert isinstance(made, flask.Flask)
    return made


@pytest.mark.parametrize(
    ("code", "kwargs", "headers"),
    [
        (400, {}, {}),
        (405, {"valid_methods": ["POST"]}, {"Allow": "POST"}),
    ],
)
def test_an_error_werkzeug_raises_is_json_with_its_status_and_headers(
    app: flask.Flask, code: int, kwargs: dict[str, Any], headers: dict[str, str]
) -> None:
    """Any page of werkzeug's own, had a request reached one: JSON naming the problem."""

    @app.before_request
    def refuse() -> None:
        flask.abort(code, **kwargs)

    reply = app.test_client().post("/", data=b"{}")
    assert reply.status_code == code
    assert reply.headers["Content-Type"] == "application/json"
    for name, value in headers.items():
        assert reply.headers[name] == value
    error = reply.get_json()
    assert error["error"] == "invalid_request" and error["retryable"] is False
    assert error["errors"] == [{"field": "request", "message": HTTP_STATUS_CODES[code]}]
    assert "<" not in reply.get_data(as_text=True)


@pytest.mark.parametrize(
    ("code", "error", "retry_after"),
    [
        (413, "payload_too_large", None),
        (429, "overloaded", "5"),
        (503, "dependency_unavailable", "10"),
    ],
)
def test_an_error_werkzeug_raises_is_said_as_the_functions_own_of_its_status(
    app: flask.Flask, code: int, error: str, retry_after: str | None
) -> None:
    """A 413, 429 or 503 werkzeug raised reads as the functions' own: a retryable one with its
    Retry-After, which a broker or a client waits for."""

    @app.before_request
    def refuse() -> None:
        flask.abort(code)

    reply = app.test_client().post("/", data=b"{}")
    assert reply.status_code == code
    body = reply.get_json()
    assert body["error"] == error and body["retryable"] is (retry_after is not None)
    assert reply.headers.get("Retry-After") == retry_after


def test_a_bug_that_escapes_the_function_is_a_json_500(app: flask.Flask) -> None:
    @app.before_request
    def broken() -> None:
        raise RuntimeError("a bug in a hook")

    reply = app.test_client().post("/", data=b"{}")
    assert reply.status_code == 500
    assert reply.get_json() == {
        "error": "internal",
        "message": "internal error; see the function's logs",
        "retryable": False,
    }


# -- a body and its Content-Length ---------------------------------------------------------


@pytest.mark.parametrize(
    ("stage", "length"),
    [
        ("enhance", 19),
        ("enhance", 5000),
        ("deadletter", 5000),
        ("deadletter", MAX_BODY_BYTES + 100),  # the sink reads the first MiB of any body
    ],
)
def test_a_body_that_ends_before_its_content_length_is_a_400_naming_the_body(
    served: dict[str, FunctionServer], stage: str, length: int
) -> None:
    """The client hung up mid-body: gunicorn hands over what came as if it were all, as it
    does not for a chunked body (``NoMoreData``); either is the same refusal."""
    body = b'{"prompt":"a cat"}'  # 18 bytes
    cut = send(served[stage], "POST", "/", JSON, body, length=length, hang_up=True)
    assert cut.status == 400, cut.body
    assert cut.json()["errors"] == [{"field": "body", "message": "could not be read"}]
    assert f"after {len(body)} of the {length} bytes" in cut.json()["message"]


def test_a_content_length_over_the_limit_is_a_413_before_any_body_is_read(
    served: dict[str, FunctionServer],
) -> None:
    """Nothing of the body is sent, and the connection stays open: the answer cannot wait for
    it. The sink reads the first MiB of such a body, and keeps it cut there."""
    for length in (MAX_BODY_BYTES + 1, 5_000_000):
        refused = send(served["enhance"], "POST", "/", JSON, length=length, timeout=10)
        assert refused.status == 413
        assert refused.json()["errors"] == [
            {"field": "body", "message": f"larger than {MAX_BODY_BYTES} bytes"}
        ]


# -- a ce-* header given twice -------------------------------------------------------------


def test_an_extension_header_given_twice_is_refused_naming_it(
    served: dict[str, FunctionServer], store: Path
) -> None:
    """Joined, ``a,b`` would be a value the sender never meant (and sdk-go would read ``a``);
    a header name's case is no part of it. The dead-letter sink keeps it as the server hands it
    over, joined, as it does a core attribute's."""
    for stage in ("enhance", "ledger"):
        for first, second in (("ce-foo", "ce-foo"), ("ce-foo", "CE-Foo")):
            headers = event(GENERATION_REQUESTED, "twice-1", (first, "a"), (second, "b"))
            refused = send(served[stage], "POST", "/", headers, b"{}")
            assert refused.status == 400, (stage, refused.body)
            assert refused.fields() == ["headers"]
            assert "'CE-FOO'" in refused.json()["message"].upper()
    headers = event(GENERATION_FAILED, "twice-kept", ("ce-foo", "a"), ("ce-Foo", "b"))
    assert send(served["deadletter"], "POST", "/", headers, b"{}").status == 202
    assert record(store, "twice-kept")["attributes"]["foo"] == "a,b"


# -- a query parameter without a name -----------------------------------------------------


@pytest.mark.parametrize(
    "path", ["/generations?=1", "/generations?limit=5&=", "/generations/g1?=1"]
)
def test_a_query_parameter_without_a_name_is_refused_naming_the_query(
    served: dict[str, FunctionServer], path: str
) -> None:
    refused = send(served["ledger"], "GET", path, [])
    assert refused.status == 400, refused.body
    assert refused.json()["errors"] == [{"field": "query", "message": "a parameter has no name"}]


# -- structured data of null ---------------------------------------------------------------


def test_structured_data_of_null_is_no_object_as_a_binary_body_of_null(
    served: dict[str, FunctionServer], store: Path
) -> None:
    """JSON event format, section 3.1.1: ``"data": null`` is a null payload, distinct from no
    ``data`` member. Refused as binary mode's body ``null`` is; no data at all, in either
    mode, is an event without data (enhance dreams a prompt). The sink records it."""
    enhance = served["enhance"]
    null = envelope(GENERATION_REQUESTED, "null-data", data=None)
    refused = send(enhance, "POST", "/", STRUCTURED, null)
    assert refused.status == 400 and refused.fields() == ["data"]
    assert refused.json()["errors"][0]["message"] == "must be a JSON object, not null"
    binary = send(enhance, "POST", "/", event(GENERATION_REQUESTED, "null-body"), b"null")
    assert binary.status == 400 and binary.fields() == ["body"]
    none = send(enhance, "POST", "/", STRUCTURED, envelope(GENERATION_REQUESTED, "no-data"))
    empty = send(enhance, "POST", "/", event(GENERATION_REQUESTED, "empty-body"))
    for dreamed in (none, empty):
        assert dreamed.status == 200, dreamed.body
        assert json.loads(dreamed.body)["dreamed"] is True
    kept = envelope(GENERATION_FAILED, "null-kept", data=None)
    assert send(served["deadletter"], "POST", "/", STRUCTURED, kept).status == 202
    assert record(store, "null-kept")["data"] is None
