"""What a newcomer sees from the command line: the result, at most one note, a line per image.

The command line runs in this process (``cli``), which sets up its output as a fresh process
does. What only a fresh process shows, the libraries' notices at import, is checked on the
fresh ``imagegen loop`` of tests/test_cli.py, whose stderr must stay empty.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

import pytest

from imagegen.cli._ollama import ollama_advice
from imagegen.cli._viewer import viewer_command
from imagegen.settings import Settings
from tests.conftest import RunCli
from tests.fakes.ollama_server import FakeOllama

SMALL = ["--model", "tiny", "--width", "256", "--height", "256"]
NO_OLLAMA = "http://127.0.0.1:9"  # the discard port: connections are refused at once


@pytest.fixture
def hub_reachable(monkeypatch: pytest.MonkeyPatch) -> None:
    """As where the Hub may be asked: tests/__init__.py sets ``HF_HUB_OFFLINE=1``, under which
    a model not in the cache fails doctor (every render would fail)."""
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "is_offline_mode", lambda: False)


def _fake_viewer(tmp_path: Path) -> tuple[Path, Path]:
    """An ``xdg-open`` on PATH that records what it was asked to show."""
    bin_dir, record = tmp_path / "bin", tmp_path / "opened.txt"
    bin_dir.mkdir()
    viewer = bin_dir / "xdg-open"
    viewer.write_text(f'#!/bin/sh\nprintf "%s" "$1" > "{record}"\n')
    viewer.chmod(0o755)
    return bin_dir, record


def test_generate_prints_the_result_and_one_line_about_the_fallback(tmp_path: Path) -> None:
    bin_dir, opened = _fake_viewer(tmp_path)
    from tests.conftest import isolated_environ

    env = {**isolated_environ(tmp_path), "DISPLAY": ":0"}
    env["PATH"] = f"{bin_dir}{os.pathsep}{os.environ['PATH']}"
    env["IMAGEGEN_OLLAMA_HOST"] = NO_OLLAMA
    # A process of its own, as a user's: what its stderr holds is this command's alone, never
    # what an earlier command run in the test process left to be collected.
    command = [sys.executable, "-m", "imagegen.cli", "generate", "a blue door", *SMALL]
    result = subprocess.run(
        [*command, "--seed", "9", "--open"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr

    lines = result.stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["image", "prompt", "seed"]
    path = lines[0].split(maxsplit=1)[1]
    assert path.endswith(".png") and Path(path).is_file()
    assert "a blue door" in lines[1]
    assert re.fullmatch(r"seed\s+9\s+model tiny", lines[2])

    # Library chatter (Ollama retries, transformers notices) stays hidden: one line, with the fix.
    note = result.stderr.strip().splitlines()
    assert len(note) == 1, result.stderr
    assert "template prompt used" in note[0] and "not running" in note[0]
    assert "`ollama serve`" in note[0] and NO_OLLAMA in note[0]

    # The platform's viewer was started on the image, detached: it writes when it runs.
    deadline = time.monotonic() + 30
    while not (opened.exists() and opened.read_text()) and time.monotonic() < deadline:
        time.sleep(0.02)  # polling for the viewer's record
    assert opened.read_text() == path


def test_verbose_shows_the_chatter_and_open_without_a_display_says_why(cli: RunCli) -> None:
    env = {"DISPLAY": "", "WAYLAND_DISPLAY": "", "IMAGEGEN_OLLAMA_RETRIES": "1"}
    result = cli("generate", "a fox", *SMALL, "--open", "--verbose", env=env)
    assert result.returncode == 0, result.stderr
    assert "Ollama attempt 1 failed" in result.stderr  # the retry line, shown when asked
    assert "not opened: no display here" in result.stderr
    assert sum("template prompt used" in line for line in result.stderr.splitlines()) == 1


def test_loop_prints_a_line_per_image_with_the_average(cli: RunCli) -> None:
    result = cli("loop", *SMALL, "--count", "2")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 2, result.stdout
    for n, line in enumerate(lines, start=1):
        match = re.fullmatch(rf"\[{n}/2\] (\S+\.png)  (\d+\.\d\d) s/image", line)
        assert match, line
        assert Path(match[1]).is_file()
        assert float(match[2]) > 0
    notes = result.stderr.strip().splitlines()
    assert len(notes) == 2, result.stderr  # the fallback, explained once; then the tally
    assert "template prompt used" in notes[0]
    assert notes[1] == "made 2 image(s)"


@pytest.mark.parametrize("command", [["generate"], ["loop", "--count", "1"]])
def test_json_output_leaves_the_notes_out(cli: RunCli, command: list[str]) -> None:
    """``loop --json`` said why the template prompt was used, where ``generate --json`` did
    not: what a program reads is the JSON, and the exit status."""
    env = {"IMAGEGEN_OLLAMA_HOST": NO_OLLAMA}
    result = cli(*command, "a fox", *SMALL, "--json", env=env)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[0] if command[0] == "loop" else result.stdout)
    assert result.stderr == ""


@pytest.mark.usefixtures("hub_reachable")
def test_doctor_rows_are_sentences_with_a_next_step(cli: RunCli) -> None:
    result = cli("doctor")
    assert result.returncode == 0, result.stderr
    rows = {line.split()[1]: line for line in result.stdout.splitlines() if line[:1].strip()}
    assert set(rows) == {"render", "model", "ollama", "storage", "plugins", "ledger"}
    assert rows["render"].split()[0] == "ok"
    assert rows["plugins"].split()[0] == "ok" and rows["ledger"].split()[0] == "ok"
    assert rows["storage"].split()[0] == "ok" and "./output" in rows["storage"]
    ollama = " ".join(line.strip() for line in result.stdout.splitlines())
    assert rows["ollama"].split()[0] == "warning"
    assert f"not running at {NO_OLLAMA}" in ollama and "`ollama serve`" in ollama
    assert "{" not in result.stdout  # sentences, not JSON dumped into a cell
    assert result.stderr == ""  # no library notices


def test_doctor_json_and_a_failing_check(cli: RunCli, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("storage cannot live under a file")
    with FakeOllama(models=()) as fake:  # running, but without the model
        env = {"IMAGEGEN_OLLAMA_HOST": fake.url, "IMAGEGEN_STORAGE_URL": str(blocker / "out")}
        result = cli("doctor", "--json", env=env)
    assert result.returncode == 1, result.stderr
    body = json.loads(result.stdout)
    assert body["ok"] is False
    checks = {c["check"]: c for c in body["checks"]}
    assert set(checks) == {"render", "model", "ollama", "storage", "plugins", "ledger"}
    assert set(checks["render"]) == {"check", "status", "summary", "next_step"}
    assert checks["ollama"]["status"] == "warning"
    assert checks["ollama"]["next_step"].startswith("Run `ollama pull llama3.2`")
    assert checks["storage"]["status"] == "error"
    assert "IMAGEGEN_STORAGE_URL" in checks["storage"]["next_step"]


@pytest.mark.usefixtures("hub_reachable")
def test_a_device_the_profile_asks_for_is_said_as_the_profiles(cli: RunCli) -> None:
    """IMAGEGEN_PROFILE=prod on a laptop: the render fails naming what set the device, and
    doctor still checks the model."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    env = {"IMAGEGEN_PROFILE": "prod"}
    said = "IMAGEGEN_DEVICE=cuda (set by IMAGEGEN_PROFILE=prod) asks for a CUDA GPU, but none"
    for enhance in ([], ["--no-enhance"]):
        made = cli("generate", "a fox", *SMALL, *enhance, env=env)
        assert made.returncode == 1
        [line] = made.stderr.strip().splitlines()
        assert line.startswith(f"imagegen: error: {said}"), line
        # Said before the prompt is written, not once it is.
        assert not list(Path("output").rglob("*.json")), enhance
    result = cli("doctor", "--json", env=env)
    assert result.returncode == 1, result.stderr
    checks = {c["check"]: c for c in json.loads(result.stdout)["checks"]}
    assert checks["render"]["status"] == "error"
    assert checks["render"]["summary"].startswith(said)
    assert checks["model"]["status"] in ("ok", "warning")  # checked all the same


