"""What the command line does with input it cannot use: one line naming it, and no work lost.

Bad input is exit 2 and one line on stderr naming the option (never a traceback); a storage
that cannot take the image fails before the render, not after it.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from imagegen.events import GENERATION_REQUESTED
from tests.conftest import RunCli
from tests.test_cli import SMALL

GID = "3f1c0d6e9a2b4c8e9d7f6a5b4c3d2e1f"
NOWHERE = "http://127.0.0.1:9"  # the discard port: connections are refused at once


def _one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("imagegen: error:"), lines[0]
    return lines[0]


@pytest.mark.parametrize(
    ("args", "named"),
    [
        # httpx.InvalidURL is no httpx.HTTPError: it escaped both commands as a traceback.
        (["send", GENERATION_REQUESTED, "--to", "http://[::1"], "--to"),
        (["status", GID, "--ledger", "http://[::1"], "--ledger"),
        (["history", "--ledger", "http://[::1"], "--ledger"),
        (["send", GENERATION_REQUESTED, "--to", "http://xn--a.com:9"], "--to"),  # IDNA refuses
        (["status", GID, "--ledger", NOWHERE, "--token", "clé"], "--token"),  # no header value
        # httpx sends a URL's user and password as Basic auth in place of the bearer key.
        (["history", "--ledger", "http://u:pw@127.0.0.1:9", "--token", "igk_x"], "--ledger: "),
        # Out of range for the library underneath (httpx, timedelta, datetime).
        (["send", GENERATION_REQUESTED, "--to", NOWHERE, "--timeout", "-1"], "--timeout"),
        (["send", GENERATION_REQUESTED, "--to", NOWHERE, "--timeout", "nan"], "--timeout"),
        (["history", "--since", "999999999w"], "--since"),
        (["ledger", "export", "--since", "9999999999d"], "--since"),
        # A time the HTTP API refuses (400) was a traceback on a local ledger, or no answer.
        (["history", "--since", "9999-12-31T23:59:59-01:00"], "--since"),
        (["history", "--until", "0001-01-01T00:00:00+01:00"], "--until"),
        (["ledger", "export", "--since", "5000-01-01"], "--since"),
        (["ledger", "prune", "--days", "99999999999"], "--days"),
        (["ledger", "prune", "--days", "-5"], "--days"),  # was "nothing pruned", exit 0
        # An id is checked before it becomes a URL path ('a/../b' asked for 'b').
        (["status", "a/../b", "--ledger", NOWHERE], "'a/../b'"),
        # NaN passed the `< 0` check (and would have rendered an image, here one).
        (["loop", "x", *SMALL, "--count", "1", "--interval", "nan"], "--interval"),
        # Named as the option typed, not as the setting it gives (storage_url).
        # ... and never showing what was typed (a URL may hold a key).
        (["generate", "x", *SMALL, "--output", ""], "error: --output: empty"),
        (["generate", "x", *SMALL, "-o", "ftp://u:p@host/x"], "error: --output: unsupported"),
        (["generate", "x", *SMALL, "-o", "s3://"], "error: --output: not a valid bucket name"),
        # An empty model was the default model, without a word.
        (["generate", "x", "--model", ""], "error: --model: empty"),
        # An empty ledger was the current folder ("ledger . is a folder, not a file").
        (["history", "--ledger", ""], "error: --ledger: empty"),
        (["status", GID, "--ledger", " "], "error: --ledger: empty"),
        (["ledger", "export", "--ledger", ""], "error: --ledger: empty"),
        (["loop", "x", "--model", " ", "--count", "1"], "error: --model: empty"),
        # No URL to post to was "could not reach", exit 1.
        (["send", GENERATION_REQUESTED, "--to", "notaurl"], "error: --to: 'notaurl'"),
        (["send", GENERATION_REQUESTED, "--to", "ftp://host/x"], "error: --to: 'ftp://host/x'"),
        (["send", GENERATION_REQUESTED, "--to", "http://"], "error: --to: 'http://'"),
        # No CloudEvents String (a header value, in binary mode, was blamed on --to).
        (["send", "g\tenerated", "--to", NOWHERE], "error: TYPE: "),
        (["send", GENERATION_REQUESTED, "--to", NOWHERE, "--source", "/\x1b"], "error: --source: "),
        (["send", GENERATION_REQUESTED, "--to", NOWHERE, "--subject", "\ufffe"], "--subject: "),
        (["history", "--limit", "0"], "--limit"),
        (["history", "--limit", "501"], "--limit"),
        # Path("") is ".": an empty name was "a local directory, nothing to pull".
        (["models", "pull", ""], "a model name is empty"),
    ],
)
def test_unusable_input_is_exit_2_and_one_line_naming_it(
    cli: RunCli, args: list[str], named: str
) -> None:
    result = cli(*args)
    assert result.returncode == 2, result.stderr
    assert named in _one_line(result.stderr)
    assert "Traceback" not in result.stderr + result.stdout


@pytest.mark.parametrize("refused", [["--model", "nope"], ["--plugins", "nope"]])
def test_a_request_generate_refuses_is_not_recorded(cli: RunCli, refused: list[str]) -> None:
    """Bad input (exit 2) is no generation: the history lists none."""
    result = cli("generate", "x", "--width", "256", "--height", "256", *refused)
    assert result.returncode == 2, result.stderr
    assert "invalid GenerationRequest: " in _one_line(result.stderr)
    listed = cli("history", "--json")
    assert (listed.returncode, json.loads(listed.stdout)) == (0, [])


def test_serve_refuses_an_address_it_cannot_listen_on_in_one_line(tmp_path: Path) -> None:
    """A port in use, a host that is no address: one line, at once (gunicorn retries for
    five seconds, a line each, and then a traceback)."""
    import socket

    def serve(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "imagegen.cli", "serve", "render", *args]
        return subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=60)

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        in_use = serve("--port", str(taken.getsockname()[1]))
    assert in_use.returncode == 1, in_use.stderr
    assert "in use" in _one_line(in_use.stderr)
    bad_host = serve("--port", "8080", "--host", "bad host!")
    assert bad_host.returncode == 2 and "--host" in _one_line(bad_host.stderr)


@pytest.mark.parametrize("port", ["99999", "-1"])
def test_serve_refuses_a_port_out_of_range_before_starting(tmp_path: Path, port: str) -> None:
    # A fresh process: without the check, the command replaces itself with gunicorn.
    result = subprocess.run(
        [sys.executable, "-m", "imagegen.cli", "serve", "render", "--port", port],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert "--port" in _one_line(result.stderr)


def test_serve_from_an_installed_package_says_where_functions_are_found(
    cli: RunCli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A wheel carries no functions/: outside a checkout and the image's /app, serve says
    where they are found rather than look in site-packages."""
    from imagegen.cli import tools
    from imagegen.errors import InvalidRequest
    from tests.conftest import ROOT

    site = tmp_path / "site-packages"
    monkeypatch.setattr(tools, "__file__", str(site / "imagegen" / "cli" / "tools.py"))

    result = cli("serve", "persist")

    assert result.returncode == 2, result.stderr
    assert _one_line(result.stderr) == (
        "imagegen: error: functions/ not found: an installed imagegen has none; run from a"
        " checkout or the image's /app, or set IMAGEGEN_FUNCTIONS_DIR to a functions/ folder"
    )
    (site / "functions").mkdir(parents=True)  # another distribution's top-level package
    (site / "functions" / "_adapter.py").write_text("")
    with pytest.raises(InvalidRequest):
        tools.functions_dir()
    monkeypatch.setenv("IMAGEGEN_FUNCTIONS_DIR", str(ROOT / "functions"))
    assert tools.functions_dir() == ROOT / "functions"
    monkeypatch.delenv("IMAGEGEN_FUNCTIONS_DIR")
    monkeypatch.chdir(ROOT)  # as in the image: /app/functions
    assert tools.functions_dir() == ROOT / "functions"


