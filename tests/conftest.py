"""Shared fixtures: every test starts from a clean environment and leaves none behind."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import pytest

if TYPE_CHECKING:
    from tests.fakes.oidc_issuer import Issuer
    from tests.functions.servers import FunctionServer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Callable[..., FunctionServer]]:
    """Start function servers for one test; all are stopped afterwards."""
    started: list[FunctionServer] = []

    def start(stage: str, env: dict[str, str], *, wait: bool = True) -> FunctionServer:
        from tests.functions.servers import FunctionServer

        server = FunctionServer(stage, env, log_dir=tmp_path)
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
    from imagegen.cli import main

    def run(*args: str, env: Mapping[str, str] | None = None) -> CliResult:
        with monkeypatch.context() as patched:
            for name, value in (env or {}).items():
                patched.setenv(name, value)
            # Each run sets up its logging as a fresh process does, onto this test's stderr.
            patched.setattr(observability, "_active", None)
            capsys.readouterr()
            try:
                main(list(args))
                code = 0
            except SystemExit as exit:
                code = exit.code if isinstance(exit.code, int) else int(exit.code is not None)
            captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """No IMAGEGEN_*/OLLAMA_*/AWS_* from the caller, no .env pick-up, logging restored."""
    saved_env = dict(os.environ)
    for name in list(os.environ):
        if name.startswith(("IMAGEGEN_", "OLLAMA_", "AWS_", "OTEL_")):
            monkeypatch.delenv(name, raising=False)
    # Nothing reaches a model hub from tests.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    # Nothing local answers as Ollama unless a test starts the fake.
    monkeypatch.setenv("IMAGEGEN_OLLAMA_HOST", "http://127.0.0.1:9")
    monkeypatch.chdir(tmp_path)
    # The CLI's local ledger goes under the user's data directory: the test's, here.
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg-data"))
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers, root.level = handlers, level
    os.environ.clear()
    os.environ.update(saved_env)
