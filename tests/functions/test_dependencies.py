"""Dependencies down, capacity, crashes: retryable answers, and nothing lost or doubled.

Functions run in this process (the framework's app) except where the process itself is the
subject: a render killed mid-request, and one whose model is still loading at start-up.
"""

from __future__ import annotations

import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from imagegen.events import GENERATION_REQUESTED, IMAGE_RENDERED, PROMPT_ENHANCED
from tests.enhance.conftest import FakeOllama
from tests.fakes.render_backend import enhanced_prompt
from tests.fakes.s3_server import SECRET_ACCESS_KEY, S3Server
from tests.functions.clients import InProcessFunction
from tests.functions.conftest import StartServer, base_env, s3_env
from tests.functions.servers import post_event

KILLED_SIZE, KILLED_STEPS = 1024, 2


def _job(generation_id: str, *, size: int = 256, steps: int = 2) -> dict[str, Any]:
    """What enhance would send render: a prompt.enhanced event's data."""
    job = enhanced_prompt(
        generation_id=generation_id, prompt="a slow painting", width=size, height=size, steps=steps
    )
    return job.model_dump(mode="json")


def test_ollama_down_falls_back_or_503(tmp_path: Path) -> None:
    env = base_env(tmp_path / "store")
    with InProcessFunction("enhance", env) as fallback:
        reply = post_event(
            fallback, GENERATION_REQUESTED, {"prompt": "a harbour"}, subject="ollama-down-1"
        )
    assert reply.status_code == 200
    assert reply.json()["fallback"] is True and reply.json()["enhancer"] == "template"

    with InProcessFunction("enhance", {**env, "IMAGEGEN_ENHANCE_FALLBACK": "false"}) as strict:
        refused = post_event(
            strict, GENERATION_REQUESTED, {"prompt": "a harbour"}, subject="ollama-down-2"
        )
    assert refused.status_code == 503
    assert int(refused.headers["retry-after"]) > 0
    assert refused.json()["retryable"] is True


def test_ollama_up_writes_the_prompt(tmp_path: Path) -> None:
    with FakeOllama() as ollama:
        ollama.reply_with('{"prompt": "a quiet harbour at dawn, mist over the water"}')
        env = {**base_env(tmp_path / "store"), "IMAGEGEN_OLLAMA_HOST": ollama.url}
        with InProcessFunction("enhance", env) as enhance:
            reply = post_event(
                enhance, GENERATION_REQUESTED, {"prompt": "a harbour"}, subject="ollama-up-1"
            )
        assert reply.status_code == 200, reply.text
        data = reply.json()
        assert data["fallback"] is False and data["enhancer"].startswith("ollama:")
        assert data["prompt"].startswith("a quiet harbour at dawn")


def test_storage_down_is_503_and_the_same_event_succeeds_later(tmp_path: Path) -> None:
    with S3Server() as s3:
        s3.create_bucket("images")
        env = {**base_env(tmp_path / "unused"), **s3_env(s3, "s3://images")}
        job = _job("storage-down-1")
        with InProcessFunction("render", env) as render:
            s3.down()
            refused = post_event(
                render, PROMPT_ENHANCED, job, subject="storage-down-1", event_id="r-1"
            )
            assert refused.status_code == 503, refused.text
            assert int(refused.headers["retry-after"]) > 0
            assert refused.json()["retryable"] is True
            assert SECRET_ACCESS_KEY not in refused.text

            s3.up()
            accepted = post_event(
                render, PROMPT_ENHANCED, job, subject="storage-down-1", event_id="r-1"
            )
        assert accepted.status_code == 200, accepted.text
        assert accepted.headers["ce-type"] == IMAGE_RENDERED


