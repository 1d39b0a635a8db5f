"""The HTTP and CloudEvents edges of a function: what it refuses, and how it says so.

Each refusal is a 4xx naming the field at fault, never a 500: a request body that is not a
JSON object, events whose required attributes are empty or of the wrong kind, ``data_base64``
that is not Base64, coded bodies, methods a path does not take (with ``Allow``), and bodies
the server itself cannot read (served by gunicorn, over a raw socket).
"""

from __future__ import annotations

import base64
import importlib
import json
import os
import signal
import socket
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import uuid4

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from imagegen.events import GENERATION_FAILED, GENERATION_REQUESTED, PROMPT_ENHANCED
from tests.conftest import ROOT
from tests.functions.clients import InProcessFunction
from tests.functions.conftest import StartServer, base_env
from tests.functions.servers import cloudevent_headers

STRUCTURED = {"content-type": "application/cloudevents+json"}


@pytest.fixture(scope="module")
def enhance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessFunction]:
    with InProcessFunction("enhance", base_env(tmp_path_factory.mktemp("store"))) as function:
        yield function


def fields(reply: httpx.Response, status: int = 400) -> set[str]:
    """The fields a plain JSON error names (and that it is one, with ``status``)."""
    assert reply.status_code == status, reply.text
    assert "ce-type" not in reply.headers and "Traceback" not in reply.text
    return {e["field"] for e in reply.json()["errors"]}


def envelope(**overrides: Any) -> dict[str, Any]:
    """A structured event of ``overrides`` (None: left out). Its id is its own unless given:
    the module's function keeps one store, where one id is one generation."""
    event = {
        "specversion": "1.0",
        "type": GENERATION_REQUESTED,
        "source": "/tests",
        "id": f"protocol-{uuid4().hex}",
        "datacontenttype": "application/json",
        "data": {"prompt": "a paper boat", "enhance": False},
    }
    return {k: v for k, v in {**event, **overrides}.items() if v is not None}


def test_a_json_string_is_not_read_again_as_json(enhance: InProcessFunction) -> None:
    text = json.dumps({"prompt": "double", "enhance": False})  # an object, inside a string
    plain = enhance.post("/", json=text)
    assert fields(plain) == {"body"} and "not a string" in plain.json()["message"]
    binary = enhance.post("/", headers=cloudevent_headers(GENERATION_REQUESTED), json=text)
    assert fields(binary) == {"body"}
    structured = enhance.post("/", headers=STRUCTURED, json=envelope(data=text))
    assert fields(structured) == {"data"}
    for other in ([1, 2], 7, True):
        assert fields(enhance.post("/", json=other)) == {"body"}


@pytest.mark.parametrize(
    ("attribute", "value"),
    [("id", ""), ("source", ""), ("type", ""), ("id", 7), ("source", None), ("specversion", 1.0)],
)
def test_required_attributes_are_non_empty_strings(
    enhance: InProcessFunction, attribute: str, value: Any
) -> None:
    event = envelope(**{attribute: value})  # None: left out
    assert fields(enhance.post("/", headers=STRUCTURED, json=event)) == {attribute}


def test_binary_attributes_are_named_when_missing_or_empty(enhance: InProcessFunction) -> None:
    headers = cloudevent_headers(GENERATION_REQUESTED)
    del headers["ce-id"]
    missing = enhance.post("/", headers=headers, json={})
    assert fields(missing) == {"id"} and "missing id" in missing.json()["message"]
    empty = {**cloudevent_headers(GENERATION_REQUESTED), "ce-source": ""}
    assert fields(enhance.post("/", headers=empty, json={})) == {"source"}


def test_data_base64_is_base64_and_alone(enhance: InProcessFunction) -> None:
    data = base64.b64encode(json.dumps({"prompt": "a kite", "enhance": False}).encode()).decode()
    bad = envelope(data=None, data_base64="!!!")
    assert fields(enhance.post("/", headers=STRUCTURED, json=bad)) == {"data_base64"}
    both = envelope(data_base64=data)
    assert fields(enhance.post("/", headers=STRUCTURED, json=both)) == {"data_base64"}
    # An id of its own: the module's other events are generations of another prompt.
    taken = envelope(data=None, data_base64=data, id="protocol-base64")
    good = enhance.post("/", headers=STRUCTURED, json=taken)
    assert good.status_code == 200, good.text
    assert good.headers["ce-type"] == PROMPT_ENHANCED and good.json()["prompt"].startswith("a kite")


