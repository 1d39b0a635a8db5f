"""The ledger under test: every test runs once on SQLite and once on a real PostgreSQL 15.

CI starts one throwaway server (``.ci/postgres``) and exports ``TEST_POSTGRES_URL``; without
it the session starts its own the same way. Each test gets a schema of its own on that server
(via ``search_path``), so migrations run from scratch every time and tests cannot see each
other's rows.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from urllib.parse import quote

import pytest

from imagegen.ledger import Ledger, open_ledger
from tests.conftest import ROOT
from tests.functions.clients import InProcessFunction

BACKENDS = ("sqlite", "postgres")


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A PostgreSQL server for this session: CI's, or one started here."""
    given = os.environ.get("TEST_POSTGRES_URL")
    if given:
        yield given
        return
    # Made by the script: owned by the server's user, which may not enter a directory of ours.
    folder = Path(tempfile.gettempdir()) / f"imagegen-pg-{uuid.uuid4().hex[:12]}"
    script = str(ROOT / ".ci" / "postgres")
    started = subprocess.run(
        [script, "start", str(folder), "--", "fsync=off", "full_page_writes=off"],
        capture_output=True,
        text=True,
        check=False,
    )
    if started.returncode:
        pytest.fail(f"could not start PostgreSQL: {started.stderr.strip()}")
    try:
        yield started.stdout.strip()
    finally:
        subprocess.run([script, "stop", str(folder)], check=False)


def schema_url(server_url: str, schema: str) -> str:
    """``server_url`` with every connection's ``search_path`` set to ``schema``."""
    separator = "&" if "?" in server_url else "?"
    return f"{server_url}{separator}options={quote(f'-csearch_path={schema}')}"


@pytest.fixture
def ledger_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The URL of an empty ledger of the parametrised backend."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'ledger.db'}"
        return
    import psycopg

    server = request.getfixturevalue("postgres_url")
    schema = "t_" + uuid.uuid4().hex[:12]
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    try:
        yield schema_url(server, schema)
    finally:
        with psycopg.connect(server, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture
def open_test_ledger(ledger_url: str) -> Iterator[Callable[[], Ledger]]:
    """Open ledgers on the test's database (as many as a test wants); all closed after."""
    opened: list[Ledger] = []

    def open_() -> Ledger:
        opened.append(open_ledger(ledger_url))
        return opened[-1]

    yield open_
    for ledger in opened:
        ledger.close()


@pytest.fixture
def ledger(open_test_ledger: Callable[[], Ledger]) -> Ledger:
    return open_test_ledger()


@pytest.fixture
def serve_ledger(ledger_url: str) -> Iterator[Callable[..., InProcessFunction]]:
    """``serve_ledger(**env)``: the ledger function on the test's database, in this process."""
    served: list[InProcessFunction] = []

    def serve(**env: str) -> InProcessFunction:
        served.append(InProcessFunction("ledger", {"IMAGEGEN_LEDGER_URL": ledger_url, **env}))
        return served[-1]

    yield serve
    close_served_ledgers(served)


def close_served_ledgers(served: Iterable[InProcessFunction]) -> None:
    """Close ledger functions served in this process, and the ledgers they opened."""
    from imagegen.stages import ledger as ledger_stage

    for function in served:
        # The warm-up opens the ledger in the background: let it end before closing what it
        # opened (a request after readiness waits for the same opening anyway).
        deadline = time.monotonic() + 60
        while not function.get("/readyz").json()["warm"] and time.monotonic() < deadline:
            time.sleep(0.02)  # polling the probe
        function.close()
    for opened, dispatcher in ledger_stage._opened.values():
        if dispatcher is not None:
            dispatcher.stop()
        opened.close()
    ledger_stage._opened.clear()
    ledger_stage._failed.clear()


@pytest.fixture
def function(serve_ledger: Callable[..., InProcessFunction]) -> InProcessFunction:
    """The ledger function on the test's database, in this process."""
    return serve_ledger()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    # Any test that uses a ledger runs on both backends, unless it names its own (what only
    # one of them has): parametrize("ledger_url", ["postgres"], indirect=True).
    named = metafunc.definition.iter_markers("parametrize")
    if "ledger_url" in metafunc.fixturenames and not any(
        m.args and m.args[0] == "ledger_url" for m in named
    ):
        metafunc.parametrize("ledger_url", BACKENDS, indirect=True)
