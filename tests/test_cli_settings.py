"""What the ``imagegen`` command line says about settings and a ledger it cannot use: one line
naming the variable (or the ledger) and a non-zero exit, never a traceback; and the help of a
group given no command."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import CliResult, RunCli

SMALL = ["--model", "tiny", "--width", "256", "--height", "256"]
SOME_ID = "733e7aba12d0499084d131cd17176267"


def one_error_line(result: CliResult) -> str:
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("imagegen: error: "), lines[0]
    return lines[0].removeprefix("imagegen: error: ")


# -- a ledger that cannot be opened ----------------------------------------------------------


def _unusable_ledger(kind: str, root: Path) -> tuple[Path, str]:
    """A ledger path that cannot hold a ledger, and what the error says of it."""
    if kind == "not a database":
        path = root / "notes.db"
        path.write_text("not a database\n")
        return path, "is not a SQLite database"
    if kind == "a folder":
        path = root / "folder"
        path.mkdir()
        return path, "is a folder"
    blocker = root / "blocker"  # a regular file where a folder of the path should be
    blocker.write_text("x")
    return blocker / "sub" / "ledger.db", "has a file where a folder of its path should be"


KINDS = ["not a database", "a folder", "a file on its path"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "args",
    [
        ["history"],
        ["status", SOME_ID],
        ["replay", SOME_ID],
        ["ledger", "export"],
        ["ledger", "prune"],
    ],
    ids=lambda args: "-".join(args[:2]).replace(SOME_ID, "id"),
)
def test_a_ledger_that_cannot_be_opened_is_one_line(
    cli: RunCli, tmp_path: Path, kind: str, args: list[str]
) -> None:
    path, says = _unusable_ledger(kind, tmp_path)
    result = cli(*args, env={"IMAGEGEN_LEDGER_URL": f"sqlite:///{path}"})
    line = one_error_line(result)
    assert result.returncode == 2  # the setting (or --ledger) must change
    assert line.startswith(f"ledger {path} {says}"), line


def test_the_ledger_option_is_checked_alike(cli: RunCli, tmp_path: Path) -> None:
    path, says = _unusable_ledger("not a database", tmp_path)
    result = cli("history", "--ledger", str(path))
    assert result.returncode == 2
    assert one_error_line(result).startswith(f"ledger {path} {says}")


READERS = [
    ["history"],
    ["status", SOME_ID],
    ["replay", SOME_ID],
    ["ledger", "export"],
    ["ledger", "prune", "--days", "30"],
]
"""The commands that read (or prune) the ledger: none of them makes one."""


@pytest.mark.parametrize(
    "args", READERS, ids=lambda args: "-".join(args[:2]).replace(SOME_ID, "id")
)
@pytest.mark.parametrize("form", ["path", "sqlite URL"])
def test_a_ledger_option_naming_no_file_is_refused_and_not_made(
    cli: RunCli, tmp_path: Path, args: list[str], form: str
) -> None:
    """A typo in --ledger is not an empty history: the file (and its folders) are not made."""
    path = tmp_path / "typo" / "ledger.db"
    given = str(path) if form == "path" else f"sqlite:///{path}"
    result = cli(*args, "--ledger", given)
    assert one_error_line(result) == f"--ledger: {path} does not exist"
    assert result.returncode == 2
    assert not (tmp_path / "typo").exists()


@pytest.mark.parametrize("setting", [False, True], ids=["default", "IMAGEGEN_LEDGER_URL"])
def test_no_ledger_yet_is_no_generation_yet_and_none_is_made(
    cli: RunCli, tmp_path: Path, setting: bool
) -> None:
    """The ledger generate records into (the default, or the setting's) not made yet: nothing
    recorded, said as such by each command; the file is made by the first generation only."""
    from imagegen.ledger import default_ledger_path

    path = tmp_path / "data" / "ledger.db" if setting else default_ledger_path()
    env = {"IMAGEGEN_LEDGER_URL": str(path)} if setting else {}
    listed = cli("history", "--json", env=env)
    assert (listed.returncode, listed.stdout, listed.stderr) == (0, "[]\n", "")
    for args in (["status", SOME_ID], ["replay", SOME_ID]):
        result = cli(*args, env=env)
        assert result.returncode == 1
        assert one_error_line(result) == f"generation '{SOME_ID}' is not in the ledger"
    exported = cli("ledger", "export", env=env)
    assert (exported.returncode, exported.stdout, exported.stderr) == (0, "", "")
    pruned = cli("ledger", "prune", "--days", "30", env=env)
    assert pruned.returncode == 0, pruned.stderr
    assert pruned.stdout == "no generation recorded yet: nothing pruned\n"
    assert not path.parent.exists()


def test_export_refuses_a_bad_since_before_it_opens_the_ledger(cli: RunCli, tmp_path: Path) -> None:
    path, _ = _unusable_ledger("not a database", tmp_path)
    result = cli("ledger", "export", "--since", "soon", "--ledger", str(path))
    assert result.returncode == 2
    assert one_error_line(result).startswith("--since: 'soon'")


def test_generate_without_a_usable_ledger_warns_and_still_makes_the_image(
    cli: RunCli, tmp_path: Path
) -> None:
    path, says = _unusable_ledger("a file on its path", tmp_path)
    result = cli("generate", "a lighthouse", *SMALL, env={"IMAGEGEN_LEDGER_URL": str(path)})
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    # One line, whatever the width: a long path is not folded into pieces.
    assert f"warning: history is not recorded: ledger {path} {says}\n" in result.stderr
    assert list((tmp_path / "output").rglob("*.png"))


def test_generate_with_a_ledger_functions_url_says_the_history_is_not_recorded(
    cli: RunCli, tmp_path: Path
) -> None:
    """A ledger function records its cluster's events: nothing this process makes reaches it,
    and that is said rather than recording nowhere without a word."""
    result = cli(
        "generate", "a lighthouse", *SMALL, env={"IMAGEGEN_LEDGER_URL": "http://127.0.0.1:47009"}
    )
    assert result.returncode == 0, result.stderr
    assert (
        "warning: history is not recorded: IMAGEGEN_LEDGER_URL is a ledger function's URL,"
        " which records a cluster's generations, not this machine's\n"
    ) in result.stderr
    assert list((tmp_path / "output").rglob("*.png"))
    assert not (tmp_path / "xdg-data" / "imagegen").exists()


def test_doctor_without_a_usable_ledger_fails_its_row_and_checks_the_rest(
    cli: RunCli, tmp_path: Path
) -> None:
    path, says = _unusable_ledger("not a database", tmp_path)
    result = cli("doctor", "--json", env={"IMAGEGEN_LEDGER_URL": f"sqlite:///{path}"})
    assert result.returncode == 1 and "Traceback" not in result.stderr
    checks = {c["check"]: c for c in json.loads(result.stdout)["checks"]}
    assert checks["ledger"]["status"] == "error"
    assert checks["ledger"]["summary"] == f"ledger {path} {says}."
    assert checks["storage"]["status"] == "ok"


def test_the_ledger_function_answers_503_naming_the_setting(tmp_path: Path) -> None:
    from tests.functions.clients import InProcessFunction

    path, says = _unusable_ledger("not a database", tmp_path)
    with InProcessFunction("ledger", {"IMAGEGEN_LEDGER_URL": f"sqlite:///{path}"}) as function:
        answer = function.get("/generations")
    assert answer.status_code == 503, answer.text
    body = answer.json()
    assert body["error"] == "not_configured" and body["retryable"] is True
    assert body["errors"] == [{"field": "ledger_url", "message": says}]


# -- settings named by the variable the user set ---------------------------------------------


@pytest.mark.parametrize(
    ("env", "named"),
    [
        # JSON settings with bad JSON (pydantic-settings' own decoding used to raise).
        ({"IMAGEGEN_MODEL_REVISIONS": "notjson"}, "IMAGEGEN_MODEL_REVISIONS"),
        ({"IMAGEGEN_PLUGIN_OPTIONS": "{bad"}, "IMAGEGEN_PLUGIN_OPTIONS"),
        # A setting under an alias: the variable set, once prefixed.
        ({"IMAGEGEN_SERVED_MODELS": "[x"}, "IMAGEGEN_SERVED_MODELS"),
        ({"IMAGEGEN_ALLOWED_MODELS": "[x"}, "IMAGEGEN_ALLOWED_MODELS"),
        ({"OLLAMA_HOST": "http://[::1"}, "OLLAMA_HOST"),
        ({"K_SINK": "broker:8080"}, "K_SINK"),
        # Settings that were taken as any text and failed later with a traceback.
        ({"IMAGEGEN_TIMEZONE": "Not/AZone"}, "IMAGEGEN_TIMEZONE"),
        ({"IMAGEGEN_OLLAMA_HOST": "http://[::1"}, "IMAGEGEN_OLLAMA_HOST"),
        ({"IMAGEGEN_OLLAMA_HOST": "ollama:99999"}, "IMAGEGEN_OLLAMA_HOST"),
        ({"IMAGEGEN_OLLAMA_HOST": "ftp://ollama"}, "IMAGEGEN_OLLAMA_HOST"),
        # A token in the query, which Ollama's client would never send.
        ({"IMAGEGEN_OLLAMA_HOST": "http://ollama/?token=hunter2"}, "IMAGEGEN_OLLAMA_HOST"),
        ({"OLLAMA_HOST": "ollama:11434?token=hunter2"}, "OLLAMA_HOST"),
        # No name Ollama takes: it would answer every prompt with a 400.
        ({"IMAGEGEN_OLLAMA_MODEL": "llama 3.2"}, "IMAGEGEN_OLLAMA_MODEL"),
        ({"IMAGEGEN_S3_ENDPOINT_URL": "http://[::1"}, "IMAGEGEN_S3_ENDPOINT_URL"),
        ({"IMAGEGEN_S3_ENDPOINT_URL": "minio:9000"}, "IMAGEGEN_S3_ENDPOINT_URL"),
        ({"IMAGEGEN_PUBLIC_BASE_URL": "https://[img"}, "IMAGEGEN_PUBLIC_BASE_URL"),
        ({"IMAGEGEN_SINK_URL": "http://[::1"}, "IMAGEGEN_SINK_URL"),
        # A password without its "@" is what urllib takes for a port, and quoted back.
        ({"OLLAMA_HOST": "http://admin:hunter2"}, "OLLAMA_HOST"),
        ({"IMAGEGEN_S3_ENDPOINT_URL": "https://AKIAKEY:wJalrXUtn"}, "IMAGEGEN_S3_ENDPOINT_URL"),
    ],
    ids=lambda value: "-".join(value) if isinstance(value, dict) else None,
)
def test_an_invalid_setting_names_the_variable_set(
    cli: RunCli, monkeypatch: pytest.MonkeyPatch, env: dict[str, str], named: str
) -> None:
    monkeypatch.delenv("IMAGEGEN_OLLAMA_HOST", raising=False)  # else it hides OLLAMA_HOST
    result = cli("plugins", env=env)
    line = one_error_line(result)
    assert result.returncode == 2
    summary = line.split(" (", 1)[0]
    assert summary == f"invalid settings: {named}", line
    assert next(iter(env.values())) not in line  # named, never echoed
    assert "hunter2" not in line and "wJalrXUtn" not in line  # nor a part of it


@pytest.mark.parametrize(
    ("args", "env", "said"),
    [
        # Taken as any text: ready, and every request needing OIDC answered 503.
        (
            ["plugins"],
            {"IMAGEGEN_OIDC_DISCOVERY_URL": "https://alice:hunter2@issuer:99999"},
            "IMAGEGEN_OIDC_DISCOVERY_URL (not a valid URL (its port is out of range))",
        ),
        # Taken: the ledger was ready and answered 503; history waited 10 s, then "unreachable".
        (
            ["history"],
            {"IMAGEGEN_LEDGER_URL": "postgresql://pg:hunter2@127.0.0.1:abc/db"},
            "IMAGEGEN_LEDGER_URL (not a valid PostgreSQL URL (its port is not a number))",
        ),
        (
            ["history"],
            {"IMAGEGEN_LEDGER_URL": "postgresql://pg:hunter2@127.0.0.1:99999/db"},
            "IMAGEGEN_LEDGER_URL (not a valid PostgreSQL URL (its port is out of range))",
        ),
        # Empty, it signed nothing: public URLs unsigned, written once into every record.
        (
            ["plugins"],
            {"IMAGEGEN_URL_SIGNING_SECRET": ""},
            "IMAGEGEN_URL_SIGNING_SECRET (empty: give a random secret (openssl rand -hex 32),"
            " or leave it unset)",
        ),
        (
            ["plugins"],
            {"IMAGEGEN_URL_SIGNING_SECRET": "hunter2"},
            "IMAGEGEN_URL_SIGNING_SECRET (shorter than 16 bytes: use openssl rand -hex 32)",
        ),
        # Kept, it signed with a secret the Worker (trimmed by wrangler) lacks: every URL 403.
        (
            ["plugins"],
            {"IMAGEGEN_URL_SIGNING_SECRET": "hunter2-hunter2-hunter2\n"},
            "IMAGEGEN_URL_SIGNING_SECRET (begins or ends with whitespace: the Worker's copy, set"
            " with wrangler secret put, loses trailing whitespace and would sign differently)",
        ),
        (
            ["plugins"],
            {"IMAGEGEN_WEBHOOK_SECRETS": ""},
            "IMAGEGEN_WEBHOOK_SECRETS (empty: give one or more whsec_ secrets, or leave it unset)",
        ),
        (
            ["plugins"],
            {"IMAGEGEN_WEBHOOK_ALLOWED": "hunter2.example.com/99"},
            "IMAGEGEN_WEBHOOK_ALLOWED (entry 1 of 1 is neither a network (10.0.0.0/8), an"
            " address nor a host name)",
        ),
        # It quoted its regular expression.
        (
            ["plugins"],
            {"IMAGEGEN_OLLAMA_KEEP_ALIVE": "hunter2"},
            "IMAGEGEN_OLLAMA_KEEP_ALIVE (not a duration: give one such as 30m or 24h, seconds,"
            " or -1 for always)",
        ),
        # They said "less than or equal to ...".
        (
            ["plugins"],
            {"IMAGEGEN_RENDER_BATCH_WINDOW_MS": "nan"},
            "IMAGEGEN_RENDER_BATCH_WINDOW_MS (Input should be a finite number)",
        ),
        (
            ["plugins"],
            {"IMAGEGEN_OLLAMA_TEMPERATURE": "inf"},
            "IMAGEGEN_OLLAMA_TEMPERATURE (Input should be a finite number)",
        ),
        # It said "IMAGEGEN_MODEL must be one of IMAGEGEN_SERVED_MODELS ()".
        (
            ["plugins"],
            {"IMAGEGEN_SERVED_MODELS": ""},
            "IMAGEGEN_SERVED_MODELS (empty: name the models the render services serve)",
        ),
        # An entry of a list pydantic refuses: they named it by its index from 0
        # (IMAGEGEN_DERIVATIVE_WIDTHS.1), the settings' own checks by its place.
        (
            ["plugins"],
            {"IMAGEGEN_DERIVATIVE_WIDTHS": "256,hunter2"},
            "IMAGEGEN_DERIVATIVE_WIDTHS (entry 2 of 2: Input should be a valid integer, unable"
            " to parse string as an integer)",
        ),
        (
            ["plugins"],
            {"IMAGEGEN_DERIVATIVE_WIDTHS": "8193"},
            "IMAGEGEN_DERIVATIVE_WIDTHS (entry 1 of 1: Input should be less than or equal to 8192)",
        ),
        # Two entries of one list: each reason, the setting named once.
        (
            ["plugins"],
            {"IMAGEGEN_DERIVATIVE_WIDTHS": "8193,512,8"},
            "IMAGEGEN_DERIVATIVE_WIDTHS (entry 1 of 3: Input should be less than or equal to 8192;"
            " entry 3 of 3: Input should be greater than or equal to 16)",
        ),
        (
            ["plugins"],
            {"IMAGEGEN_PLUGINS": '["holiday", 7, "weather"]'},
            "IMAGEGEN_PLUGINS (entry 2 of 3: Input should be a valid string)",
        ),
        (
            ["plugins"],
            {"IMAGEGEN_HOLIDAY_COUNTRIES": '["US", ["hunter2"]]'},
            "IMAGEGEN_HOLIDAY_COUNTRIES (entry 2 of 2: Input should be a valid string)",
        ),
        (
            ["plugins"],
            {"IMAGEGEN_WEBHOOK_SECRETS": '[{"whsec_hunter2": 1}]'},
            "IMAGEGEN_WEBHOOK_SECRETS (entry 1 of 1: Input should be a valid string)",
        ),
    ],
    ids=lambda value: "-".join(value) if isinstance(value, dict) else None,
)
def test_a_setting_that_cannot_work_is_refused_in_words(
    cli: RunCli, args: list[str], env: dict[str, str], said: str
) -> None:
    result = cli(*args, env=env)
    assert result.returncode == 2, result.stderr
    assert one_error_line(result) == f"invalid settings: {said}"
    assert "hunter2" not in result.stderr + result.stdout  # named, never echoed


def test_serve_refuses_settings_that_cannot_work_before_starting(tmp_path: Path) -> None:
    """It said where it served and kept running, answering 503 to every request; a fresh
    process, as the command replaces itself with the server once the checks pass."""
    from tests.functions.servers import free_port

    env = {**os.environ, "IMAGEGEN_TIMEZONE": "Mars/Base"}
    command = [sys.executable, "-m", "imagegen.cli", "serve", "enhance"]
    result = subprocess.run(
        [*command, "--port", str(free_port())],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == (
        "imagegen: error: invalid settings: IMAGEGEN_TIMEZONE (unknown IANA time zone)"
    )
    assert "serving" not in result.stdout + result.stderr


@pytest.mark.parametrize(
    ("stage", "env", "line"),
    [
        (
            "persist",
            {"IMAGEGEN_STORAGE_URL": "azure://b/x"},
            "invalid IMAGEGEN_STORAGE_URL: unsupported scheme 'azure'; use a path, file:// or"
            " s3://",
        ),
        (
            "enhance",
            {"IMAGEGEN_PLUGINS": "time_of_day,nosuchplugin"},
            "invalid settings: IMAGEGEN_PLUGINS (unknown plugin 'nosuchplugin'; known: ",
        ),
        (
            "enhance",
            {"IMAGEGEN_PLUGIN_OPTIONS": '{"art_style": {"style": 5}}'},
            "invalid settings: IMAGEGEN_PLUGIN_OPTIONS"
            " (plugin_options.art_style.style: must be text, got 5)",
        ),
    ],
    ids=["storage", "plugins", "plugin-options"],
)
def test_serve_refuses_storage_and_plugins_the_function_would_refuse(
    tmp_path: Path, stage: str, env: dict[str, str], line: str
) -> None:
    """It said where it served, and the function answered 503 on ``/readyz`` for good, while
    ``imagegen generate`` refused the same settings in one line."""
    from tests.functions.servers import free_port

    command = [sys.executable, "-m", "imagegen.cli", "serve", stage, "--port", str(free_port())]
    result = subprocess.run(
        command,
        cwd=tmp_path,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"imagegen: error: {line}"), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "serving" not in result.stdout + result.stderr


@pytest.mark.parametrize(
    ("args", "env", "named"),
    [
        (["generate", "x", *SMALL], {"IMAGEGEN_TIMEZONE": "Not/AZone"}, "IMAGEGEN_TIMEZONE"),
        (
            ["generate", "x", *SMALL],
            {"IMAGEGEN_OLLAMA_HOST": "http://[::1"},
            "IMAGEGEN_OLLAMA_HOST",
        ),
        (
            ["doctor"],
            {"IMAGEGEN_STORAGE_URL": "s3://bucket/p", "IMAGEGEN_S3_ENDPOINT_URL": "http://[::1"},
            "IMAGEGEN_S3_ENDPOINT_URL",
        ),
    ],
    ids=["generate-timezone", "generate-ollama-host", "doctor-s3-endpoint"],
)
def test_the_commands_that_crashed_on_a_bad_setting_say_which(
    cli: RunCli, args: list[str], env: dict[str, str], named: str
) -> None:
    result = cli(*args, env=env)
    assert result.returncode == 2
    assert one_error_line(result).startswith(f"invalid settings: {named} ")


def test_ollama_host_takes_the_forms_ollama_takes_and_no_other(cli: RunCli) -> None:
    # The forms ollama-python's _parse_host documents (ollama/_client.py) ...
    taken = [
        "1.2.3.4",
        ":56789",
        "example.com:56789/path/",
        "https://example.com",
        "[0001:002:003:0004::1]:56789",
        "http://[0001:002:003:0004::1]",
        "https://user:p%40ss@ollama.example",  # sent as Basic auth
    ]
    # ... and what it cannot read (urlsplit raises in it) or send (not HTTP).
    refused = ["http://[::1", "[::1", "ollama:99999", "ollama:port", "ftp://ollama", "ollama?t=1"]
    for host in taken:
        result = cli("plugins", "--json", env={"IMAGEGEN_OLLAMA_HOST": host})
        assert result.returncode == 0, (host, result.stderr)
    for host in refused:
        result = cli("plugins", "--json", env={"IMAGEGEN_OLLAMA_HOST": host})
        assert result.returncode == 2, (host, result.stdout)
        assert one_error_line(result).startswith("invalid settings: IMAGEGEN_OLLAMA_HOST ")


def test_a_settings_source_error_is_named_by_its_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError

    from imagegen.errors import ConfigurationError

    class Decoded(BaseSettings):  # a dict setting decoded by pydantic-settings itself
        model_config = SettingsConfigDict(env_prefix="IMAGEGEN_")
        options: dict[str, str] = {}

    monkeypatch.setenv("IMAGEGEN_OPTIONS", "{secret-but-bad")
    with pytest.raises(SettingsError) as raised:
        Decoded()
    error = ConfigurationError.of("", raised.value, name=lambda f: f"IMAGEGEN_{f.upper()}")
    assert error.message == "invalid settings: IMAGEGEN_OPTIONS"
    assert error.fields == ["options"]
    assert "secret" not in error.message + str(error.errors)


# -- a group with no command shows its help --------------------------------------------------


@pytest.mark.parametrize(
    "group", [[], ["models"], ["ledger"]], ids=["imagegen", "models", "ledger"]
)
def test_a_group_without_a_command_shows_its_help(cli: RunCli, group: list[str]) -> None:
    result = cli(*group)
    # click's behaviour for a group with no_args_is_help: the help on stderr, exit 2.
    assert result.returncode == 2
    assert result.stderr.startswith(f"Usage: {' '.join(['imagegen', *group])} "), result.stderr
    assert "Commands:" in result.stderr and "imagegen: error" not in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize("options", [["-v"], ["--verbose"]])
def test_options_without_a_command_show_the_help_as_none_do(
    cli: RunCli, options: list[str]
) -> None:
    """``imagegen -v`` said a bare "Missing command.", where ``imagegen`` shows its help."""
    assert cli(*options) == cli()


def test_a_misspelled_variable_is_a_warning_that_names_the_setting(
    cli: RunCli, tmp_path: Path
) -> None:
    """IMAGEGEN_MODLE is read by no setting: the command runs with the default, and says so
    (from the environment or the .env file)."""
    (tmp_path / ".env").write_text("IMAGEGEN_STORAGEURL=./elsewhere\n")
    result = cli("plugins", env={"IMAGEGEN_MODLE": "tiny"})
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [
        "imagegen: warning: IMAGEGEN_MODLE is no setting (ignored); did you mean IMAGEGEN_MODEL?",
        "imagegen: warning: IMAGEGEN_STORAGEURL is no setting (ignored);"
        " did you mean IMAGEGEN_STORAGE_URL?",
    ]


def test_a_dotenv_line_that_cannot_be_parsed_is_a_warning(
    cli: RunCli, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """python-dotenv skips it and says so only as a log record: the value meant is not set.
    Said whatever level logging was set up with before (this process's earlier commands)."""
    caplog.set_level(logging.ERROR)  # the root's level, put back after the test
    (tmp_path / ".env").write_text("IMAGEGEN_MODEL=tiny\nIMAGEGEN_STEPS 4\n")
    for args in (["models", "list", "--json"], ["history"]):
        result = cli(*args)
        assert result.returncode == 0, result.stderr
        assert result.stderr == "imagegen: warning: .env line 2 cannot be parsed (ignored)\n"


def test_a_relative_xdg_data_home_is_ignored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The XDG Base Directory specification: a relative path is invalid, and ignored."""
    from imagegen.ledger import default_ledger_path

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_DATA_HOME", "relative/data")
    assert (
        default_ledger_path() == tmp_path / "home" / ".local" / "share" / "imagegen" / "ledger.db"
    )
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    assert default_ledger_path() == tmp_path / "data" / "imagegen" / "ledger.db"


@pytest.mark.parametrize(
    "host",
    [
        "http://user:hunter2#x@ollama:11434",  # read as a port, "hunter2"
        "http://us#er:hunter2@ollama",  # read as a fragment
        "http://user:hunter2?x@ollama",  # read as a query
        "http://user:hunter2/x@ollama",  # read as a path, to the host "user"
        "http://user:hunter2[x@ollama",  # read as an IPv6 host's bracket
        "http://user:hunter2]x@ollama",
    ],
    ids=["hash", "hash-in-user", "question-mark", "slash", "open-bracket", "close-bracket"],
)
def test_an_ollama_host_with_unencoded_user_info_says_to_percent_encode_it(
    cli: RunCli, host: str
) -> None:
    # urlsplit ends the authority at the first /, ? or #: what follows is no user-info; and
    # reads a bracket in the authority as an IPv6 host's.
    result = cli("plugins", "--json", env={"IMAGEGEN_OLLAMA_HOST": host})
    assert result.returncode == 2, result.stdout
    line = one_error_line(result)
    assert line.startswith("invalid settings: IMAGEGEN_OLLAMA_HOST (has a /, ?, #, [ or ] before")
    assert "percent-encoded (%2F, %3F, %23, %5B, %5D)" in line
    assert "hunter2" not in result.stdout + result.stderr


def test_an_ollama_host_takes_an_unencoded_at_and_colon_in_the_password(cli: RunCli) -> None:
    # urlsplit splits the user-info from the host at the last @, and the password from the
    # user name at the first :.
    result = cli("plugins", "--json", env={"IMAGEGEN_OLLAMA_HOST": "http://user:p@ss:w@ollama"})
    assert result.returncode == 0, result.stderr
