"""``history``'s filters given empty: refused, naming the option, never read as no filter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from imagegen.cli import main
from tests.ledger.chain import recorded_file


def _history(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    try:
        main(["history", *args])
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("option", ["--since", "--until", "--model", "--cursor"])
@pytest.mark.parametrize("value", ["", "  "])
def test_an_empty_filter_is_refused_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], option: str, value: str
) -> None:
    """An empty ``--since`` would list every generation, an empty ``--model`` none at all:
    either way an answer to another question than the one asked."""
    ledger = str(recorded_file(f"sqlite:///{tmp_path / 'l.db'}"))
    code, out, _ = _history(capsys, "--ledger", ledger, "--json")
    assert code == 0 and [g["generation_id"] for g in json.loads(out)] == ["gen-1"]

    code, out, err = _history(capsys, "--ledger", ledger, option, value, "--json")
    assert code == 2 and not out
    assert err.strip() == f"imagegen: error: {option}: empty"