@pytest.mark.parametrize(
    ("env", "said"),
    [
        ({"IMAGEGEN_PLUGINS": "nope"}, "IMAGEGEN_PLUGINS: unknown plugin 'nope'"),
        (
            {"IMAGEGEN_PLUGIN_OPTIONS": '{"art_style": {"style": "nonexistent"}}'},
            "IMAGEGEN_PLUGIN_OPTIONS: plugin_options.art_style.style: unknown art style",
        ),
        (  # a misspelt key, ignored before: a random style drawn all the same
            {"IMAGEGEN_PLUGIN_OPTIONS": '{"art_style": {"stlye": "ukiyo-e"}}'},
            "IMAGEGEN_PLUGIN_OPTIONS: plugin_options.art_style.stlye: unknown option",
        ),
        (
            {"IMAGEGEN_PLUGIN_OPTIONS": '{"weather": {"a": 1}}'},
            "IMAGEGEN_PLUGIN_OPTIONS: plugin_options.weather: no enabled plugin 'weather'",
        ),
    ],
)
def test_doctor_fails_plugin_settings_that_fail_every_generation(
    cli: RunCli, env: dict[str, str], said: str
) -> None:
    result = cli("doctor", "--json", env=env)
    assert result.returncode == 1, result.stderr
    checks = {c["check"]: c for c in json.loads(result.stdout)["checks"]}
    assert checks["plugins"]["status"] == "error" and checks["plugins"]["summary"].startswith(said)