@pytest.mark.parametrize("command", [["generate", "x"], ["loop", "x", "--count", "1"]])
def test_object_storage_without_credentials_fails_before_the_render(
    cli: RunCli, tmp_path: Path, command: list[str]
) -> None:
    nothing = str(tmp_path / "no-aws-files")
    env = {  # no credentials from anywhere: files, the instance metadata service
        "AWS_SHARED_CREDENTIALS_FILE": nothing,
        "AWS_CONFIG_FILE": nothing,
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    result = cli(*command, *SMALL, "--output", "s3://bucket", env=env)
    assert result.returncode == 1
    assert "no usable credentials" in _one_line(result.stderr)
    # Checked before anything started: no generation was begun (and none failed half-way).
    listed = cli("history", "--json")
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout) == []


def test_a_file_in_the_way_of_a_key_is_named(cli: RunCli, tmp_path: Path) -> None:
    output = tmp_path / "out"
    output.mkdir()
    year = datetime.now(UTC).strftime("%Y")  # the key's first segment: yyyy/mm/dd/<id>.png
    (output / year).write_text("not a directory")
    result = cli("generate", "x", *SMALL, "--output", str(output))
    assert result.returncode == 1
    line = _one_line(result.stderr)
    assert f"{output / year}/" in line and "Not a directory" in line  # not just the root


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("ftp://AKIA0000:hunter2@example.org/images", "unsupported scheme 'ftp'"),
        ("s3://", "not a valid bucket name"),
        ("s3://AKIA0000:hunter2@bucket", "expected s3://bucket[/prefix]"),
        # Names S3 refuses (InvalidBucketName), which failed every write as a bug.
        ("s3://xn--example.org/images", "not a valid S3 bucket name (the prefix xn-- is reserved)"),
        (
            "s3://example.org-s3alias",
            "not a valid S3 bucket name (the suffix -s3alias is reserved)",
        ),
        ("s3://192.168.1.1/images", "not a valid S3 bucket name (formatted as an IP address)"),
    ],
)
@pytest.mark.parametrize("command", [["generate", "x"], ["loop", "x", "--count", "1"]])
def test_a_storage_url_setting_that_names_no_storage_is_named_by_its_variable(
    cli: RunCli, url: str, why: str, command: list[str]
) -> None:
    """Never by the field (storage_url), never with the value: it may hold a key."""
    result = cli(*command, *SMALL, env={"IMAGEGEN_STORAGE_URL": url})
    assert result.returncode == 2, result.stderr
    line = _one_line(result.stderr)
    assert line.startswith(f"imagegen: error: invalid IMAGEGEN_STORAGE_URL: {why}"), line
    assert "hunter2" not in line and "AKIA" not in line and "example.org" not in line


