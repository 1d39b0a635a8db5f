"""Running one plugin in isolation: its own span, a timeout, and failures that only skip it."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import inspect
import json
import logging
import threading
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from typing import Any, TypeVar

from opentelemetry import trace

from imagegen._threads import DaemonPool, PoolExhausted
from imagegen.errors import ConfigurationError, InvalidRequest, first_line
from imagegen.models import Contribution
from imagegen.plugins.context import PluginContext, PromptPlugin
from imagegen.telemetry import record_error, tracer
from imagegen.validation import check_json_value, loads

__all__ = [
    "CANCEL_GRACE_SECONDS",
    "CLOSE_SECONDS",
    "MAX_RUNNING",
    "Busy",
    "LeftOut",
    "PluginExit",
    "answers_at_once",
    "close_plugin",
    "leave_out",
    "noting_skips",
    "refusal",
    "run_plugin",
    "warm_plugin",
]

logger = logging.getLogger("imagegen.plugins")

T = TypeVar("T")


class LeftOut(Exception):
    """A contribution the generation leaves out (no room for it, or no valid one): its plugin
    is skipped as one that raises is; the message says why."""


async def run_plugin(
    plugin: PromptPlugin,
    context: PluginContext,
    *,
    time_limit: float,
    keep: Callable[[Contribution], Contribution] | None = None,
) -> Contribution | None:
    """``plugin``'s contribution for ``context``, or None when it adds nothing or is skipped.

    Args:
        plugin: The plugin to run.
        context: What it sees of the generation.
        time_limit: Seconds it may take before it is skipped.
        keep: Given the contribution, still within the plugin's span: what the generation
            keeps of it, or :class:`LeftOut` raised, which skips the plugin (:func:`leave_out`)
            and marks its span failed, as one that raises.

    Raises:
        InvalidRequest: the plugin rejected its options.
        ConfigurationError: the plugin rejected an option only the operator sets.
    """
    with tracer().start_as_current_span("imagegen.plugin") as span:
        span.set_attribute("imagegen.plugin.name", context.plugin)
        result = await _contribution(plugin, context, span, time_limit)
        if result is not None and keep is not None:
            try:
                result = keep(result)
            except LeftOut as exc:
                leave_out(context.plugin, str(exc))
                # No stack trace: the generation's own decision, expected, not the plugin's code.
                _skipped(span, exc, str(exc), traceback=False)
                result = None
        span.set_attribute("imagegen.plugin.contributed", result is not None)
        return result


async def _contribution(
    plugin: PromptPlugin, context: PluginContext, span: trace.Span, time_limit: float
) -> Contribution | None:
    name = context.plugin
    try:
        with plugin_code(name):
            result = _begin(plugin, context)
            if inspect.isawaitable(result):
                # Only what is awaited can be cut short: a plain call that answered here is over.
                result = await _within(name, result, time_limit)
    except (InvalidRequest, ConfigurationError):
        raise
    except (Busy, PoolExhausted) as exc:
        # Refused before it began: said in a line, no traceback (nothing of the plugin ran).
        logger.warning("plugin %s skipped: %s", name, exc)
        _skipped(span, exc, "skipped: no thread for it")
        _note(name, str(exc))
        return None
    except TimeoutError as exc:
        logger.warning("plugin %s timed out after %.2fs; skipped", name, time_limit)
        _skipped(span, exc, f"timed out after {time_limit:g}s")
        _note(name, f"timed out after {time_limit:g}s")
        return None
    except asyncio.CancelledError as exc:
        if _cancelled():
            raise  # the request itself: its timeout, its caller gone
        # The plugin's own (a task of its that was cancelled, or raised outright): a failure.
        logger.warning("plugin %s raised CancelledError; skipped", name, exc_info=True)
        _skipped(span, exc, "failed: CancelledError")
        _note(name, "failed: CancelledError")
        return None
    except BaseException as exc:  # a plugin cannot stop the process's loop
        # SystemExit, KeyboardInterrupt and the like, raised on the loop, would end the
        # event loop's thread, and every later request with it.
        logger.warning("plugin %s failed; skipped", name, exc_info=True)
        _skipped(span, exc, f"failed: {type(exc).__name__}")
        _note(name, f"failed: {type(exc).__name__}: {first_line(exc)}".rstrip(": "))
        return None
    if result is None:
        return None
    if not isinstance(result, Contribution):
        logger.warning("plugin %s returned %s, not a Contribution; skipped", name, type(result))
        span.set_status(trace.StatusCode.ERROR, f"returned {type(result).__name__}")
        _note(name, f"returned {type(result).__name__}, not a Contribution")
        return None
    if result.data and not _json_data(result.data):
        # It would fail the generation later, where the prompt is kept as JSON (the memo,
        # the event): a misbehaving plugin is skipped, as one that raises is.
        logger.warning("plugin %s returned data that is not JSON; skipped", name)
        span.set_status(trace.StatusCode.ERROR, "returned data that is not JSON")
        _note(name, "returned data that is not JSON")
        return None
    if result.plugin != name:
        result = result.model_copy(update={"plugin": name})
    return result


# The plugins skipped in this context and why, where someone asked (:func:`noting_skips`): the
# tasks made within share the list.
_SKIPS: contextvars.ContextVar[list[tuple[str, str]] | None] = contextvars.ContextVar(
    "imagegen_plugin_skips", default=None
)


@contextlib.contextmanager
def noting_skips() -> Iterator[list[tuple[str, str]]]:
    """Note each plugin skipped within this block, as ``(name, why)``: ``("weather", "timed
    out after 5s")``; a plugin that adds nothing (None) is not skipped. For a caller that tells
    its user (the command line); the log says it too, either way."""
    skips: list[tuple[str, str]] = []
    token = _SKIPS.set(skips)
    try:
        yield skips
    finally:
        _SKIPS.reset(token)


def leave_out(name: str, why: str) -> None:
    """Leave plugin ``name``'s contribution out of the generation, saying why: in the log, and
    to whoever notes the skips (:func:`noting_skips`), as a plugin that fails is."""
    logger.warning("plugin %s skipped: %s", name, why)
    _note(name, why)


def _note(name: str, why: str) -> None:
    skips = _SKIPS.get()
    if skips is not None:
        skips.append((name, why))


class PluginExit(Exception):
    """What a plugin's own task raised that would have ended the event loop (``SystemExit``,
    ``KeyboardInterrupt``), as an ordinary exception: whoever awaits the task gets this."""


# The plugin whose code runs in this context, if any: the tasks it creates copy the context,
# and with it this mark (as do the tasks those create).
_PLUGIN: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "imagegen_plugin", default=None
)


@contextlib.contextmanager
def plugin_code(name: str) -> Iterator[None]:
    """Run a plugin's code in this block: each task it creates on the running loop is kept
    from ending the loop (:func:`_contain`)."""
    _contain_on(asyncio.get_running_loop())
    token = _PLUGIN.set(name)
    try:
        yield
    finally:
        _PLUGIN.reset(token)


async def _contained(name: str, coro: Coroutine[Any, Any, T]) -> T:
    try:
        return await coro
    except (SystemExit, KeyboardInterrupt) as exc:
        raise PluginExit(f"a task of plugin {name} raised {type(exc).__name__}") from exc


def _close(coro: Coroutine[Any, Any, Any], _: object) -> None:
    coro.close()


def _contain_on(loop: asyncio.AbstractEventLoop) -> None:
    """Have ``loop`` keep the tasks plugins create from ending it.

    A task whose coroutine raises ``SystemExit`` or ``KeyboardInterrupt`` sets it as its
    exception and raises it again out of the loop's ``run_forever`` (CPython's
    Lib/asyncio/tasks.py, ``Task.__step``: ``except (KeyboardInterrupt, SystemExit)``): a
    plugin's ``await asyncio.create_task(...)`` ended the loop of every later request, beyond
    any handler of the plugin's runner. The loop's task factory (the hook
    ``loop.create_task`` calls, ``set_task_factory``) wraps each coroutine created where a
    plugin's code runs (:func:`plugin_code`) so that those two become a :class:`PluginExit`,
    which the task keeps as any exception. Other tasks are made as before, by the factory the
    loop had, if any.
    """
    current = loop.get_task_factory()
    if getattr(current, "_contains_plugins", False):
        return
    previous = current

    def factory(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> asyncio.Future[Any]:
        context = kwargs.get("context")
        name = context.get(_PLUGIN) if context is not None else _PLUGIN.get()
        inner = None
        if name is not None and inspect.iscoroutine(coro):
            inner, coro = coro, _contained(name, coro)
        if previous is not None:
            task = previous(loop, coro, **kwargs)
        else:
            task = asyncio.Task(coro, loop=loop, **kwargs)
        if inner is not None:
            # A task cancelled before its first step never begins the wrapper, nor so the
            # plugin's coroutine: closed once the task is done, it is not "never awaited", as
            # an unwrapped one would not be (a no-op for a coroutine that ran).
            task.add_done_callback(functools.partial(_close, inner))
        return task

    factory._contains_plugins = True  # type: ignore[attr-defined]
    loop.set_task_factory(factory)


def _cancelled() -> bool:
    """Whether the running task is being cancelled (a ``CancelledError`` seen now is its own)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _json_data(data: dict[str, Any]) -> bool:
    """Whether ``data`` is JSON as the prompt's events carry it: plain values, nested within
    the depth a request's metadata may take, its keys and strings UTF-8 text (a lone surrogate,
    as ``json.loads`` makes of a split ``\\ud83d`` escape, goes through JSON's own round trip
    escaped, and no event or memo written as UTF-8 could hold it)."""
    try:
        check_json_value(loads(json.dumps(data, allow_nan=False)), text=True)
    except (TypeError, ValueError, RecursionError, InvalidRequest):
        return False
    return True


