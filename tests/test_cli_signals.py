"""How ``imagegen`` ends when it is stopped (Ctrl-C, SIGTERM, SIGHUP) or fails as nothing
expects: in a fresh process where signals are what is tested, in this one for the errors."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import pytest

from tests.conftest import RunCli, isolated_environ
from tests.test_cli import on_a_terminal, rendering, terminal_output

RENDER = ["generate", "a kite", "--model", "tiny", "--no-enhance", "--plugins", ""]


def _recorded(cwd: Path) -> tuple[str, str | None, str | None]:
    """The status of the one generation in ``cwd``'s ledger, the stage it failed at, and the
    code of its error."""
    from imagegen.ledger import open_ledger

    [memo] = (cwd / "output" / "prompts").glob("*.json")  # enhance's, named by the id
    ledger = open_ledger(str(cwd / "xdg-data" / "imagegen" / "ledger.db"))
    try:
        found = ledger.get(memo.stem)
    finally:
        ledger.close()
    assert found is not None
    return found.status, found.failed_stage, found.error.code if found.error else None


class _Stopped(NamedTuple):
    text: str
    """What the terminal showed, colours and cursor moves taken out."""
    status: int
    """The exit code (negative: the signal that ended it)."""
    step: float
    """Seconds a step took, as the progress bar showed them."""
    ended: float
    """Seconds from the first Ctrl-C to the end of the process."""


def _ctrl_c_during_a_long_render(cwd: Path, *, again: bool) -> _Stopped:
    """``imagegen generate`` of a long render on a terminal (a real pseudo-terminal), whose
    progress bar shows each step: Ctrl-C once a few steps are done, and (``again``) a second
    Ctrl-C as soon as the first is said."""
    env = {**isolated_environ(cwd), "COLUMNS": "100"}
    args = [*RENDER, "--width", "2048", "--height", "2048", "--steps", "50"]
    pid, fd = on_a_terminal(cwd, args, env)
    seen = ""
    paced: list[tuple[float, int]] = []  # (when, steps done) as the bar shows them
    interrupted_at: float | None = None
    said = False
    try:
        for chunk in terminal_output(fd, seconds=400):
            seen += chunk.decode(errors="replace")
            if interrupted_at is None:
                done = [int(n) for n in re.findall(r"(\d+)/50 steps", seen[-400:])]
                if done and done[-1] > (paced[-1][1] if paced else 0):
                    paced.append((time.monotonic(), done[-1]))
                if len(paced) > 1 and paced[-1][1] - paced[0][1] >= 3:
                    os.kill(pid, signal.SIGINT)
                    interrupted_at = time.monotonic()
            elif again and not said and "interrupted" in seen:
                said = True
                os.kill(pid, signal.SIGINT)  # while the process ends
        _, status = os.waitpid(pid, 0)
        ended_at = time.monotonic()
    finally:
        os.close(fd)
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", seen)
    assert interrupted_at is not None, f"no steps shown: {text[-2000:]}"
    (first, done_first), (last, done_last) = paced[0], paced[-1]
    step = (last - first) / (done_last - done_first)
    return _Stopped(text, os.waitstatus_to_exitcode(status), step, ended_at - interrupted_at)


@pytest.mark.slow
def test_ctrl_c_stops_the_render_at_its_next_step(tmp_path: Path) -> None:
    """The process ends about a step after Ctrl-C, not once the render is done; the image is
    not stored and the ledger says the render was cancelled."""
    stopped = _ctrl_c_during_a_long_render(tmp_path, again=False)

    assert stopped.status == 130, stopped.text[-2000:]
    # 45-odd steps and the decode were left (the steps' pace, measured, sizes the wait on a
    # busy machine as on an idle one): many times this, had the render gone on.
    assert stopped.ended < 10 * stopped.step + 15, (stopped.step, stopped.ended)
    assert "imagegen: error: interrupted" in stopped.text
    assert "Traceback" not in stopped.text, stopped.text[-3000:]
    assert not list((tmp_path / "output").rglob("*.png"))
    assert _recorded(tmp_path) == ("failed", "render", "cancelled")


@pytest.mark.slow
def test_a_second_ctrl_c_while_the_process_ends_exits_at_once_and_quietly(
    tmp_path: Path,
) -> None:
    """The second Ctrl-C comes while the interpreter waits for the render's thread to end its
    step: it ends the process then, never with a traceback or an abort."""
    stopped = _ctrl_c_during_a_long_render(tmp_path, again=True)

    for broken in ("Traceback", "terminate called", "Exception ignored"):
        assert broken not in stopped.text, stopped.text[-3000:]
    # 130; or killed by the second Ctrl-C once the interpreter no longer handles signals.
    assert stopped.status in (130, -signal.SIGINT), stopped.text[-2000:]
    assert stopped.text.count("imagegen: error: interrupted") == 1
    assert not list((tmp_path / "output").rglob("*.png"))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("signum", "code", "said"),
    [(signal.SIGTERM, 143, "terminated"), (signal.SIGHUP, 129, "hung up")],
)
def test_a_termination_stops_generate_and_is_recorded(
    tmp_path: Path, signum: int, code: int, said: str
) -> None:
    """``timeout``, systemd or a closed terminal: the generation is recorded as stopped where
    it was, as a Ctrl-C's is, and the exit status is the conventional 128 + the signal."""
    args = [*RENDER, "--width", "1024", "--height", "1024", "--steps", "50"]
    # Once the render has begun: its generation is claimed as its pipeline call starts (the
    # prompt's record comes before, while enhance may still be at work).
    with rendering(tmp_path, *args, until="renders/*.json") as proc:
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert err == f"imagegen: error: {said}\n"
    assert out == ""
    assert not list((tmp_path / "output").rglob("*.png"))
    assert _recorded(tmp_path) == ("failed", "render", "cancelled")