def test_plugins_shows_the_options_a_plugin_refuses(cli: RunCli) -> None:
    env = {"IMAGEGEN_PLUGIN_OPTIONS": '{"art_style": {"style": "nonexistent"}}'}
    result = cli("plugins", "--json", env=env)
    assert result.returncode == 0, result.stderr
    errors = {row["name"]: row["error"] for row in json.loads(result.stdout)}
    assert "unknown art style 'nonexistent'" in errors["art_style"]
    assert errors["time_of_day"] is None
    result = cli("plugins", env={**env, "COLUMNS": "200"})
    assert "refuses its options: plugin_options.art_style.style: unknown art style" in result.stdout


def test_an_option_no_plugin_reads_fails_generate_in_one_line(cli: RunCli) -> None:
    env = {"IMAGEGEN_PLUGIN_OPTIONS": '{"art_style": {"stlye": "ukiyo-e"}}'}
    result = cli("generate", "a fox", *SMALL, "--no-enhance", env=env)
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert line == (
        "imagegen: error: invalid settings: IMAGEGEN_PLUGIN_OPTIONS"
        " (plugin_options.art_style.stlye: unknown option of plugin 'art_style'; known: style)"
    )
    listed = {row["name"]: row for row in json.loads(cli("plugins", "--json", env=env).stdout)}
    assert listed["art_style"]["error"] == (
        "plugin_options.art_style.stlye: unknown option of plugin 'art_style'; known: style"
    )


def test_doctor_checks_the_ledger_without_making_one(cli: RunCli, tmp_path: Path) -> None:
    made = tmp_path / "xdg-data" / "imagegen" / "ledger.db"
    checks = {c["check"]: c for c in json.loads(cli("doctor", "--json").stdout)["checks"]}
    assert checks["ledger"]["status"] == "ok" and str(made) in checks["ledger"]["summary"]
    assert not made.exists() and not made.parent.exists()

    damaged = tmp_path / "damaged.db"
    damaged.write_bytes(b"SQLite format 3\x00" + b"\xa5" * 8192)
    result = cli("doctor", "--json", env={"IMAGEGEN_LEDGER_URL": str(damaged)})
    assert result.returncode == 1, result.stderr
    checks = {c["check"]: c for c in json.loads(result.stdout)["checks"]}
    assert checks["ledger"]["status"] == "error"
    assert checks["ledger"]["summary"].startswith(f"ledger {damaged} ")
    assert "IMAGEGEN_LEDGER_URL" in checks["ledger"]["next_step"]


