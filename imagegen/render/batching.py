"""Micro-batching: compatible render jobs gathered for a short window, run as one pipeline call.

A pipeline runs one call at a time. Jobs wait in arrival order; when the pipeline is free, the
oldest waiting job opens a batch, waits for compatible jobs (same :func:`batch_key`) until its
window, counted from its arrival, is over, and the batch runs as one call with one generator
per image. With a batch size of 1 every job runs alone, exactly as it would without a queue.

The queue also measures what admission needs: what a call costs for its work
(:class:`CallCost`), how long its call's outputs take to finish after the pipeline is done with
them (the PNG encoding), and how many jobs are waiting or running; and it tells how long the
pipeline needs for a set of held jobs (:meth:`Batcher.backlog`), each batch key a call of its
own.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import math
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import trace

from imagegen.models import EnhancedPrompt
from imagegen.render import _exiting
from imagegen.render.base import ProgressCallback, RenderOutput
from imagegen.render.cost import CallCost, work_of

__all__ = [
    "BATCHED_MAX_ABS_DIFF",
    "BATCHED_MIN_PSNR",
    "Batch",
    "BatchKey",
    "Batcher",
    "batch_key",
]

BatchKey = tuple[str, int, int, int, float, tuple[tuple[str, str, float], ...]]

BATCHED_MAX_ABS_DIFF = 2
"""The most an 8-bit channel of a batched CPU render differs from the same job rendered alone.

Float reductions depend on the batch shape, so batching moves a few values by one level
(measured: at most 1, PSNR 84 dB or more, batches of 2 to 8; docs/rendering.md).
"""

BATCHED_MIN_PSNR = 70.0
"""The least PSNR (dB) of a batched CPU render against the same job rendered alone."""

# Weight of the newest measurement in the running estimate of the seconds after a call.
_SMOOTHING = 0.3


def batch_key(job: EnhancedPrompt) -> BatchKey:
    """What jobs must share to run as one pipeline call: model, size, steps, guidance, LoRAs."""
    loras = tuple(sorted((lora.name, lora.path, lora.weight) for lora in job.loras))
    return (job.model, job.width, job.height, job.steps, job.guidance, loras)


@dataclass(frozen=True)
class Batch:
    """Jobs to render together, with what the call needs around them.

    Attributes:
        jobs: Compatible jobs, in arrival order.
        progress: Reports each step to every job that asked for progress; raises, at a step's
            end, in a call the batcher's closing interrupts (:meth:`Batcher.close`).
        links: The span contexts of the requests the jobs came from (one trace each).
    """

    jobs: list[EnhancedPrompt]
    progress: ProgressCallback | None
    links: list[trace.SpanContext] = field(default_factory=list)


@dataclass(eq=False)
class _Waiting:
    job: EnhancedPrompt
    progress: ProgressCallback | None
    future: asyncio.Future[RenderOutput]
    context: contextvars.Context
    arrived: float
    """When it was queued: its window counts from then, however many calls ran before it."""
    taken: bool = False
    """Part of a call: it runs to the end whatever happens to its request."""
    on_start: Callable[[], None] | None = None
    """Told when its call is formed (on the loop, so nothing can come between)."""
    keep: bool = False
    """Its output is wanted once its request has gone (a stored render, which the retry finds
    in storage): its call runs to the end. Otherwise a call whose jobs' requests have all gone
    stops at its next step's end."""
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    """Set once its call has ended, the PNG encoding included."""
    held: bool = False
    """Its caller holds it on once its call has ended (storing its PNG) and says when it lets
    go (:meth:`Batcher.release`)."""