@pytest.mark.parametrize(
    "env",
    [
        {"IMAGEGEN_S3_PRESET": "r2"},  # an endpoint the preset needs
        {"IMAGEGEN_S3_ENDPOINT_URL": "https://storage.googleapis.com"},  # another's endpoint
        {"IMAGEGEN_S3_ACCESS_KEY_ID": "AKIAEXAMPLE"},  # half a key pair
    ],
)
def test_an_s3_setting_refused_is_named_by_its_variable(cli: RunCli, env: dict[str, str]) -> None:
    """The preset checks name the variables a person sets, in the message and its reasons."""
    result = cli("generate", "x", *SMALL, env={"IMAGEGEN_STORAGE_URL": "s3://bucket", **env})
    assert result.returncode == 2, result.stderr
    line = _one_line(result.stderr)
    assert "IMAGEGEN_S3_" in line, line
    assert not re.search(r"(?<![A-Z_])s3_[a-z_]+", line), line
    assert "AKIAEXAMPLE" not in line


@pytest.mark.parametrize("output", ["afile", "afile/sub"])
def test_an_output_that_is_a_file_is_said_to_be_one(
    cli: RunCli, tmp_path: Path, output: str
) -> None:
    """Not mkdir's "File exists" (or "Not a directory"): which path is a file."""
    (tmp_path / "afile").write_text("not a directory")
    result = cli("generate", "x", *SMALL, "--output", output)
    assert result.returncode == 1
    line = _one_line(result.stderr)
    assert line.endswith(f"{str(tmp_path / 'afile')!r} is a file, not a directory"), line


def test_doctor_reports_a_storage_url_it_cannot_open_as_a_row(cli: RunCli) -> None:
    result = cli("doctor", "--json", env={"IMAGEGEN_STORAGE_URL": "ftp://example.org/images"})
    assert result.returncode == 1, result.stderr
    checks = {c["check"]: c for c in json.loads(result.stdout)["checks"]}
    assert set(checks) == {"render", "model", "ollama", "storage", "plugins", "ledger"}
    assert checks["storage"]["status"] == "error"
    assert "ftp" in checks["storage"]["summary"]
    assert checks["ollama"]["status"] == "warning"  # still asked


def test_models_pull_refuses_a_file_before_pulling_anything(cli: RunCli, tmp_path: Path) -> None:
    (tmp_path / "README.md").write_text("# not a model\n")
    result = cli("models", "pull", "tiny", "README.md")
    assert result.returncode == 2
    assert _one_line(result.stderr) == (
        "imagegen: error: 'README.md' is a file here, not a pipeline directory or a Hub id"
    )
    assert result.stdout == ""  # nothing said of tiny: refused before any pull


def test_history_help_gives_the_limit_range(cli: RunCli) -> None:
    assert "1<=x<=500" in cli("history", "--help", env={"COLUMNS": "200"}).stdout


def test_the_limit_the_cli_allows_is_the_ledgers() -> None:
    from imagegen.cli.history import _MAX_PAGE
    from imagegen.ledger._sql import MAX_PAGE

    assert _MAX_PAGE == MAX_PAGE