@pytest.mark.parametrize(
    ("model", "status", "said"),
    [
        ("black-forest-labs/FLUX.2-klein-4B", "warning", "not in the model cache"),
        ("tiny", "ok", "built here"),
        ("./no-pipeline-here", "error", "no diffusers pipeline directory"),
    ],
)
@pytest.mark.usefixtures("hub_reachable")
def test_doctor_says_whether_the_model_loads_without_a_download(
    cli: RunCli, tmp_path: Path, model: str, status: str, said: str
) -> None:
    # A model that is not cached is a download at the first image (offline: an error, as in
    # tests/test_cli_doctor.py).
    (tmp_path / "no-pipeline-here").mkdir()
    env = {"IMAGEGEN_MODEL": model, "IMAGEGEN_SERVED_MODELS": model}
    env["IMAGEGEN_MODEL_CACHE_DIR"] = str(tmp_path / "cache")
    result = cli("doctor", "--json", env=env)
    checks = {c["check"]: c for c in json.loads(result.stdout)["checks"]}
    assert checks["model"]["status"] == status and said in checks["model"]["summary"]
    assert result.returncode == (1 if status == "error" else 0)
    if status == "warning":
        assert "imagegen models pull" in checks["model"]["next_step"]


def test_ollama_advice_for_a_running_ollama_with_the_model() -> None:
    settings = Settings(ollama_host="http://user:secret@ollama:11434", ollama_model="llama3.2")
    advice = ollama_advice({"reachable": True, "model_available": True}, settings)
    assert advice.status == "ok" and advice.next_step == ""
    assert "llama3.2" in advice.summary and "secret" not in advice.summary


@pytest.mark.parametrize(
    ("error", "summary"),
    [
        ("ConnectError: [Errno 111] Connection refused", "Ollama is not running at"),
        ("TimeoutError: ", "does not answer in time"),
        ("ReadTimeout: timed out", "does not answer in time"),
        ("unreadable /api/tags response (AttributeError)", "answers, but not as Ollama"),
    ],
)
def test_ollama_advice_tells_a_server_that_hangs_from_none(error: str, summary: str) -> None:
    """A server that accepts and never answers is running: "not running, start it" would
    send the operator to start a second one."""
    advice = ollama_advice({"reachable": False, "error": error}, Settings())
    assert advice.status == "warning" and summary in advice.summary


def test_doctor_tells_another_http_server_from_no_ollama(cli: RunCli) -> None:
    """A web server answering 404 where Ollama should be (a wrong port) is no Ollama that is
    not running: what the real check of it says."""
    import threading
    from http.server import HTTPServer, SimpleHTTPRequestHandler

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        host = f"http://127.0.0.1:{server.server_port}"
        result = cli("doctor", "--json", env={"IMAGEGEN_OLLAMA_HOST": host})
    finally:
        server.shutdown()
        server.server_close()
    checks = {c["check"]: c for c in json.loads(result.stdout)["checks"]}
    assert checks["ollama"]["summary"] == f"The server at {host} answers, but not as Ollama."


@pytest.mark.parametrize(
    ("platform", "environ", "expected"),
    [
        ("darwin", {}, ["open", "/x.png"]),
        ("linux", {"PATH": "/nowhere"}, "no display here"),
        ("linux", {"DISPLAY": ":0", "PATH": "/nowhere"}, "xdg-open is not installed"),
    ],
)
def test_viewer_command_per_platform(
    platform: str, environ: dict[str, str], expected: list[str] | str
) -> None:
    command = viewer_command("/x.png", platform=platform, environ=environ)
    if isinstance(expected, list):
        assert command == expected
    else:
        assert isinstance(command, str) and command.startswith(expected)


