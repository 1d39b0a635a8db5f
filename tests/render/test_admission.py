"""Admission once renders are timed: what a job is taken to cost, and what follows its call."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.render.test_batching import BatchingBackend, TwoPhaseBackend, job, make_stage


async def test_admission_leaves_room_for_what_follows_the_last_call(tmp_path: Path) -> None:
    stage = make_stage(BatchingBackend(), tmp_path, render_timeout=10)
    stage.batcher.observe(1.0, 1)
    stage.batcher.observe_finish(2.0)  # its PNG is encoded once the pipeline is done with it
    assert stage.capacity == 8  # (10 s - 2 s) / 1 s per job
    stage._held = [job(f"held-{i}") for i in range(7)]
    assert stage.admits(job("eighth"))  # 8 x 1 s, then 2 s of encoding: 10 s
    stage._held.append(job("eighth"))
    assert not stage.admits(job("ninth"))  # its image would be encoded after the timeout


async def test_the_time_from_a_call_to_its_outputs_is_measured(tmp_path: Path) -> None:
    backend = TwoPhaseBackend()
    backend.encode_seconds = 0.2
    stage = make_stage(backend, tmp_path)
    assert stage.batcher.finish_seconds is None
    await stage.render_png(job("a"))
    finish = stage.batcher.finish_seconds
    # The encode's 0.2 s sleep, read on another clock than the one that slept: a few
    # microseconds either way (0.19998 s was seen), never the near-zero of a call left out.
    assert finish is not None and finish >= 0.19


async def test_a_small_job_is_never_estimated_below_the_measured_time_per_job(
    tmp_path: Path,
) -> None:
    # One 1024² job of 8 steps took 1 s: a 256² job of 2 steps is 1/64 of its work, but its
    # text encoding, VAE decode and PNG do not shrink with it.
    stage = make_stage(BatchingBackend(), tmp_path, render_timeout=10)
    stage.batcher.observe(1.0, 1, 1024 * 1024 * 8)
    small = job("small", width=256, height=256, steps=2)
    assert stage.batcher.estimate(small) == 1.0
    larger = job("larger", width=1024, height=1024, steps=16)
    assert stage.batcher.estimate(larger) == pytest.approx(2.0)  # larger jobs still scale
    stage._held = [small] * 9
    assert stage.admits(small)  # 10 x 1 s
    stage._held.append(small)
    assert not stage.admits(small)
