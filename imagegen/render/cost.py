"""What a pipeline call costs: its work (:func:`work_of`) and the seconds fitted to it
(:class:`CallCost`), which render's admission adds up per call (:mod:`imagegen.render.batching`).
"""

from __future__ import annotations

from collections import deque

from imagegen.models import EnhancedPrompt

__all__ = ["SCALED_AT_MOST", "CallCost", "work_of"]

# Calls the cost of a call is fitted over: enough to average out noise, few enough to follow a
# change (a recompiled shape, another LoRA set) within a few calls.
_CALLS_FITTED = 16

# While the calls timed are all of one work w0, the most a job's work may exceed it and still be
# estimated from them (CallCost.measures). A call of work w above w0 is then put at
# t0 x w / w0, the most it takes on any line of non-negative parts through (w0, t0); it takes
# at least t0 on every such line, so the estimate is at most w / w0 times too long: within a
# factor of 2, a queue at least half as long as it could be. Beyond it the error grows with
# the work, as the overhead in t0 is multiplied too: one 256² call of 1 step, 1.5 s of it
# overhead, put a 1024² call of 8 steps at 190 s where it took 4 s, and a burst of them was
# refused for minutes of work that took seconds. Such a job is admitted as jobs are before any
# call is timed (counted), until a call of another work fits the line's two parts, which then
# scales only the part that grows with the work.
SCALED_AT_MOST = 2.0


def work_of(job: EnhancedPrompt) -> int:
    """What ``job`` asks of the pipeline, relatively: its pixels times its steps.

    A denoising step's cost grows with the latents it works on, so a call's time grows with
    the work of its jobs together (pixels x steps x images) about as this does; what does not
    grow with it is the call's overhead (:class:`CallCost`).
    """
    return job.width * job.height * job.steps


class CallCost:
    """Seconds a pipeline call takes for its work: ``overhead + rate x work``.

    ``work`` is the :func:`work_of` of a call's jobs together. The line is fitted by least
    squares over the last calls timed (a bounded window), so it scales down as well as up: a
    small job after a large one costs the overhead and its own share, not the large job's
    time, and a batch of images that costs little more than one image is taken to. A fit that
    makes either part negative (noise between calls of close sizes) keeps the other alone.

    While the calls timed are all of one work ``w0`` (one call, say, or only full batches),
    the overhead cannot be told from the rate, and a call of work ``w`` is taken to cost
    ``t0 x max(1, w / w0)``, ``t0`` their mean time: what a call of work ``w`` takes at most
    on any line with both parts non-negative through ``(w0, t0)``. Taken in proportion
    instead, a batch of one image after full ones would cost a share of a call that on a GPU
    costs as much as the full one, and admission would take jobs the pod must time out;
    taken as all overhead, a full batch after one image would cost that image's time. The
    first call of another size fits both parts (the warm-up with batching times two sizes:
    one image, then a full batch). Meanwhile a work over ``SCALED_AT_MOST`` times ``w0`` is
    one the calls timed do not measure (:meth:`measures`): admission counts its jobs instead.
    """

    def __init__(self, window: int = _CALLS_FITTED) -> None:
        self._calls: deque[tuple[float, float]] = deque(maxlen=window)
        self.overhead = 0.0
        """Seconds of a call whatever its work (text encoding, VAE set-up, launch)."""
        self.rate = 0.0
        """Seconds per unit of work."""
        self.floor = 0.0
        """Seconds no call is taken to take less than: while the calls timed are all of one
        work, their mean time (a smaller call may cost all of it); 0 once the line is fitted."""

    @property
    def timed(self) -> bool:
        """Whether any call has been timed."""
        return bool(self._calls)

    def measures(self, work: float) -> bool:
        """Whether the calls timed tell what a job of ``work`` costs: once calls of two works
        have fitted the line, any work; while they are all of one work, a smaller one (at most
        their time) or one up to ``SCALED_AT_MOST`` times theirs (in proportion)."""
        works = {done for done, _ in self._calls}
        return len(works) > 1 or any(work <= SCALED_AT_MOST * done for done in works)

    def observe(self, work: float, seconds: float) -> None:
        """Fold one call of ``work`` that took ``seconds`` into the fit."""
        self._calls.append((work, seconds))
        count = len(self._calls)
        mean_work = sum(w for w, _ in self._calls) / count
        mean_seconds = sum(t for _, t in self._calls) / count
        spread = sum((w - mean_work) ** 2 for w, _ in self._calls)
        self.floor = 0.0
        if mean_work <= 0:
            self.overhead, self.rate = mean_seconds, 0.0
            return
        if spread <= 0:  # one work only: its time below it, in proportion above it
            self.overhead, self.rate = 0.0, mean_seconds / mean_work
            self.floor = mean_seconds
            return
        rate = sum((w - mean_work) * (t - mean_seconds) for w, t in self._calls) / spread
        overhead = mean_seconds - rate * mean_work
        if rate < 0:  # no measurable growth with the work: a constant
            self.overhead, self.rate = mean_seconds, 0.0
        elif overhead < 0:  # no measurable overhead: through the origin
            squares = sum(w * w for w, _ in self._calls)
            self.overhead, self.rate = 0.0, sum(w * t for w, t in self._calls) / squares
        else:
            self.overhead, self.rate = overhead, rate

    def __call__(self, work: float) -> float:
        """Seconds a call of ``work`` should take (meaningful once :attr:`timed`): the mean
        time of the calls of that very work in the window, where there are some, else the
        fitted line's, never below :attr:`floor`.

        A call's time grows faster than its work at larger sizes (attention over more
        tokens, the VAE), so a line through one 2048² call and a few 1024² ones would put
        the next 1024² call at several times what such calls take; the calls of its own
        work say it best.
        """
        same = [seconds for done, seconds in self._calls if done == work]
        if same:
            return sum(same) / len(same)
        return max(self.floor, self.overhead + self.rate * work)
