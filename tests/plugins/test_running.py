"""Synchronous plugins run on reused daemon threads, not a new thread per call."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable
from typing import Any

import pytest

import imagegen.plugins._running as running
from imagegen._threads import DaemonPool
from imagegen.plugins import PluginSet
from imagegen.plugins._running import _POOL
from imagegen.plugins.context import PluginContext
from imagegen.settings import Settings
from tests.plugins.conftest import NOW
from tests.plugins.sample_plugins import AsyncEchoPlugin, EchoPlugin


async def test_sequential_calls_reuse_one_thread(settings: Settings) -> None:
    plugins = PluginSet([EchoPlugin(name="a"), EchoPlugin(name="b")], settings=settings)
    await plugins.run(generation_id="warm", seed=1, now=NOW)  # a thread exists now
    started = _POOL.started
    for i in range(20):
        await plugins.run(generation_id=f"gen-{i}", seed=i, now=NOW)
    assert _POOL.started == started


async def test_the_end_is_announced_once_the_thread_is_free_again() -> None:
    # Whoever hears a task has ended and submits the next finds the thread idle: no new one.
    pool = DaemonPool("free")
    for _ in range(20):
        ended = threading.Event()
        pool.submit(lambda ended=ended: ended.set)
        assert await asyncio.to_thread(ended.wait, 10)
    assert pool.started == 1


async def test_a_stuck_task_gets_a_new_thread_and_is_a_daemon() -> None:
    pool = DaemonPool("test")
    stuck, done = threading.Event(), threading.Event()
    names: list[str] = []
    # Both tasks share one queue: either thread may take the stuck one, so compare names.

    def task(then: Callable[[], object]) -> Callable[[], Callable[[], None]]:
        def run() -> Callable[[], None]:
            names.append(threading.current_thread().name)
            then()
            return lambda: None

        return run

    pool.submit(task(lambda: stuck.wait(10)))
    pool.submit(task(done.set))
    assert await asyncio.to_thread(done.wait, 10)
    assert pool.started == 2 and sorted(names) == ["test-1", "test-2"]
    assert all(t.daemon for t in threading.enumerate() if t.name.startswith("test-"))
    stuck.set()


class _OnTheLoop(EchoPlugin):
    blocking = False


async def test_a_bounded_pool_refuses_a_call_once_every_thread_hangs(settings: Settings) -> None:
    """A plugin that never returns keeps its thread: past the bound, a call is refused at
    once (the plugin skipped, as one that raises) instead of a thread leaked per request."""
    from imagegen._threads import PoolExhausted

    pool = DaemonPool("bounded", max_threads=2)
    release = threading.Event()
    hung = [asyncio.ensure_future(pool.run(release.wait, 30)) for _ in range(2)]
    await asyncio.sleep(0.05)
    with pytest.raises(PoolExhausted):
        await pool.run(lambda: None)
    assert pool.started == 2
    release.set()
    await asyncio.gather(*hung)
    assert await pool.run(lambda: "free again") == "free again"
    assert pool.started == 2


async def test_a_plugin_that_never_blocks_runs_on_the_loop(settings: Settings) -> None:
    plugins = PluginSet([EchoPlugin(name="threaded"), _OnTheLoop(name="inline")], settings=settings)
    threaded, inline = await plugins.run(generation_id="gen-1", seed=1, now=NOW)
    assert inline.data["thread"] == threading.current_thread().name
    assert threaded.data["thread"] != threading.current_thread().name
    assert inline.data["before"] == ["threaded"]


class _InlineButAwaited(EchoPlugin):
    """Never blocks its caller, but answers with a coroutine that never ends."""

    blocking = False

    def contribute(self, context: PluginContext) -> Any:  # type: ignore[override]
        return asyncio.Event().wait()


async def test_what_a_plain_plugin_leaves_to_await_is_still_timed(settings: Settings) -> None:
    plugins = PluginSet(
        [_InlineButAwaited(name="late"), EchoPlugin()], settings=settings, timeout=0.1
    )
    result = await plugins.run(generation_id="gen-1", seed=1, now=NOW)
    assert [c.plugin for c in result] == ["echo"]


async def test_an_answer_given_at_once_sets_no_timer(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """asyncio.timeout around a call that has returned could never fire: it is not made."""
    import imagegen.plugins._running as running

    timers: list[float] = []
    real = asyncio.timeout

    def counted(delay: float | None) -> asyncio.Timeout:
        timers.append(delay or 0.0)
        return real(delay)

    monkeypatch.setattr(running.asyncio, "timeout", counted)
    plugins = PluginSet(
        [_OnTheLoop(name="inline"), EchoPlugin(name="threaded"), AsyncEchoPlugin()],
        settings=settings,
    )
    result = await plugins.run(generation_id="gen-1", seed=1, now=NOW)
    assert [c.plugin for c in result] == ["inline", "threaded", "async_echo"]
    assert len(timers) == 2, "the threaded and the coroutine plugins only"


class _Hangs(EchoPlugin):
    """Blocks its thread until released, as a call on a socket that never answers."""

    def __init__(self, release: threading.Event, *, name: str) -> None:
        super().__init__(name=name)
        self.release = release

    def contribute(self, context: PluginContext) -> Any:
        self.release.wait(30)
        return super().contribute(context)


async def _until_none_running(name: str) -> None:
    for _ in range(500):
        if running._RUNNING.of(name) == 0:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"calls of {name} still counted as running")


async def test_a_hung_plugin_takes_only_its_share_of_the_threads(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A call that never returns keeps its thread: one hung plugin took every thread of the
    pool, and every plain plugin was skipped from then on, until the process restarted."""
    monkeypatch.setattr(running, "_POOL", DaemonPool("shared", max_threads=6))
    monkeypatch.setattr(running, "MAX_RUNNING", 2)
    release = threading.Event()
    plugins = PluginSet(
        [_Hangs(release, name="hangs"), EchoPlugin(name="good")], settings=settings, timeout=0.05
    )
    try:
        with caplog.at_level(logging.WARNING, logger="imagegen.plugins"):
            for i in range(10):
                result = await plugins.run(generation_id=f"gen-{i}", seed=i, now=NOW)
                assert [c.plugin for c in result] == ["good"], f"request {i}"
        assert running._RUNNING.of("hangs") == 2
        assert running._POOL.started <= 3, "two hung threads, and one for the rest"
        refused = [r for r in caplog.records if "skipped: 2 calls" in r.getMessage()]
        assert len(refused) == 8
        assert refused[0].getMessage().startswith("plugin hangs skipped: ")
        assert all(r.exc_info is None for r in refused)
    finally:
        release.set()
    await _until_none_running("hangs")
    result = await plugins.run(generation_id="gen-after", seed=1, now=NOW)
    assert [c.plugin for c in result] == ["hangs", "good"], "its calls ended: it runs again"


