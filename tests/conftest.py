"""Shared fixtures: every test starts from a clean environment and leaves none behind."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import os
import sys
import weakref
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import pytest

if TYPE_CHECKING:
    from tests.fakes.oidc_issuer import Issuer
    from tests.functions.servers import FunctionServer

ROOT = Path(__file__).resolve().parents[1]

# The workers share two cores with the processes they start (see the Makefile), and the tiny
# model's tensors are small: torch's intra-op threads would only spin against each other.
# Set before anything imports torch; a caller's own value is kept.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# The tests start about eighty Python processes (served functions, CLI runs, the workers):
# where PYTHONDONTWRITEBYTECODE is set, each would compile the project's modules, and pytest
# rewrite every test module's asserts, from source again.
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
sys.dont_write_bytecode = False


# Scheduling over xdist workers (``make test-python`` runs ``-n 2 --dist loadscope``): a module's
# tests run on one worker, so its module fixtures start once. Two rules keep the workers busy
# to the end: the modules with a ``slow`` test (most start processes) are handed out first, and
# the many quick modules even out the finish; and tests/fuzz is one unit, as its modules share
# the functions its session fixture starts (a render with a model among them).


def pytest_configure(config: pytest.Config) -> None:
    # With xdist, one process imports the model libraries for every function server the
    # workers start, and forks them (tests/functions/preloaded.py).
    if getattr(config.option, "numprocesses", None) and not hasattr(config, "workerinput"):
        import tempfile

        from tests.functions import preloaded

        directory = Path(tempfile.mkdtemp(prefix="imagegen-preloaded-"))
        config.stash[_PRELOADED] = (preloaded.start(directory), directory)


def pytest_unconfigure(config: pytest.Config) -> None:
    started = config.stash.get(_PRELOADED, None)
    if started is not None:
        import shutil

        process, directory = started
        assert process.stdin is not None
        process.stdin.close()  # it ends, and ends what it forked
        process.wait(30)
        shutil.rmtree(directory, ignore_errors=True)


_PRELOADED = pytest.StashKey[tuple[Any, Path]]()


# A client session whose event loop has closed can never be closed: its connections stay open
# until the collector frees it, which then says "Unclosed client session" (asyncio's ERROR) in
# whatever runs at that moment, such as a later test's command line. So a test is held to
# closing the sessions it opened (through the services and clients that made them) before their
# loop closes, and is the one to fail where it did not.
# Each open session: its loop, and the test that made it (a module's fixture may own the loop,
# which closes as the module's last test ends).
_sessions: weakref.WeakKeyDictionary[Any, tuple[weakref.ref[asyncio.AbstractEventLoop], str]] = (
    weakref.WeakKeyDictionary()
)


def _follow_client_sessions() -> None:
    import aiohttp

    made = aiohttp.ClientSession.__init__

    @functools.wraps(made)
    def init(self: aiohttp.ClientSession, *args: Any, **kwargs: Any) -> None:
        made(self, *args, **kwargs)
        with contextlib.suppress(RuntimeError):  # made outside a loop: aiohttp's old way
            made_in = os.environ.get("PYTEST_CURRENT_TEST", "?").rpartition(" ")[0]
            _sessions[self] = (weakref.ref(asyncio.get_running_loop()), made_in)

    aiohttp.ClientSession.__init__ = init  # type: ignore[method-assign]


_follow_client_sessions()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item) -> Iterator[None]:
    yield  # the test's fixtures are finalized: a function-scoped event loop is closed
    left = []
    for session, (loop, made_in) in list(_sessions.items()):
        ended = loop()
        if not session.closed and ended is not None and ended.is_closed():
            left.append(made_in)
            del _sessions[session]
    if left:
        pytest.fail(
            f"aiohttp client sessions left open on a closed event loop, made in {left}: close"
            " the service or client that made each before its loop ends",
            pytrace=False,
        )


def pytest_sessionfinish(session: pytest.Session) -> None:
    # The functions tests started in this process and left open close now, as the process's
    # exit would close them (functions/_adapter.py), while the streams their lines are written
    # to are still open: pytest closes its captures before the interpreter exits. Their routine
    # closing lines (INFO) are not shown; a warning or an error still is.
    adapter = sys.modules.get("_adapter")
    if adapter is None:
        return
    functions_log = logging.getLogger("imagegen.functions")
    level = functions_log.level
    functions_log.setLevel(max(level, logging.WARNING))
    try:
        adapter._close_started()
        adapter._started.clear()
    finally:
        functions_log.setLevel(level)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    slow = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow)  # stable: the order within stays


@pytest.hookimpl(optionalhook=True)  # xdist's: a run with -p no:xdist has no such hook
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    if config.getoption("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class Scheduling(LoadScopeScheduling):  # type: ignore[misc]
        def _split_scope(self, nodeid: str) -> str:
            if nodeid.startswith("tests/fuzz/"):
                return "tests/fuzz"
            return str(super()._split_scope(nodeid))

    config.option.loadscopereorder = False  # by test count, which says nothing of time
    return Scheduling(config, log)


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Callable[..., FunctionServer]]:
    """Start function servers for one test; all are stopped afterwards."""
    started: list[FunctionServer] = []

    def start(
        stage: str, env: dict[str, str], *, wait: bool = True, fresh: bool = False
    ) -> FunctionServer:
        from tests.functions.servers import FunctionServer

        server = FunctionServer(stage, env, log_dir=tmp_path, fresh=fresh)
        started.append(server)
        return server.start(wait=wait)

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="module")
def issuer() -> Iterator[Issuer]:
    """A Kubernetes API server's OIDC discovery on loopback, publishing the key ``k1``."""
    from tests.fakes.oidc_issuer import Issuer

    with Issuer() as server:
        server.add_key("k1")
        yield server


