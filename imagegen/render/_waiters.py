"""Stored renders and the requests that wait for them.

A stored render runs as a task of its own, so that once its pipeline call has started it ends
and stores its PNG for the retry, whatever happens to its request. Before that, it is wanted
only while some request for its generation still waits: when the last one has gone (a
timeout), the renders of that generation whose call has not started are cancelled, so nothing
runs, and no admission slot is held, for a request that has gone (docs/adr/0005).
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

__all__ = ["Waiters"]

T = TypeVar("T")

log = logging.getLogger("imagegen.render")

Work = Callable[[Callable[[], None]], Coroutine[Any, Any, T]]
"""A stored render, given what to call once its pipeline call has started."""


@dataclass(eq=False)
class _Render:
    task: asyncio.Future[Any] = field(init=False)
    started: bool = False

    def start(self) -> None:
        self.started = True


class Waiters:
    """Counts the requests waiting per generation; drops its unstarted renders when none is."""

    def __init__(self) -> None:
        self._requests: Counter[str] = Counter()
        self._renders: dict[str, list[_Render]] = {}

    def __len__(self) -> int:
        """Generations with a render under way or a request waiting."""
        return len(self._renders.keys() | self._requests.keys())

    def waiting(self, generation_id: str) -> int:
        """The requests waiting for ``generation_id``'s render now."""
        return self._requests[generation_id]

    async def wait(self, generation_id: str, work: Work[T]) -> T:
        """Run ``work`` as a task of its own and await it; see the module's docstring."""
        render = _Render()
        render.task = asyncio.ensure_future(work(render.start))
        self._renders.setdefault(generation_id, []).append(render)
        render.task.add_done_callback(lambda _: self._forget(generation_id, render))
        self._requests[generation_id] += 1
        try:
            return await asyncio.shield(render.task)
        finally:
            self._requests[generation_id] -= 1
            if not self._requests[generation_id]:
                del self._requests[generation_id]
                for each in self._renders.get(generation_id, []):
                    if not each.started:
                        each.task.cancel()  # nobody waits for it: it leaves the queue

    def _forget(self, generation_id: str, render: _Render) -> None:
        renders = self._renders[generation_id]
        renders.remove(render)
        if not renders:
            del self._renders[generation_id]
        failure = None if render.task.cancelled() else render.task.exception()
        if failure is not None and not self._requests[generation_id]:
            # A started render that failed once its requests had gone: nobody else says so
            # (asyncio would, as an exception never retrieved, when the task is collected).
            log.error(
                "render of %s failed after its requests had gone",
                generation_id,
                exc_info=failure,
                extra={"generation_id": generation_id},
            )