def test_models_pull_skips_a_named_model_that_needs_no_download(
    cli: RunCli, tmp_path: Path
) -> None:
    local = tmp_path / "my-model"
    local.mkdir()
    result = cli("models", "pull", "tiny", str(local))
    assert result.returncode == 0, result.stderr
    assert "tiny: built offline, nothing to pull" in result.stdout
    assert f"{local}: a local directory, nothing to pull" in result.stdout


def test_history_folds_the_longest_ids_beside_their_status(cli: RunCli) -> None:
    from imagegen.events import GENERATION_REQUESTED
    from imagegen.ledger import LedgerEvent, open_ledger

    gid = "g" + "0123456789abcdef" * 7 + "0123456789abcde"  # the longest id there is
    assert len(gid) == 128
    ledger = open_ledger(None)  # the laptop's, where the CLI reads it
    try:
        data = {"generation_id": gid, "prompt": "a fox", "model": "tiny"}
        ledger.ingest(LedgerEvent(source="/t", id="1", type=GENERATION_REQUESTED, data=data))
    finally:
        ledger.close()
    result = cli("history", env={"COLUMNS": "80"})
    assert result.returncode == 0, result.stderr
    header, *rows = result.stdout.splitlines()
    assert max(len(line) for line in rows) <= 80
    # Under 100 columns the model is left out (status shows it), the time shortened.
    assert rows[0].split()[-3:] == ["requested", "a", "fox"], "the other columns kept"
    start, end = header.index("generation"), header.index("status")
    assert "".join(line[start:end].strip() for line in rows) == gid, "whole, folded"
    wide = cli("history", env={"COLUMNS": "120"}).stdout.splitlines()
    assert wide[1].split()[-4:] == ["requested", "tiny", "a", "fox"]


def test_history_shows_whole_ids_on_80_columns(cli: RunCli) -> None:
    from imagegen.ledger import LedgerEvent, open_ledger

    # A generation requested, with nothing rendered yet.
    prompt = "a long prompt that fills the last column of the table " * 2
    data = {"generation_id": GID, "prompt": prompt, "model": "some-organisation/some-long-name"}
    ledger = open_ledger(None)  # the laptop's, where the CLI reads it
    try:
        ledger.ingest(LedgerEvent(source="/t", id="1", type=GENERATION_REQUESTED, data=data))
    finally:
        ledger.close()
    (listed,) = json.loads(cli("history", "--json").stdout)
    result = cli("history", env={"COLUMNS": "80"})
    assert result.returncode == 0, result.stderr
    assert max(len(line) for line in result.stdout.splitlines()) <= 80
    assert listed["generation_id"] in result.stdout
    # One line per generation: the prompt cut with an ellipsis, not folded into fragments.
    [row] = [line for line in result.stdout.splitlines()[1:] if line.strip()]
    assert listed["generation_id"] in row and "a long" in row and row.rstrip().endswith("…")


def test_models_list_shows_each_id_whole_at_80_columns(cli: RunCli) -> None:
    """The id is what a user types and the served column says which: never cut to fit."""
    from imagegen.modelspec import MODELS

    result = cli("models", "list", env={"COLUMNS": "80"})
    assert result.returncode == 0, result.stderr
    assert max(len(line) for line in result.stdout.splitlines()) <= 80
    for spec in MODELS.values():
        assert any(line.split()[:1] == [spec.id] for line in result.stdout.splitlines()), spec.id


def test_a_prompt_too_long_is_said_in_characters(cli: RunCli) -> None:
    """It said "Value should have at most 2000 items after validation": a list's words."""
    from pydantic import ValidationError

    from imagegen.models import EnhancedPrompt

    result = cli("generate", "a" * 2001, *SMALL)
    assert result.returncode == 2, result.stderr
    assert _one_line(result.stderr) == (
        "imagegen: error: invalid GenerationRequest: prompt (String should have at most 2000"
        " characters)"
    )
    # Measured as given, as the JSON Schema's maxLength measures it: not once stripped.
    padded = cli("generate", f" {'a' * 2000}", *SMALL)
    assert "at most 2000 characters" in _one_line(padded.stderr)
    # The prompt a request gave, as the chain carries it on.
    with pytest.raises(ValidationError, match="at most 2000 characters"):
        EnhancedPrompt.model_validate(
            {
                "generation_id": GID,
                "prompt": "a moth",
                "original_prompt": "a" * 2001,
                "enhancer": "passthrough",
                "model": "tiny",
                "seed": 1,
                "width": 256,
                "height": 256,
            }
        )