def test_a_coded_body_is_refused(enhance: InProcessFunction) -> None:
    reply = enhance.post("/", headers={"content-encoding": "gzip"}, json={"prompt": "a kite"})
    assert fields(reply, 415) == {"content-encoding"}


def test_a_refused_method_says_which_are_allowed(enhance: InProcessFunction) -> None:
    cases = [("GET", "/", "POST"), ("POST", "/openapi.json", "GET, HEAD")]
    cases += [("POST", "/healthz", "GET, HEAD"), ("DELETE", "/readyz", "GET, HEAD")]
    for method, path, allowed in cases:
        reply = enhance.client.request(method, path)
        assert reply.status_code == 405, (method, path, reply.text)
        assert reply.headers["allow"] == allowed
        assert reply.json()["error"] == "method_not_allowed"
    assert enhance.client.head("/readyz").status_code == 200


def test_a_failed_event_names_the_generation_its_data_names(enhance: InProcessFunction) -> None:
    headers = cloudevent_headers(GENERATION_REQUESTED)  # no subject
    reply = enhance.post("/", headers=headers, json={"generation_id": "named-1", "width": 5})
    assert reply.status_code == 200 and reply.headers["ce-type"] == GENERATION_FAILED
    assert reply.json()["generation_id"] == reply.headers["ce-subject"] == "named-1"


def _raw(url: str, request: bytes, *, hang_up: bool = False) -> bytes:
    """Send ``request`` as it is; with ``hang_up``, stop writing and reading half-way."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(request)
        if hang_up:
            sock.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
        return received


def test_a_body_the_server_cannot_read_is_the_requests_fault(
    start_server: StartServer, tmp_path: Path
) -> None:
    server = start_server("enhance", base_env(tmp_path / "store"))
    head = (
        f"POST / HTTP/1.1\r\nHost: {server.url[7:]}\r\nContent-Type: application/json\r\n"
        "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    ).encode()
    malformed = _raw(server.url, head + b"zz\r\nabc\r\n0\r\n\r\n")
    cut_off = _raw(server.url, head + b'40\r\n{"prompt": ', hang_up=True)
    for answer in (malformed, cut_off):
        status, _, body = answer.partition(b"\r\n\r\n")
        assert status.startswith(b"HTTP/1.1 400"), answer[:300]
        error = json.loads(body)
        assert error["errors"] == [{"field": "body", "message": "could not be read"}]
    assert "unexpected error" not in server.logs()


def test_what_gunicorn_refuses_itself_is_refused_in_json_too(
    start_server: StartServer, tmp_path: Path
) -> None:
    """gunicorn refuses some requests before the function sees them; the answer is still the
    functions' JSON, naming the part at fault, never an HTML page."""
    server = start_server("deadletter", base_env(tmp_path / "store"))
    host = server.url[7:]

    def sent(headers: str, line: str = "POST / HTTP/1.1") -> tuple[bytes, dict[str, Any]]:
        request = f"{line}\r\nHost: {host}\r\n{headers}Content-Length: 2\r\nConnection: close\r\n"
        head, _, body = _raw(server.url, request.encode() + b"\r\n{}").partition(b"\r\n\r\n")
        assert b"\r\ncontent-type: application/json\r\n" in head.lower() + b"\r\n", head
        return head, json.loads(body)

    head, error = sent(f"X-Big: {'x' * 9000}\r\n")  # past gunicorn's 8190 bytes a field
    assert head.startswith(b"HTTP/1.1 431 Request Header Fields Too Large")
    assert error["error"] == "invalid_request" and not error["retryable"]
    assert error["errors"] == [{"field": "headers", "message": "Request Header Fields Too Large"}]
    head, error = sent("Content-Type: application/json\r\nContent-Type: text/plain\r\n")
    assert head.startswith(b"HTTP/1.1 400 Bad Request")
    assert [e["field"] for e in error["errors"]] == ["headers"]
    assert "CONTENT-TYPE" in error["message"].upper()
    head, error = sent("", line="POST / HTTP/9.9")
    assert head.startswith(b"HTTP/1.1 400 Bad Request")
    assert [e["field"] for e in error["errors"]] == ["request"]
    assert "<html>" not in server.logs()


