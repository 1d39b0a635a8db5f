"""``imagegen ledger export`` run as a process: its lines are UTF-8 JSON whatever the locale."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from imagegen.ledger import Ledger
from tests.conftest import isolated_environ
from tests.ledger.chain import chain

PROMPTS = {"gen-cafe": "a café in Zürich", "gen-fox": "a fox 🦊"}


@pytest.mark.parametrize("encoding", ["latin-1", "ascii"])
def test_export_writes_utf8_whatever_the_locales_encoding(
    ledger: Ledger, ledger_url: str, tmp_path: Path, encoding: str
) -> None:
    """A stdout in Latin-1 or ASCII (a C locale, PYTHONIOENCODING) would write the café in
    another encoding and could not write the fox at all: JSON between systems is UTF-8
    (RFC 8259, section 8.1)."""
    for gid, prompt in PROMPTS.items():
        requested = chain(gid)["requested"]
        ledger.ingest(requested.model_copy(update={"data": {**requested.data, "prompt": prompt}}))

    exported = subprocess.run(
        [sys.executable, "-m", "imagegen.cli", "ledger", "export", "--ledger", ledger_url],
        cwd=tmp_path,
        env={**isolated_environ(tmp_path), "PYTHONIOENCODING": encoding},
        capture_output=True,
        timeout=120,
    )

    assert exported.returncode == 0, exported.stderr
    lines = [json.loads(line) for line in exported.stdout.decode("utf-8").splitlines()]
    assert {line["subject"]: line["data"]["prompt"] for line in lines} == PROMPTS
    assert "🦊".encode() in exported.stdout  # as itself, not escaped


def _export(
    ledger_url: str, tmp_path: Path, **redirect: object
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "imagegen.cli", "ledger", "export", "--ledger", ledger_url],
        cwd=tmp_path,
        env={**isolated_environ(tmp_path), "PYTHONIOENCODING": "latin-1"},
        stderr=subprocess.PIPE,
        timeout=120,
        **redirect,  # type: ignore[call-overload]
    )


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full")
def test_an_export_that_cannot_be_written_is_one_line(
    ledger: Ledger, ledger_url: str, tmp_path: Path
) -> None:
    ledger.ingest(chain("gen-fox")["requested"])
    with open("/dev/full", "wb") as full:
        result = _export(ledger_url, tmp_path, stdout=full)
    assert result.returncode == 1
    assert result.stderr == b"imagegen: error: cannot write output: No space left on device\n"


def test_an_export_into_a_closed_pipe_ends_quietly(
    ledger: Ledger, ledger_url: str, tmp_path: Path
) -> None:
    """``imagegen ledger export | head``: the reader gone, the export ends, exit 1, no word."""
    import os

    ledger.ingest(chain("gen-fox")["requested"])
    read, write = os.pipe()
    os.close(read)
    try:
        result = _export(ledger_url, tmp_path, stdout=write)
    finally:
        os.close(write)
    assert (result.returncode, result.stderr) == (1, b"")
