"""``imagegen send``: the key it sends, the deadline it keeps and the reply it prints."""

from __future__ import annotations

import base64
import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from imagegen.auth import new_api_key
from imagegen.events import GENERATION_REQUESTED, PROMPT_ENHANCED
from tests.conftest import RunCli
from tests.fakes.oidc_issuer import Issuer
from tests.functions.conftest import StartServer, auth_env, base_env

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4
REQUEST = '{"prompt": "a moth", "width": 256, "height": 256}'


class _Replies(BaseHTTPRequestHandler):
    """Replies as a proxy, a busy function or a stalled one give them, by path."""

    posted: list[str]

    def do_POST(self) -> None:
        self.posted.append(self.path)
        self.rfile.read(int(self.headers.get("content-length") or 0))
        if self.path == "/trickle":  # a byte a second: each read is quick, the reply is not
            self.send_response(200)
            self.send_header("content-length", "20")
            self.end_headers()
            try:
                for _ in range(20):
                    self.wfile.write(b" ")
                    self.wfile.flush()
                    time.sleep(1)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up, as it should
            return
        if self.path == "/png":
            self.send_response(200)
            self.send_header("content-type", "image/png")
            body = PNG
        elif self.path == "/moved":  # a redirect: nothing was delivered
            self.send_response(302)
            self.send_header("location", "/png")
            body = b""
        elif self.path == "/nan":  # what Python's json writes of float("nan"); 1e999 is inf
            self.send_response(200)
            self.send_header("content-type", "application/json")
            body = b'{"seed": NaN, "scale": Infinity, "steps": 1e999}'
        elif self.path == "/jsonish":  # bytes that are no UTF-8, a JSON string once replaced
            self.send_response(200)
            self.send_header("content-type", "application/octet-stream")
            body = b'"\xff\xfe\x89"'
        elif self.path in ("/text-bytes", "/json-bytes", "/ascii-bytes", "/foo-bytes"):
            self.send_response(200)  # typed as text, in bytes its charset cannot decode
            kind, charset = {
                "/text-bytes": ("text/plain", "utf-8"),
                "/json-bytes": ("application/json", "utf-8"),
                "/ascii-bytes": ("text/plain", "us-ascii"),
                "/foo-bytes": ("text/plain", "foo"),  # no codec: httpx reads it as UTF-8
            }[self.path]
            self.send_header("content-type", f"{kind}; charset={charset}")
            body = b"caf\xe9 \xff"
        elif self.path == "/busy":
            self.send_response(503)
            self.send_header("retry-after", "7")
            self.send_header("content-type", "application/json")
            body = b'{"error": "unavailable", "retryable": true}'
        else:
            self.send_response(404)
            body = b"not found"
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def replies() -> Iterator[tuple[str, list[str]]]:
    """A loopback server's URL and the paths posted to it so far."""
    posted: list[str] = []
    handler = type("Replies", (_Replies,), {"posted": posted})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)  # a port the system gives
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", posted
    server.shutdown()
    server.server_close()


def _one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("imagegen: error:"), lines[0]
    return lines[0]


def test_send_sends_the_api_key_as_a_bearer_token(
    cli: RunCli, start_server: StartServer, issuer: Issuer, tmp_path: Path
) -> None:
    key, key_hash = new_api_key()
    env = {**base_env(tmp_path / "store"), **auth_env(issuer.url, key_hash)}
    server = start_server("enhance", env)
    args = ["send", GENERATION_REQUESTED, "--data", REQUEST, "--to", server.url]

    refused = cli(*args)
    assert refused.returncode == 1 and json.loads(refused.stdout)["status"] == 401
    for given in (cli(*args, "--token", key), cli(*args, env={"IMAGEGEN_API_KEY": key})):
        assert given.returncode == 0, given.stderr
        reply = json.loads(given.stdout)
        assert reply["status"] == 200 and reply["attributes"]["ce-type"] == PROMPT_ENHANCED
    wrong = cli(*args, "--token", "igk_not-the-key")
    assert wrong.returncode == 1 and json.loads(wrong.stdout)["status"] == 401
    for unsendable in ("clé", f"{key} ", f" {key}"):  # no header value: refused, never shown
        bad = cli(*args, "--token", unsendable)
        line = _one_error_line(bad.stderr)
        assert bad.returncode == 2 and "--token" in line and unsendable.strip() not in line