def test_a_repeated_event_attribute_is_refused_not_joined(
    start_server: StartServer, tmp_path: Path
) -> None:
    """A server joins a repeated header's values with commas; sdk-go takes the first. The one
    message would be two events: a stage refuses it, naming the header; the dead-letter sink,
    which keeps whatever comes, records it as it came."""
    env = base_env(tmp_path / "store")
    attributes = (
        f"ce-specversion: 1.0\r\nce-type: {GENERATION_REQUESTED}\r\n"
        "ce-source: /tests\r\nce-id: twice-a\r\nce-id: twice-b\r\n"
    )
    for name, status in (("enhance", b"400"), ("deadletter", b"202")):
        server = start_server(name, env)
        request = (
            f"POST / HTTP/1.1\r\nHost: {server.url[7:]}\r\n{attributes}"
            "Content-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}"
        )
        head, _, body = _raw(server.url, request.encode()).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 " + status), (name, head)
        if name == "enhance":
            error = json.loads(body)
            assert [e["field"] for e in error["errors"]] == ["headers"]
            assert "CE-ID" in error["message"].upper()


def test_binary_header_values_are_unquoted_and_percent_decoded(enhance: InProcessFunction) -> None:
    """HTTP binding, section 3.1.3.2: a sender percent-encodes a space, '"', '%' and all
    that is not printable ASCII in a ``ce-*`` header; the receiver decodes once. The same event
    in either mode is then one generation."""
    data = {"prompt": "a paper boat", "enhance": False}
    event = envelope(source="/té", id="pe two", time="2026-01-07T00:00:00+01:00", data=data)
    structured = enhance.post("/", headers=STRUCTURED, json=event)
    assert structured.status_code == 200, structured.text
    headers = {
        **cloudevent_headers(GENERATION_REQUESTED, source="/t%C3%A9", event_id='"pe%20two"'),
        "ce-time": "2026-01-07T00:00:00%2B01:00",
    }
    binary = enhance.post("/", headers=headers, json=data)
    assert binary.status_code == 200, binary.text
    assert binary.headers["ce-subject"] == structured.headers["ce-subject"]
    assert binary.json()["requested_at"] == structured.json()["requested_at"]
    named = {**cloudevent_headers(GENERATION_REQUESTED), "ce-subject": "boat%2D1"}
    assert enhance.post("/", headers=named, json=data).headers["ce-subject"] == "boat-1"
    not_utf8 = {**cloudevent_headers(GENERATION_REQUESTED), "ce-source": "/t%FF"}
    assert fields(enhance.post("/", headers=not_utf8, json=data)) == {"source"}


def _binary_request(url: str, attributes: bytes, body: bytes) -> tuple[bytes, bytes]:
    """A binary-mode event whose ``ce-*`` header lines are ``attributes``, bytes as they are;
    the answer's head and body."""
    request = (
        f"POST / HTTP/1.1\r\nHost: {url[7:]}\r\n".encode()
        + attributes
        + f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n".encode()
        + b"Connection: close\r\n\r\n"
        + body
    )
    head, _, answer = _raw(url, request).partition(b"\r\n\r\n")
    return head, answer


def _header(head: bytes, name: str) -> str:
    for line in head.decode("latin-1").split("\r\n")[1:]:
        key, _, value = line.partition(":")
        if key.strip().lower() == name:
            return value.strip()
    raise AssertionError(f"no {name} in {head!r}")


