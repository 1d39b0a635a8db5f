"""Blocking calls awaited from the event loop, on reused daemon threads.

Daemon threads rather than the loop's default executor, whose threads the interpreter joins at
exit: a call that never returns (a plugin stuck on a socket, a model download hanging on the
hub) is abandoned by its caller's timeout, or left behind when the process is told to stop,
instead of holding up the loop's and the interpreter's shutdown. Reused rather than one thread
per call: starting a thread costs more than most calls take.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import os
import queue
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["AbortedCall", "DaemonPool", "PoolExhausted"]

T = TypeVar("T")

Task = Callable[[], Callable[[], None]]
"""Work for a pool thread; it returns what announces its end."""


class PoolExhausted(RuntimeError):
    """Every thread of a bounded :class:`DaemonPool` is busy (calls that never returned): at
    once, or, for a pool that queues, for its whole ``queue_for``."""


class AbortedCall(RuntimeError):
    """A call on a pool thread raised what is no :class:`Exception` (``SystemExit``,
    ``KeyboardInterrupt``, a ``CancelledError`` of its own); the original is its cause.

    On a worker thread none of them ends the process or cancels anything: raised as they are
    in the awaiting task, the first two would stop the event loop itself (asyncio re-raises
    them out of ``run_forever``) and the last would pass for the caller's cancellation.
    """


class DaemonPool:
    """Reused daemon worker threads; another starts only when none is idle.

    Args:
        name: The threads' names: ``<name>-1``, ``<name>-2``...
        max_threads: At most this many threads (None: no limit). A call that never returns
            keeps its thread for good; past the limit a call is refused (:class:`PoolExhausted`)
            rather than a thread started for every such call: at once, unless ``queue_for``.
        queue_for: Seconds, with ``max_threads``: a call past the limit waits for a thread, in
            the order the calls came, and is refused only when it has waited this long and no
            thread has taken a call for as long either, so every thread has been busy with one
            call all that time (calls that do not return). Calls that end, however many wait,
            are each run in turn. A caller cancelled while it waits takes its call back unrun.
    """

    def __init__(
        self, name: str, *, max_threads: int | None = None, queue_for: float | None = None
    ) -> None:
        self._name = name
        self._max = max_threads
        self._queue_for = queue_for
        self._start_over()
        _POOLS.add(self)

    def _start_over(self) -> None:
        """No thread, no call: a new pool's state, and a forked child's (:func:`_after_fork`)."""
        self._tasks: queue.SimpleQueue[Task] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0
        self._waiting: OrderedDict[Task, None] = OrderedDict()
        """Calls past the limit, first come first: a thread that ends a call takes the next.
        Ordered keys rather than a deque: a withdrawn call leaves from anywhere, at no cost."""
        self._taken = time.monotonic()
        """When a thread last took a call: long ago, with calls waiting, means all are stuck."""
        self.started = 0

    def submit(self, task: Task) -> bool:
        """Run ``task`` on an idle thread, or a new one; what it returns is called last.

        ``task`` returns how to announce its end: that runs once the thread counts as idle
        again, so a caller who submits the next task on hearing of it finds the thread free.

        Returns:
            Whether ``task`` waits for a thread (a pool with ``queue_for``, every thread busy):
            :meth:`withdraw` takes it back while it does.

        Raises:
            PoolExhausted: every thread is busy, and the pool does not queue.
        """
        with self._lock:
            if self._idle:
                self._idle -= 1
            elif self._max is not None and self.started >= self._max:
                if self._queue_for is None:
                    raise PoolExhausted(f"all {self._max} {self._name} threads are busy")
                self._waiting[task] = None
                return True
            else:
                self.started += 1
                name = f"{self._name}-{self.started}"
                threading.Thread(target=self._work, name=name, daemon=True).start()
            self._taken = time.monotonic()
        self._tasks.put(task)
        return False

    def withdraw(self, task: Task) -> bool:
        """Take back ``task``, waiting for a thread; False once a thread has taken it."""
        with self._lock:
            if task not in self._waiting:
                return False
            del self._waiting[task]
            return True

    async def run(self, fn: Callable[..., T], *args: Any, thread_name: str | None = None) -> T:
        """Await ``fn(*args)`` on one of the pool's threads, in the caller's context.

        The caller's context goes along (as :func:`asyncio.to_thread` passes it), so spans the
        call makes nest under the caller's. ``thread_name`` renames the thread for the call,
        for logs and debuggers.

        Raises:
            AbortedCall: ``fn`` raised what is no :class:`Exception` (``SystemExit``...).
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()

        def settle(value: Any, error: BaseException | None) -> None:
            if future.done():  # the caller was cancelled meanwhile
                return
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(value)

        def task() -> Callable[[], None]:
            if thread_name is not None:
                threading.current_thread().name = thread_name
            error: BaseException | None
            try:
                value, error = fn(*args), None
            except Exception as exc:  # handed to the caller as it is
                value, error = None, exc
            except BaseException as exc:  # handed over as an Exception: see AbortedCall
                value, error = None, AbortedCall(f"the call raised {type(exc).__name__}")
                error.__cause__ = exc

            def announce() -> None:
                with contextlib.suppress(RuntimeError):  # the loop closed while the call ran
                    loop.call_soon_threadsafe(settle, value, error)

            return announce

        runner = contextvars.copy_context().run

        def job() -> Callable[[], None]:
            return runner(task)

        if self.submit(job):
            try:
                await self._until_taken(job, future)
            except BaseException:  # refused, or the caller cancelled while it waited
                self.withdraw(job)
                future.cancel()  # if a thread took it meanwhile, its answer goes unread
                raise
        return await future

    async def _until_taken(self, job: Task, future: asyncio.Future[Any]) -> None:
        """Wait while ``job`` waits for a thread.

        Raises:
            PoolExhausted: ``job`` waited ``queue_for`` seconds, and for as long no thread took
                any call: each has been busy with one call all that time.
        """
        assert self._queue_for is not None
        since = time.monotonic()
        while True:
            with self._lock:
                if job not in self._waiting:
                    return  # a thread took it
                # A thread taking any call shows the calls are moving: this one's turn comes.
                quiet = time.monotonic() - max(since, self._taken)
                if quiet >= self._queue_for:
                    del self._waiting[job]
                    raise PoolExhausted(
                        f"no {self._name} thread was free for {self._queue_for:g}s: each of"
                        f" the {self._max} was busy with one call all that time"
                    )
            await asyncio.wait([future], timeout=self._queue_for - quiet)

    async def run_to_end(self, fn: Callable[..., T], *args: Any) -> T:
        """:meth:`run`, but a cancelled caller still waits for the call to end.

        A thread cannot be stopped: a caller that holds a lock around the call (a model load)
        keeps holding it until the thread is done, so no second call runs beside it.
        """
        call = asyncio.ensure_future(self.run(fn, *args))
        try:
            return await asyncio.shield(call)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await call
            raise

    def _work(self) -> None:
        task = self._tasks.get()
        while True:
            announce = task()
            with self._lock:
                waiting = self._waiting.popitem(last=False)[0] if self._waiting else None
                if waiting is None:
                    self._idle += 1
                else:
                    self._taken = time.monotonic()
            announce()
            task = self._tasks.get() if waiting is None else waiting


_POOLS: weakref.WeakSet[DaemonPool] = weakref.WeakSet()


def _after_fork() -> None:
    # A forked child has none of its parent's threads, though a pool would count them idle and
    # queue calls for them (and its lock may have been held as the parent forked): each pool
    # of the process starts over (a gunicorn worker, forked from a parent that loaded the app).
    for pool in list(_POOLS):
        pool._start_over()


os.register_at_fork(after_in_child=_after_fork)