_CTRL_C_AS_TYPER_LOADS = """\
import os, signal, sys


class CtrlC:
    \"\"\"Ctrl-C, as a terminal sends it, as the first of the commands' libraries loads.\"\"\"

    def find_spec(self, name, path=None, target=None):
        if name == "typer":
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGINT)
        return None


sys.meta_path.insert(0, CtrlC())
"""


@pytest.mark.parametrize("started", ["script", "module"])
def test_ctrl_c_as_the_commands_load_is_one_line(tmp_path: Path, started: str) -> None:
    """A Ctrl-C in the first moments, while typer and the commands are imported, ends as one
    later does: one line and 130, never a traceback. The signal is sent as that import
    begins (a ``sitecustomize`` that runs before anything of imagegen is imported)."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_CTRL_C_AS_TYPER_LOADS)
    script = Path(sys.executable).parent / "imagegen"  # the console script, as installed
    command = [str(script)] if started == "script" else [sys.executable, "-m", "imagegen.cli"]
    result = subprocess.run(
        [*command, "history"],
        cwd=tmp_path,
        env={**isolated_environ(tmp_path), "PYTHONPATH": str(hook)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (result.returncode, result.stderr) == (130, "imagegen: error: interrupted\n")
    assert result.stdout == ""


@pytest.fixture
def broken(monkeypatch: pytest.MonkeyPatch) -> None:
    """``generate`` fails as nothing in imagegen expects (a bug's ``KeyError``)."""

    def fail(*args: object, **kwargs: object) -> None:
        raise KeyError("width")

    monkeypatch.setattr("imagegen.cli.generate._request", fail)


@pytest.mark.usefixtures("broken")
def test_an_unexpected_error_is_one_line_naming_it(cli: RunCli) -> None:
    result = cli("generate", "a kite")

    assert result.returncode == 1
    assert result.stderr == (
        "imagegen: error: internal error (KeyError: 'width'); run with -v for the traceback\n"
    )


@pytest.mark.usefixtures("broken")
def test_verbose_shows_an_unexpected_errors_traceback(cli: RunCli) -> None:
    result = cli("-v", "generate", "a kite")

    assert result.returncode == 1
    *traceback, said = result.stderr.splitlines()
    assert traceback[0] == "Traceback (most recent call last):"
    assert traceback[-1] == "KeyError: 'width'"
    assert said == "imagegen: error: internal error (KeyError: 'width')"


def _wait_for(cwd: Path, pattern: str, count: int, proc: subprocess.Popen[str]) -> None:
    """Until ``count`` files under ``cwd/output`` match ``pattern`` (polled, with a deadline for
    a busy machine)."""
    deadline = time.monotonic() + 300
    while len(list((cwd / "output").glob(pattern))) < count:
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, f"no {pattern} after 300 s"
        time.sleep(0.1)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("signum", "code", "said"),
    [(signal.SIGTERM, 143, "terminated"), (signal.SIGHUP, 129, "hung up")],
)
def test_a_termination_stops_replay_and_is_recorded(
    tmp_path: Path, signum: int, code: int, said: str
) -> None:
    """``replay`` stops as ``generate`` does: the replay recorded as cancelled where it was,
    never left at ``enhanced`` for ever, and 128 + the signal."""
    from imagegen.ledger import open_ledger

    args = [*RENDER, "--width", "1024", "--height", "1024", "--steps", "50"]
    with rendering(tmp_path, *args, until="renders/*.json") as proc:  # the original, stopped
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=120)
    [memo] = (tmp_path / "output" / "prompts").glob("*.json")
    replay = subprocess.Popen(
        [sys.executable, "-m", "imagegen.cli", "replay", memo.stem],
        cwd=tmp_path,
        env=isolated_environ(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for(tmp_path, "renders/*.json", 2, replay)  # the replay's render has begun
        replay.send_signal(signum)
        out, err = replay.communicate(timeout=120)
    finally:
        if replay.poll() is None:
            replay.kill()
            replay.communicate()
    assert replay.returncode == code, err
    assert err == f"imagegen: error: {said}\n"
    assert out == ""
    ledger = open_ledger(str(tmp_path / "xdg-data" / "imagegen" / "ledger.db"))
    try:
        [again] = [g for g in ledger.history(limit=10).items if g.generation_id != memo.stem]
        found = ledger.get(again.generation_id)
    finally:
        ledger.close()
    assert found is not None and found.replay_of == memo.stem
    assert (found.status, found.failed_stage) == ("failed", "render")
    assert found.error is not None and found.error.code == "cancelled"


@pytest.mark.slow
def test_a_hang_up_stops_the_loop_after_its_image_with_129(tmp_path: Path) -> None:
    """A closed terminal stops ``loop`` as SIGTERM does: after the image under way, which is
    stored, and then 128 + SIGHUP."""
    args = ["loop", "a kite", "--model", "tiny", "--width", "256", "--height", "256"]
    with rendering(tmp_path, *args, "--no-enhance", "--plugins", "", "--json") as proc:
        proc.send_signal(signal.SIGHUP)
        out, err = proc.communicate(timeout=300)
    assert proc.returncode == 129, err
    assert err == "imagegen: error: hung up\n"
    assert len(out.strip().splitlines()) == 1
    assert len(list((tmp_path / "output").rglob("*.png"))) == 1


@pytest.mark.slow
@pytest.mark.parametrize(
    ("signum", "code", "said"),
    [(signal.SIGTERM, 143, "terminated"), (signal.SIGHUP, 129, "hung up")],
)
def test_a_termination_after_a_ctrl_c_stops_the_loops_image_too(
    tmp_path: Path, signum: int, code: int, said: str
) -> None:
    """A first Ctrl-C lets the image under way finish; SIGTERM or SIGHUP after it is the
    second signal: the image is stopped at its next step, recorded as cancelled where it was,
    and the exit status is the one of the signal that ended it."""
    args = ["loop", "a kite", "--model", "tiny", "--width", "1024", "--height", "1024"]
    args += ["--steps", "50", "--no-enhance", "--plugins", ""]
    with rendering(tmp_path, *args, until="renders/*.json") as proc:
        proc.send_signal(signal.SIGINT)
        assert proc.stderr is not None
        first = proc.stderr.readline()  # the loop stops after this image
        assert first == "stopping after this image; Ctrl-C again to stop now\n"
        proc.send_signal(signum)
        out, rest = proc.communicate(timeout=120)
    assert proc.returncode == code, first + rest
    assert rest.splitlines() == ["made 0 image(s)", f"imagegen: error: {said}"]
    assert out == ""
    assert not list((tmp_path / "output").rglob("*.png"))
    assert _recorded(tmp_path) == ("failed", "render", "cancelled")


_NESTED = """\
import signal, sys
from imagegen.cli import _app

_app.exit_at_once(130)
handler = signal.getsignal(signal.SIGINT)


class Interrupted:
    # A signal as the line is about to be written: the handler again, before any byte is.
    def __init__(self, stream):
        self.stream, self.again = stream, True

    def write(self, text):
        if self.again:
            self.again = False
            handler(signal.SIGINT, None)
        return self.stream.write(text)

    def flush(self):
        self.stream.flush()


sys.stderr = Interrupted(sys.stderr)
handler(signal.SIGINT, None)
print("still running", flush=True)
"""


def test_a_signal_as_the_stopped_line_is_written_ends_the_process_after_it(
    tmp_path: Path,
) -> None:
    """Ctrl-C pressed again and again: one comes as the first one's handler writes the line,
    and runs that handler again there. It waits for the line, then the process ends: never
    ended first, with no line said."""
    done = subprocess.run(
        [sys.executable, "-c", _NESTED],
        env=isolated_environ(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (done.returncode, done.stdout, done.stderr) == (
        130,
        "",
        "imagegen: error: interrupted\n",
    )