def test_raw_utf8_header_values_are_read_as_utf8(start_server: StartServer, tmp_path: Path) -> None:
    """sdk-go, and so Knative's broker, writes a ``ce-*`` value as it is, never
    percent-encoded (cloudevents/sdk-go#1331): an ``é`` arrives as its two UTF-8 bytes, which
    the server hands over each byte a Latin-1 character (PEP 3333). Read as UTF-8, the event is
    its structured form: one generation. Bytes that are no UTF-8 are refused, naming the
    attribute; the dead-letter sink keeps them, each byte its Latin-1 character, and says so."""
    store = tmp_path / "store"
    enhance = start_server("enhance", base_env(store))
    data = {"prompt": "a paper boat", "enhance": False}
    event = envelope(source="/café", id="raw-1", data=data)
    structured = enhance.post(headers=STRUCTURED, json=event)
    assert structured.status_code == 200, structured.text
    assert structured.headers["ce-type"] == PROMPT_ENHANCED, structured.text
    required = f"ce-specversion: 1.0\r\nce-type: {GENERATION_REQUESTED}\r\nce-id: raw-1\r\n"
    body = json.dumps(data).encode()
    head, answer = _binary_request(
        enhance.url, required.encode() + "ce-source: /café\r\n".encode(), body
    )
    assert head.startswith(b"HTTP/1.1 200"), head + answer
    assert _header(head, "ce-type") == PROMPT_ENHANCED, head + answer
    assert _header(head, "ce-subject") == structured.headers["ce-subject"]
    latin1 = required.encode() + b"ce-source: /caf\xe9\r\n"  # the Latin-1 byte: no UTF-8
    head, answer = _binary_request(enhance.url, latin1, body)
    assert head.startswith(b"HTTP/1.1 400"), head + answer
    assert [e["field"] for e in json.loads(answer)["errors"]] == ["source"]

    deadletter = start_server("deadletter", base_env(store))
    for event_id, subject in ((b"dl-raw-1", b"x\xc3\xa9"), (b"dl-raw-2", b"x\xe9")):
        attributes = (
            f"ce-specversion: 1.0\r\nce-type: {GENERATION_REQUESTED}\r\n".encode()
            + "ce-source: /café\r\n".encode()
            + b"ce-id: "
            + event_id
            + b"\r\nce-subject: "
            + subject
            + b"\r\n"
        )
        head, answer = _binary_request(deadletter.url, attributes, b"{}")
        assert head.startswith(b"HTTP/1.1 202"), head + answer
    records = {
        r["event_id"]: r["attributes"]
        for r in (json.loads(p.read_text()) for p in store.rglob("failures/**/*.json"))
    }
    assert records["dl-raw-1"]["source"] == records["dl-raw-2"]["source"] == "/café"
    assert records["dl-raw-1"]["subject"] == "xé" and "imagegenlatin1" not in records["dl-raw-1"]
    assert records["dl-raw-2"]["subject"].encode("latin-1") == b"x\xe9"
    assert records["dl-raw-2"]["imagegenlatin1"] == "subject"


def test_only_cloudevents_1_0_is_read(enhance: InProcessFunction) -> None:
    """CloudEvents 0.3 would be read as 1.0 is, its ``datacontentencoding`` ignored: its
    Base64 data a string, refused as if the data were at fault. Refused by its version."""
    data = base64.b64encode(json.dumps({"prompt": "a kite", "enhance": False}).encode()).decode()
    event = envelope(specversion="0.3", datacontentencoding="base64", data=data)
    assert fields(enhance.post("/", headers=STRUCTURED, json=event)) == {"specversion"}
    old = envelope(specversion="0.3")
    assert fields(enhance.post("/", headers=STRUCTURED, json=old)) == {"specversion"}
    headers = {
        **cloudevent_headers(GENERATION_REQUESTED),
        "ce-specversion": "0.3",
        "ce-datacontentencoding": "base64",
    }
    reply = enhance.post("/", headers=headers, content=data.encode())
    assert fields(reply) == {"specversion"} and "not one of 1.0" in reply.json()["message"]


@pytest.mark.parametrize("name", ["Bad_Name", "badName", "my-ext", "café", ""])
def test_structured_extension_names_are_lower_case_letters_and_digits(
    enhance: InProcessFunction, name: str
) -> None:
    """CloudEvents 1.0, section 3.1.1: an attribute name MUST consist of lower-case ASCII
    letters and digits; the JSON event format's member names are the attributes' own."""
    for value in ("x", None):
        event = {**envelope(), name: value}
        assert fields(enhance.post("/", headers=STRUCTURED, json=event)) == {name}


def test_binary_extension_names_are_read_as_sdk_go_reads_them(
    enhance: InProcessFunction, tmp_path: Path
) -> None:
    """A header name's case is no part of it (RFC 9110, section 5.1): ``ce-MyExt`` is the
    extension ``myext``. sdk-go refuses a name of other characters (v2/event/extensions.go,
    validateExtensionName). The dead-letter sink keeps any name."""
    data = {"prompt": "a paper boat", "enhance": False}
    cased = {**cloudevent_headers(GENERATION_REQUESTED), "ce-MyExt": "x"}
    taken = enhance.post("/", headers=cased, json=data)
    assert taken.status_code == 200 and taken.headers["ce-type"] == PROMPT_ENHANCED, taken.text
    dashed = {**cloudevent_headers(GENERATION_REQUESTED), "ce-my-ext": "x"}
    assert fields(enhance.post("/", headers=dashed, json=data)) == {"my-ext"}
    deadletter = InProcessFunction("deadletter", base_env(tmp_path / "store"))
    dashed["ce-id"] = "dl-dashed"
    assert deadletter.post(headers=dashed, content=b"{}").status_code == 202
    structured = {**envelope(id="dl-named"), "Bad_Name": "x"}
    assert deadletter.post(headers=STRUCTURED, json=structured).status_code == 202
    records = {
        r["event_id"]: r["attributes"]
        for r in (json.loads(p.read_text()) for p in (tmp_path / "store").rglob("*.json"))
    }
    assert records["dl-dashed"]["my-ext"] == "x" and records["dl-named"]["Bad_Name"] == "x"


