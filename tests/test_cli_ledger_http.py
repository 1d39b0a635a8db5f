"""The commands that read an ``http(s)://`` ledger: what a server that is no ledger answered,
said in one line, and the URL and key named as the user gave them."""

from __future__ import annotations

import json
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from typing import Any

import pytest

from tests.conftest import RunCli
from tests.fakes.loopback import LoopbackServer

GENERATION = "0123456789abcdef0123456789abcdef"
PAGE = b"<html>\n<body>Bad Gateway</body>\n</html>\n"


class _Page(BaseHTTPRequestHandler):
    """A proxy's HTML page, with the status its path names (``/502/generations``)."""

    asked: list[str]

    def _answer(self) -> None:
        self.asked.append(self.path)
        self.rfile.read(int(self.headers.get("content-length") or 0))
        self.send_response(int(self.path.split("/")[1]))
        self.send_header("content-type", "text/html")
        self.send_header("content-length", str(len(PAGE)))
        self.end_headers()
        self.wfile.write(PAGE)

    do_GET = do_POST = _answer

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def page() -> Iterator[tuple[str, list[str]]]:
    """A loopback server's address (host:port) and the paths asked of it so far."""
    asked: list[str] = []
    with LoopbackServer(type("Page", (_Page,), {"asked": asked})) as server:
        yield server.url.removeprefix("http://"), asked


def _error(result: Any) -> str:
    assert "Traceback" not in result.stdout + result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("imagegen: error: "), lines[0]
    return str(lines[0].removeprefix("imagegen: error: "))


@pytest.mark.parametrize(
    ("status", "code", "said"),
    [
        (502, 1, "answered 502 Bad Gateway"),
        (404, 2, "answered 404 Not Found"),
        (200, 1, "answered 200 OK, but not as the ledger API (no JSON)"),
    ],
)
def test_a_page_that_is_no_ledger_is_said_by_its_status(
    cli: RunCli, page: tuple[str, list[str]], status: int, code: int, said: str
) -> None:
    """It quoted the page (``ledger answered 502: <html>``) and named no URL."""
    host, _ = page
    url = f"http://reader:s3cret@{host}/{status}"
    for args in (("status", GENERATION), ("history",), ("replay", GENERATION)):
        result = cli(*args, "--ledger", url)
        line = _error(result)
        assert result.returncode == code, (args, line)
        assert line.startswith(f"ledger http://***@{host}/{status} {said}"), (args, line)
        assert "<html>" not in line and "s3cret" not in result.stdout + result.stderr


def test_doctor_says_a_page_that_is_no_ledger_by_its_status(
    cli: RunCli, page: tuple[str, list[str]]
) -> None:
    host, _ = page
    result = cli("doctor", "--json", env={"IMAGEGEN_LEDGER_URL": f"http://{host}/502"})
    assert result.returncode == 1, result.stderr
    rows = {row["check"]: row for row in json.loads(result.stdout)["checks"]}
    assert rows["ledger"]["summary"] == f"ledger http://{host}/502 answered 502 Bad Gateway."


@pytest.mark.parametrize(
    ("given", "ledger", "key"),
    [
        ("options", "--ledger", "--token"),
        ("environment", "IMAGEGEN_LEDGER_URL", "IMAGEGEN_API_KEY"),
        (".env", "IMAGEGEN_LEDGER_URL", "IMAGEGEN_API_KEY"),
        ("both", "--ledger", "IMAGEGEN_API_KEY"),
    ],
)
def test_the_url_and_key_are_named_as_they_were_given(
    cli: RunCli, page: tuple[str, list[str]], given: str, ledger: str, key: str
) -> None:
    """An error named --ledger and --token where the variables gave them."""
    from pathlib import Path

    host, asked = page
    before = len(asked)

    def run(*args: str, url: str, token: str | None) -> str:
        options: list[str] = []
        env: dict[str, str] = {}
        if given in ("options", "both"):
            options += ["--ledger", url]
        else:
            env["IMAGEGEN_LEDGER_URL"] = url
        if token is None:
            pass
        elif given == "options":
            options += ["--token", token]
        else:
            env["IMAGEGEN_API_KEY"] = token
        if given == ".env":
            Path(".env").write_text("".join(f'{k}="{v}"\n' for k, v in env.items()))
            env = {}
        result = cli(*args, *options, env=env)
        assert result.returncode == 2, result.stderr
        return _error(result)

    with_password = f"http://reader:s3cret@{host}/200"
    for args in (("history",), ("status", GENERATION), ("replay", GENERATION)):
        line = run(*args, url=with_password, token="igk_key")
        assert line.startswith(
            f"{ledger}: 'http://***@{host}/200' holds a user or password and {key} is given;"
        ), line
        line = run(*args, url=f"http://{host}/200", token="igk_key ")
        assert line.startswith(f"{key}: an API key has no spaces around it"), line
    if given != "both":  # export takes no key
        line = run("ledger", "export", url=f"http://{host}/200", token=None)
        assert line.startswith(f"{ledger}: export and prune read the ledger's database"), line
    assert len(asked) == before  # nothing was asked


def test_send_names_the_key_as_it_was_given(cli: RunCli, tmp_path: Any) -> None:
    to = "http://reader:s3cret@127.0.0.1:9/"
    for env, key in (({}, "--token"), ({"IMAGEGEN_API_KEY": "igk_key"}, "IMAGEGEN_API_KEY")):
        token = ["--token", "igk_key"] if key == "--token" else []
        result = cli("send", "x.y", "--to", to, *token, env=env)
        assert result.returncode == 2, result.stderr
        assert f"holds a user or password and {key} is given" in _error(result)
        spaced = ["--token", "igk_key "] if key == "--token" else []
        result = cli(
            "send",
            "x.y",
            "--to",
            "http://127.0.0.1:9/",
            *spaced,
            env={k: f"{v} " for k, v in env.items()},
        )
        assert _error(result) == f"{key}: an API key has no spaces around it"


def test_doctor_names_the_url_and_key_by_their_variables(
    cli: RunCli, page: tuple[str, list[str]]
) -> None:
    host, _ = page
    env = {"IMAGEGEN_LEDGER_URL": f"http://reader:s3cret@{host}/200", "IMAGEGEN_API_KEY": "k"}
    result = cli("doctor", "--json", env=env)
    rows = {row["check"]: row for row in json.loads(result.stdout)["checks"]}
    assert (
        f"IMAGEGEN_LEDGER_URL: 'http://***@{host}/200' holds a user or password and"
        " IMAGEGEN_API_KEY is given" in rows["ledger"]["summary"]
    )
    assert "--ledger" not in rows["ledger"]["summary"] and "s3cret" not in result.stdout