class Batcher:
    """Runs submitted jobs on one pipeline, one call at a time, compatible jobs together.

    Args:
        run: Renders a :class:`Batch` (blocking; called in a worker thread), one output per job;
            with ``finish``, returns what ``finish`` completes instead.
        lock: Held around every call (the pipeline's lock, shared with model loading).
        max_size: Most jobs in one call; 1 disables batching.
        window: Seconds the oldest job waits, from its arrival, for compatible jobs before its
            batch runs: a job that waited that long behind earlier calls runs at the next.
        finish: Completes what ``run`` returned (PNG encoding, blocking) on a thread of its
            own, handed over by ``run``'s thread: it overlaps the next call.
        clock: Monotonic seconds, for the window (a test's fake clock).
    """

    def __init__(
        self,
        run: Callable[[Batch], Any],
        lock: asyncio.Lock,
        *,
        max_size: int = 1,
        window: float = 0.0,
        finish: Callable[[Batch, Any], list[RenderOutput]] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._run = run
        self._finish = finish
        self._clock = clock
        self._lock = lock
        self.max_size = max_size
        self.window = window
        self._waiting: deque[_Waiting] = deque()
        self._changed = asyncio.Event()  # a job arrived, or one waiting has gone
        self._worker: asyncio.Future[None] | None = None
        # The pipeline always runs on one thread, the encoding on another: each keeps its own
        # memory and caches warm from one call to the next.
        self._pipeline = ThreadPoolExecutor(1, thread_name_prefix="imagegen-pipeline")
        self._encoder = ThreadPoolExecutor(1, thread_name_prefix="imagegen-encode")
        self._delivering: set[asyncio.Future[None]] = set()
        self._closed = threading.Event()  # read at each step's end, in the pipeline's thread
        self.running = 0
        self.running_since: float | None = None
        self._in_call: list[_Waiting] = []  # the running call's jobs
        self._finishing: set[_Waiting] = set()  # jobs whose call ended, outputs not delivered
        self._past_call: list[_Waiting] = []  # held jobs whose call ended, not yet let go
        self._stop: threading.Event | None = None  # set once the running call is not wanted
        self.cost = CallCost()
        """What a call costs for its work, fitted over the calls timed."""
        self.finish_seconds: float | None = None
        """Measured seconds from a call's end to its outputs, waiting for the encoding thread
        included: what each of its jobs still waits once the pipeline is free (None until one
        ended)."""

    def close(self) -> None:
        """Interrupt the call under way at its next denoising step; let the pipeline's and the
        encoding's threads end once their work is done.

        Only the end of the service closes the queue (a server never does: its started calls
        run on while someone waits for them, :meth:`submit`). What a call interrupted so made
        is dropped, nothing of it stored, and its jobs' requests are cancelled, as are those
        of the jobs still queued, before their calls form (so their ``on_start`` is never
        told); a process that exits then waits a step for the pipeline's thread rather than
        the rest of the call. A call past its last step (its pipeline decoding) has no step
        left to stop at: it is encoded and its jobs answered, since what is left of its work
        is the encoding alone.
        """
        self._closed.set()
        self._pipeline.shutdown(wait=False)
        self._encoder.shutdown(wait=False)

    @property
    def depth(self) -> int:
        """Jobs waiting or running."""
        return self.running + sum(1 for w in self._waiting if not w.future.done())

    @property
    def timed(self) -> bool:
        """Whether a call has been timed: admission follows :meth:`backlog` from then on."""
        return self.cost.timed

    def observe(self, seconds: float, jobs: Sequence[EnhancedPrompt]) -> None:
        """Fold one call of ``jobs`` that took ``seconds`` into :attr:`cost`."""
        self.cost.observe(sum(work_of(job) for job in jobs), seconds)

    def observe_finish(self, seconds: float) -> None:
        """Fold the seconds from one call's end to its outputs into :attr:`finish_seconds`."""
        self.finish_seconds = _smoothed(self.finish_seconds, seconds)

    def estimate(self, jobs: Sequence[EnhancedPrompt]) -> float | None:
        """Seconds one call of ``jobs`` should take (None until a call has been timed)."""
        if not self.cost.timed:
            return None
        return self.cost(sum(work_of(job) for job in jobs))

    def pending(self, jobs: Iterable[EnhancedPrompt]) -> dict[BatchKey, list[EnhancedPrompt]]:
        """Those of ``jobs`` that still need a call, by batch key: not in the running call,
        nor in one that has ended, its outputs being finished or, for a job submitted
        ``held``, delivered and its caller not done with them (storing its PNG: the pipeline
        owes it nothing). Each job object is counted once per time it is there."""
        done = Counter(id(w.job) for w in (*self._in_call, *self._finishing, *self._past_call))
        groups: dict[BatchKey, list[EnhancedPrompt]] = {}
        for job in jobs:
            if done[id(job)] > 0:
                done[id(job)] -= 1
                continue
            groups.setdefault(batch_key(job), []).append(job)
        return groups

    def calls(self, jobs: Iterable[EnhancedPrompt]) -> int:
        """The calls the pipeline runs before it is done with ``jobs``: the running one, and
        for each batch key ``ceil(n / max_size)`` (jobs of different keys never share one)."""
        groups = self.pending(jobs).values()
        return bool(self._in_call) + sum(math.ceil(len(g) / self.max_size) for g in groups)

    def backlog(
        self,
        jobs: Iterable[EnhancedPrompt],
        *,
        priced: Callable[[EnhancedPrompt], bool] | None = None,
    ) -> float | None:
        """Seconds until the pipeline is done with ``jobs`` (None until a call has been timed).

        The running call costs what is left of its estimate, or, once it has overrun that (a
        new shape compiling, a stalled device), its time so far: what it has taken, it may
        take again. A running call that stops (nobody waits for what it makes, or the queue
        closed) costs one step of its estimate: it ends at its next step's end. The jobs still
        waiting cost, per batch key, ``ceil(n / max_size)`` calls, each at :attr:`cost` for
        its own number of jobs: a call of fewer jobs than the calls timed, while those were
        all of one size, at their whole time (:class:`CallCost`). A running call of a job
        ``priced`` says the cost cannot tell costs its time so far, not a scaled estimate.
        """
        if not self.cost.timed:
            return None
        seconds = 0.0
        if self._in_call and priced is not None and not all(priced(w.job) for w in self._in_call):
            seconds += self.running_for  # what it has taken, it may take again
        elif self._in_call:
            estimate = self.cost(sum(work_of(w.job) for w in self._in_call))
            running = self.running_for
            if self._stopping:  # it ends at its next step's end (_Interrupted)
                seconds += estimate / max(1, self._in_call[0].job.steps)
            else:
                seconds += estimate - running if running < estimate else running
        for group in self.pending(jobs).values():
            full, rest = divmod(len(group), self.max_size)
            work = work_of(group[0])
            seconds += full * self.cost(self.max_size * work)
            seconds += self.cost(rest * work) if rest else 0.0
        return seconds

    def joins(self, job: EnhancedPrompt, jobs: Iterable[EnhancedPrompt]) -> bool:
        """Whether ``job`` would share a call with some of ``jobs`` still waiting."""
        group = self.pending(jobs).get(batch_key(job), [])
        return len(group) % self.max_size != 0

    @property
    def _stopping(self) -> bool:
        """Whether the running call stops at its next step's end."""
        stop = self._stop
        return self._closed.is_set() or (stop is not None and stop.is_set())

    @property
    def running_for(self) -> float:
        """Seconds the running call has run so far (0 with none running)."""
        since = self.running_since
        return time.perf_counter() - since if since is not None else 0.0

    async def submit(
        self,
        job: EnhancedPrompt,
        progress: ProgressCallback | None = None,
        *,
        on_start: Callable[[], None] | None = None,
        keep: bool = False,
        held: bool = False,
    ) -> RenderOutput:
        """Queue ``job`` and return its output once its batch has run.

        Cancelling the caller drops the job if its batch has not started (a batch window
        whose jobs have all gone ends at once). A batch that has started runs on for its
        other jobs, and to the end for a job to ``keep`` (a stored render: the retry finds
        its image); once the requests of all its jobs have gone and none is to be kept, it
        stops at its next step's end (a thread is stopped only there; :meth:`close` stops
        every call so). The cancelled caller returns (raises) only once that call has ended,
        so what it holds around this, an admission slot, stays held while the pipeline works
        for it. ``on_start`` is called when the job joins a call. A ``held`` job is one its
        caller goes on holding once its call has ended (to store its output): it is counted
        as done, never as a call still to run (:meth:`pending`), until :meth:`release`.
        """
        waiting = _Waiting(
            job,
            progress,
            asyncio.get_running_loop().create_future(),
            contextvars.copy_context(),
            self._clock(),
            on_start=on_start,
            keep=keep,
            held=held,
        )
        self._waiting.append(waiting)
        self._changed.set()
        if self._worker is None or self._worker.done():
            self._worker = asyncio.ensure_future(self._drain())
        try:
            return await waiting.future
        except asyncio.CancelledError:
            if not waiting.taken:
                self._changed.set()  # a window kept open for it alone ends now
            elif self._stop is not None and waiting in self._in_call and self._unwanted():
                self._stop.set()  # nobody waits for what the running call makes
            while waiting.taken and not waiting.ended.is_set():
                with contextlib.suppress(asyncio.CancelledError):  # cancelled again: still held
                    await waiting.ended.wait()
            raise

    async def _drain(self) -> None:
        while self._waiting:
            first = self._waiting[0]
            if first.future.done():  # cancelled while waiting
                self._waiting.popleft()
                continue
            key = batch_key(first.job)
            deadline = first.arrived + self.window  # windows queued behind calls never add up
            # The window waits for company while someone waits in it: once every job in it
            # has gone (their requests timed out), it ends, and nothing runs for them.
            while self.max_size > 1 and 0 < self._compatible(key) < self.max_size:
                remaining = deadline - self._clock()
                if remaining <= 0:
                    break
                self._changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), remaining)
            # A call forms only once it holds the pipeline (a model's load may hold it), and
            # never once the queue is closed: a job whose call never starts is not told it has
            # (``on_start``: a stored render writes its claim then).
            async with self._lock:
                if self._closed.is_set():
                    self._refuse_queued()
                    return
                batch = self._take(key)
                if batch:
                    await self._run_batch(batch)

    def release(self, job: EnhancedPrompt) -> None:
        """``job``, submitted ``held``, is no longer held by its caller: forget it. A job that
        never joined a call (cancelled while it waited, refused) is not there: nothing to do."""
        for index, waiting in enumerate(self._past_call):
            if waiting.job is job:
                del self._past_call[index]
                return

    def _refuse_queued(self) -> None:
        """The queue is closed: every job still waiting is cancelled, none of them run (their
        requests are refused as the stage's closing says)."""
        for waiting in self._waiting:
            waiting.future.cancel()
        self._waiting.clear()

    def _unwanted(self) -> bool:
        return all(w.future.cancelled() and not w.keep for w in self._in_call)

    def _compatible(self, key: BatchKey) -> int:
        return sum(1 for w in self._waiting if not w.future.done() and batch_key(w.job) == key)

    def _take(self, key: BatchKey) -> list[_Waiting]:
        taken: list[_Waiting] = []
        kept: deque[_Waiting] = deque()
        for waiting in self._waiting:
            if waiting.future.done():
                continue
            if len(taken) < self.max_size and batch_key(waiting.job) == key:
                waiting.taken = True
                if waiting.on_start is not None:
                    waiting.on_start()
                taken.append(waiting)
            else:
                kept.append(waiting)
        self._waiting = kept
        return taken

    async def _run_batch(self, batch: list[_Waiting]) -> None:
        """Run ``batch``'s call; the caller holds the pipeline's lock."""
        try:
            self.running, self.running_since = len(batch), time.perf_counter()
            self._in_call = batch
            try:
                outcome = await self._call(batch)
                calls: list[tuple[list[_Waiting], _Called | BaseException]]
                if not isinstance(outcome, BaseException) or len(batch) == 1:
                    calls = [(batch, outcome)]
                else:
                    # One job's failure is its own: run each alone to find which. One whose
                    # request has left needs no answer (a started stored render's task is
                    # never cancelled: its retry waits for the image).
                    calls = [
                        ([w], outcome if w.future.done() else await self._call([w])) for w in batch
                    ]
            finally:
                self.running, self.running_since, self._in_call = 0, None, []
        except BaseException as error:
            # Not an Exception (those come back as values): the jobs' requests get it too,
            # rather than wait for an answer that never comes.
            _fail(batch, error)
            self._end(batch)
            if isinstance(error, asyncio.CancelledError | KeyboardInterrupt | SystemExit):
                raise
            return  # the queue goes on with the next call
        # The pipeline is free for the next call: what is left (PNG encoding) overlaps it.
        self._finishing.update(batch)
        task = asyncio.ensure_future(self._deliver(batch, calls))
        self._delivering.add(task)  # held until done: the loop keeps only weak references
        task.add_done_callback(self._delivering.discard)

    async def _deliver(
        self, batch: list[_Waiting], calls: list[tuple[list[_Waiting], _Called | BaseException]]
    ) -> None:
        try:
            results: list[RenderOutput | BaseException] = []
            for jobs, called in calls:
                results += await self._complete(jobs, called)
            for waiting, result in zip(batch, results, strict=True):
                if waiting.future.done():  # its request was cancelled meanwhile
                    continue
                if isinstance(result, BaseException):
                    waiting.future.set_exception(result)
                else:
                    waiting.future.set_result(result)
        finally:
            self._finishing.difference_update(batch)
            self._end(batch)

    def _end(self, batch: list[_Waiting]) -> None:
        """Its call has ended for each job of ``batch``: those still held stay counted as done
        until their callers let go (:meth:`release`)."""
        for waiting in batch:
            if waiting.held:
                self._past_call.append(waiting)
            waiting.ended.set()

    async def _call(self, batch: list[_Waiting]) -> _Called | BaseException:
        """Run one call in a thread, in the first job's context; the error, if any, as a value.

        Returns as soon as the pipeline's part is done. The pipeline's thread hands what it
        made straight to the encoding thread for ``finish`` (no round trip through the loop),
        while the loop hands the pipeline to the next call; :meth:`_complete` awaits it.
        """
        progress_of = [w.progress for w in batch if w.progress is not None]
        closed = self._closed
        if closed.is_set():  # jobs queued when the queue closed: none of them runs
            raise _Interrupted
        stop = self._stop = threading.Event()

        def progress(step: int, total: int) -> None:
            # The one point of a call where it can stop: a backend reports each step's end.
            if closed.is_set() or stop.is_set():
                raise _Interrupted
            for report in progress_of:
                report(step, total)

        work = Batch(
            jobs=[w.job for w in batch],
            progress=progress,
            links=[w.context.run(_span_context) for w in batch],
        )
        loop = asyncio.get_running_loop()
        freed: asyncio.Future[Any] = loop.create_future()

        def call() -> None:
            try:
                outputs = self._run(work)
                # Past its last step: closing leaves it to be encoded and answered (its
                # image is made, only the encoding is left), but a call nobody waits for
                # any more is dropped.
                if stop.is_set():
                    raise _Interrupted
                if self._finish is not None:  # handed straight to the encoding thread
                    runner = contextvars.copy_context().run
                    # On a thread of its own where the pool refuses it: the interpreter is
                    # exiting, and the request waits for this image (_exiting).
                    outputs = _exiting.submit(
                        self._encoder, "imagegen-encode", runner, self._finish, work, outputs
                    )
            except BaseException as error:
                loop.call_soon_threadsafe(_settle, freed, error, None)
                raise
            loop.call_soon_threadsafe(_settle, freed, None, outputs)

        started = time.perf_counter()
        # A copy: a job run again alone (a failed batch) may start before this thread has left.
        runner = batch[0].context.copy().run
        # On a thread of its own where the pool refuses it: the interpreter is exiting, with
        # jobs queued before it began whose requests wait (_exiting).
        handed_over = _exiting.submit(self._pipeline, "imagegen-pipeline", runner, call)
        ran = asyncio.wrap_future(handed_over)
        ran.add_done_callback(_retrieve)  # its error, if any, reaches the jobs through ``freed``
        try:
            handed = await freed
        except Exception as error:  # handed to the jobs' requests, which raise it
            return error
        ended = time.perf_counter()
        self.observe(ended - started, [waiting.job for waiting in batch])
        if self._finish is None:
            finished: asyncio.Future[Any] = loop.create_future()
            finished.set_result(handed)
        else:
            finished = asyncio.wrap_future(handed)
        return _Called(work, finished, ended)

    async def _complete(
        self, batch: list[_Waiting], called: _Called | BaseException
    ) -> list[RenderOutput | BaseException]:
        """Each job's output (or error) from a call, once its ``finish`` has run too."""
        if isinstance(called, BaseException):
            return [called] * len(batch)
        try:
            finished = await called.finished
        except Exception as error:
            return [error] * len(batch)
        self.observe_finish(time.perf_counter() - called.ended)
        return list(finished)