def test_a_structured_event_may_carry_binary_headers_too(enhance: InProcessFunction) -> None:
    """HTTP binding, section 3.2: the Content-Type says structured; the envelope is the event,
    whatever ``ce-*`` headers came with it."""
    headers = {**cloudevent_headers(GENERATION_REQUESTED, event_id="header-id"), **STRUCTURED}
    reply = enhance.post("/", headers=headers, json=envelope(id="envelope-id", subject="env-1"))
    assert reply.status_code == 200 and reply.headers["ce-type"] == PROMPT_ENHANCED, reply.text
    assert reply.headers["ce-subject"] == "env-1"


def test_a_binary_body_of_null_is_no_object(enhance: InProcessFunction) -> None:
    """An empty body is an event without data (the dreaming ping); ``null`` is data, and
    no object: refused as a plain body of ``null`` is, not taken for no data."""
    headers = cloudevent_headers(GENERATION_REQUESTED)
    assert fields(enhance.post("/", headers=headers, content=b"null")) == {"body"}
    empty = enhance.post("/", headers=headers, content=b"")
    assert empty.status_code == 200 and empty.headers["ce-type"] == PROMPT_ENHANCED, empty.text
    assert empty.json()["dreamed"] is True


def test_event_headers_without_a_specversion_are_no_plain_body(enhance: InProcessFunction) -> None:
    """``ce-id``, ``ce-type`` and ``ce-source`` but no ``ce-specversion``: an event missing an
    attribute, not a plain body that mints a new generation at each delivery."""
    headers = cloudevent_headers(GENERATION_REQUESTED)
    del headers["ce-specversion"]
    reply = enhance.post("/", headers=headers, json={"prompt": "a kite", "enhance": False})
    assert fields(reply) == {"specversion"}


@pytest.mark.parametrize(
    ("attribute", "value", "status"),
    [
        ("subject", 5, 400),
        ("time", False, 400),
        ("myextension", {"a": 1}, 400),
        ("myextension", ["a"], 400),
        ("datacontenttype", "text/plain", 415),
    ],
)
def test_structured_attributes_are_of_their_types(
    enhance: InProcessFunction, attribute: str, value: Any, status: int
) -> None:
    """The JSON event format: String attributes are JSON strings, an extension a string,
    number or boolean; the data is JSON, as a binary-mode Content-Type must say."""
    reply = enhance.post("/", headers=STRUCTURED, json=envelope(**{attribute: value}))
    assert fields(reply, status) == {attribute}


def test_structured_extensions_of_scalar_types_are_taken(enhance: InProcessFunction) -> None:
    event = envelope(myflag=True, mycount=3, datacontenttype="application/json; charset=utf-8")
    reply = enhance.post("/", headers=STRUCTURED, json=event)
    assert reply.status_code == 200 and reply.headers["ce-type"] == PROMPT_ENHANCED, reply.text


