"""Blocking calls awaited on daemon threads: results, errors, context, and cancellation."""

from __future__ import annotations

import asyncio
import contextvars
import threading

import pytest

from imagegen._threads import DaemonPool

CALLER: contextvars.ContextVar[str] = contextvars.ContextVar("caller", default="none")


async def test_run_returns_raises_and_sees_the_callers_context() -> None:
    pool = DaemonPool("results")
    CALLER.set("the request")

    def where() -> tuple[str, str, bool]:
        thread = threading.current_thread()
        return CALLER.get(), thread.name, thread.daemon

    assert await pool.run(where, thread_name="named") == ("the request", "named", True)
    with pytest.raises(KeyError, match="missing"):
        await pool.run({}.__getitem__, "missing")


async def test_a_cancelled_caller_of_run_to_end_waits_for_the_call() -> None:
    pool = DaemonPool("to-end")
    release, ended = threading.Event(), threading.Event()

    def load() -> str:
        release.wait(30)
        ended.set()
        return "loaded"

    caller = asyncio.ensure_future(pool.run_to_end(load))
    while pool.started == 0:  # the call is on its thread
        await asyncio.sleep(0)
    caller.cancel()  # a request timeout
    for _ in range(20):  # the loop delivers the cancellation; the caller stays
        await asyncio.sleep(0)
    assert not caller.done()
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert ended.is_set()  # the caller let go only once the call had ended