def _skipped(
    span: trace.Span, error: BaseException, description: str, *, traceback: bool = True
) -> None:
    """Mark a plugin's span failed (status ``ERROR``, an ``exception`` event); the generation
    goes on without the plugin."""
    if traceback:
        span.record_exception(error)
    else:
        record_error(span, error, traceback=False)
    span.set_status(trace.StatusCode.ERROR, description)


# Plain plugins' threads. One that hangs keeps its thread for good: past this many, a call
# is refused (the plugin skipped, as one that raises), not a thread leaked per request.
_POOL = DaemonPool("plugin", max_threads=128)

MAX_RUNNING = 32
"""Calls of one plain plugin that may run at once on the plugins' threads. A call that never
returns keeps its thread: without a share, one hung plugin took every thread within a few
hundred requests, and every plain plugin was skipped from then on. A quarter of the pool: the
others still run beside up to three plugins that hang."""


class Busy(RuntimeError):
    """A plain plugin already has :data:`MAX_RUNNING` calls running (hung, most likely)."""


class _Running:
    """How many calls of each plain plugin are running on the pool's threads, by name.

    Counted up on the loop as a call is handed to a thread, down on that thread as the call
    ends: a call its caller has stopped waiting for (timed out) counts until it returns.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._calls: dict[str, int] = {}

    def begin(self, name: str) -> None:
        """Count one more call of ``name``.

        Raises:
            Busy: ``name`` already has :data:`MAX_RUNNING` calls running.
        """
        with self._lock:
            self._calls[name] = self._room(name) + 1

    def check(self, name: str) -> None:
        """Refuse a call of ``name`` that would be one too many; count nothing.

        Raises:
            Busy: ``name`` already has :data:`MAX_RUNNING` calls running.
        """
        with self._lock:
            self._room(name)

    def held(self, name: str) -> None:
        """Count one more call of ``name``, one already running (given up on, never stopped)."""
        with self._lock:
            self._calls[name] = self._calls.get(name, 0) + 1

    def _room(self, name: str) -> int:
        running = self._calls.get(name, 0)
        if running >= MAX_RUNNING:
            raise Busy(f"{running} calls of it still running, at most {MAX_RUNNING}")
        return running

    def end(self, name: str) -> None:
        """Count one call of ``name`` the fewer."""
        with self._lock:
            running = self._calls.pop(name, 0) - 1
            if running > 0:
                self._calls[name] = running

    def of(self, name: str) -> int:
        """The calls of ``name`` running now."""
        return self._calls.get(name, 0)


_RUNNING = _Running()

CANCEL_GRACE_SECONDS = 0.5
"""Seconds a plugin's call, cancelled (past its time limit, or its request gone), gets to end
before it is given up on and left running: a coroutine that catches its ``CancelledError`` and
goes on holds no request, nor a close, past this."""

CLOSE_SECONDS = 5.0
"""Seconds a plugin's ``aclose()`` gets before it is given up on (the plugin named in a
warning): the bound the enhance function gives its whole close as its process exits, so that a
close that hangs keeps the library's caller, the command line and a worker alike no longer."""