def test_render_at_capacity_answers_429(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from imagegen.render.diffusers_backend import DiffusersBackend

    env = {**base_env(tmp_path / "store"), "IMAGEGEN_RENDER_QUEUE_SIZE": "0"}
    with InProcessFunction("render", env) as render:
        # The first render holds the pipeline until the others have been answered.
        rendering, release = threading.Event(), threading.Event()
        denoise_batch = DiffusersBackend.denoise_batch

        def held(self: DiffusersBackend, jobs: Any, **kwargs: Any) -> Any:
            rendering.set()
            assert release.wait(60)
            return denoise_batch(self, jobs, **kwargs)

        monkeypatch.setattr(DiffusersBackend, "denoise_batch", held)
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(render.post, "/", json=_job("busy-0"))
            assert rendering.wait(60), "the first render never started"
            refused = [render.post("/", json=_job(f"busy-{i}")) for i in (1, 2)]
            release.set()
            accepted = first.result(timeout=120)
    assert accepted.status_code == 200, accepted.text
    for reply in refused:
        assert reply.status_code == 429, reply.text
        assert int(reply.headers["retry-after"]) > 0
        assert reply.json()["error"] == "overloaded"


@pytest.mark.slow
def test_render_killed_mid_request_produces_the_image_once(
    start_server: StartServer, tmp_path: Path
) -> None:
    store = tmp_path / "store"
    env = base_env(store)
    render = start_server("render", env)
    render.wait("/readyz", timeout=120)
    # Long enough to be caught inside its pipeline call: the kill follows the log line by
    # milliseconds, and the render takes seconds.
    job = _job("killed-1", size=KILLED_SIZE, steps=KILLED_STEPS)

    outcome: list[object] = []

    def deliver() -> None:
        try:
            outcome.append(
                post_event(render.url, PROMPT_ENHANCED, job, subject="killed-1", event_id="k-1")
            )
        except httpx.HTTPError as exc:
            outcome.append(exc)

    sender = threading.Thread(target=deliver)
    sender.start()
    # Kill it once the pipeline call has begun: inside the denoising loop.
    deadline = time.monotonic() + 120
    while not any(
        r.get("message") == "rendering" and "killed-1" in r.get("generation_ids", [])
        for r in render.log_records()
    ):
        assert time.monotonic() < deadline, "the render never started"
        assert sender.is_alive(), f"the delivery ended before the render started: {outcome}"
        time.sleep(0.02)  # polling the log, not waiting on an assumed duration
    render.kill()
    sender.join(30)
    assert outcome and isinstance(outcome[0], httpx.HTTPError), "the delivery should have failed"
    assert not list(store.rglob("killed-1*.png")), "a killed render leaves no partial image"

    # The broker redelivers to another replica: a render started afresh on the same store.
    with InProcessFunction("render", env) as again:
        first = post_event(again, PROMPT_ENHANCED, job, subject="killed-1", event_id="k-1")
        second = post_event(again, PROMPT_ENHANCED, job, subject="killed-1", event_id="k-1")
    assert first.status_code == second.status_code == 200
    assert first.json() == second.json()
    stored = sorted(
        p.relative_to(store).parts[0] + "/" + p.name
        for p in store.rglob("killed-1*")
        if not p.name.startswith(".")
    )
    # The image once, and the id's claim on its key (render/stored_png.py: claim).
    assert [s for s in stored if not s.startswith("renders/")] == [
        s for s in stored if s.endswith("/killed-1.png")
    ]
    assert len(stored) == 2 and "renders/killed-1.json" in stored


def test_render_is_not_ready_while_its_model_loads(
    start_server: StartServer, tmp_path: Path
) -> None:
    # A model hub that accepts connections and never answers: the model load hangs in the
    # download, exactly where a cold start spends its time.
    hub = socket.socket()
    hub.bind(("127.0.0.1", 0))
    hub.listen(16)
    env = {
        **base_env(tmp_path / "store"),
        "IMAGEGEN_MODEL": "black-forest-labs/FLUX.1-schnell",
        "IMAGEGEN_ALLOWED_MODELS": "black-forest-labs/FLUX.1-schnell",
        "HF_HUB_OFFLINE": "0",
        "HF_ENDPOINT": f"http://127.0.0.1:{hub.getsockname()[1]}",
        "HF_HOME": str(tmp_path / "hf"),
        # Past any test's patience: the hub's silence, not a client timeout, ends nothing
        # (huggingface_hub/constants.py reads both; 10 s each by default).
        "HF_HUB_ETAG_TIMEOUT": "600",
        "HF_HUB_DOWNLOAD_TIMEOUT": "600",
    }
    downloads: list[socket.socket] = []
    try:
        render = start_server("render", env, fresh=True)  # importing is one of the phases
        assert httpx.get(render.url + "/healthz").status_code == 200
        for phase in ("importing", "downloading"):
            if phase == "downloading":  # the load has reached the hub: it hangs there now
                hub.settimeout(120)
                downloads.append(hub.accept()[0])
            ready = httpx.get(render.url + "/readyz")
            assert ready.status_code == 503 and ready.json()["status"] == "loading", phase
            assert int(ready.headers["retry-after"]) > 0
            early = httpx.post(render.url, json={"generation_id": "early"}, timeout=10)
            assert early.status_code == 503 and int(early.headers["retry-after"]) > 0
            assert early.json()["retryable"] is True
        # Stopped while its load hangs (a pod scaled down during its start): it exits on
        # SIGTERM, not killed once FunctionServer.stop's grace period is over.
        render.stop()
        assert render.process is not None
        assert render.process.returncode == 0, render.logs()[-2000:]
    finally:
        for connection in downloads:
            connection.close()
        hub.close()
