"""Every storage call measured in one place: a span, a duration, and the bytes written (of a
``location``, which only names an object, only a failure).

The service wraps whatever storage it is given, so the render's PNG, persist's derivatives,
enhance's prompt memo and the dead-letter records are all seen alike, and no call site measures.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from imagegen.errors import NotFound
from imagegen.storage.base import Storage, StoredObject
from imagegen.telemetry import current_stage, instruments, record_error, tracer

__all__ = ["InstrumentedStorage", "instrumented"]


class InstrumentedStorage:
    """``inner`` with each ``put``/``get``/``head``, and each ``location`` that fails, traced and
    timed (``imagegen.storage.*``)."""

    def __init__(self, inner: Storage) -> None:
        self.inner = inner
        self.name = inner.name

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)  # what is not measured: root, bucket, ...

    # A plain context manager: nothing in it awaits, and an async one costs an async
    # generator and two more awaits on every storage call.
    @contextmanager
    def _measured(self, operation: str, key: str) -> Iterator[Callable[[], None]]:
        """Time and trace one call; what it yields says the call found no object (a ``head``
        answering None), as a ``get`` says it by raising :class:`NotFound`: alike, a miss."""
        # The span's failures marked here, not by the SDK: a miss is an answer, no error.
        with tracer().start_as_current_span(
            f"imagegen.storage.{operation}", record_exception=False, set_status_on_exception=False
        ) as span:
            span.set_attribute("imagegen.storage.key", key)
            started = time.perf_counter()
            outcome = "failed"  # a call that raises is timed too: a slow timeout is slow
            missed = False

            def missing() -> None:
                nonlocal missed
                missed = True

            try:
                yield missing
                outcome = "missing" if missed else "success"
            except NotFound:
                # An answer, and often the expected one (a first delivery): no error, no trace.
                outcome = "missing"
                raise
            except BaseException as exc:
                record_error(span, exc)
                raise
            finally:
                if outcome == "missing":
                    span.set_attribute("imagegen.storage.found", False)
                labels = {"operation": operation, "stage": current_stage.get(), "outcome": outcome}
                instruments().storage_duration.record(time.perf_counter() - started, labels)

    def _written(self, size: int) -> None:
        instruments().storage_bytes_written.add(size, {"stage": current_stage.get()})

    # The options (content_type, metadata) pass through as :class:`Storage` declares them.
    async def put(self, key: str, data: bytes, **options: Any) -> StoredObject:
        with self._measured("put", key):
            stored = await self.inner.put(key, data, **options)
        self._written(len(data))
        return stored

    async def create(self, key: str, data: bytes, **options: Any) -> bool:
        with self._measured("put", key):
            written = await self.inner.create(key, data, **options)
        if written:
            self._written(len(data))
        return written

    async def get(self, key: str) -> bytes:
        with self._measured("get", key):
            return await self.inner.get(key)

    async def head(self, key: str) -> StoredObject | None:
        with self._measured("head", key) as missing:
            found = await self.inner.head(key)
            if found is None:
                missing()
            return found

    def location(self, key: str) -> str:
        # Only a failure is measured (local storage: a link leading outside the root). The name
        # is computed on every request, in microseconds (S3: a string; local: a look at the
        # key's links), where a span and a histogram point would cost several times that and
        # put a span of no interest in every trace.
        started, started_ns = time.perf_counter(), time.time_ns()
        try:
            return self.inner.location(key)
        except BaseException as exc:
            failed = tracer().start_span("imagegen.storage.location", start_time=started_ns)
            failed.set_attribute("imagegen.storage.key", key)
            record_error(failed, exc)
            failed.end()
            labels = {"operation": "location", "stage": current_stage.get(), "outcome": "failed"}
            instruments().storage_duration.record(time.perf_counter() - started, labels)
            raise

    async def check(self) -> None:
        await self.inner.check()


def instrumented(storage: Storage) -> Storage:
    """``storage`` measured (once: an instrumented storage is returned as it is)."""
    return storage if isinstance(storage, InstrumentedStorage) else InstrumentedStorage(storage)
