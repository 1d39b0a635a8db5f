"""``imagegen generate`` stopped at a given moment: a second Ctrl-C while the first is handled,
and an interrupt once the image is stored. Each in a fresh process, as a user runs it."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

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


@pytest.mark.slow
def test_ctrl_c_once_the_png_is_stored_ends_with_the_image_complete(tmp_path: Path) -> None:
    """Ctrl-C while the metadata record is written (the PNG stored): the record and the history
    are finished first, then the command stops as interrupted; the image is complete and the
    history says persisted, not a PNG left behind a failed generation."""
    from imagegen.ledger import open_ledger

    proc = subprocess.Popen(
        [sys.executable, "-c", _PAUSED, *RENDER, "--steps", "2", "--no-enhance", "--json"],
        cwd=tmp_path,
        env=isolated_environ(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        said = proc.stderr.readline()
        assert said == "writing the record\n", said + proc.communicate(timeout=60)[1]
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert (proc.returncode, err) == (130, "imagegen: error: interrupted\n")
    assert out == ""
    [png] = (tmp_path / "output").rglob("*.png")
    assert png.with_suffix(".json").is_file()
    ledger = open_ledger(str(tmp_path / "xdg-data" / "imagegen" / "ledger.db"))
    try:
        found = ledger.get(png.stem)
    finally:
        ledger.close()
    assert found is not None and found.status == "persisted"
