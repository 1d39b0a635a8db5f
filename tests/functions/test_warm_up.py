"""A function warms its stage up in the background once ready: readiness never waits for it."""

from __future__ import annotations

import asyncio
import dataclasses
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import pytest

from imagegen.stages import get
from tests.conftest import ROOT
from tests.functions.conftest import base_env

pytestmark = pytest.mark.slow  # functions served in processes of their own


def _until(condition: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not {what} after {timeout}s")
        time.sleep(0.02)  # polling


def test_a_served_enhance_turns_ready_then_warm(start_server: Any, tmp_path: Path) -> None:
    enhance = start_server("enhance", base_env(tmp_path / "store"))
    deadletter = start_server("deadletter", base_env(tmp_path / "store"))

    _until(lambda: enhance.get("/readyz").json()["warm"], "warm")
    ready = enhance.get("/readyz")
    assert ready.status_code == 200 and ready.json()["ready"] is True
    warmed = [r for r in enhance.log_records() if r.get("message", "").startswith("warmed up in")]
    assert len(warmed) == 1 and warmed[0]["stage"] == "enhance", enhance.logs()
    # Ollama is down in this chain: the log says so once, before any request needs it.
    down = [r for r in enhance.log_records() if "does not answer" in r.get("message", "")]
    assert len(down) == 1 and down[0]["message"].startswith("Ollama at http://127.0.0.1:9 ")
    # Warmed before any request came; the first one is answered as any is (Ollama down: the
    # template prompt).
    reply = enhance.post("/", json={"prompt": "a lighthouse", "model": "tiny"})
    assert reply.status_code == 200 and reply.json()["fallback"] is True
    # A stage with nothing to warm says so from the start.
    assert deadletter.get("/readyz").json() == {
        "ready": True,
        "status": "ready",
        "stage": "deadletter",
        "warm": True,
    }


def test_persist_warms_its_stage_before_the_first_event(start_server: Any, tmp_path: Path) -> None:
    persist = start_server("persist", base_env(tmp_path / "store"))
    _until(lambda: persist.get("/readyz").json()["warm"], "warm")
    warmed = [r for r in persist.log_records() if r.get("message", "").startswith("warmed up in")]
    assert len(warmed) == 1 and warmed[0]["stage"] == "persist", persist.logs()


@pytest.fixture
def function_class(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Any]:
    """The adapter's Function, imported as functions-framework imports it; settings on disk."""
    monkeypatch.syspath_prepend(str(ROOT / "functions"))
    for name, value in base_env(tmp_path / "store").items():
        monkeypatch.setenv(name, value)
    imported = "_adapter" in sys.modules  # by a function another test serves in this process
    import _adapter

    before = list(_adapter._started)
    yield _adapter.Function
    # The functions this test started, closed as the process's exit would close them
    # (_adapter._close_started), now, while the streams their lines go to are open; never
    # those of others: a session's functions (tests/fuzz) go on serving.
    mine = [f for f in _adapter._started if f not in before]
    closing = [(f, c) for f in mine if (c := f.stop()) is not None]
    futures.wait([c for _, c in closing], timeout=_adapter.CLOSE_SECONDS)
    for function, close in closing:
        function.stopped(close)
    for function in mine:
        _adapter._started.remove(function)
    if not imported:
        sys.modules.pop("_adapter", None)  # its exit hook closes what is left: nothing


def _ready(function: Any) -> None:
    """Probe until ready, each answer sent as a server sends it (then :meth:`replied`)."""

    def probed() -> bool:
        ready = function.ready()[0]
        function.replied()
        return bool(ready)

    _until(probed, "ready")


def test_readiness_does_not_wait_for_the_warm_up(function_class: Any) -> None:
    begun, release = threading.Event(), threading.Event()
    calls: list[object] = []

    async def warm_up(service: object) -> None:
        calls.append(service)
        begun.set()
        while not release.is_set():  # the loop stays free for requests meanwhile
            await asyncio.sleep(0.01)

    function = function_class(dataclasses.replace(get("enhance"), warm_up=warm_up))
    assert function.warm() is False, "not begun before start-up"
    _ready(function)
    assert begun.wait(30), "the warm-up begins once the function is ready"
    for _ in range(5):
        assert function.ready() == (True, "ready")
        function.replied()
    assert function.warm() is False, "ready while warming"
    release.set()
    _until(function.warm, "warm")
    assert len(calls) == 1, "once, however often readiness is asked"


def test_the_warm_up_begins_once_the_ready_answer_is_sent(function_class: Any) -> None:
    """It holds the interpreter: begun while the probe that says ready is being answered, it
    would delay that answer."""
    begun = threading.Event()

    async def warm_up(service: object) -> None:
        begun.set()

    function = function_class(dataclasses.replace(get("enhance"), warm_up=warm_up))
    _until(lambda: function.ready()[0], "ready")  # asked, not yet answered
    assert not begun.wait(0.2) and function.warm() is False
    function.replied()
    assert begun.wait(30)


def test_a_failed_warm_up_is_logged_and_the_function_stays_ready(
    function_class: Any, function_caplog: pytest.LogCaptureFixture
) -> None:
    async def warm_up(service: object) -> None:
        raise OSError("no tables here")

    function = function_class(dataclasses.replace(get("enhance"), warm_up=warm_up))
    with function_caplog.at_level("WARNING", logger="imagegen.functions"):
        _ready(function)
        _until(function.warm, "warm")
    assert function.ready() == (True, "ready")
    [failed] = [r for r in function_caplog.records if r.getMessage().startswith("warm-up")]
    assert failed.getMessage() == "warm-up failed: OSError: no tables here"
    said = (failed.name, failed.levelname, getattr(failed, "stage", None))
    assert said == ("imagegen.functions", "WARNING", "enhance")


@pytest.mark.parametrize("ignores_cancellation", [False, True], ids=["stops", "goes-on"])
def test_a_warm_up_cut_short_by_the_close_is_no_warning(
    function_class: Any, function_caplog: pytest.LogCaptureFixture, ignores_cancellation: bool
) -> None:
    """The process exits (a scale-down) while the warm-up runs: the close releases what the
    warm-up uses, which then fails as a closed client does; that failure is none."""
    begun, ended = threading.Event(), threading.Event()

    async def warm_up(service: Any) -> None:
        begun.set()
        try:
            while not service._closed:  # until the close has released the stage's clients
                try:
                    await asyncio.sleep(0.01)
                except asyncio.CancelledError:
                    if not ignores_cancellation:
                        raise
            raise RuntimeError("Cannot send a request, as the client has been closed.")
        finally:
            ended.set()

    function = function_class(dataclasses.replace(get("enhance"), warm_up=warm_up))
    with function_caplog.at_level("INFO", logger="imagegen.functions"):
        _ready(function)
        assert begun.wait(30)
        closing = function.stop()  # as the process's exit does (_adapter._close_started)
        assert closing is not None
        closing.result(timeout=30)
        function.stopped(closing)
        assert ended.wait(30)
        # The step of the loop that ended it, where the adapter logs how it ended, is over.
        asyncio.run_coroutine_threadsafe(asyncio.sleep(0), function._loop).result(30)
    said = [(r.levelname, r.getMessage()) for r in function_caplog.records]
    assert [(level, message) for level, message in said if level != "INFO"] == [], said
    assert any(message.startswith("closed in") for _, message in said), said


def test_persists_warm_up_builds_its_stage(function_class: Any) -> None:
    function = function_class(get("persist"))
    _ready(function)
    _until(function.warm, "warm")
    assert function._service._persist_stage is not None  # what a first event would build


def test_a_stage_without_a_warm_up_is_warm(function_class: Any) -> None:
    function = function_class(get("deadletter"))
    assert function.warm() is True
    _ready(function)
    assert function.warm() is True


def test_a_function_that_is_not_ready_is_not_warm(tmp_path: Path) -> None:
    """render has no warm-up of its own (its model load is its start): not ready, not warm."""
    from tests.functions.clients import InProcessFunction

    env = {**base_env(tmp_path / "store"), "IMAGEGEN_TIMEZONE": "Mars/Base"}
    reply = InProcessFunction("render", env).client.get("/readyz")
    assert reply.status_code == 503
    assert reply.json()["ready"] is False and reply.json()["warm"] is False