async def test_a_call_the_pool_refuses_is_not_counted_as_running(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(running, "_POOL", DaemonPool("single", max_threads=1))
    monkeypatch.setattr(running, "MAX_RUNNING", 3)
    release = threading.Event()
    plugins = PluginSet(
        [_Hangs(release, name="hangs"), EchoPlugin(name="good")], settings=settings, timeout=0.05
    )
    try:
        for i in range(5):  # the one thread hangs: "good" is refused by the pool each time
            assert await plugins.run(generation_id=f"gen-{i}", seed=i, now=NOW) == []
            assert running._RUNNING.of("good") == 0
    finally:
        release.set()
    await _until_none_running("hangs")
    result = await plugins.run(generation_id="gen-after", seed=1, now=NOW)
    assert [c.plugin for c in result] == ["hangs", "good"]


@pytest.mark.parametrize("error", [SystemExit, KeyboardInterrupt])
def test_a_task_of_a_plugin_cannot_end_the_event_loop(
    settings: Settings, error: type[BaseException], caplog: pytest.LogCaptureFixture
) -> None:
    """A coroutine plugin's own task that raises SystemExit or KeyboardInterrupt would end the
    loop it runs on (asyncio raises those two out of ``run_forever``): the plugin is skipped,
    the loop runs on, and tasks made outside any plugin are as before."""
    from tests.plugins.sample_plugins import RaisingInItsTask

    plugins = PluginSet(
        [RaisingInItsTask("in_its_task", error), AsyncEchoPlugin()], settings=settings
    )
    loop = asyncio.new_event_loop()
    try:
        with caplog.at_level(logging.WARNING, logger="imagegen.plugins"):
            try:
                result = loop.run_until_complete(
                    plugins.run(generation_id="gen-1", seed=1, now=NOW)
                )
            except BaseException as exc:  # the test's own loop, not pytest's, is what ends
                pytest.fail(f"the event loop ended: {type(exc).__name__}")
        assert [c.plugin for c in result] == ["async_echo"]
        [failed] = [r for r in caplog.records if "in_its_task failed" in r.getMessage()]
        assert failed.exc_info is not None and failed.exc_info[0] is running.PluginExit

        async def outside() -> None:
            raise error

        # A task made outside any plugin keeps asyncio's own behaviour.
        with pytest.raises(error):
            loop.run_until_complete(loop.create_task(outside()))
        assert loop.run_until_complete(asyncio.sleep(0, "still runs")) == "still runs"
    finally:
        loop.close()


def test_a_plugin_task_cancelled_before_it_began_is_no_coroutine_never_awaited() -> None:
    """A plugin's TaskGroup whose first task fails cancels the others before they begin:
    wrapped or not, such a task leaves no "coroutine was never awaited" warning."""
    import gc
    import warnings

    async def sleeper() -> None:
        await asyncio.sleep(1)

    async def failing() -> None:
        raise ValueError("at once")

    async def plugin_body() -> None:
        with running.plugin_code("grouping"):
            with contextlib.suppress(ExceptionGroup):
                async with asyncio.TaskGroup() as group:
                    group.create_task(failing())
                    group.create_task(sleeper())
            cancelled = asyncio.create_task(sleeper())
            cancelled.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await cancelled

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        asyncio.run(plugin_body())
        gc.collect()
    assert [str(w.message) for w in caught if "never awaited" in str(w.message)] == []
