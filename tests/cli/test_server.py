"""``imagegen serve`` once its checks pass: the server process (``imagegen.cli._server``).

It says where it serves once it listens; a Ctrl-C before then is the one line any command
says and exit 130, one after it the server's own (exit 0); werkzeug's lines (``--debug``)
carry styles only on a terminal without ``NO_COLOR``. Each served in a fresh process, from a
``functions/`` folder of its own: a function that loads for ever, or one that answers at once.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import httpx
import pytest

from tests.conftest import ROOT, isolated_environ
from tests.functions.servers import free_port
from tests.test_cli import on_a_terminal, terminal_output

_LOADING_FOR_EVER = """\
import sys, time

print("loading", file=sys.stderr, flush=True)
time.sleep(120)
"""

_ANSWERING = """\
def persist(request):
    return "served"
"""


def _functions(tmp_path: Path, persist: str) -> dict[str, str]:
    """The environment of a ``serve persist`` whose function is ``persist``'s source."""
    folder = tmp_path / "functions"
    folder.mkdir()
    (folder / "_adapter.py").write_text("")  # what marks a functions/ folder
    (folder / "persist.py").write_text(persist)
    return {**isolated_environ(tmp_path), "IMAGEGEN_FUNCTIONS_DIR": str(folder)}


def _default_sigint() -> None:
    # As a terminal's foreground job: SIGINT at its default, even where the tests run in a
    # background job, which starts its processes ignoring it.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Served(NamedTuple):
    proc: subprocess.Popen[str]
    port: int


def _started(
    tmp_path: Path, env: dict[str, str], *args: str, session: bool = False
) -> subprocess.Popen[str]:
    """``imagegen serve persist ARGS`` in a process of its own, its output piped, Ctrl-C its
    default; with ``session``, its workers in its new session, to be killed with it."""
    return subprocess.Popen(
        [sys.executable, "-m", "imagegen.cli", "serve", "persist", *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_default_sigint,
        start_new_session=session,
    )


@pytest.fixture
def serving(tmp_path: Path) -> Iterator[Served]:
    """A ``serve persist`` whose function answers at once, in a fresh process."""
    port = free_port()
    proc = _started(tmp_path, _functions(tmp_path, _ANSWERING), "--port", str(port))
    try:
        yield Served(proc, port)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def _next_line(proc: subprocess.Popen[str], seconds: float = 60) -> str:
    """The next line ``proc`` writes on stderr, waited for ``seconds`` at most."""
    lines: list[str] = []
    assert proc.stderr is not None
    stderr = proc.stderr
    reader = threading.Thread(target=lambda: lines.append(stderr.readline()), daemon=True)
    reader.start()
    reader.join(seconds)
    assert lines, f"nothing said in {seconds} s"
    assert lines[0], f"it ended, exit {proc.wait()}, without saying it"
    return lines[0]


def _rest(proc: subprocess.Popen[str], seconds: float = 30) -> tuple[str, str]:
    """What ``proc`` writes on stdout and stderr until they close, waited for ``seconds`` at
    most, then its exit. Read through the streams :func:`_next_line` reads: a line read there
    may have brought the next ones into the stream's buffer, which ``communicate`` (reading
    the pipes beneath) would never see."""
    got: dict[str, str] = {}
    readers = [
        threading.Thread(target=lambda n=name, s=stream: got.update({n: s.read()}), daemon=True)
        for name, stream in (("out", proc.stdout), ("err", proc.stderr))
        if stream is not None
    ]
    for reader in readers:
        reader.start()
    for reader in readers:
        reader.join(seconds)
    assert len(got) == len(readers), f"still writing after {seconds} s: {got}"
    proc.wait(seconds)
    return got.get("out", ""), got.get("err", "")


@pytest.mark.slow
def test_ctrl_c_while_the_function_loads_is_one_line_and_130(tmp_path: Path) -> None:
    """It said "serving persist on …" before anything listened, then "Aborted!" (click's),
    exit 1, or a traceback of the import the interrupt broke into."""
    proc = _started(tmp_path, _functions(tmp_path, _LOADING_FOR_EVER), "--port", str(free_port()))
    try:
        assert _next_line(proc) == "loading\n"  # the server imports the function
        proc.send_signal(signal.SIGINT)
        out, err = _rest(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert (proc.returncode, err) == (130, "imagegen: error: interrupted\n")
    assert out == ""


@pytest.mark.slow
def test_serving_is_said_once_it_listens(serving: Served) -> None:
    """It was said before the server was started, let alone listening."""
    port = serving.port
    assert _next_line(serving.proc) == f"serving persist on http://127.0.0.1:{port}\n"
    reply = httpx.get(f"http://127.0.0.1:{port}/", timeout=10)  # at once: it listens
    assert (reply.status_code, reply.text) == (200, "served")


@pytest.mark.slow
def test_ctrl_c_once_it_serves_is_the_servers_own_exit_0(serving: Served) -> None:
    """gunicorn's arbiter takes SIGINT over as it starts: it stops its workers, exit 0; the
    look at whether it listens yet leaves nothing in its log."""
    proc, port = serving
    assert _next_line(proc) == f"serving persist on http://127.0.0.1:{port}\n"
    assert httpx.get(f"http://127.0.0.1:{port}/", timeout=10).text == "served"
    proc.send_signal(signal.SIGINT)
    out, err = _rest(proc)
    assert (proc.returncode, err, out) == (0, "", "")


_HELD_SUBMIT = ROOT / "tests" / "functions" / "held_submit"
"""A ``sitecustomize`` holding the server's thread pool's lock in a submit, once asked to."""


@pytest.mark.slow
def test_ctrl_c_as_the_worker_submits_a_connection_is_still_the_servers_own_exit_0(
    tmp_path: Path,
) -> None:
    """gthread's worker quit (SIGQUIT, SIGINT) by shutting its thread pool down, under the
    pool's lock, which its main thread holds while it submits a connection: a kept-alive one
    that its client closes as the Ctrl-C comes. The handler waited on that lock for good, and
    the master killed the worker after its graceful timeout (gunicorn's 30 s; an hour for a
    function of functions/), saying so."""
    flag = tmp_path / "hold-the-next-submit"
    env = _functions(tmp_path, _ANSWERING)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_HELD_SUBMIT), env.get("PYTHONPATH")]))
    env["SUBMIT_HELD_ONCE"] = str(flag)
    port = free_port()
    proc = _started(tmp_path, env, "--port", str(port), session=True)
    try:
        assert _next_line(proc) == f"serving persist on http://127.0.0.1:{port}\n"
        with httpx.Client(timeout=10) as client:  # the connection kept alive
            assert client.get(f"http://127.0.0.1:{port}/").text == "served"
            flag.touch()
        # Closed: the worker's main thread submits it, and is held there.
        assert _next_line(proc, 10) == '{"message": "submit held"}\n'
        proc.send_signal(signal.SIGINT)
        out, err = _rest(proc, 10)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # its worker too, stuck in its handler
            proc.communicate()
    assert (proc.returncode, err, out) == (0, "", "")


