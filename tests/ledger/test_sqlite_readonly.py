"""A SQLite ledger opened only to read: a file this process may not write is read, and nothing is
written to the file it reads (SQLite's ``mode=ro``; "Write-Ahead Logging", "Read-Only
Databases", for a WAL-mode file)."""

from __future__ import annotations

import io
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from imagegen.errors import InternalError, NotFound
from imagegen.ledger import open_ledger
from imagegen.ledger._migrate import migrations
from tests.conftest import ROOT
from tests.ledger.chain import chain


def record(path: Path, *gids: str) -> None:
    """A ledger at ``path`` with a generation recorded for each of ``gids``, closed."""
    ledger = open_ledger(str(path))
    for gid in gids:
        ledger.ingest(chain(gid)["requested"])
    ledger.close()


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file in ``folder``: its bytes and modification time."""
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.iterdir()}


def test_a_ledger_is_read_and_nothing_is_written_to_it(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    record(path, "gen-1")
    before = snapshot(tmp_path)
    assert set(before) == {"ledger.db"}  # closed: SQLite removed its -wal and -shm

    ledger = open_ledger(str(path), read_only=True)
    assert [g.generation_id for g in ledger.history().items] == ["gen-1"]
    detail = ledger.get("gen-1")
    assert detail is not None and detail.status == "requested"
    out = io.StringIO()
    assert ledger.export_jsonl(out) == 1
    ledger.close()

    after = snapshot(tmp_path)
    assert after["ledger.db"] == before["ledger.db"]  # same bytes, same mtime
    # A WAL-mode file is read beside its -wal, which SQLite makes where the folder lets it
    # (and a reader never writes into it).
    assert set(after) <= {"ledger.db", "ledger.db-wal", "ledger.db-shm"}
    assert after.get("ledger.db-wal", (b"", 0))[0] == b""


def test_writes_through_it_fail(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    record(path, "gen-1")
    ledger = open_ledger(str(path), read_only=True)
    try:
        with pytest.raises(InternalError, match="is open read-only"):
            ledger.ingest(chain("gen-2")["requested"])
        with pytest.raises(InternalError, match="is open read-only"):
            ledger.prune(timedelta(0))
        # Below the ledger's own refusal, SQLite's: the connection cannot write either.
        with (
            pytest.raises(sqlite3.OperationalError, match="readonly database"),
            ledger.statement() as db,  # type: ignore[attr-defined]
        ):
            db.run("DELETE FROM generations", {})
        assert [g.generation_id for g in ledger.history().items] == ["gen-1"]
    finally:
        ledger.close()


@pytest.mark.parametrize("content", ["empty", "another program's database"])
def test_a_file_with_no_ledger_in_it_reads_as_no_history_and_stays_as_it_was(
    tmp_path: Path, content: str
) -> None:
    path = tmp_path / "ledger.db"
    if content == "empty":
        path.touch()
    else:
        other = sqlite3.connect(path)
        other.execute("CREATE TABLE notes (body TEXT)")
        other.commit()
        other.close()
    before = snapshot(tmp_path)

    ledger = open_ledger(str(path), read_only=True)
    assert ledger.history().items == []
    assert ledger.get("gen-1") is None
    assert ledger.export_jsonl(io.StringIO()) == 0
    with pytest.raises(InternalError, match="is open read-only"):
        ledger.ingest(chain("gen-1")["requested"])
    ledger.close()

    assert snapshot(tmp_path) == before  # no schema, no -wal, -shm or -journal


def test_a_missing_file_is_not_made(tmp_path: Path) -> None:
    path = tmp_path / "data" / "imagegen" / "ledger.db"
    with pytest.raises(NotFound, match="does not exist"):
        open_ledger(str(path), read_only=True)
    assert list(tmp_path.iterdir()) == []


def test_a_migration_still_to_apply_is_applied_then_it_reads_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "ledger.db"
    known = migrations("sqlite")
    with monkeypatch.context() as older:  # the ledger as the release before made it
        older.setattr("imagegen.ledger._sql.migrations", lambda dialect: known[:-1])
        record(path)

    ledger = open_ledger(str(path), read_only=True)
    try:
        assert ledger.history().items == []
        with pytest.raises(InternalError, match="is open read-only"):
            ledger.ingest(chain("gen-2")["requested"])
    finally:
        ledger.close()
    applied = sqlite3.connect(path).execute("SELECT max(version) FROM ledger_migrations")
    assert applied.fetchone()[0] == known[-1].version


# -- a file this process may not write --------------------------------------------------------


@pytest.fixture
def shared_folder() -> Iterator[Path]:
    """A folder another user may enter (pytest's own tmp_path is its owner's alone)."""
    folder = Path(tempfile.mkdtemp(prefix="imagegen-ro-"))
    folder.chmod(0o755)
    yield folder
    for p in [folder, *folder.iterdir()]:
        p.chmod(0o755)
    shutil.rmtree(folder)


READ = """
import json, sys
from imagegen.ledger import open_ledger
try:
    ledger = open_ledger(sys.argv[1], read_only=True)
    print(json.dumps([g.generation_id for g in ledger.history().items]))
