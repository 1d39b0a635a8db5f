"""Recording the in-process chain (``imagegen generate``, ``loop``, ``replay``) into a ledger.

The events are the ones the functions would exchange: same types, sources and stable ids
(:func:`imagegen.events.reply_id`), so the local history reads like a cluster's. Recording is
best-effort here: a ledger that cannot be written costs a warning, never the image.

A write that cannot be answered now (a retryable :class:`DependencyUnavailable`: another
process holds the ledger's lock past its busy timeout, a long ``imagegen ledger prune``; the
database server cut the connection, a restart or a failover) is not tried again while the
image is made: that event and the generation's later ones are kept, so the image waits for the
ledger once at most, and its history never takes up with a later event and misses what came
between. Once the generation ends (its derivatives made, or its failure), the events kept are
written in their order: a lock's through ``patient``, a ledger that waits its usual 30 s for
a lock; the others through the same ledger, whose pool has connected again by
then (:class:`~imagegen.ledger.postgres.PostgresLedger`). This is the redelivery a function's
broker makes of an event its ledger function could not record; as there, writing an event
again changes nothing (it is recorded once, by source and id): one the server recorded before
the connection was cut is not recorded twice.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import UTC, datetime

from pydantic import BaseModel

from imagegen.errors import DependencyUnavailable
from imagegen.events import (
    GENERATION_FAILED,
    GENERATION_REQUESTED,
    IMAGE_DERIVED,
    reply_id,
    source_for,
)
from imagegen.ledger._sql import BUSY
from imagegen.ledger.models import LedgerEvent
from imagegen.ledger.store import Ledger
from imagegen.models import ErrorInfo, GenerationFailed, GenerationRequest

__all__ = ["LOCAL_SOURCE", "HistoryCutShort", "Recorder"]

log = logging.getLogger("imagegen.ledger")

LOCAL_SOURCE = "/imagegen/cli"


class HistoryCutShort(Exception):
    """A generation's event could not be recorded now: neither it nor the generation's later
    events are. What was recorded of it before (``recorded``: the short name of its last event
    written, ``requested``, ``enhanced``..., or None) stays."""

    def __init__(
        self,
        generation_id: str,
        recorded: str | None,
        error: DependencyUnavailable,
        where: str,
        *,
        kept: bool = False,
        final: bool = False,
    ) -> None:
        self.generation_id, self.recorded, self.error = generation_id, recorded, error
        # kept: the event and the later ones are written once the generation ends.
        # final: the last try, once the generation ended; no more is written of it.
        self.kept, self.final = kept, final
        so_far = "is not recorded" if recorded is None else f"is recorded up to {recorded!r} only"
        # The ledger's own words for a lock not granted ask its client to retry: not here.
        busy = error.message == BUSY
        why = f"ledger {where} is locked by another process" if busy else error
        later = "; the rest is written once the image is made" if kept and not final else ""
        super().__init__(f"the history of generation {generation_id} {so_far}: {why}{later}")


class Recorder:
    """Writes a generation's events to ``ledger`` as the stages produce them.

    ``on_failure`` hears of each event that could not be recorded (after it is logged): a
    caller that shows a person what happened says so where a log line would go unseen.
    ``patient`` opens the same ledger with its usual wait for a lock (``ledger`` may be opened
    with a shorter one): what a busy ledger kept of a generation is written through it once
    the generation ends; without it, that is not written. What another retryable failure
    (a connection the server cut) kept is written through ``ledger`` itself.
    """

    def __init__(
        self,
        ledger: Ledger,
        *,
        on_failure: Callable[[Exception], None] | None = None,
        patient: Callable[[], Ledger] | None = None,
    ) -> None:
        self.ledger = ledger
        self.on_failure = on_failure
        self.patient = patient
        # The events of a generation the ledger could not take now, in order: written at its
        # end; ``_busy``: those of a lock not granted, written through ``patient``.
        self._kept: dict[str, list[LedgerEvent]] = {}
        self._busy: set[str] = set()
        # The generation last recorded and the short name of its last event written: the
        # chain records one generation at a time.
        self._recorded: tuple[str, str] | None = None
        self._cut_short: set[str] = set()

    async def requested(
        self,
        generation_id: str,
        request: GenerationRequest,
        requested_at: datetime | None = None,
    ) -> None:
        """``request`` was made as generation ``generation_id``.

        Args:
            requested_at: The call's request time (:func:`imagegen.identity.identify`), which
                the job carries and which dates its storage keys: recorded as the request's.
                Without it, a request that names no time is dated by the ledger, when this
                event is written, later than the job (near midnight UTC, another day).
        """
        data = request.model_copy(
            update={
                "generation_id": generation_id,
                "requested_at": requested_at or request.requested_at,
            }
        )
        await self._record(
            LOCAL_SOURCE, reply_id(generation_id, GENERATION_REQUESTED), GENERATION_REQUESTED, data
        )

    async def emitted(self, stage: str, result: BaseModel) -> None:
        """``stage`` produced ``result`` (its reply event's data)."""
        from imagegen.stages import get

        event_type = get(stage).emits
        assert event_type is not None, f"stage {stage} emits no event"
        gid = str(getattr(result, "generation_id", ""))
        await self._record(source_for(stage), reply_id(gid, event_type), event_type, result)

    async def failed(self, stage: str, generation_id: str, exc: BaseException) -> None:
        failure = GenerationFailed(
            generation_id=generation_id,
            stage=stage,
            error=ErrorInfo.of(exc),
            failed_at=datetime.now(UTC),
        )
        await self._record(
            source_for(stage),
            reply_id(generation_id, GENERATION_FAILED),
            GENERATION_FAILED,
            failure,
        )

    async def _record(self, source: str, event_id: str, event_type: str, data: BaseModel) -> None:
        event = LedgerEvent(
            source=source,
            id=event_id,
            type=event_type,
            subject=str(getattr(data, "generation_id", "") or "") or None,
            time=datetime.now(UTC),
            data=data.model_dump(mode="json"),
        )
        gid = event.subject or ""
        # Named in the lines, not left to the current span: a failure can be recorded where
        # none is (a cancelled load ahead of render).
        extra = {"generation_id": gid or None, "event_id": event_id}
        if gid in self._cut_short:
            log.info(
                "not recording %s yet: the ledger failed for this generation",
                event_type,
                extra=extra,
            )
            if gid in self._kept:
                self._kept[gid].append(event)
                if event_type in (IMAGE_DERIVED, GENERATION_FAILED):  # the generation's end
                    await self._catch_up(gid)
            return
        try:
            await asyncio.to_thread(self.ledger.ingest, event)
        except Exception as exc:  # the image matters more than its history line
            log.warning("could not record %s in the ledger: %s", event_type, exc, extra=extra)
            said: Exception = exc
            if isinstance(exc, DependencyUnavailable) and gid:
                self._cut_short.add(gid)
                busy = exc.message == BUSY
                kept = exc.retryable and (self.patient is not None or not busy)
                if kept:
                    self._kept[gid] = [event]
                    if busy:
                        self._busy.add(gid)
                last = self._recorded[1] if self._recorded and self._recorded[0] == gid else None
                said = HistoryCutShort(gid, last, exc, self.ledger.where, kept=kept)
            if self.on_failure is not None:
                self.on_failure(said)
        else:
            self._recorded = (gid, _short_name(event_type))

    async def _catch_up(self, gid: str) -> None:
        """Write what was kept of generation ``gid``: what a lock held up, waiting for it as
        long as :attr:`patient`'s ledger does; the rest through :attr:`ledger`. A failure is
        said as any other."""
        events = self._kept.pop(gid)
        busy = gid in self._busy
        self._busy.discard(gid)

        def write_to(ledger: Ledger) -> None:
            for event in events:
                ledger.ingest(event)
                # Recorded, whatever becomes of the next: a failure says how far it got.
                self._recorded = (gid, _short_name(event.type))

        def write() -> None:
            if not busy:
                write_to(self.ledger)
                return
            assert self.patient is not None, "a lock's events are kept only with a patient ledger"
            ledger = self.patient()
            try:
                write_to(ledger)
            finally:
                ledger.close()

        try:
            await asyncio.to_thread(write)
        except Exception as exc:
            log.warning(
                "could not record generation %s in the ledger: %s",
                gid,
                exc,
                extra={"generation_id": gid},
            )
            if self.on_failure is not None:
                last = self._recorded[1] if self._recorded and self._recorded[0] == gid else None
                error = (
                    exc
                    if isinstance(exc, DependencyUnavailable)
                    else DependencyUnavailable(str(exc))
                )
                self.on_failure(HistoryCutShort(gid, last, error, self.ledger.where, final=True))
        else:
            self._cut_short.discard(gid)
            log.info(
                "recorded generation %s in the ledger after all: %d kept events written",
                gid,
                len(events),
                extra={"generation_id": gid, "events": len(events)},
            )


def _short_name(event_type: str) -> str:
    """What a history says of an event: ``rendered`` for ``…image.rendered``."""
    return event_type.rsplit(".", 1)[-1]
