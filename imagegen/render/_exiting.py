"""Work handed to a thread pool that is still done while the interpreter exits.

A gunicorn worker's main thread leaves at SIGINT or SIGQUIT, whatever its requests are doing
(gunicorn/workers/base.py, ``Worker.handle_quit``: ``sys.exit(0)``), and the interpreter then
joins the threads still at work, the request threads that wait for a render among them. From
the moment it begins, concurrent.futures refuses new work to every ``ThreadPoolExecutor``
(CPython's Lib/concurrent/futures/thread.py: ``_python_exit``, a threading exit hook, sets
``_shutdown``, which ``submit`` checks, and each pool's threads end once idle): a render under
way would have its PNG encoding refused, and its request fail with nothing stored.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

__all__ = ["submit"]

T = TypeVar("T")


def submit(pool: ThreadPoolExecutor, name: str, fn: Callable[..., T], *args: Any) -> Future[T]:
    """``fn(*args)`` on ``pool``, or on a thread of its own, named ``name``, where the pool
    refuses new work (it was shut down, or the interpreter is exiting).

    The thread is no daemon: the interpreter joins it as it joins the pool's threads
    (``threading._shutdown`` joins every non-daemon thread, those started while it runs too).
    """
    try:
        return pool.submit(fn, *args)
    except RuntimeError:  # concurrent.futures' refusal: "cannot schedule new futures after …"
        pass
    future: Future[T] = Future()

    def run() -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            result = fn(*args)
        except BaseException as error:  # the caller's to handle, as the pool hands it on
            future.set_exception(error)
        else:
            future.set_result(result)

    threading.Thread(target=run, name=name).start()
    return future
