"""The command line where part of what it needs fails: a ledger that cannot be written, a disk
that fills up after the PNG, URLs and ledger URLs that name nothing, and commands that only
look (which make nothing)."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from imagegen.render._errors import INSTALL_HINT
from tests.conftest import RunCli
from tests.functions.servers import free_port

SMALL = ["--model", "tiny", "--width", "256", "--height", "256", "--steps", "2"]
GENERATION = "0123456789abcdef0123456789abcdef"


def test_a_ledger_that_opens_but_cannot_be_written_is_said_once(
    cli: RunCli, tmp_path: Path
) -> None:
    ledger = tmp_path / "l.db"
    env = {"IMAGEGEN_LEDGER_URL": "l.db"}  # the working directory: tmp_path
    assert cli("generate", "x", *SMALL, "--json", env=env).returncode == 0
    # Its first pages (the header, the schema) stay: it opens, and fails as it is written.
    pages = ledger.stat().st_size // 4096
    with ledger.open("r+b") as file:
        file.seek(2 * 4096)
        file.write(b"\xff" * 4096 * (pages - 2))

    result = cli("generate", "x", *SMALL, env=env)

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("image ")
    said = [line for line in result.stderr.splitlines() if "history is not recorded" in line]
    assert said == [
        "warning: history is not recorded: ledger l.db is unreadable: database disk image is"
        " malformed"
    ]


@pytest.fixture
def small_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A 200 KB file system: the tiny model's PNG (150 KB) and its record fit, and its
    derivatives do not. Where no tmpfs can be mounted (not root), a folder whose derivative
    files fail as a full disk fails them: ``ENOSPC`` as their bytes are written."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mount = shutil.which("mount")
    made = mount and subprocess.run(
        [mount, "-t", "tmpfs", "-o", "size=200k", "imagegen-test", str(disk)],
        capture_output=True,
        check=False,
    )
    if made and made.returncode == 0:
        try:
            yield disk
        finally:
            subprocess.run(["umount", str(disk)], check=True)
        return
    from imagegen.storage import local

    staged = local._staged

    def full(path: Path, data: bytes, **kwargs: bool) -> Path:
        if path.suffix in (".webp", ".avif"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return staged(path, data, **kwargs)

    monkeypatch.setattr(local, "_staged", full)
    yield disk


@pytest.mark.parametrize(
    "command",
    [["generate", "x", "--seed", "42"], ["loop", "x", "--count", "1"]],
    ids=lambda c: c[0],
)
def test_derivatives_that_cannot_be_made_leave_the_image_made(
    cli: RunCli, small_disk: Path, command: list[str]
) -> None:
    result = cli(*command, *SMALL, "-o", str(small_disk / "out"))

    assert result.returncode == 0, result.stderr
    png = next((small_disk / "out").rglob("*.png"))
    assert str(png) in result.stdout  # the image's report, as usual
    warnings = [line for line in result.stderr.splitlines() if "derivatives" in line]
    assert len(warnings) == 1
    assert "were not made" in warnings[0] and "No space left on device" in warnings[0]
    assert warnings[0].endswith("(the image is stored)")
    assert not list((small_disk / "out").rglob("*.derivatives.json"))
    if command[0] == "loop":  # on to the next image (none here), not stopped by it
        assert "made 1 image(s)" in result.stderr


class _Recording(BaseHTTPRequestHandler):
    seen: list[str] = []

    def do_GET(self) -> None:
        self._answer()

    def do_POST(self) -> None:
        self._answer()

    def _answer(self) -> None:
        self.seen.append(self.path)
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: object) -> None:
        pass


PORT = free_port()


@pytest.fixture
def listener() -> Iterator[list[str]]:
    """A server on :data:`PORT`, where a port 65536 higher would land if taken modulo."""
    _Recording.seen = []
    server = ThreadingHTTPServer(("127.0.0.1", PORT), _Recording)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield _Recording.seen
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["send", "x", "--to", f"http://127.0.0.1:{PORT + 65536}"], "--to"),
        (["history", "--ledger", f"http://127.0.0.1:{PORT + 65536}"], "--ledger"),
        (["status", GENERATION, "--ledger", f"http://127.0.0.1:{PORT + 65536}"], "--ledger"),
    ],
)
def test_a_port_out_of_range_is_refused(
    cli: RunCli, listener: list[str], args: list[str], named: str
) -> None:
    result = cli(*args)

    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("imagegen: error: ")
    assert named in result.stderr and "range" in result.stderr
    assert listener == []


def test_a_port_out_of_range_in_the_variable_is_named_by_it(
    cli: RunCli, listener: list[str]
) -> None:
    result = cli("history", env={"IMAGEGEN_LEDGER_URL": f"http://127.0.0.1:{PORT + 65536}"})

    assert result.returncode == 2, result.stderr
    assert "IMAGEGEN_LEDGER_URL" in result.stderr and "range" in result.stderr
    assert listener == []


EVERY_COMMAND = [
    ["generate", "x", *SMALL],
    ["loop", "x", "--count", "1", *SMALL],
    ["history"],
    ["status", GENERATION],
    ["replay", GENERATION],
    ["ledger", "export"],
    ["ledger", "prune"],
    ["doctor"],
    ["plugins"],
    ["models", "list"],
]


@pytest.mark.parametrize("command", EVERY_COMMAND, ids=" ".join)
def test_an_unsupported_ledger_scheme_is_refused_by_every_command(
    cli: RunCli, tmp_path: Path, command: list[str]
) -> None:
    result = cli(*command, env={"IMAGEGEN_LEDGER_URL": "mysql://user:secret@host/db"})

    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("imagegen: error: invalid settings: IMAGEGEN_LEDGER_URL (")
    assert "'mysql'" in result.stderr and "secret" not in result.stderr
    assert not (tmp_path / "output").exists()


@pytest.mark.parametrize(
    "command",
    [c for c in EVERY_COMMAND if c[0] in ("history", "status", "replay", "ledger")],
    ids=" ".join,
)
def test_an_unsupported_ledger_scheme_given_as_the_option_names_it(
    cli: RunCli, command: list[str]
) -> None:
    result = cli(*command, "--ledger", "mysql://host/db")

    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("imagegen: error: invalid settings: --ledger (")
    assert "ledger_url" not in result.stderr and "IMAGEGEN_LEDGER_URL" not in result.stderr


@pytest.mark.parametrize("command", [["doctor", "--json"], ["plugins"], ["models", "list"]])
def test_diagnostic_commands_make_no_folder(
    cli: RunCli, tmp_path: Path, command: list[str]
) -> None:
    before = sorted(tmp_path.rglob("*"))

    result = cli(*command)

    assert result.returncode in (0, 1), result.stderr  # doctor: 1 where a check fails
    assert not (tmp_path / "output").exists()
    assert sorted(tmp_path.rglob("*")) == before


def test_doctor_checks_a_storage_folder_not_made_by_the_folder_above(
    cli: RunCli, tmp_path: Path
) -> None:
    import json

    (tmp_path / "afile").write_text("")
    fine = cli("doctor", "--json", env={"IMAGEGEN_STORAGE_URL": str(tmp_path / "new" / "out")})
    blocked = cli("doctor", "--json", env={"IMAGEGEN_STORAGE_URL": str(tmp_path / "afile" / "x")})

    rows = {
        name: {row["check"]: row for row in json.loads(result.stdout)["checks"]}["storage"]
        for name, result in (("fine", fine), ("blocked", blocked))
    }
    assert rows["fine"]["status"] == "ok"
    assert rows["blocked"]["status"] == "error"
    assert f"cannot be created under {tmp_path / 'afile'}" in rows["blocked"]["summary"]
    assert not (tmp_path / "new").exists()


@pytest.fixture
def no_render_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    """An install without the render extra (the CPU functions' ``.[ledger]``): diffusers cannot
    be imported, as None in ``sys.modules`` tells the import system, and the backend's module
    is imported again."""
    monkeypatch.setitem(sys.modules, "diffusers", None)
    monkeypatch.delitem(sys.modules, "imagegen.render.diffusers_backend", raising=False)


@pytest.mark.usefixtures("no_render_extra")
def test_generate_without_the_render_extra_says_what_to_install(cli: RunCli) -> None:
    result = cli("generate", "x", *SMALL)

    assert result.returncode == 2, result.stderr  # the installation, as a setting: not a bug
    assert result.stderr.splitlines() == [
        "imagegen: error: rendering needs the render extra (diffusers is not installed): "
        + INSTALL_HINT
    ]
    assert "pip install 'imagegen[render]'" in INSTALL_HINT  # an installed package's way
    assert "pip install -e '.[render]'" in INSTALL_HINT  # and a checkout's


@pytest.mark.usefixtures("no_render_extra")
def test_doctor_without_the_render_extra_says_the_same_command(cli: RunCli) -> None:
    import json

    result = cli("doctor", "--json")

    row = {row["check"]: row for row in json.loads(result.stdout)["checks"]}["render"]
    assert row["status"] == "warning"
    assert row["summary"].startswith("diffusers is not installed")
    assert row["next_step"] == f"Install the render extra: {INSTALL_HINT}."