def test_viewer_command_on_wayland_uses_xdg_open(tmp_path: Path) -> None:
    bin_dir, _ = _fake_viewer(tmp_path)
    environ = {"WAYLAND_DISPLAY": "wayland-0", "PATH": str(bin_dir)}
    assert viewer_command("/x.png", platform="linux", environ=environ) == [
        str(bin_dir / "xdg-open"),
        "/x.png",
    ]


def test_help_imports_no_library_code() -> None:
    """``imagegen --help`` loads the CLI and typer only: no models, settings, asyncio or torch."""
    probe = (
        "import sys\n"
        "from imagegen.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print(' '.join(sorted(sys.modules)), file=sys.stderr)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    assert "Usage: imagegen" in result.stdout
    loaded = set(result.stderr.split())
    heavy = {"torch", "diffusers", "pydantic", "pydantic_settings", "asyncio", "rich", "httpx"}
    assert not heavy & loaded, heavy & loaded
    library = {"imagegen.models", "imagegen.settings", "imagegen.service", "imagegen.storage"}
    assert not library & loaded, library & loaded


def test_the_package_names_resolve_on_first_use() -> None:
    """``import imagegen`` defers its imports; every public name still resolves."""
    import imagegen

    for name in imagegen.__all__:
        assert getattr(imagegen, name) is not None, name
    # What the library's calls return or raise, and what they take, by the names docs use.
    for name in ("DerivedImage", "ConfigurationError", "PluginSet"):
        assert name in imagegen.__all__, name
    with pytest.raises(AttributeError):
        _ = imagegen.NoSuchName


def test_status_lines_stay_whole_and_show_a_local_image_as_its_path(
    cli: RunCli, tmp_path: Path
) -> None:
    """Piped, or on a narrow terminal, a path or id is never folded into pieces; a local image
    is its path, as generate shows it, not a percent-encoded file:// URL."""
    from imagegen.ledger import open_ledger
    from tests.ledger.chain import chain

    folder = tmp_path / "a folder with spaces and a long name" / "2026" / "06" / "01"
    gid = "0123456789abcdef0123456789abcdef"
    events = chain(gid)
    data = {k: v for k, v in events["persisted"].data.items() if k not in ("url", "urls")}
    data["location"] = (folder / f"{gid}.png").as_uri()
    ledger = open_ledger(str(tmp_path / "l.db"))
    try:
        for name in ("requested", "enhanced", "rendered"):
            ledger.ingest(events[name])
        ledger.ingest(events["persisted"].model_copy(update={"data": data}))
    finally:
        ledger.close()

    result = cli("status", gid, "--ledger", str(tmp_path / "l.db"), env={"COLUMNS": "40"})
    assert result.returncode == 0, result.stderr
    assert f"image      {folder / gid}.png\n" in result.stdout
    assert f"generation {gid}\n" in result.stdout


HOSTILE = "a kite\x1b]0;owned\x07 \x1b[2J\rover\x9b31m the\tsea\nat dusk\x7f"
"""A prompt (an LLM's, for an enhanced one) that would retitle the terminal, clear it, move
the cursor (C0 and C1 alike) and break a table's line, were it printed as it is."""
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def test_stored_text_reaches_the_terminal_without_its_control_characters(
    cli: RunCli, tmp_path: Path
) -> None:
    """A prompt typed with control characters is refused, in one line that holds none; one
    stored with them (kept before every stage refused them) is shown without them, one line a
    generation in the table, and exact in ``--json``."""
    from imagegen.ledger import default_ledger_path, open_ledger
    from tests.ledger.chain import chain

    refused = cli("generate", HOSTILE, *SMALL, "--no-enhance", "--plugins", "")
    assert refused.returncode == 2, refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and "prompt" in refused.stderr
    assert not CONTROL.search(refused.stderr), refused.stderr
    made = cli("generate", "a kite", *SMALL, "--no-enhance", "--plugins", "")
    assert made.returncode == 0, made.stderr

    events = chain("gen-hostile")
    ledger = open_ledger(str(default_ledger_path()))
    try:
        for name in ("requested", "enhanced"):
            ledger.ingest(events[name])
    finally:
        ledger.close()
    # Kept before the rule refused it on every stage: written where the ledger keeps it.
    with closing(sqlite3.connect(default_ledger_path())) as db, db:
        db.execute(
            "UPDATE generations SET prompt = ? WHERE generation_id = 'gen-hostile'", (HOSTILE,)
        )
    for args in (["history"], ["status", "gen-hostile"]):
        result = cli(*args, env={"COLUMNS": "200"})
        assert result.returncode == 0, result.stderr
        assert "a kite" in result.stdout and "over" in result.stdout, result.stdout
        assert not CONTROL.search(result.stdout), (args, result.stdout)
    listed = cli("history", env={"COLUMNS": "200"})
    # One line a generation: the table's cell has neither the newline nor the tab.
    assert len(listed.stdout.strip().splitlines()) == 3  # the header, two generations
    exact = json.loads(cli("history", "--json").stdout)
    assert [g["prompt"] for g in exact if g["generation_id"] == "gen-hostile"] == [HOSTILE]


@pytest.mark.parametrize(
    ("text", "one_line", "shown"),
    [
        ("a\x1b[31mb\x9bc\x7f", False, "a\ufffd[31mb\ufffdc\ufffd"),
        ("line\nnext\tcol\r", False, "line\nnext\tcol\ufffd"),
        ("line\nnext\tcol", True, "line\ufffdnext\ufffdcol"),
        # A file name's byte 0x9b (os.fsdecode keeps it as U+DC9B): C1 to an 8-bit terminal.
        ("caf\udce9\udc9b", False, "caf\udce9\ufffd"),
        ("[bold]é ✓", True, "[bold]é ✓"),
    ],
    ids=["escapes", "newline-kept", "cell", "file-name-bytes", "printable"],
)
def test_printable_replaces_control_characters_only(text: str, one_line: bool, shown: str) -> None:
    from imagegen.cli._app import printable

    assert ascii(printable(text, one_line=one_line)) == ascii(shown)  # reportable as ASCII


def test_the_progress_bar_shows_no_step_count_before_it_is_known(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Enhancing, and loading the model meanwhile, have no steps: not ``0/None steps``."""
    import asyncio
    import io
    from types import SimpleNamespace

    from rich.console import Console

    from imagegen.cli import generate as generate_command

    terminal = io.StringIO()
    console = Console(file=terminal, force_terminal=True, width=100)
    monkeypatch.setattr(generate_command, "err", console)

    class Service:
        async def enhance_while_loading(self, request: object) -> object:
            await asyncio.sleep(0.5)  # the bar is drawn meanwhile, ten times a second
            return SimpleNamespace(steps=4)

        async def render_and_persist(
            self,
            enhanced: object,
            *,
            progress: object,
            stored: object = None,
            persisted: object = None,
        ) -> str:
            for step in range(1, 5):
                progress(step, 4)  # type: ignore[operator]
                await asyncio.sleep(0.15)
            return "persisted"

        async def try_derive(self, persisted: str) -> str | None:
            return None  # derivatives made

    result = asyncio.run(generate_command._generate_one(Service(), None, show_progress=True))
    assert result == (SimpleNamespace(steps=4), "persisted", None)  # derivatives made
    drawn = terminal.getvalue()
    assert "enhancing" in drawn and "3/4 steps" in drawn
    assert "None" not in drawn


def test_a_local_image_is_shown_at_its_own_path_whatever_its_bytes(tmp_path: Path) -> None:
    """A folder whose name is no UTF-8 (Latin-1 here): the path printed is the file's own,
    byte for byte, where stdout is strict UTF-8 too; no U+FFFD."""
    from tests.conftest import isolated_environ

    folder = os.fsencode(tmp_path) + b"/caf\xe9"
    env = {**isolated_environ(tmp_path), "PYTHONIOENCODING": "utf-8:strict"}
    args = [b"generate", b"x", *(a.encode() for a in SMALL), b"--no-enhance", b"-o", folder]
    result = subprocess.run(
        [sys.executable, "-m", "imagegen.cli", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    [png] = list(Path(os.fsdecode(folder)).rglob("*.png"))
    assert b"image   " + os.fsencode(png) + b"\n" in result.stdout


def test_display_location_is_the_files_path() -> None:
    from imagegen.cli._app import display_location

    path = Path(os.fsdecode(b"/srv/caf\xe9 [1]/x%y.png"))
    assert os.fsencode(display_location(path.as_uri())) == os.fsencode(path)


def _run(args: list[str], cwd: Path, **redirect: object) -> subprocess.CompletedProcess[str]:
    from tests.conftest import isolated_environ

    return subprocess.run(
        [sys.executable, "-m", "imagegen.cli", *args],
        cwd=cwd,
        env=isolated_environ(cwd),
        text=True,
        timeout=300,
        **redirect,  # type: ignore[call-overload]
    )


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full")
def test_output_that_cannot_be_written_is_one_line(tmp_path: Path) -> None:
    with open("/dev/full", "w") as full:
        result = _run(["models", "list"], tmp_path, stdout=full, stderr=subprocess.PIPE)
    assert result.returncode == 1
    assert result.stderr == "imagegen: error: cannot write output: No space left on device\n"


def test_a_closed_stdout_is_one_line_and_a_closed_stderr_keeps_the_exit_status(
    tmp_path: Path,
) -> None:
    def closed(fd: int) -> object:
        return lambda: os.close(fd)

    json_out = _run(
        ["models", "list", "--json"], tmp_path, stderr=subprocess.PIPE, preexec_fn=closed(1)
    )
    assert json_out.returncode == 1  # not 0, having written nothing
    assert json_out.stderr == "imagegen: error: cannot write output: standard output is closed\n"
    table = _run(["models", "list"], tmp_path, stderr=subprocess.PIPE, preexec_fn=closed(1))
    assert (table.returncode, table.stderr) == (json_out.returncode, json_out.stderr)

    refused = _run(
        ["history", "--limit", "0"], tmp_path, stdout=subprocess.PIPE, preexec_fn=closed(2)
    )
    assert refused.returncode == 2  # what it would have said, said nowhere
    listed = _run(["history", "--json"], tmp_path, stdout=subprocess.PIPE, preexec_fn=closed(2))
    assert (listed.returncode, listed.stdout) == (0, "[]\n")


def test_generate_says_where_the_image_is_when_its_output_cannot_be_written(
    cli: RunCli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full")
    with open("/dev/full", "w") as full:
        monkeypatch.setattr(sys, "stdout", full)
        result = cli("generate", "x", *SMALL, "--no-enhance", "--json")
    assert result.returncode == 1
    assert result.stderr == (
        "imagegen: error: cannot write output: No space left on device"
        " (the image is stored: see `imagegen history`)\n"
    )
    assert len(list((tmp_path / "output").rglob("*.png"))) == 1


def test_an_image_a_ledger_functions_url_does_not_record_is_not_said_to_be_listed(
    cli: RunCli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the history not recorded here, the failure to write says the image is stored,
    and sends no one to a history that does not list it."""
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full")
    function = {"IMAGEGEN_LEDGER_URL": "http://127.0.0.1:47009"}
    with open("/dev/full", "w") as full:
        monkeypatch.setattr(sys, "stdout", full)
        result = cli("generate", "x", *SMALL, "--no-enhance", "--json", env=function)
    assert result.returncode == 1
    assert result.stderr.endswith(
        "\nimagegen: error: cannot write output: No space left on device (the image is stored)\n"
    )
    assert len(list((tmp_path / "output").rglob("*.png"))) == 1
