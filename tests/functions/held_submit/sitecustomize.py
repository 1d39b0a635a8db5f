"""A server's thread pool that holds its lock while it submits: a ``sitecustomize`` that a
test puts first on a server's ``PYTHONPATH``.

Where ``SUBMIT_HELD_ONCE`` names a file, the first ``ThreadPoolExecutor.submit`` that a
process's main thread makes once that file exists writes ``{"message": "submit held"}`` on
stderr and stays there for a minute, holding the pool's ``_shutdown_lock`` (CPython's
Lib/concurrent/futures/thread.py, ``submit``: ``_adjust_thread_count`` runs under it). It
stands for a gthread worker's main thread submitting a connection (gunicorn/workers/gthread.py,
``enqueue_req``: a kept-alive one its client closed) as a Ctrl-C comes, a moment made as
long as the test needs to send the signal into it.
"""

import os

_FLAG = os.environ.get("SUBMIT_HELD_ONCE")

if _FLAG:
    import threading
    import time
    from concurrent.futures import thread

    _adjust = thread.ThreadPoolExecutor._adjust_thread_count

    def _adjust_thread_count(self: thread.ThreadPoolExecutor) -> None:
        if threading.current_thread() is threading.main_thread() and os.path.exists(_FLAG):
            os.unlink(_FLAG)  # once
            os.write(2, b'{"message": "submit held"}\n')
            # Busy, as a submitting thread is, not asleep: the kernel may hand a signal to
            # another of the process's threads, and Python runs its handler in the main
            # thread only once that thread next runs Python code (CPython's signal module).
            held = time.monotonic() + 60
            while time.monotonic() < held:
                time.sleep(0.01)
        _adjust(self)

    thread.ThreadPoolExecutor._adjust_thread_count = _adjust_thread_count
