"""The ``imagegen`` command line: in this process (``cli``), and as a user runs it, a subprocess,
where a fresh process is what is tested (pixels, signals, servers, errors before any import)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import httpx
import pytest
from PIL import Image

from imagegen.events import GENERATION_FAILED, GENERATION_REQUESTED, PROMPT_ENHANCED
from tests.conftest import RunCli, isolated_environ
from tests.functions.conftest import StartServer, base_env

SMALL = ["--model", "tiny", "--width", "256", "--height", "256"]


def imagegen(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "imagegen.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_generate_writes_png_and_record_under_output(cli: RunCli, tmp_path: Path) -> None:
    result = cli("generate", "a lighthouse at dusk", *SMALL, "--seed", "42", "--json")
    assert result.returncode == 0, result.stderr
    body = json.loads(result.stdout)
    image = body["image"]
    png = tmp_path / "output" / image["key"]
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert hashlib.sha256(png.read_bytes()).hexdigest() == image["sha256"]
    record = json.loads((tmp_path / "output" / image["keys"]["metadata"]).read_text())
    assert record["request"]["seed"] == 42
    assert image["key"].endswith(f"{image['generation_id']}.png")
    assert len(image["key"].split("/")) == 4  # yyyy/mm/dd/<id>.png
    assert body["prompt"]["fallback"] is True  # no Ollama on this machine


def on_a_terminal(cwd: Path, args: list[str], env: dict[str, str]) -> tuple[int, int]:
    """``imagegen ARGS`` in a fresh process on a real pseudo-terminal (its stdin, stdout and
    stderr), in ``cwd``: its pid, and the terminal's end to read."""
    import os
    import pty

    pid, fd = pty.fork()
    if pid == 0:  # the child
        # As a terminal's shell starts its foreground job: SIGINT and SIGQUIT at their
        # defaults, even where the tests run in a background job, which ignores both (and a
        # process keeps a signal ignored that it started with ignored).
        for signum in (signal.SIGINT, signal.SIGQUIT):
            signal.signal(signum, signal.SIG_DFL)
        os.chdir(cwd)
        os.execve(sys.executable, [sys.executable, "-m", "imagegen.cli", *args], env)
    return pid, fd


def terminal_output(fd: int, *, seconds: float) -> Iterator[bytes]:
    """What the terminal ``fd`` shows, a chunk at a time, until its process closes it or
    ``seconds`` have passed."""
    import os
    import select

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if not ready:
            continue
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # EIO: the child closed the terminal
            return
        if not chunk:
            return
        yield chunk


def test_generate_on_a_terminal_shows_its_progress_and_makes_the_image(tmp_path: Path) -> None:
    """On a terminal (a real pseudo-terminal here) the progress bar holds the console: the
    path the pipes of every other test never take."""
    import os

    env = {**os.environ, "IMAGEGEN_OLLAMA_HOST": "http://127.0.0.1:9", "COLUMNS": "100"}
    args = ["generate", "a fox", *SMALL, "--seed", "3"]
    pid, fd = on_a_terminal(tmp_path, args, env)
    seen = b""
    try:
        for chunk in terminal_output(fd, seconds=300):
            seen += chunk
        _, status = os.waitpid(pid, 0)
    finally:
        os.close(fd)
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", seen.decode(errors="replace"))  # colours
    assert os.waitstatus_to_exitcode(status) == 0, text[-2000:]
    assert "Traceback" not in text and "enhancing" in text  # the bar was drawn
    [png] = (tmp_path / "output").rglob("*.png")
    assert png.name in text  # the result, printed after the bar


class Interrupted(NamedTuple):
    returncode: int
    stdout: str
    stderr: str
    output: Path


@pytest.fixture(scope="module")
def interrupted_loop(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Interrupted]:
    """``imagegen loop`` in a fresh process, interrupted (SIGINT) during its first image.

    One fresh process for two tests: the clean stop, and the pixels a fresh process renders.
    """
    cwd = tmp_path_factory.mktemp("loop")
    args = ["loop", "a red kite", *SMALL, "--no-enhance", "--plugins", "", "--interval", "30"]
    with rendering(cwd, *args, "--json") as proc:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=300)
        yield Interrupted(proc.returncode, out, err, cwd / "output")


