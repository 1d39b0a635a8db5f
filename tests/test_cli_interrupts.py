"""``imagegen generate`` stopped at a given moment: a second Ctrl-C while the first is handled,
and an interrupt once the image is stored. Each in a fresh process, as a user runs it."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import isolated_environ

RENDER = ["generate", "a kite", "--model", "tiny", "--width", "512", "--height", "512"]


def _noise(stderr: str) -> list[str]:
    """What ``-v`` shows on stderr, less imagegen's own log lines and the model libraries'
    notices: what a person would read as something gone wrong (or the one line expected)."""
    logged = ("INFO imagegen", "WARNING imagegen", "WARNING transformers", "WARNING diffusers")
    return [line for line in stderr.splitlines() if line and not line.startswith(logged)]


@pytest.mark.slow
def test_ctrl_c_again_while_the_first_is_handled_ends_at_once_in_one_line(tmp_path: Path) -> None:
    """Ctrl-C once the render has begun, then again every 50 ms until the process ends: one of
    them comes while the first is handled (the render stopping, its failure recorded, the
    Ollama client closing), and ends the process there, with the one line and 130; nothing
    left half-closed is reported, and no traceback of the signal is shown."""
    proc = subprocess.Popen(
        # With Ollama tried (and refused), so its client is open, closed as the service ends.
        [sys.executable, "-m", "imagegen.cli", "-v", *RENDER, "--steps", "50"],
        cwd=tmp_path,
        env=isolated_environ(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []
    rendering = threading.Event()

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            if line.startswith("INFO imagegen.render: rendering"):
                rendering.set()

    reader = threading.Thread(target=read)
    reader.start()
    try:
        assert rendering.wait(300), "".join(lines)[-3000:]
        while proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            time.sleep(0.05)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
        reader.join(60)
        assert proc.stdout is not None
        out = proc.stdout.read()
        proc.stdout.close()
    stderr = "".join(lines)
    assert proc.returncode == 130, stderr[-3000:]
    assert _noise(stderr) == ["imagegen: error: interrupted"], stderr[-3000:]
    assert out == ""
    assert not list((tmp_path / "output").rglob("*.png"))


_PAUSED = """\
import sys, time
from imagegen.storage import local

create = local.LocalStorage._create


def paused(self, key, *args):
    if key.endswith(".json") and key[:4].isdigit():  # the metadata record, yyyy/mm/dd/<id>.json
        print("writing the record", file=sys.stderr, flush=True)
        time.sleep(2)
    return create(self, key, *args)


local.LocalStorage._create = paused
from imagegen.cli import main