def test_reply_header_values_are_percent_encoded(enhance: InProcessFunction) -> None:
    """What a reply carries in a ``ce-*`` header is encoded as the binding says: a
    ``tracestate`` with spaces, say."""
    from _binding import event_reply  # functions/, on the path once a function is loaded

    from imagegen.models import ErrorInfo, GenerationFailed

    data = GenerationFailed(
        stage="enhance",
        error=ErrorInfo(code="x", message="y", retryable=False),
        failed_at=datetime(2026, 1, 7, tzinfo=UTC),
    )
    attributes = {
        "type": GENERATION_FAILED,
        "source": "/imagegen/enhance",
        "id": "r-1",
        "tracestate": 'vendor=a b,other="é%"',
    }
    reply = event_reply(attributes, data)
    assert reply.headers["ce-tracestate"] == "vendor=a%20b,other=%22%C3%A9%25%22"
    assert reply.headers["ce-source"] == "/imagegen/enhance"


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"IMAGEGEN_PLUGINS": "time_of_day,nope"}, "IMAGEGEN_PLUGINS"),
        (  # holiday computes: it refuses a value at each request, not at start-up
            {"IMAGEGEN_PLUGIN_OPTIONS": '{"holiday": {"horizon_days": "nope"}}'},
            "IMAGEGEN_PLUGIN_OPTIONS",
        ),
        (  # an option no plugin reads: a misspelt key is not ignored
            {"IMAGEGEN_PLUGIN_OPTIONS": '{"art_style": {"stlye": "ukiyo-e"}}'},
            "plugin_options.art_style.stlye: unknown option",
        ),
    ],
)
def test_plugin_settings_that_cannot_work_are_the_deployments_fault(
    tmp_path: Path, env: dict[str, str], variable: str
) -> None:
    """A plugin no one installed, or an option the operator set that its plugin refuses:
    every request would fail alike. A 503 naming the setting (retried, and a delivered event
    not dropped), not the 400 or generation.failed that blames the caller."""
    with InProcessFunction("enhance", {**base_env(tmp_path / "store"), **env}) as enhance:
        request = {"prompt": "a paper boat", "enhance": False}
        plain = enhance.post("/", json=request)
        assert plain.status_code == 503, plain.text
        assert plain.json()["error"] == "not_configured" and variable in plain.text
        event = enhance.post("/", headers=cloudevent_headers(GENERATION_REQUESTED), json=request)
        assert event.status_code == 503 and "ce-type" not in event.headers
        if "nope" in env.get("IMAGEGEN_PLUGIN_OPTIONS", ""):  # the request's own is the caller's
            mine = {**request, "plugin_options": {"holiday": {"horizon_days": "mine"}}}
            refused = enhance.post("/", json=mine)
            assert fields(refused) == {"plugin_options.holiday.horizon_days"}


@pytest.mark.parametrize(
    "extension",
    [
        "garbage",
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",  # all-zero trace id
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",  # 00 has 4 fields
        "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",  # version ff
    ],
)
def test_a_tracing_extension_that_is_no_traceparent_leaves_the_http_one(
    enhance: InProcessFunction, extension: str
) -> None:
    trace_id = "0af7651916cd43dd8448eb211c80319c"
    headers = cloudevent_headers(GENERATION_REQUESTED, traceparent=extension)
    headers["traceparent"] = f"00-{trace_id}-b7ad6b7169203331-01"
    reply = enhance.post(
        "/", headers=headers, json={"prompt": "a fox", "width": 256, "height": 256}
    )
    assert reply.status_code == 200 and reply.headers["ce-type"] == PROMPT_ENHANCED, reply.text
    assert reply.headers["ce-traceparent"].split("-")[1] == trace_id


def test_a_valid_tracing_extension_wins_over_the_http_header(enhance: InProcessFunction) -> None:
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    headers = cloudevent_headers(
        GENERATION_REQUESTED, traceparent=f"00-{trace_id}-00f067aa0ba902b7-01"
    )
    headers["traceparent"] = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    reply = enhance.post(
        "/", headers=headers, json={"prompt": "a fox", "width": 256, "height": 256}
    )
    assert reply.status_code == 200 and reply.headers["ce-type"] == PROMPT_ENHANCED, reply.text
    assert reply.headers["ce-traceparent"].split("-")[1] == trace_id


def test_an_event_without_a_time_is_read_without_one(enhance: InProcessFunction) -> None:
    """The SDK's CloudEvent gives an event that has no time the clock's: not one that was
    sent, and different at each delivery."""
    from _binding import parse  # functions/, on the path once a function is loaded

    binary = {**cloudevent_headers(GENERATION_REQUESTED), "content-type": "application/json"}
    envelope = {"specversion": "1.0", "type": GENERATION_REQUESTED, "source": "/t", "id": "1"}
    for headers, body in (
        (binary, b"{}"),
        ({"content-type": "application/cloudevents+json"}, json.dumps(envelope).encode()),
    ):
        assert "time" not in parse(headers, body, consumes=(GENERATION_REQUESTED,)).attributes
    timed = {**binary, "ce-time": "2026-12-01T10:00:00Z"}
    read = parse(timed, b"{}", consumes=(GENERATION_REQUESTED,)).attributes
    assert read["time"].startswith("2026-12-01T10:00:00")


def test_a_binary_ce_datacontenttype_header_is_not_the_events(enhance: InProcessFunction) -> None:
    """HTTP binding, sections 3.1.1 and 3.1.3.1: in binary mode ``datacontenttype`` is the
    Content-Type, the one checked for JSON, and no ``ce-`` header; a ``ce-datacontenttype``,
    before or after the Content-Type, does not become the event's."""
    from _binding import parse  # functions/, on the path once a function is loaded

    ce = cloudevent_headers(GENERATION_REQUESTED)
    del ce["content-type"]
    json_type, other = {"content-type": "application/json"}, {"ce-datacontenttype": "text/plain"}
    for headers in ({**ce, **json_type, **other}, {**ce, **other, **json_type}):
        read = parse(headers, b"{}", consumes=(GENERATION_REQUESTED,)).attributes
        assert read["datacontenttype"] == "application/json"
    untyped = parse({**ce, **other}, b"{}", consumes=(GENERATION_REQUESTED,)).attributes
    assert "datacontenttype" not in untyped