@pytest.mark.slow
@pytest.mark.parametrize("debug", [False, True], ids=["gunicorn", "debug"])
def test_a_port_taken_after_the_check_is_never_said_served(tmp_path: Path, debug: bool) -> None:
    """Another program listening on the port by the time the server binds (``serve`` checks
    it before it execs): a connection to the port succeeded, so "serving" was said, of a
    server that then failed to bind."""
    env = _functions(tmp_path, _ANSWERING)
    source = Path(env["IMAGEGEN_FUNCTIONS_DIR"]) / "persist.py"
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        # What ``serve`` runs in its place once it has checked the port (imagegen.cli._server).
        command = [sys.executable, "-m", "imagegen.cli._server", "--target", "persist"]
        command += ["--source", str(source), "--host", "127.0.0.1", "--port", str(port)]
        done = subprocess.run(
            command + (["--debug"] if debug else []),
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode != 0
    assert "serving" not in done.stderr


def _debug_server_output(tmp_path: Path, env: dict[str, str], *, terminal: bool) -> str:
    """What ``serve persist --debug`` writes (stderr, or the whole terminal) until it serves a
    request, stopped then by a Ctrl-C."""
    port = free_port()
    options = ["--port", str(port), "--debug"]
    args = ["serve", "persist", *options]
    if terminal:
        pid, fd = on_a_terminal(tmp_path, args, env)
        seen = ""
        try:
            for chunk in terminal_output(fd, seconds=120):
                seen += chunk.decode(errors="replace")
                if "Debugger PIN" in seen:
                    break
            assert httpx.get(f"http://127.0.0.1:{port}/", timeout=10).text == "served"
            os.kill(pid, signal.SIGINT)
            for chunk in terminal_output(fd, seconds=30):
                seen += chunk.decode(errors="replace")
        finally:
            os.close(fd)
            _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, seen
        return seen
    proc = _started(tmp_path, env, *options)
    try:
        said = ""
        while "serving persist" not in said:
            said += _next_line(proc)
        assert httpx.get(f"http://127.0.0.1:{port}/", timeout=30).text == "served"
        proc.send_signal(signal.SIGINT)
        _, err = _rest(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, said + err
    return said + err


@pytest.mark.slow
@pytest.mark.parametrize(
    ("terminal", "no_color", "styled"),
    [(False, "", False), (False, "1", False), (True, "1", False), (True, "", True)],
    ids=["pipe", "pipe-NO_COLOR", "terminal-NO_COLOR", "terminal"],
)
def test_debug_server_styles_its_lines_only_on_a_terminal_without_no_color(
    tmp_path: Path, terminal: bool, no_color: str, styled: bool
) -> None:
    """Werkzeug styled them wherever they went: ``ESC[31mESC[1mWARNING: This is a development
    server…`` in a pipe, and with NO_COLOR set."""
    env = {**_functions(tmp_path, _ANSWERING), "NO_COLOR": no_color, "TERM": "xterm-256color"}
    said = _debug_server_output(tmp_path, env, terminal=terminal)
    assert "WARNING: This is a development server." in said
    assert ("\x1b[" in said) is styled, said