class _Interrupted(BaseException):
    """Raised in the pipeline's thread, from the report of a step's end, by a call the
    batcher's closing interrupts (:meth:`Batcher.close`), or one that nobody waits for any more
    (:meth:`Batcher.submit`).

    No :class:`Exception`, as a cancellation is not: a backend's or the stage's ``except
    Exception`` lets it through, so it is neither logged as a failed render nor run again.
    Raised rather than setting a diffusers pipeline's interrupt flag: with that flag the
    pipeline still decodes the half-denoised latents, an image nobody wants, which at large
    sizes takes as long as several steps.
    """


@dataclass(frozen=True)
class _Called:
    work: Batch
    finished: asyncio.Future[Any]
    """The outputs: ``run``'s, completed by ``finish`` when there is one."""
    ended: float
    """When the pipeline's part ended (``time.perf_counter``)."""


def _smoothed(previous: float | None, sample: float) -> float:
    return sample if previous is None else previous + _SMOOTHING * (sample - previous)


def _fail(batch: list[_Waiting], error: BaseException) -> None:
    for waiting in batch:
        if waiting.future.done():
            continue
        # An interrupted call's jobs are cancelled: the service closing has ended them.
        if isinstance(error, asyncio.CancelledError | _Interrupted):
            waiting.future.cancel()
        else:
            waiting.future.set_exception(error)


def _settle(future: asyncio.Future[Any], error: BaseException | None, result: Any) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(result)
    else:
        future.set_exception(error)


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def _span_context() -> trace.SpanContext:
    return trace.get_current_span().get_span_context()