# Plugin calls given up on that still run (a coroutine that ignores its cancellation): held
# here until they end, as the loop keeps only weak references to its tasks.
_ABANDONED: set[asyncio.Task[Any]] = set()


class _Escaped(Exception):
    """``SystemExit`` or ``KeyboardInterrupt`` a plugin's call raised in its own task, carried
    to the caller, which raises it again: out of a task it would end the event loop."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(type(error).__name__)
        self.error = error


async def _settled(awaitable: Awaitable[Any]) -> Any:
    try:
        result = await awaitable
        if inspect.isawaitable(result):  # a plain function returned a coroutine
            result = await result
        return result
    except (SystemExit, KeyboardInterrupt) as exc:
        raise _Escaped(exc) from exc


async def _within(name: str, awaitable: Awaitable[Any], time_limit: float) -> Any:
    """What ``awaitable``, plugin ``name``'s call, comes to within ``time_limit`` seconds.

    It runs as a task of its own, in the caller's context (its span, its plugin mark): past its
    time, or when the caller is cancelled, it is cancelled and given :data:`CANCEL_GRACE_SECONDS`
    to end, then left running, counted among the plugin's calls running (:data:`MAX_RUNNING`)
    until it ends. Awaited in the caller's task, a coroutine that catches its
    ``CancelledError`` held its request, or the close, for as long as it went on.

    Raises:
        TimeoutError: past ``time_limit``.
        BaseException: what the call raised, its ``SystemExit`` included.
    """
    task = asyncio.ensure_future(_settled(awaitable))
    try:
        async with asyncio.timeout(time_limit):
            return await asyncio.shield(task)
    except _Escaped as escaped:
        raise escaped.error from None
    except BaseException:
        if task.done():
            _retrieved(task)
        else:
            await _stop(name, task)
        raise


async def _stop(name: str, task: asyncio.Task[Any]) -> None:
    """Cancel plugin ``name``'s ``task``, wait its grace, then leave it running if it still is."""
    task.cancel()
    try:
        await asyncio.wait({task}, timeout=CANCEL_GRACE_SECONDS)
    finally:
        if task.done():
            _retrieved(task)
        else:
            _RUNNING.held(name)
            _ABANDONED.add(task)
            task.add_done_callback(functools.partial(_ended_late, name))
            logger.warning(
                "plugin %s did not stop when cancelled; left running (%d of its calls running)",
                name,
                _RUNNING.of(name),
            )


