"""A coroutine plugin past its time, or a plugin's close past its own, is cut off: cancelled,
given a moment, then left running, so that neither a request nor a close waits for it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

import imagegen.plugins._running as running
from imagegen.models import Contribution
from imagegen.plugins import PluginSet, noting_skips
from imagegen.plugins.context import PluginContext
from imagegen.settings import Settings
from tests.plugins.conftest import NOW
from tests.plugins.sample_plugins import AsyncEchoPlugin, EchoPlugin

LIMIT = 0.2  # each plugin's time limit in these tests
GRACE = 0.2  # what a cancelled call gets to end


@pytest.fixture(autouse=True)
def short_grace(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(running, "CANCEL_GRACE_SECONDS", GRACE)
    monkeypatch.setattr(running, "CLOSE_SECONDS", LIMIT)


class Stubborn:
    """Catches every cancellation and goes on until ``released`` (or, lest a test that fails
    hang, for 3 s); then it ends, returning, or raising what ``then_raises`` says."""

    description = "ignores its cancellation"

    def __init__(self, name: str, *, then_raises: BaseException | None = None) -> None:
        self.name = name
        self.then_raises = then_raises
        self.released = False
        self.began = 0

    async def _hold(self) -> None:
        self.began += 1
        until = time.monotonic() + 3
        while not self.released and time.monotonic() < until:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(0.01)
        if self.then_raises is not None:
            raise self.then_raises

    async def contribute(self, context: PluginContext) -> Contribution:
        await self._hold()
        return Contribution(plugin=self.name, text="too late")

    async def aclose(self) -> None:
        await self._hold()


async def _until_none_left() -> None:
    for _ in range(500):
        if not running._ABANDONED:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("a call left running never ended")


@contextlib.asynccontextmanager
async def released(*plugins: Stubborn) -> AsyncIterator[None]:
    """Let the plugins' calls left running end once the test is done with them."""
    try:
        yield
    finally:
        for plugin in plugins:
            plugin.released = True
        await _until_none_left()


@contextlib.contextmanager
def unretrieved(loop: asyncio.AbstractEventLoop) -> Iterator[list[dict[str, Any]]]:
    """What the loop's exception handler hears (``Task exception was never retrieved``)."""
    heard: list[dict[str, Any]] = []
    before = loop.get_exception_handler()
    loop.set_exception_handler(lambda _, context: heard.append(context))
    try:
        yield heard
    finally:
        loop.set_exception_handler(before)


async def test_a_plugin_that_ignores_its_cancellation_is_skipped_at_its_time_limit(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    stubborn = Stubborn("stubborn")
    plugins = PluginSet([stubborn, AsyncEchoPlugin()], settings=settings, timeout=LIMIT)
    async with released(stubborn):
        began = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="imagegen.plugins"), noting_skips() as skips:
            result = await plugins.run(generation_id="gen-1", seed=1, now=NOW)
        took = time.monotonic() - began
        assert [c.plugin for c in result] == ["async_echo"]
        assert took < LIMIT + GRACE + 1.0, "cut off after its limit and grace, not waited for"
        assert skips == [("stubborn", f"timed out after {LIMIT:g}s")]
        said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert "plugin stubborn timed out after 0.20s; skipped" in said
        assert (
            "plugin stubborn did not stop when cancelled; left running (1 of its calls running)"
            in said
        )
        assert running._RUNNING.of("stubborn") == 1, "counted until it ends"
    assert running._RUNNING.of("stubborn") == 0