def test_robots_and_favicon_are_the_json_404_of_any_unknown_path(
    enhance: InProcessFunction,
) -> None:
    """functions-framework gives these two paths a view of its own, an HTML 404
    (functions_framework/__init__.py, _configure_app: endpoint "error"); here they answer as
    every path without a route does."""
    unknown = enhance.client.get("/nope")
    assert unknown.status_code == 404 and unknown.json()["error"] == "not_found"
    for path in ("/robots.txt", "/favicon.ico"):
        for method in ("GET", "POST", "HEAD"):
            reply = enhance.client.request(method, path, content=b"{")
            assert reply.status_code == 404, (method, path, reply.text)
            assert reply.headers["content-type"] == unknown.headers["content-type"]
            if method != "HEAD":
                assert reply.json() == {
                    **unknown.json(),
                    "message": f"no route {path!r}; POST / instead",
                }


def test_robots_and_favicon_leave_a_body_unread_when_served(
    start_server: StartServer, tmp_path: Path
) -> None:
    """An upload to either answers at once, its body unread, as an unknown path's does."""
    server = start_server("enhance", base_env(tmp_path / "store"))
    for path in ("/favicon.ico", "/robots.txt"):
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {server.url[7:]}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {100 << 20}\r\nConnection: close\r\n\r\n"
        ).encode()
        status, _, body = _raw(server.url, head + b"{", hang_up=True).partition(b"\r\n\r\n")
        assert status.startswith(b"HTTP/1.1 404"), status
        assert json.loads(body)["error"] == "not_found"


@settings(max_examples=200, deadline=None)
@given(
    message=st.text(max_size=3000),
    fields=st.lists(st.tuples(st.text(max_size=80), st.text(max_size=400)), max_size=40),
    code=st.sampled_from(["invalid_request", "dependency_unavailable", "x" * 900]),
)
def test_a_delivered_error_body_fits_768_bytes_and_stays_json(
    message: str, fields: list[tuple[str, str]], code: str
) -> None:
    functions = str(ROOT / "functions")  # where functions-framework finds the adapters
    if functions not in sys.path:
        sys.path.insert(0, functions)
    from _binding import DELIVERED_ERROR_BODY_MAX, fit_error_body

    error = {
        "error": code,
        "message": message,
        "retryable": False,
        "errors": [{"field": f, "message": m} for f, m in fields],
    }
    body = json.dumps(error, separators=(",", ":")).encode()
    fitted = fit_error_body(body)
    assert len(fitted) <= DELIVERED_ERROR_BODY_MAX
    kept = json.loads(fitted)
    assert kept["retryable"] is False
    if len(body) <= DELIVERED_ERROR_BODY_MAX:
        assert fitted == body
    elif len(code) < 100:  # the fields named first, as many as fit, in order
        named = [e["field"] for e in kept.get("errors", [])]
        assert named == [f for f, _ in fields][: len(named)]
        assert kept.get("errors_left_out", 0) == len(fields) - len(named)


def test_errors_left_out_counts_the_fields_a_list_cut_short_stood_for() -> None:
    """An error names at most 20 fields, the last entry saying how many more
    (ImageGenError); cut to fit a delivery, ``errors_left_out`` counted that entry as one
    field, saying 11 left out where 61 were."""
    functions = str(ROOT / "functions")
    if functions not in sys.path:
        sys.path.insert(0, functions)
    from _binding import fit_error_body

    from imagegen.errors import InvalidRequest

    fields = [{"field": f"unknown_field_{i:03d}", "message": "extra inputs"} for i in range(72)]
    error = InvalidRequest("invalid enhance input", errors=fields)
    assert error.errors[-1] == {"field": "…", "message": "53 more, not listed"}
    body = {"error": "invalid_request", "message": error.message, "errors": error.errors}
    kept = json.loads(fit_error_body(json.dumps(body).encode()))
    named = [e["field"] for e in kept["errors"]]
    assert "…" not in named and named == [f["field"] for f in fields][: len(named)]
    assert kept["errors_left_out"] == 72 - len(named)