def _retrieved(task: asyncio.Task[Any]) -> BaseException | None:
    """``task``'s exception, if any, marked as seen: asyncio logs one never asked for."""
    return None if task.cancelled() else task.exception()


def _ended_late(name: str, task: asyncio.Task[Any]) -> None:
    """A plugin's call given up on has ended: counted no more; what it raised said once."""
    _ABANDONED.discard(task)
    _RUNNING.end(name)
    error = _retrieved(task)
    if isinstance(error, _Escaped):
        error = error.error
    if error is not None:
        logger.warning(
            "plugin %s failed after it was given up on: %s: %s",
            name,
            type(error).__name__,
            first_line(error),
        )


def _begin(plugin: PromptPlugin, context: PluginContext) -> object:
    """``plugin.contribute(context)`` begun: a coroutine's, or a plain function's on a reused
    daemon thread, as an awaitable; a plain function that says it never blocks
    (``blocking = False``) is called here, where the thread's round trip would cost more than
    the call, and its answer returned as it is."""
    fn = plugin.contribute
    if inspect.iscoroutinefunction(fn):
        # Its calls given up on, still running, count as a plain plugin's hung threads do.
        _RUNNING.check(context.plugin)
        return fn(context)
    if answers_at_once(plugin):
        return fn(context)
    return _on_thread(context.plugin, fn, context)