async def test_a_plugin_that_stops_when_cancelled_is_not_left_running(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    class Slow:
        name = "slow"
        description = "takes its time"
        cleaned = False

        async def contribute(self, context: PluginContext) -> None:
            try:
                await asyncio.sleep(30)
            finally:
                self.cleaned = True

    slow = Slow()
    plugins = PluginSet([slow], settings=settings, timeout=LIMIT)
    with caplog.at_level(logging.WARNING, logger="imagegen.plugins"), noting_skips() as skips:
        assert await plugins.run(generation_id="gen-1", seed=1, now=NOW) == []
    assert slow.cleaned, "its cancellation ran to its end before the request went on"
    assert skips == [("slow", f"timed out after {LIMIT:g}s")]
    assert not any("left running" in r.getMessage() for r in caplog.records)
    assert running._RUNNING.of("slow") == 0 and not running._ABANDONED


async def test_calls_left_running_count_against_the_plugins_share(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """As a plain plugin's hung threads do: past MAX_RUNNING of them, a call is refused at
    once rather than one more task left on the loop per request."""
    monkeypatch.setattr(running, "MAX_RUNNING", 2)
    stubborn = Stubborn("stubborn")
    plugins = PluginSet([stubborn, EchoPlugin(name="good")], settings=settings, timeout=LIMIT)
    async with released(stubborn):
        with caplog.at_level(logging.WARNING, logger="imagegen.plugins"):
            for i in range(4):
                with noting_skips() as skips:
                    result = await plugins.run(generation_id=f"gen-{i}", seed=i, now=NOW)
                assert [c.plugin for c in result] == ["good"], f"request {i}"
        assert stubborn.began == 2, "the calls past its share never began"
        assert skips == [("stubborn", "2 calls of it still running, at most 2")]
    assert running._RUNNING.of("stubborn") == 0
    result = await plugins.run(generation_id="gen-after", seed=1, now=NOW)
    assert [c.plugin for c in result] == ["stubborn", "good"], "its calls ended: it runs again"


async def test_what_a_call_left_running_raises_later_is_said_once_naming_it(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    stubborn = Stubborn("stubborn", then_raises=SystemExit(3))
    plugins = PluginSet([stubborn], settings=settings, timeout=LIMIT)
    with unretrieved(asyncio.get_running_loop()) as heard:
        async with released(stubborn):
            with caplog.at_level(logging.WARNING, logger="imagegen.plugins"):
                assert await plugins.run(generation_id="gen-1", seed=1, now=NOW) == []
        await asyncio.sleep(0)  # the loop would report an unretrieved exception by now
    said = [r.getMessage() for r in caplog.records]
    assert said.count("plugin stubborn failed after it was given up on: SystemExit: 3") == 1
    assert heard == []


async def test_a_request_cancelled_meanwhile_waits_for_no_stubborn_plugin(
    settings: Settings,
) -> None:
    stubborn = Stubborn("stubborn")
    plugins = PluginSet([stubborn], settings=settings, timeout=30)
    async with released(stubborn):
        request = asyncio.ensure_future(plugins.run(generation_id="gen-1", seed=1, now=NOW))
        await asyncio.sleep(0.1)  # the plugin runs
        began = time.monotonic()
        request.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(request, 10)
        assert time.monotonic() - began < GRACE + 1.0


async def test_a_plugin_runs_in_the_context_of_its_request(settings: Settings) -> None:
    """Run in a task of its own, a plugin still sees its request's context: marked as a
    plugin's code (the tasks it makes are kept from ending the loop), its skips noted for
    whoever asked for them."""
    seen: list[str | None] = []

    class Looking:
        name = "looking"
        description = "looks at its context"

        async def contribute(self, context: PluginContext) -> None:
            seen.append(running._PLUGIN.get())
            running.leave_out(self.name, "looked")

    plugins = PluginSet([Looking()], settings=settings)
    with noting_skips() as skips:
        await plugins.run(generation_id="gen-1", seed=1, now=NOW)
    assert skips == [("looking", "looked")]
    assert seen == ["looking"]


async def test_a_close_that_never_ends_is_given_up_on(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """One that waits for ever, and one that ignores its cancellation too: the set's close
    ends after the bound and the grace, each named; the others are closed all the same."""
    closed: list[str] = []

    class Holding(EchoPlugin):
        async def aclose(self) -> None:
            if self.name == "hangs":
                await asyncio.sleep(3600)
            closed.append(self.name)

    stubborn = Stubborn("stubborn")
    plugins = PluginSet(
        [Holding(name="hangs"), stubborn, Holding(name="fine")], settings=settings, timeout=1
    )
    async with released(stubborn):
        began = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="imagegen.plugins"):
            await asyncio.wait_for(plugins.aclose(), 30)
        took = time.monotonic() - began
        said = [r.getMessage() for r in caplog.records]
        assert "plugin hangs did not close: timed out after 0.2s" in said
        assert "plugin stubborn did not close: timed out after 0.2s" in said
        assert (
            "plugin stubborn did not stop when cancelled; left running (1 of its calls running)"
            in said
        )
        assert closed == ["fine"]
        assert took < LIMIT + GRACE + 1.0, "closed at once, each within its bound"
