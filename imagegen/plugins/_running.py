"""Running one plugin in isolation: its own span, a timeout, and failures that only skip it."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

from opentelemetry import trace

from imagegen.errors import InvalidRequest
from imagegen.models import Contribution
from imagegen.plugins.context import PluginContext, PromptPlugin
from imagegen.telemetry import tracer

__all__ = ["run_plugin"]

logger = logging.getLogger("imagegen.plugins")


async def run_plugin(
    plugin: PromptPlugin, context: PluginContext, *, time_limit: float
) -> Contribution | None:
    """``plugin``'s contribution for ``context``, or None when it adds nothing or is skipped.

    Args:
        plugin: The plugin to run.
        context: What it sees of the generation.
        time_limit: Seconds it may take before it is skipped.

    Raises:
        InvalidRequest: the plugin rejected its options.
    """
    with tracer().start_as_current_span("imagegen.plugin") as span:
        span.set_attribute("imagegen.plugin.name", context.plugin)
        result = await _contribution(plugin, context, span, time_limit)
        span.set_attribute("imagegen.plugin.contributed", result is not None)
        return result


async def _contribution(
    plugin: PromptPlugin, context: PluginContext, span: trace.Span, time_limit: float
) -> Contribution | None:
    name = context.plugin
    try:
        async with asyncio.timeout(time_limit):
            result: object = await _call(plugin, context)
    except InvalidRequest:
        raise
    except TimeoutError as exc:
        logger.warning("plugin %s timed out after %.2fs; skipped", name, time_limit)
        _skipped(span, exc, f"timed out after {time_limit:g}s")
        return None
    except Exception as exc:
        logger.warning("plugin %s failed; skipped", name, exc_info=True)
        _skipped(span, exc, f"failed: {type(exc).__name__}")
        return None
    if result is None:
        return None
    if not isinstance(result, Contribution):
        logger.warning("plugin %s returned %s, not a Contribution; skipped", name, type(result))
        span.set_status(trace.StatusCode.ERROR, f"returned {type(result).__name__}")
        return None
    if result.plugin != name:
        result = result.model_copy(update={"plugin": name})
    return result


def _skipped(span: trace.Span, error: BaseException, description: str) -> None:
    """Mark a plugin's span failed; the generation goes on without the plugin."""
    span.record_exception(error)
    span.set_status(trace.StatusCode.ERROR, description)


Task = Callable[[], Callable[[], None]]
"""Work for a pool thread; it returns what announces its end."""


class _DaemonPool:
    """Reused daemon worker threads; another starts only when none is idle.

    Daemon threads rather than the loop's executor: a plugin that never returns is abandoned
    after its timeout instead of holding up the loop's (and the interpreter's) shutdown. Reused
    rather than one per call: starting a thread costs more than most plugins take.
    """

    def __init__(self, name: str) -> None:
        self._name = name
        self._tasks: queue.SimpleQueue[Task] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0
        self.started = 0

    def submit(self, task: Task) -> None:
        """Run ``task`` on an idle thread, or a new one; what it returns is called last.

        ``task`` returns how to announce its end: that runs once the thread counts as idle
        again, so a caller who submits the next task on hearing of it finds the thread free.
        """
        with self._lock:
            if self._idle:
                self._idle -= 1
            else:
                self.started += 1
                name = f"{self._name}-{self.started}"
                threading.Thread(target=self._work, name=name, daemon=True).start()
        self._tasks.put(task)

    def _work(self) -> None:
        while True:
            announce = self._tasks.get()()
            with self._lock:
                self._idle += 1
            announce()


_POOL = _DaemonPool("plugin")


async def _call(plugin: PromptPlugin, context: PluginContext) -> Contribution | None:
    """Await ``plugin.contribute(context)``; a plain function runs on a reused daemon thread.

    Unless the plugin says it never blocks (``blocking = False``): then the thread's round
    trip would cost more than the call, and it runs here.
    """
    fn = plugin.contribute
    if inspect.iscoroutinefunction(fn):
        result: Any = await fn(context)
        return result  # type: ignore[no-any-return]
    if not getattr(plugin, "blocking", True):
        result = fn(context)
        if inspect.isawaitable(result):
            result = await result
        return result  # type: ignore[no-any-return]
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Any] = loop.create_future()

    def settle(value: Any, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(value)

    def target() -> Callable[[], None]:
        threading.current_thread().name = f"plugin-{context.plugin}"  # for logs and debuggers
        try:
            value, error = fn(context), None
        except BaseException as exc:
            value, error = None, exc

        def announce() -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed while the plugin ran
                loop.call_soon_threadsafe(settle, value, error)

        return announce

    # The caller's context goes along, so spans the plugin makes nest under its own.
    runner = contextvars.copy_context().run
    _POOL.submit(lambda: runner(target))
    result = await future
    if inspect.isawaitable(result):
        result = await result
    return result  # type: ignore[no-any-return]
