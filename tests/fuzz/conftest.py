"""The functions under hostile input, in this process, and what every answer must be."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import settings

from imagegen import stages
from imagegen.events import GENERATION_FAILED
from tests.functions.clients import InProcessFunction
from tests.functions.conftest import base_env
from tests.ledger.conftest import close_served_ledgers

# Deterministic in CI: the same inputs every run, no example database, no timing flakiness.
settings.register_profile(
    "fuzz",
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=True,
)
FUZZ = settings.get_profile("fuzz")

STAGES = ("enhance", "render", "persist", "derive", "deadletter", "ledger")

# The only 5xx a function may answer: retryable, with Retry-After (functions.md).
RETRYABLE = frozenset({429, 503})
TRACE_MARKERS = ("Traceback (most recent call last)", 'File "/', "RecursionError", "Error:\n")


def fuzz_env(store: Path) -> dict[str, str]:
    """Settings of the functions under fuzz: those of a test chain, logging errors only, the
    ledger in a SQLite file beside the objects."""
    return {
        **base_env(store),
        "IMAGEGEN_LOG_LEVEL": "ERROR",
        "IMAGEGEN_LEDGER_URL": f"sqlite:///{store / 'ledger.db'}",
    }


@pytest.fixture(scope="session")
def fuzz_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Where the functions under fuzz store: in memory where the system has a tmpfs.

    Thousands of records are written, each synced to disk by the local storage; on tmpfs a
    sync costs nothing, and the code paths are the same.
    """
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        yield tmp_path_factory.mktemp("fuzz-store")
        return
    store = Path(tempfile.mkdtemp(prefix="imagegen-fuzz-", dir=shm))
    try:
        yield store
    finally:
        shutil.rmtree(store, ignore_errors=True)


@pytest.fixture(scope="session")
def functions(fuzz_store: Path) -> Iterator[dict[str, InProcessFunction]]:
    """Every function on one store (the ledger's in it), started once per worker; one image
    rendered and persisted on it, whose events are persist's and derive's valid ones.

    Starting a function sets up this process's logging (the root logger's handler and level:
    ERROR here); the logging of the tests that follow on this worker is put back as it was.
    Session-scoped, this runs before any test's own restoring fixture saves the root logger.
    """
    root = logging.getLogger()
    # Those it sets levels on (imagegen._logging.setup_logging) included, existing or not.
    names = {*root.manager.loggerDict, "httpx", "httpcore", "botocore", "boto3", "s3transfer"}
    loggers = [root, *(logging.getLogger(name) for name in sorted(names | {"urllib3"}))]
    saved = [(logger, list(logger.handlers), logger.level) for logger in loggers]
    try:
        started = {stage: InProcessFunction(stage, fuzz_env(fuzz_store)) for stage in STAGES}
    finally:
        for logger, handlers, level in saved:
            logger.handlers, logger.level = handlers, level
    # Imported here: its strategies, built as it loads, read hypothesis's character tables,
    # which hypothesis warns of while conftest modules load.
    from tests.fuzz.inputs import CHAINED, VALID

    for stage, before in CHAINED.items():
        VALID[stage] = _reply(started[before], before)
    yield started
    close_served_ledgers([started.pop("ledger")])
    for function in started.values():
        function.client.close()


def _reply(function: InProcessFunction, stage: str) -> dict[str, Any]:
    """The event data ``stage`` answers its valid request with: the next stage's valid one."""
    from tests.fuzz.inputs import VALID, binary

    request = binary(stage, json.dumps(VALID[stage]).encode())
    reply = function.post(headers=request.headers, content=request.body)
    assert succeeded(stage, reply), (reply.status_code, reply.text[:500])
    data: dict[str, Any] = reply.json()
    return data


def succeeded(stage: str, response: httpx.Response) -> bool:
    """Whether ``stage`` did its work on a request: its reply event (an event's reply, or a
    plain call's body of 200), or an empty 202 from a stage that replies none."""
    if (response.request.method, response.request.url.path) != ("POST", "/"):
        return False
    emits = stages.get(stage).emits
    if emits is None:
        return response.status_code == 202
    return response.status_code == 200 and response.headers.get("ce-type", emits) == emits


def check(stage: str, response: httpx.Response) -> None:
    """What every answer to hostile input must be."""
    status, body = response.status_code, response.text
    assert status < 500 or status in RETRYABLE, (status, body[:500])
    if status in RETRYABLE:
        assert int(response.headers["Retry-After"]) > 0, body[:200]
    for marker in TRACE_MARKERS:
        assert marker not in body, body[:500]
    delivery = (response.request.method, response.request.url.path) == ("POST", "/")
    if stage == "deadletter" and delivery and status < 300:
        # A broker takes a non-empty 2xx body that is not an event for a failed delivery.
        assert status == 202 and response.content == b"", (status, body[:200])
        return
    if status < 300 or response.request.method == "HEAD":
        if response.headers.get("ce-type") == GENERATION_FAILED:  # it names what was wrong
            assert response.json()["error"]["message"], body[:300]
        return
    # A plain JSON error: a code, a message, whether a retry can help.
    error = response.json()
    assert error["error"] and error["message"] and "retryable" in error, body[:300]
