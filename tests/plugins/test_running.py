"""Synchronous plugins run on reused daemon threads, not a new thread per call."""

from __future__ import annotations

import asyncio
import threading

from imagegen.plugins import PluginSet
from imagegen.plugins._running import _POOL, _DaemonPool
from imagegen.settings import Settings
from tests.plugins.conftest import NOW
from tests.plugins.sample_plugins import EchoPlugin


async def test_sequential_calls_reuse_one_thread(settings: Settings) -> None:
    plugins = PluginSet([EchoPlugin(name="a"), EchoPlugin(name="b")], settings=settings)
    await plugins.run(generation_id="warm", seed=1, now=NOW)  # a thread exists now
    started = _POOL.started
    for i in range(20):
        await plugins.run(generation_id=f"gen-{i}", seed=i, now=NOW)
    assert _POOL.started == started


async def test_a_stuck_task_gets_a_new_thread_and_is_a_daemon() -> None:
    pool = _DaemonPool("test")
    stuck, done = threading.Event(), threading.Event()
    names: list[str] = []
    # Both tasks share one queue: either thread may take the stuck one, so compare names.
    pool.submit(lambda: (names.append(threading.current_thread().name), stuck.wait(10)))
    pool.submit(lambda: (names.append(threading.current_thread().name), done.set()))
    assert await asyncio.to_thread(done.wait, 10)
    assert pool.started == 2 and sorted(names) == ["test-1", "test-2"]
    assert all(t.daemon for t in threading.enumerate() if t.name.startswith("test-"))
    stuck.set()


class _OnTheLoop(EchoPlugin):
    blocking = False


async def test_a_plugin_that_never_blocks_runs_on_the_loop(settings: Settings) -> None:
    plugins = PluginSet([EchoPlugin(name="threaded"), _OnTheLoop(name="inline")], settings=settings)
    threaded, inline = await plugins.run(generation_id="gen-1", seed=1, now=NOW)
    assert inline.data["thread"] == threading.current_thread().name
    assert threaded.data["thread"] != threading.current_thread().name
    assert inline.data["before"] == ["threaded"]
