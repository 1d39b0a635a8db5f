"""Blocking calls awaited on daemon threads: results, errors, context, and cancellation."""

from __future__ import annotations

import asyncio
import contextvars
import threading
import time

import pytest

from imagegen._threads import DaemonPool, PoolExhausted

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


async def test_calls_past_the_limit_wait_in_turn_while_calls_end() -> None:
    """A pool that queues runs every call past its limit, first come first, however long the
    queue takes, while its threads keep taking calls: one thread hung, the other slow."""
    pool = DaemonPool("queued", max_threads=2, queue_for=0.3)
    hung, ran = threading.Event(), []
    stuck = asyncio.ensure_future(pool.run(hung.wait, 30))
    while pool.started == 0:
        await asyncio.sleep(0)

    def slow(i: int) -> int:
        time.sleep(0.05)
        ran.append(i)
        return i

    started = time.monotonic()
    answers = await asyncio.wait_for(asyncio.gather(*(pool.run(slow, i) for i in range(12))), 30)
    assert answers == ran == list(range(12))
    assert time.monotonic() - started > 0.3  # the last waited longer than queue_for
    assert pool.started == 2
    hung.set()
    await stuck


async def test_a_waiting_call_is_refused_once_every_thread_was_busy_that_long() -> None:
    """Every thread held by a call that does not return: a call past the limit is refused after
    ``queue_for``, saying so, and is never run; the threads, freed, take calls again."""
    pool = DaemonPool("stuck", max_threads=2, queue_for=0.3)
    release, ran = threading.Event(), []
    hung = [asyncio.ensure_future(pool.run(release.wait, 30)) for _ in range(2)]
    while pool.started < 2:
        await asyncio.sleep(0)
    started = time.monotonic()
    with pytest.raises(PoolExhausted) as error:
        await pool.run(ran.append, "refused")
    assert 0.3 <= time.monotonic() - started < 5
    assert str(error.value) == (
        "no stuck thread was free for 0.3s: each of the 2 was busy with one call all that time"
    )
    release.set()
    await asyncio.gather(*hung)
    assert await pool.run(lambda: "free again") == "free again"
    assert ran == [] and pool.started == 2


async def test_a_caller_cancelled_while_its_call_waits_takes_it_back_unrun() -> None:
    pool = DaemonPool("withdrawn", max_threads=1, queue_for=30)
    release, ran = threading.Event(), []
    hung = asyncio.ensure_future(pool.run(release.wait, 30))
    while pool.started == 0:
        await asyncio.sleep(0)
    waiting = asyncio.ensure_future(pool.run(ran.append, "withdrawn"))
    await asyncio.sleep(0.05)
    waiting.cancel()  # a request timeout
    with pytest.raises(asyncio.CancelledError):
        await waiting
    release.set()
    await hung
    assert await pool.run(ran.append, "next") is None
    assert ran == ["next"]