@contextlib.contextmanager
def rendering(cwd: Path, *args: str, until: str = "**/*.json") -> Iterator[subprocess.Popen[str]]:
    """``imagegen ARGS`` in a fresh process, once it renders: its first record (the prompt's,
    written before the image) is there, or what ``until`` matches under ``output`` (polled, with
    a deadline for a busy machine)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "imagegen.cli", *args],
        cwd=cwd,
        env=isolated_environ(cwd),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 300
        while not list((cwd / "output").glob(until)):
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "no record after 300 s"
            time.sleep(0.1)
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


@pytest.mark.slow
def test_loop_stops_cleanly_on_ctrl_c(interrupted_loop: Interrupted) -> None:
    assert interrupted_loop.returncode == 0, interrupted_loop.stderr
    # Nothing on stderr: no traceback, and none of the notices the model libraries print while
    # a fresh process imports them (the one place those show; test_cli_output.py).
    assert interrupted_loop.stderr == ""
    # The image under way when interrupted is finished, and no other is begun.
    assert len(list(interrupted_loop.output.rglob("*.png"))) == 1
    assert len(interrupted_loop.stdout.strip().splitlines()) == 1


@pytest.mark.slow
def test_a_second_ctrl_c_stops_the_loop_now_and_says_what_was_made(tmp_path: Path) -> None:
    args = ["loop", "a kite", "--model", "tiny", "--width", "512", "--height", "512"]
    args += ["--steps", "50", "--no-enhance", "--plugins", ""]
    with rendering(tmp_path, *args) as proc:
        proc.send_signal(signal.SIGINT)
        assert proc.stderr is not None
        said = proc.stderr.readline()  # the first is handled: the loop stops after this image
        assert said == "stopping after this image; Ctrl-C again to stop now\n"
        proc.send_signal(signal.SIGINT)
        _, rest = proc.communicate(timeout=300)
        err = said + rest
    assert proc.returncode == 130, err
    assert err.splitlines() == [
        "stopping after this image; Ctrl-C again to stop now",
        "made 0 image(s)",
        "imagegen: error: interrupted",
    ]
    assert not list((tmp_path / "output").rglob("*.png"))


@pytest.mark.slow
def test_a_ctrl_c_between_images_stops_the_loop_at_once(tmp_path: Path) -> None:
    """Waiting out --interval, no image is under way: the loop stops now, and says only that."""
    args = ["loop", "a kite", *SMALL, "--no-enhance", "--plugins", "", "--interval", "300"]
    with rendering(tmp_path, *args, until="**/*.png") as proc:
        assert proc.stdout is not None
        first = proc.stdout.readline()  # the image's line: the wait follows, nothing between
        assert first.startswith("[1] "), first
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=60)  # long before the interval's 300 s
    assert proc.returncode == 0, err
    assert err.splitlines() == ["stopping", "made 1 image(s)"]
    assert rest == "" and len(list((tmp_path / "output").rglob("*.png"))) == 1


def test_same_seed_same_pixels_from_the_cli(
    cli: RunCli, interrupted_loop: Interrupted, tmp_path: Path
) -> None:
    # A fresh process (the loop's image), then this one, which has rendered before.
    assert interrupted_loop.returncode == 0, interrupted_loop.stderr
    fresh = json.loads(interrupted_loop.stdout)
    seed = fresh["prompt"]["seed"]
    args = ["generate", "a red kite", *SMALL, "--seed", str(seed), "--no-enhance", "--plugins", ""]
    result = cli(*args, "--json", "--output", str(tmp_path / "again"))
    assert result.returncode == 0, result.stderr
    again = json.loads(result.stdout)
    digests = []
    for out, body in ((interrupted_loop.output, fresh), (tmp_path / "again", again)):
        with Image.open(out / body["image"]["key"]) as png:
            digests.append(hashlib.sha256(png.convert("RGB").tobytes()).hexdigest())
    assert digests[0] == digests[1]  # the PNG files differ only in their generation-id text chunk


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["generate", "x", "--width", "100"], "width"),
        (["generate", "x", "--steps", "0", "--seed", "-3"], "steps"),
        (["generate", "x", "--bogus"], "--bogus"),
        (["generate", "x", "--width", "wide"], "--width"),
        (["generate", "x", "--model", "nope"], "IMAGEGEN_SERVED_MODELS"),
        (["generate", "x", "--guidance", "nan"], "guidance (Input should be a finite number)"),
        (["generate", "x", "--plugins", "no_such_plugin"], "plugins"),
        (["generate", "x", "--output", "ftp://nowhere"], "--output"),
        (["serve", "nope"], "stage"),
        (["loop", "--count", "-1"], "count"),
        (["loop", "x", "--count", "1", "--seed", "4294967296"], "seed (Input should be less"),
        (["loop", "x", "--count", "1", "--seed", "-1"], "seed (Input should be greater"),
    ],
)
def test_bad_input_is_one_line_and_non_zero(
    cli: RunCli, tmp_path: Path, args: list[str], expected: str
) -> None:
    # The first case in a fresh process, as a user meets it; the others in this one.
    fresh = args == ["generate", "x", "--width", "100"]
    result = imagegen(*args, cwd=tmp_path, timeout=60) if fresh else cli(*args)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("imagegen: error:") and expected in lines[0]
    assert "Traceback" not in result.stderr + result.stdout


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        (["generate", "x"], {"IMAGEGEN_PNG_ENCODE_THREADS": "0"}, "IMAGEGEN_PNG_ENCODE_THREADS"),
        (["generate", "x"], {"IMAGEGEN_PNG_COMPRESS_LEVEL": "99"}, "IMAGEGEN_PNG_COMPRESS_LEVEL"),
        (["doctor"], {"IMAGEGEN_THUMBNAIL_SIZE": "big"}, "IMAGEGEN_THUMBNAIL_SIZE"),
        (["models", "list"], {"IMAGEGEN_RENDER_BATCH_SIZE": "-2"}, "IMAGEGEN_RENDER_BATCH_SIZE"),
        (["plugins"], {"IMAGEGEN_SIGNED_URL_TTL": "0"}, "IMAGEGEN_SIGNED_URL_TTL"),
        (  # a rule across settings: its own message names them
            ["plugins"],
            {
                "IMAGEGEN_MODEL": "black-forest-labs/FLUX.1-schnell",
                "IMAGEGEN_SERVED_MODELS": "tiny",
            },
            "IMAGEGEN_MODEL must be one of IMAGEGEN_SERVED_MODELS (tiny)",
        ),
    ],
)
def test_an_invalid_setting_is_one_line_naming_its_variable(
    cli: RunCli, args: list[str], env: dict[str, str], expected: str
) -> None:
    result = cli(*args, env=env)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("imagegen: error: invalid settings: " + expected), lines[0]
    if len(env) == 1:  # one bad value: named, never echoed
        assert next(iter(env.values())) not in lines[0].split("(")[0]
    if "IMAGEGEN_MODEL" in env:  # the choices said, not the value given
        assert env["IMAGEGEN_MODEL"] not in lines[0]
    assert "Traceback" not in result.stderr + result.stdout


def test_a_setting_given_by_its_other_name_is_named_as_given(
    cli: RunCli, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("IMAGEGEN_OLLAMA_HOST", raising=False)  # OLLAMA_HOST is the one read
    result = cli("generate", "x", *SMALL, env={"OLLAMA_HOST": "http://[::1"})
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    # The one field the message names is not named again in its details.
    assert line.startswith("imagegen: error: invalid settings: OLLAMA_HOST (not a")
    assert "IMAGEGEN_OLLAMA_HOST" not in line


def test_a_malformed_ollama_host_the_setting_overrides_breaks_nothing(tmp_path: Path) -> None:
    """The ollama package parses OLLAMA_HOST when imported (its default client): a fresh
    process, where IMAGEGEN_OLLAMA_HOST names the host, imports it and renders alike."""
    env = {**isolated_environ(tmp_path), "OLLAMA_HOST": "http://[::1"}
    env["IMAGEGEN_OLLAMA_HOST"] = "http://127.0.0.1:9"
    done = subprocess.run(
        [sys.executable, "-c", "import imagegen.enhance, os; print(os.environ['OLLAMA_HOST'])"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "http://[::1\n"  # the variable as it was, for whatever else reads it


def test_loop_makes_count_images_and_stops(cli: RunCli, tmp_path: Path) -> None:
    result = cli("loop", *SMALL, "--count", "2", "--json")
    assert result.returncode == 0, result.stderr
    decoder, text, images = json.JSONDecoder(), result.stdout.strip(), []
    while text:
        obj, end = decoder.raw_decode(text)
        images.append(obj)
        text = text[end:].strip()
    assert len(images) == 2
    assert images[0]["image"]["generation_id"] != images[1]["image"]["generation_id"]
    assert all(im["prompt"]["dreamed"] for im in images)
    assert len(list((tmp_path / "output").rglob("*.png"))) == 2


def _json_lines(stdout: str) -> list[dict[str, Any]]:
    decoder, text, objects = json.JSONDecoder(), stdout.strip(), []
    while text:
        obj, end = decoder.raw_decode(text)
        objects.append(obj)
        text = text[end:].strip()
    return objects


def test_loop_with_a_seed_makes_the_same_images_again(cli: RunCli, tmp_path: Path) -> None:
    # The top seed, then 0: past 4294967295 the seeds wrap.
    args = ["loop", "a red kite", *SMALL, "--count", "2", "--seed", "4294967295", "--json"]
    runs = []
    for name in ("first", "second"):
        result = cli(*args, "--no-enhance", "--plugins", "", "--output", str(tmp_path / name))
        assert result.returncode == 0, result.stderr
        images = _json_lines(result.stdout)
        assert [im["prompt"]["seed"] for im in images] == [4294967295, 0]
        digests = []
        for im in images:
            with Image.open(tmp_path / name / im["image"]["key"]) as png:
                digests.append(hashlib.sha256(png.convert("RGB").tobytes()).hexdigest())
        runs.append(digests)
    assert runs[0] == runs[1]  # the PNG files differ only in their generation-id text chunk
    assert runs[0][0] != runs[0][1]


def test_plugins_lists_the_built_ins(cli: RunCli) -> None:
    result = cli("plugins", "--json")
    assert result.returncode == 0, result.stderr
    names = {p["name"] for p in json.loads(result.stdout)}
    assert {"time_of_day", "holiday", "art_style", "lora", "remote_context"} <= names


def test_a_plugin_that_cannot_load_is_one_line_and_a_row_with_its_error(
    cli: RunCli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.plugins.sample_plugins import install_distribution

    install_distribution(
        tmp_path / "site",
        "broken-plugin",
        {"broken": "no_such_mod:P", "keyless": "tests.plugins.sample_plugins:needing_a_key"},
    )
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    env = {"IMAGEGEN_PLUGINS": "time_of_day,broken"}

    made = cli("generate", "a fox", *SMALL, env=env)
    assert made.returncode == 2
    [line] = made.stderr.strip().splitlines()
    assert "IMAGEGEN_PLUGINS" in line and "'broken' cannot be loaded" in line
    assert line.count("cannot be loaded") == 1  # said once, not again as a detail

    listed = cli("plugins", env=env)
    assert listed.returncode == 0, listed.stderr
    [row] = [line for line in listed.stdout.splitlines() if "broken" in line]
    assert "yes" in row and "cannot be" in row
    as_json = {p["name"]: p for p in json.loads(cli("plugins", "--json", env=env).stdout)}
    assert as_json["broken"]["enabled"] is True and as_json["time_of_day"]["enabled"] is True
    assert "ModuleNotFoundError" in as_json["broken"]["error"]
    # A factory that fails (its configuration missing) is said in its row too, once enabled.
    keyless = {"IMAGEGEN_PLUGINS": "keyless"}
    rows = {p["name"]: p for p in json.loads(cli("plugins", "--json", env=keyless).stdout)}
    assert rows["keyless"]["error"] == "RuntimeError: WEATHER_API_KEY is not set"


def test_send_posts_an_event_and_prints_the_reply(
    cli: RunCli, start_server: StartServer, tmp_path: Path
) -> None:
    server = start_server("enhance", base_env(tmp_path / "store"))
    result = cli(
        "send",
        GENERATION_REQUESTED,
        "--data",
        '{"prompt": "a moth", "width": 256, "height": 256}',
        "--to",
        server.url,
        "--subject",
        "sent-1",
    )
    assert result.returncode == 0, result.stderr
    reply = json.loads(result.stdout)
    assert reply["status"] == 200
    assert reply["attributes"]["ce-type"] == PROMPT_ENHANCED
    assert reply["data"]["generation_id"] == "sent-1"
    bad = cli("send", GENERATION_REQUESTED, "--data", '{"width": 3}', "--to", server.url)
    failed = json.loads(bad.stdout)
    assert bad.returncode == 1 and failed["status"] == 200
    assert failed["attributes"]["ce-type"] == GENERATION_FAILED
    assert failed["data"]["error"]["errors"][0]["field"] == "width"


def test_serve_runs_a_function(tmp_path: Path) -> None:
    from tests.functions.servers import free_port

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "imagegen.cli", "serve", "persist", "--port", str(port)],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        # One client for the polls: ``httpx.get`` builds a TLS context each call (~50 ms CPU).
        with httpx.Client() as client:
            while time.monotonic() < deadline:
                try:
                    if client.get(f"http://127.0.0.1:{port}/healthz").status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.1)
        assert httpx.get(f"http://127.0.0.1:{port}/healthz").json()["stage"] == "persist"
    finally:
        proc.terminate()
        proc.wait(10)


def test_a_plugin_name_two_packages_declare_is_shown_and_refused_naming_both(
    cli: RunCli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.plugins.sample_plugins import declare_echo_twice

    declare_echo_twice(tmp_path / "site")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    both = ("first-echo (tests.plugins.sample_plugins:EchoPlugin)", "second-echo")

    rows = {p["name"]: p for p in json.loads(cli("plugins", "--json").stdout)}
    assert rows["echo"]["enabled"] is False
    assert all(name in rows["echo"]["error"] for name in both)
    env = {"IMAGEGEN_PLUGINS": "time_of_day,echo"}
    made = cli("generate", "a fox", *SMALL, env=env)
    assert made.returncode == 2
    [line] = made.stderr.strip().splitlines()
    assert "IMAGEGEN_PLUGINS" in line and all(name in line for name in both)
    doctor = cli("doctor", "--json", env=env)
    [check] = [c for c in json.loads(doctor.stdout)["checks"] if c["check"] == "plugins"]
    assert check["status"] == "error" and all(name in check["summary"] for name in both)


def test_a_plugin_skipped_is_one_note_line_naming_it_and_why(
    cli: RunCli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.plugins.sample_plugins import install_distribution

    install_distribution(
        tmp_path / "site",
        "failing-plugin",
        {
            "failing": "tests.plugins.sample_plugins:failing",
            "wrong_type": "tests.plugins.sample_plugins:wrong_type",
        },
    )
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    env = {"IMAGEGEN_PLUGINS": "failing,time_of_day,wrong_type"}

    made = cli("generate", "a fox", *SMALL, "--no-enhance", env=env)
    assert made.returncode == 0, made.stderr
    notes = [line for line in made.stderr.splitlines() if line.startswith("note")]
    assert notes == [
        "note    plugin failing skipped: failed: RuntimeError: the failing plugin failed",
        "note    plugin wrong_type skipped: returned dict, not a Contribution",
    ]
    as_json = cli("generate", "a fox", *SMALL, "--no-enhance", "--json", env=env)
    assert as_json.returncode == 0, as_json.stderr
    assert "skipped" not in as_json.stderr
    contributed = json.loads(as_json.stdout)["prompt"]["contributions"]
    assert [c["plugin"] for c in contributed] == ["time_of_day"]
    looped = cli("loop", "a fox", "--count", "2", *SMALL, "--no-enhance", env=env)
    assert looped.returncode == 0, looped.stderr
    assert [line for line in looped.stderr.splitlines() if line.startswith("note")] == notes