main(sys.argv[1:])
"""


_PAUSED_AT_THE_PNG = _PAUSED.replace(
    'key.endswith(".json") and key[:4].isdigit():  # the metadata record, yyyy/mm/dd/<id>.json',
    'key.endswith(".png"):  # the PNG itself, yyyy/mm/dd/<id>.png (a PutObject on S3)',
).replace("writing the record", "writing the PNG")
"""As :data:`_PAUSED`, paused as the PNG itself is written."""


def _status(tmp_path: Path, generation_id: str) -> str | None:
    """The status the CLI's own ledger (under ``tmp_path``'s XDG data folder) records."""
    from imagegen.ledger import open_ledger

    ledger = open_ledger(str(tmp_path / "xdg-data" / "imagegen" / "ledger.db"))
    try:
        found = ledger.get(generation_id)
    finally:
        ledger.close()
    return None if found is None else found.status


def _ctrl_c_at_the_record(
    tmp_path: Path,
    args: list[str],
    *,
    again: bool = False,
    script: str = _PAUSED,
    **popen: Any,
) -> tuple[int, str, str]:
    """Run ``imagegen *args`` paused as it writes the metadata record (:data:`_PAUSED`, or
    what ``script`` pauses at), send it one SIGINT there (``again``: a second one soon after);
    its exit status, stdout and stderr."""
    proc = subprocess.Popen(
        [sys.executable, "-c", script, *args],
        cwd=tmp_path,
        env=popen.pop("env", None) or isolated_environ(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )
    try:
        assert proc.stderr is not None
        said = proc.stderr.readline()
        assert said.startswith("writing the "), said + proc.communicate(timeout=60)[1]
        proc.send_signal(signal.SIGINT)
        if again:
            time.sleep(0.5)  # well within the pause: the record is still being written
            proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return proc.returncode, out, err


@pytest.mark.slow
def test_ctrl_c_once_the_png_is_stored_ends_with_the_image_complete(tmp_path: Path) -> None:
    """Ctrl-C while the metadata record is written (the PNG stored): the record and the history
    are finished first, then the command stops as interrupted; the image is complete and the
    history says persisted, not a PNG left behind a failed generation."""

    code, out, err = _ctrl_c_at_the_record(
        tmp_path, [*RENDER, "--steps", "2", "--no-enhance", "--json"]
    )
    assert (code, err) == (130, "imagegen: error: interrupted\n")
    [png] = (tmp_path / "output").rglob("*.png")
    assert png.with_suffix(".json").is_file()
    assert _status(tmp_path, png.stem) == "persisted"
    # The image stored is shown, as one not interrupted is.
    shown = json.loads(out)
    assert shown["image"]["generation_id"] == png.stem
    assert shown["image"]["location"] == png.as_uri()


@pytest.mark.slow
def test_ctrl_c_while_the_png_is_written_ends_with_the_image_complete(tmp_path: Path) -> None:
    """Ctrl-C while the PNG itself is written (a whole PutObject on S3): the write ends all the
    same, so the record and the history are written too before the command stops; never a
    PNG left behind a generation the history says failed."""
    code, out, err = _ctrl_c_at_the_record(
        tmp_path, [*RENDER, "--steps", "2", "--no-enhance", "--json"], script=_PAUSED_AT_THE_PNG
    )
    assert (code, err) == (130, "imagegen: error: interrupted\n")
    [png] = (tmp_path / "output").rglob("*.png")
    assert png.with_suffix(".json").is_file()
    assert _status(tmp_path, png.stem) == "persisted"
    assert json.loads(out)["image"]["generation_id"] == png.stem


@pytest.mark.slow
@pytest.mark.parametrize("as_json", [False, True], ids=["lines", "json"])
def test_a_second_ctrl_c_once_a_loops_png_is_stored_counts_and_shows_the_image(
    tmp_path: Path, as_json: bool
) -> None:
    """``imagegen loop`` stopped by a second Ctrl-C while its image's record is written (the
    PNG stored): the image is persisted first, as generate's is, and it is counted and shown
    as any other, its line (or JSON object) then how many were made, then exit 130."""
    args = ["loop", *RENDER[1:], "--steps", "2", "--no-enhance", *(["--json"] if as_json else [])]
    code, out, err = _ctrl_c_at_the_record(tmp_path, args, again=True)
    assert code == 130, err
    lines = [line for line in err.splitlines() if not line.startswith("stopping after")]
    made = [] if as_json else ["made 1 image(s)"]  # --json: the objects alone say it
    assert lines == [*made, "imagegen: error: interrupted"], err
    [png] = (tmp_path / "output").rglob("*.png")
    assert png.with_suffix(".json").is_file()
    assert _status(tmp_path, png.stem) == "persisted"
    if as_json:
        assert json.loads(out)["image"]["generation_id"] == png.stem
    else:
        assert re.fullmatch(rf"\[1\] {re.escape(str(png))}  \d+\.\d\d s/image\n", out), out


@pytest.mark.slow
@pytest.mark.parametrize(
    ("command", "images"),
    [
        (RENDER, 1),
        # A Ctrl-C heard would stop the loop after its first image.
        (
            [
                "loop",
                "a kite",
                "--count",
                "2",
                "--model",
                "tiny",
                "--width",
                "512",
                "--height",
                "512",
            ],
            2,
        ),
    ],
    ids=["generate", "loop"],
)
def test_a_process_started_ignoring_ctrl_c_goes_on_ignoring_it(
    tmp_path: Path, command: list[str], images: int
) -> None:
    """Started with SIGINT ignored (a script's background job, ``trap '' INT``, a
    supervisor), the command is not stopped by one: it finishes, exit 0, every image complete."""
    code, out, err = _ctrl_c_at_the_record(
        tmp_path,
        [*command, "--steps", "2", "--no-enhance", "--json"],
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    assert code == 0, err
    pngs = list((tmp_path / "output").rglob("*.png"))
    assert len(pngs) == images, err
    for png in pngs:
        assert png.with_suffix(".json").is_file() and png.stem in out


def test_an_interrupted_run_leaves_the_signal_handlers_as_they_were() -> None:
    """After a run Ctrl-C stopped, SIGINT, SIGTERM and SIGHUP do what they did before it: a
    later Ctrl-C in the same process is a KeyboardInterrupt, not an exit at once."""
    import asyncio
    import os

    from imagegen.cli._app import run_async

    names = [name for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name)]
    before = {name: signal.getsignal(getattr(signal, name)) for name in names}

    async def interrupted() -> str:
        os.kill(os.getpid(), signal.SIGINT)
        await asyncio.sleep(5)
        return "not interrupted"

    with pytest.raises(KeyboardInterrupt):
        run_async(interrupted)
    assert {name: signal.getsignal(getattr(signal, name)) for name in names} == before


def test_each_command_in_a_process_says_it_was_interrupted(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A second command run in the same process, interrupted too, says so as the first did."""
    from imagegen.cli import _main

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(_main, "app", interrupted)
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        for _ in range(2):
            with pytest.raises(SystemExit) as exited:
                _main.run(["generate"])
            assert exited.value.code == 130
            assert capsys.readouterr().err == "imagegen: error: interrupted\n"
    finally:  # the exit-at-once handlers a stopped command leaves for the process's end
        for signum, handler in handlers.items():
            signal.signal(signum, handler)


@pytest.mark.slow
def test_ctrl_c_once_a_replays_png_is_stored_ends_with_the_image_complete(tmp_path: Path) -> None:
    """``imagegen replay`` interrupted while the metadata record is written ends as generate
    does: the record and the history finished first, the image shown, then exit 130."""
    import json

    env = isolated_environ(tmp_path)
    first = subprocess.run(
        [sys.executable, "-c", _PAUSED.replace("time.sleep(2)", "pass"), *RENDER,
         "--steps", "2", "--no-enhance", "--json"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert first.returncode == 0, first.stderr
    original = json.loads(first.stdout)["image"]["generation_id"]
    code, out, err = _ctrl_c_at_the_record(tmp_path, ["replay", original, "--json"], env=env)
    assert (code, err) == (130, "imagegen: error: interrupted\n")
    [png] = [p for p in (tmp_path / "output").rglob("*.png") if p.stem != original]
    assert png.with_suffix(".json").is_file()
    assert _status(tmp_path, png.stem) == "persisted"
    shown = json.loads(out)  # what a replay that ran to its end prints
    assert shown["generation_id"] == png.stem and shown["replay_of"] == original
    assert shown["location"] == png.as_uri()