def answers_at_once(plugin: PromptPlugin) -> bool:
    """Whether ``plugin``'s ``contribute`` is a plain function that says it never blocks
    (``blocking = False``): a look-up in memory, called where it is needed, on no thread."""
    return not inspect.iscoroutinefunction(plugin.contribute) and not getattr(
        plugin, "blocking", True
    )


def refusal(
    plugin: PromptPlugin, context: PluginContext
) -> InvalidRequest | ConfigurationError | None:
    """``plugin``'s refusal of ``context.options``, asked of a plugin that answers at once
    (:func:`answers_at_once`) by calling it as a request would; None when it takes them, does
    not answer at once, or fails otherwise (its own fault, which only skips it at a request).
    """
    if not answers_at_once(plugin):
        return None
    try:
        result = plugin.contribute(context)
    except (InvalidRequest, ConfigurationError) as exc:
        return exc
    except KeyboardInterrupt:
        raise
    except BaseException:  # as at a request: nothing a plugin raises stops the caller
        return None
    if inspect.iscoroutine(result):  # a plain function that returned a coroutine: not run
        result.close()
    return None


async def _on_thread(name: str, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` on the plugins' threads, counted in plugin ``name``'s share until it returns.

    Raises:
        Busy: ``name`` has :data:`MAX_RUNNING` calls running already.
        PoolExhausted: every thread of the pool is taken.
    """
    _RUNNING.begin(name)
    started = False

    def call(*args: Any) -> T:
        nonlocal started
        started = True
        try:
            return fn(*args)
        finally:
            _RUNNING.end(name)

    try:
        return await _POOL.run(call, *args, thread_name=f"plugin-{name}")
    except PoolExhausted:
        if not started:  # refused before it began: no thread will count it down
            _RUNNING.end(name)
        raise


async def warm_plugin(plugin: PromptPlugin, name: str) -> bool:
    """Run ``plugin.warm_up()`` if it has one (a plain one on the plugins' threads).

    Returns whether it ran and succeeded; a failure is logged, never raised: warming only
    saves a first request some time.
    """
    warm_up = getattr(plugin, "warm_up", None)
    if warm_up is None:
        return False
    try:
        with plugin_code(name):
            if inspect.iscoroutinefunction(warm_up):
                await warm_up()
            else:
                result = await _on_thread(name, warm_up)
                if inspect.isawaitable(result):
                    await result
    except asyncio.CancelledError:
        if _cancelled():
            raise
        logger.warning("plugin %s could not warm up: CancelledError", name)
        return False
    except BaseException as exc:  # as in contribute: skipped, never fatal
        logger.warning("plugin %s could not warm up: %s: %s", name, type(exc).__name__, exc)
        return False
    return True


async def close_plugin(plugin: PromptPlugin, name: str) -> None:
    """Run ``plugin.aclose()`` if it has one, for at most :data:`CLOSE_SECONDS` (then it is
    cancelled, and one that goes on regardless is left running, as a call past its time is); a
    failure is logged, never raised: the others close all the same."""
    close = getattr(plugin, "aclose", None)
    if close is None:
        return
    try:
        with plugin_code(name):
            await _within(name, close(), CLOSE_SECONDS)
    except TimeoutError:
        logger.warning("plugin %s did not close: timed out after %gs", name, CLOSE_SECONDS)
    except asyncio.CancelledError:
        if _cancelled():
            raise
        logger.warning("plugin %s did not close: CancelledError", name)
    except BaseException as exc:  # as in contribute: a plugin cannot stop its caller
        logger.warning("plugin %s did not close: %s: %s", name, type(exc).__name__, exc)