class CliResult(NamedTuple):
    returncode: int
    stdout: str
    stderr: str


RunCli = Callable[..., CliResult]


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> RunCli:
    """Run the ``imagegen`` command line in this process, through its entry point.

    Torch and the tiny model load once per test process; the behaviour that only a fresh
    process shows (quiet start-up, signals) is tested with subprocesses in tests/test_cli*.py.
    """
    from imagegen import observability
    from imagegen.cli import _app, main

    def run(*args: str, env: Mapping[str, str] | None = None) -> CliResult:
        with monkeypatch.context() as patched:
            for name, value in (env or {}).items():
                patched.setenv(name, value)
            # Each run sets up its logging as a fresh process does, onto this test's stderr,
            # and its consoles, which read the terminal's width (COLUMNS) when made.
            patched.setattr(observability, "_active", None)
            for console in (_app.out, _app.err):
                patched.setattr(console, "_console", None)
            # What earlier tests in this process left for the collector goes now, not during
            # the run: an unclosed client's "Unclosed client session" (asyncio's ERROR, said
            # as it is collected) is theirs, never this run's stderr.
            gc.collect()
            capsys.readouterr()
            try:
                main(list(args))
                code = 0
            except SystemExit as exit:
                code = exit.code if isinstance(exit.code, int) else int(exit.code is not None)
            captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


@pytest.fixture
def function_caplog(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> pytest.LogCaptureFixture:
    """``caplog`` that keeps the records of the functions started in this test.

    The first function a process starts sets up its logging, which replaces the root logger's
    handlers (caplog's among them); one started after it sets up nothing, that being done. So
    caplog's handler goes back on the root logger after that set-up, whichever test it is in.
    """
    from imagegen import observability

    set_up = observability.setup_logging

    def and_caplog(*args: Any, **kwargs: Any) -> None:
        set_up(*args, **kwargs)
        logging.getLogger().addHandler(caplog.handler)  # the handler of the phase under way

    monkeypatch.setattr(observability, "setup_logging", and_caplog)
    return caplog


CALLER_SETTINGS = ("IMAGEGEN_", "OLLAMA_", "AWS_", "OTEL_")
"""Prefixes of the caller's variables that no test sees."""


def isolated_settings(home: Path) -> dict[str, str]:
    """The variables every test runs under, its own data directory under ``home``."""
    return {
        # Nothing reaches a model hub from tests.
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        # Nothing local answers as Ollama unless a test starts the fake.
        "IMAGEGEN_OLLAMA_HOST": "http://127.0.0.1:9",
        # The CLI's local ledger goes under the user's data directory: the test's, here.
        "XDG_DATA_HOME": str(home / "xdg-data"),
    }


def isolated_environ(home: Path) -> dict[str, str]:
    """A whole environment as :func:`_isolated_environment` makes it, for a process started
    outside one test (by a module-scoped fixture)."""
    kept = {k: v for k, v in os.environ.items() if not k.startswith(CALLER_SETTINGS)}
    return {**kept, **isolated_settings(home)}


@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """No IMAGEGEN_*/OLLAMA_*/AWS_* from the caller, no .env pick-up, logging restored."""
    saved_env = dict(os.environ)
    for name in list(os.environ):
        if name.startswith(CALLER_SETTINGS):
            monkeypatch.delenv(name, raising=False)
    for name, value in isolated_settings(tmp_path).items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers, root.level = handlers, level
    os.environ.clear()
    os.environ.update(saved_env)