def test_the_server_lets_requests_in_flight_finish_past_gunicorns_30_s() -> None:
    """After SIGTERM gunicorn waits ``graceful_timeout`` for requests in flight, then kills its
    workers; functions-framework's server leaves it at gunicorn's 30 s, less than any stage's
    budget. The function's process sets it past any grace period the pod gets."""
    functions = str(ROOT / "functions")
    if functions not in sys.path:
        sys.path.insert(0, functions)
    import _process
    import flask
    from functions_framework._http.gunicorn import GunicornApplication

    server = GunicornApplication(flask.Flask("t"), "127.0.0.1", 0, False)
    assert server.cfg.graceful_timeout == _process.DRAIN_SECONDS >= 600  # render's timeoutSeconds


def test_a_quit_signal_arriving_while_one_is_handled_returns_at_once() -> None:
    """Ctrl-C reaches a worker twice, the terminal's SIGINT and the master's SIGQUIT; gthread's
    handler shuts its pool down under a non-reentrant lock, and a second one run inside the
    first waited on that lock for good. A worker here stands in for gthread's: its handlers set
    as ``init_signals`` sets them, its quit holding a lock as ``tpool.shutdown`` does."""
    functions = str(ROOT / "functions")
    if functions not in sys.path:
        sys.path.insert(0, functions)
    importlib.import_module("_process")  # sets the server's hooks, as a function's import does
    import flask
    from functions_framework._http.gunicorn import GunicornApplication

    pool_lock, handled = threading.Lock(), []

    class Worker:
        def handle_quit(self, sig: int, frame: object) -> None:
            if not pool_lock.acquire(timeout=1):
                handled.append("waited on the lock the first quit holds")
                return
            try:
                handled.append(signal.Signals(sig).name)
                second = signal.getsignal(signal.SIGQUIT)
                assert callable(second)
                second(signal.SIGQUIT, None)  # the master's SIGQUIT, meanwhile
            finally:
                pool_lock.release()

    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGQUIT)}
    try:
        worker = Worker()
        for sig in saved:  # gunicorn/workers/base.py, init_signals
            signal.signal(sig, worker.handle_quit)
        GunicornApplication(flask.Flask("t"), "127.0.0.1", 0, False).cfg.post_worker_init(worker)
        first = signal.getsignal(signal.SIGINT)
        assert callable(first)
        first(signal.SIGINT, None)  # the terminal's
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
    assert handled == ["SIGINT"]


@pytest.mark.slow
def test_the_server_opens_no_control_socket(start_server: StartServer, tmp_path: Path) -> None:
    """gunicorn 25.1+ serves ``gunicornc`` on a socket at ``$XDG_RUNTIME_DIR/gunicorn.ctl``, else
    ``~/.gunicorn/gunicorn.ctl`` (gunicorn/config.py, ControlSocket), which no function uses:
    with a home it cannot write (a read-only root file system, an arbitrary UID) it logged an
    ERROR at every start, and the functions on one host shared the one path."""
    runtime = tmp_path / "run"
    runtime.mkdir()
    no_home = tmp_path / "not-a-directory"
    no_home.write_text("")
    env = base_env(tmp_path / "store")
    # A fresh interpreter: gunicorn reads these for the socket's path as it is imported.
    shared = start_server("persist", {**env, "XDG_RUNTIME_DIR": str(runtime)}, fresh=True)
    unwritable = start_server(
        "persist", {**env, "XDG_RUNTIME_DIR": "", "HOME": str(no_home)}, fresh=True
    )
    for server in (shared, unwritable):
        server.wait("/readyz")

    assert list(runtime.iterdir()) == []
    errors = [r for server in (shared, unwritable) for r in server.log_records()]
    assert [r["message"] for r in errors if r.get("level") == "ERROR"] == []


def test_a_worker_s_heartbeat_is_kept_off_the_root_file_system(
    start_server: StartServer, tmp_path: Path
) -> None:
    """gunicorn's worker heartbeat, a file it opens and unlinks, goes to /dev/shm (a tmpfs in
    every container), not /tmp: with a read-only root file system no worker would start."""
    server = start_server("persist", base_env(tmp_path / "store"))
    server.wait("/readyz")

    fds = Path(f"/proc/{server.worker()}/fd")
    opened = [os.readlink(fd) for fd in fds.iterdir() if fd.is_symlink()]
    heartbeats = [target for target in opened if "wgunicorn-" in target]
    assert len(heartbeats) == 1
    assert heartbeats[0].startswith("/dev/shm/wgunicorn-"), heartbeats