except Exception as exc:
    print(json.dumps(f"{type(exc).__name__}: {exc}"))
"""


def read_as_reader(path: Path, *, prefix: tuple[str, ...] = ()) -> object:
    """Open ``path`` read-only in another process and return its history's ids, or its error
    as ``Name: message``.

    Without ``prefix``, a process that may not write the file or its folder: both made
    read-only, and, where this process is root, the reader without root's capabilities (its
    bounding set emptied), which is what lets root write whatever the permissions say.
    ``prefix`` runs it as it says.
    """
    if not prefix:
        for p in path.parent.iterdir():
            p.chmod(0o444)
        path.parent.chmod(0o555)
        if os.geteuid() == 0:
            prefix = ("setpriv", "--bounding-set=-all", "--inh-caps=-all")
    done = subprocess.run(
        [*prefix, sys.executable, "-c", READ, str(path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_a_ledger_another_process_has_open_is_read_from_a_folder_it_cannot_write(
    shared_folder: Path,
) -> None:
    path = shared_folder / "ledger.db"
    record(path, "gen-1")
    writer = open_ledger(str(path))  # the owner's: its -wal and -shm are there meanwhile
    try:
        writer.ingest(chain("gen-2")["requested"])
        before = snapshot(shared_folder)
        assert read_as_reader(path) == ["gen-2", "gen-1"]
        assert snapshot(shared_folder) == before
    finally:
        writer.close()


def test_a_closed_ledger_in_a_folder_it_cannot_write_is_refused_saying_what_it_needs(
    shared_folder: Path,
) -> None:
    path = shared_folder / "ledger.db"
    record(path, "gen-1")
    before = snapshot(shared_folder)
    said = read_as_reader(path)
    assert said == (
        f"DependencyUnavailable: ledger {path} cannot be read without write access to "
        f"{shared_folder}: SQLite reads a WAL-mode database only beside its ledger.db-shm and "
        "-wal files, which are not there (they are while a process that writes the ledger has "
        "it open)"
    )
    assert snapshot(shared_folder) == before


def test_a_closed_ledger_on_a_read_only_mount_is_read(shared_folder: Path) -> None:
    path = shared_folder / "ledger.db"
    record(path, "gen-1")
    before = snapshot(shared_folder)
    # The folder bound read-only onto itself, in a mount namespace of the reader's own (not
    # root: in a user namespace too), where no one, root included, can write it.
    unshare = ("unshare", "-m") if os.geteuid() == 0 else ("unshare", "-rm")
    mount = 'mount --bind -o ro "$0" "$0" && exec "$@"'
    prefix = (*unshare, "sh", "-c", mount, str(shared_folder))
    probe = subprocess.run([*prefix, "true"], capture_output=True, text=True, check=False)
    if probe.returncode != 0:  # a container without mount namespaces for this user
        pytest.skip(f"no read-only bind mount here: {probe.stderr.strip()[:200]}")
    assert read_as_reader(path, prefix=prefix) == ["gen-1"]
    assert snapshot(shared_folder) == before