@pytest.mark.parametrize(
    ("args", "named"),
    [
        # Past what the event loop's clock takes: was an internal error (OverflowError).
        (["--timeout", "1e10"], "--timeout"),
        (["--timeout", "86401"], "--timeout"),
        # Python reads these, JSON has none: they were posted as invalid JSON.
        (["--data", "NaN"], "--data: NaN is not a JSON number"),
        (["--data", '{"seed": Infinity}'], "--data: Infinity is not a JSON number"),
        (["--data", "[-Infinity]"], "--data: -Infinity is not a JSON number"),
        # Said of the data, never in the interpreter's words (sys.set_int_max_str_digits()).
        (["--data", "9" * 5000], "--data: holds an integer of more than 4300 digits"),
        (["--data", '{"seed": }'], "--data: not valid JSON (line 1 column 10: Expecting value)"),
        # No CloudEvents String, in either mode: an argument's bytes that are no UTF-8 (read as
        # a surrogate) could not even be encoded (was an internal error), a control character.
        (["--source", "/a\udcff"], "--source: holds the surrogate U+DCFF at 2"),
        (["--subject", "a\nb"], "--subject: holds the control character U+000A at 1"),
        (["--mode", "structured", "--id", "x\x7f"], "--id: holds the control character U+007F"),
    ],
)
def test_input_send_cannot_use_is_refused_before_posting(
    cli: RunCli, replies: tuple[str, list[str]], args: list[str], named: str
) -> None:
    url, posted = replies
    before = len(posted)
    result = cli("send", GENERATION_REQUESTED, "--to", f"{url}/png", *args)
    assert result.returncode == 2, result.stderr
    assert named in _one_error_line(result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    assert len(posted) == before  # nothing was sent


def test_the_same_id_sends_the_same_event_again(
    cli: RunCli, start_server: StartServer, tmp_path: Path
) -> None:
    server = start_server("enhance", base_env(tmp_path / "store"))
    args = ["send", GENERATION_REQUESTED, "--data", '{"prompt": "a fox"}', "--to", server.url]

    def reply(*more: str) -> dict[str, Any]:
        result = cli(*args, *more)
        assert result.returncode == 0, result.stderr
        attributes: dict[str, Any] = json.loads(result.stdout)["attributes"]
        assert attributes["ce-type"] == PROMPT_ENHANCED
        return attributes

    first, again = reply("--id", "order-7"), reply("--id", "order-7")
    # A redelivery: the same generation and the same reply, as enhance answers a broker's.
    assert again["ce-id"] == first["ce-id"] and again["ce-subject"] == first["ce-subject"]
    assert reply("--id", "order-8")["ce-subject"] != first["ce-subject"]
    assert reply()["ce-subject"] not in (first["ce-subject"], reply()["ce-subject"])
    refused = cli(*args, "--id", "")
    assert refused.returncode == 2 and "--id: must not be empty" in _one_error_line(refused.stderr)


def test_either_mode_sends_the_same_event(
    cli: RunCli, start_server: StartServer, tmp_path: Path
) -> None:
    """Binary mode's headers are percent-encoded (HTTP binding, section 3.1.3.2): the function
    reads the attributes structured mode sends, so one event is one generation in either mode,
    a '%', a space and non-ASCII text included."""
    server = start_server("enhance", base_env(tmp_path / "store"))
    args = ["send", GENERATION_REQUESTED, "--data", '{"prompt": "a fox"}', "--to", server.url]
    for source, event_id in (("/a%41", "order-9"), ("/orders", "clé 7"), ("/b", '"%2541"')):
        subjects = []
        for mode in ("binary", "structured"):
            result = cli(*args, "--source", source, "--id", event_id, "--mode", mode)
            assert result.returncode == 0, result.stderr
            subjects.append(json.loads(result.stdout)["attributes"]["ce-subject"])
        assert subjects[0] == subjects[1], (source, event_id)


def test_the_timeout_bounds_the_whole_reply(cli: RunCli, replies: tuple[str, list[str]]) -> None:
    url, _ = replies
    started = time.monotonic()
    result = cli("send", GENERATION_REQUESTED, "--to", f"{url}/trickle", "--timeout", "2")
    took = time.monotonic() - started
    assert result.returncode == 1, result.stdout
    assert "did not reply within 2 s" in _one_error_line(result.stderr)
    assert took < 6  # not the 20 s the trickle takes


def test_a_binary_reply_is_printed_base64_encoded(
    cli: RunCli, replies: tuple[str, list[str]]
) -> None:
    url, _ = replies
    result = cli("send", GENERATION_REQUESTED, "--to", f"{url}/png")
    assert result.returncode == 0, result.stderr
    reply = json.loads(result.stdout)
    assert "data" not in reply
    assert base64.b64decode(reply["data_base64"]) == PNG


def test_retry_after_of_a_busy_reply_is_printed(
    cli: RunCli, replies: tuple[str, list[str]]
) -> None:
    url, _ = replies
    result = cli("send", GENERATION_REQUESTED, "--to", f"{url}/busy")
    assert result.returncode == 1
    reply = json.loads(result.stdout)
    assert reply["status"] == 503 and reply["retry_after"] == "7"
    assert reply["data"]["retryable"] is True
    # Plain text is still text.
    missing = json.loads(cli("send", GENERATION_REQUESTED, "--to", f"{url}/none").stdout)
    assert missing == {"status": 404, "attributes": {}, "data": "not found"}


def _strict_json(text: str) -> Any:
    def refuse(constant: str) -> None:
        raise ValueError(f"{constant} is no JSON")

    return json.loads(text, parse_constant=refuse)


def test_a_reply_that_is_no_strict_json_is_printed_as_text(
    cli: RunCli, replies: tuple[str, list[str]]
) -> None:
    url, _ = replies
    result = cli("send", GENERATION_REQUESTED, "--to", f"{url}/nan")
    assert result.returncode == 0, result.stderr
    reply = _strict_json(result.stdout)  # what is printed is JSON, always
    assert reply["data"] == '{"seed": NaN, "scale": Infinity, "steps": 1e999}'


def test_a_binary_reply_that_would_read_as_json_once_replaced_keeps_its_bytes(
    cli: RunCli, replies: tuple[str, list[str]]
) -> None:
    """Read as text, its bytes became U+FFFD and the string they made was printed as data."""
    url, _ = replies
    result = cli("send", GENERATION_REQUESTED, "--to", f"{url}/jsonish")
    assert result.returncode == 0, result.stderr
    reply = json.loads(result.stdout)
    assert "data" not in reply
    assert base64.b64decode(reply["data_base64"]) == b'"\xff\xfe\x89"'


@pytest.mark.parametrize("path", ["/text-bytes", "/json-bytes", "/ascii-bytes", "/foo-bytes"])
def test_a_text_reply_its_charset_cannot_decode_keeps_its_bytes(
    cli: RunCli, replies: tuple[str, list[str]], path: str
) -> None:
    """Printed as text, its bytes were replaced by U+FFFD."""
    url, _ = replies
    result = cli("send", GENERATION_REQUESTED, "--to", f"{url}{path}")
    assert result.returncode == 0, result.stderr
    reply = json.loads(result.stdout)
    assert "data" not in reply and base64.b64decode(reply["data_base64"]) == b"caf\xe9 \xff"


def test_a_redirect_delivered_nothing(cli: RunCli, replies: tuple[str, list[str]]) -> None:
    url, posted = replies
    before = len(posted)
    result = cli("send", GENERATION_REQUESTED, "--to", f"{url}/moved")
    assert result.returncode == 1, result.stdout
    assert json.loads(result.stdout)["status"] == 302
    assert posted[before:] == ["/moved"]  # not followed


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["", "--to", "{url}/png"], "TYPE: must not be empty"),
        (
            [GENERATION_REQUESTED, "--source", "", "--to", "{url}/png"],
            "--source: must not be empty",
        ),
        # httpx would send the URL's user and password in place of the key.
        (
            [GENERATION_REQUESTED, "--to", "http://ops:s3cret@{host}/png", "--token", "igk_k"],
            "--to: 'http://***@{host}/png' holds a user or password and --token is given",
        ),
    ],
)
def test_an_event_send_cannot_send_is_refused_before_posting(
    cli: RunCli, replies: tuple[str, list[str]], args: list[str], named: str
) -> None:
    url, posted = replies
    host = url.removeprefix("http://")
    before = len(posted)
    result = cli("send", *(a.format(url=url, host=host) for a in args))
    assert result.returncode == 2, result.stderr
    line = _one_error_line(result.stderr)
    assert named.format(host=host) in line and "s3cret" not in line
    assert len(posted) == before


def test_a_password_in_the_url_is_never_said(cli: RunCli, replies: tuple[str, list[str]]) -> None:
    url, _ = replies
    host = url.removeprefix("http://")
    with socket.socket() as probe:  # a port the system gives, then closed: nothing listens
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    unreachable = cli(
        "send", GENERATION_REQUESTED, "--to", f"http://ops:s3cret@127.0.0.1:{closed}/"
    )
    line = _one_error_line(unreachable.stderr)
    assert unreachable.returncode == 1
    assert f"could not reach http://***@127.0.0.1:{closed}/" in line and "s3cret" not in line
    args = ("--to", f"http://ops:s3cret@{host}/trickle", "--timeout", "1")
    stalled = cli("send", GENERATION_REQUESTED, *args)
    line = _one_error_line(stalled.stderr)
    assert stalled.returncode == 1
    assert f"http://***@{host}/trickle did not reply within 1 s" in line and "s3cret" not in line
