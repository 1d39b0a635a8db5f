"""A path that starts with ``~user`` naming no home: refused in one line, naming where it came
from, by every command that reads storage or ledger paths, and by the library beneath them."""

from __future__ import annotations

import json
import os
import pwd
from pathlib import Path

import pytest

from imagegen.errors import ConfigurationError
from tests.conftest import RunCli

NOBODY = "~imagegen-no-such-user"
NO_HOME = "~ names no home directory this process can find"
GENERATION = "0123456789abcdef0123456789abcdef"


def _no_such_user() -> None:
    with pytest.raises(KeyError):
        pwd.getpwnam(NOBODY[1:])


@pytest.mark.parametrize(
    ("args", "env", "named"),
    [
        (["generate", "x", "-o", f"{NOBODY}/out"], {}, "--output"),
        (["generate", "x"], {"IMAGEGEN_STORAGE_URL": f"{NOBODY}/out"}, "IMAGEGEN_STORAGE_URL"),
        (["loop", "--count", "1", "-o", f"{NOBODY}/out"], {}, "--output"),
        (["replay", GENERATION, "-o", f"{NOBODY}/out"], {}, "--output"),
        (["history", "--ledger", f"{NOBODY}/l.db"], {}, "--ledger"),
        (["history", "--ledger", f"sqlite:///{NOBODY}/l.db"], {}, "--ledger"),
        (["status", GENERATION, "--ledger", f"{NOBODY}/l.db"], {}, "--ledger"),
        (["ledger", "export", "--ledger", f"{NOBODY}/l.db"], {}, "--ledger"),
        (["history"], {"IMAGEGEN_LEDGER_URL": f"{NOBODY}/l.db"}, "IMAGEGEN_LEDGER_URL"),
        (["generate", "x"], {"IMAGEGEN_LEDGER_URL": f"{NOBODY}/l.db"}, "IMAGEGEN_LEDGER_URL"),
        (["doctor"], {"IMAGEGEN_LEDGER_URL": f"{NOBODY}/l.db"}, "IMAGEGEN_LEDGER_URL"),
        (["serve", "persist"], {"IMAGEGEN_STORAGE_URL": f"{NOBODY}/o"}, "IMAGEGEN_STORAGE_URL"),
    ],
)
def test_a_home_no_user_has_is_refused_naming_where_it_came_from(
    cli: RunCli,
    monkeypatch: pytest.MonkeyPatch,
    args: list[str],
    env: dict[str, str],
    named: str,
) -> None:
    """It was an internal error: pathlib's "Could not determine home directory.", exit 1."""
    _no_such_user()
    # serve replaces this process with the server once its checks pass: never here.
    monkeypatch.setattr(os, "execv", lambda *_: pytest.fail("serve started"))
    result = cli(*args, env={"IMAGEGEN_MODEL": "tiny", **env})
    assert result.returncode == 2, result.stderr
    assert result.stderr == f"imagegen: error: invalid settings: {named} ({NO_HOME})\n"


def test_doctor_names_a_storage_home_no_user_has(cli: RunCli) -> None:
    _no_such_user()
    result = cli("doctor", "--json", env={"IMAGEGEN_STORAGE_URL": f"{NOBODY}/out"})
    assert result.returncode == 2, result.stderr
    rows = {row["check"]: row for row in json.loads(result.stdout)["checks"]}
    assert rows["settings"]["status"] == "error"
    assert rows["settings"]["summary"] == (f"invalid settings: IMAGEGEN_STORAGE_URL ({NO_HOME}).")


def test_the_library_refuses_a_home_no_user_has_as_a_setting(tmp_path: Path) -> None:
    """Given to the library, not through the settings: a ConfigurationError naming the
    setting, never a RuntimeError."""
    from imagegen.ledger import ledger_path, open_ledger
    from imagegen.ledger.sqlite import SqliteLedger
    from imagegen.storage.local import LocalStorage

    _no_such_user()
    with pytest.raises(ConfigurationError) as storage:
        LocalStorage(f"{NOBODY}/out")
    assert storage.value.errors == [{"field": "storage_url", "message": NO_HOME}]
    for opening in (
        lambda: ledger_path(f"{NOBODY}/l.db"),
        lambda: open_ledger(f"sqlite:///{NOBODY}/l.db"),
        lambda: SqliteLedger(f"{NOBODY}/l.db"),
    ):
        with pytest.raises(ConfigurationError) as ledger:
            opening()
        assert ledger.value.errors == [{"field": "ledger_url", "message": NO_HOME}]
    assert not list(tmp_path.iterdir())  # nothing made on the way


def test_a_loop_of_links_is_said_as_one_not_as_a_home(cli: RunCli, tmp_path: Path) -> None:
    """resolve() raises RuntimeError for a loop of links too (Python 3.11): it was said as
    a ``~`` that names no home, of a path with no ``~``."""
    loop = tmp_path / "loop"
    loop.symlink_to("loop")
    result = cli("generate", "x", env={"IMAGEGEN_MODEL": "tiny", "IMAGEGEN_STORAGE_URL": str(loop)})
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "home" not in result.stderr
    assert f"{str(loop)!r} cannot be resolved" in result.stderr
    assert "IMAGEGEN_STORAGE_URL" in result.stderr


def test_no_home_for_the_default_ledger_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """No HOME, no XDG_DATA_HOME and no passwd entry: pathlib's RuntimeError was an internal
    error; it names the setting that says where the ledger is."""
    from imagegen.ledger.store import default_ledger_path

    monkeypatch.delenv("HOME", raising=False)
    monkeypatch.delenv("XDG_DATA_HOME", raising=False)

    def no_entry(uid: int) -> pwd.struct_passwd:
        raise KeyError(uid)

    monkeypatch.setattr(pwd, "getpwuid", no_entry)
    with pytest.raises(ConfigurationError) as refused:
        default_ledger_path()
    assert refused.value.errors[0]["field"] == "ledger_url"
    assert refused.value.message.endswith("set IMAGEGEN_LEDGER_URL")
