"""Dependencies down, capacity, crashes: retryable answers, and nothing lost or doubled."""

from __future__ import annotations

import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from imagegen.events import GENERATION_REQUESTED, IMAGE_RENDERED, PROMPT_ENHANCED
from tests.enhance.conftest import FakeOllama
from tests.fakes.s3_server import SECRET_ACCESS_KEY, S3Server
from tests.functions.conftest import StartServer, base_env, s3_env
from tests.functions.servers import post_event


def _job(enhance_url: str, **request: object) -> dict:
    reply = httpx.post(enhance_url, json={"prompt": "a slow painting", **request}, timeout=60)
    assert reply.status_code == 200, reply.text
    return reply.json()


def test_ollama_down_falls_back_or_503(start_server: StartServer, tmp_path: Path) -> None:
    env = base_env(tmp_path / "store")
    fallback = start_server("enhance", env)
    reply = post_event(
        fallback.url, GENERATION_REQUESTED, {"prompt": "a harbour"}, subject="ollama-down-1"
    )
    assert reply.status_code == 200
    assert reply.json()["fallback"] is True and reply.json()["enhancer"] == "template"

    strict = start_server("enhance", {**env, "IMAGEGEN_ENHANCE_FALLBACK": "false"})
    refused = post_event(
        strict.url, GENERATION_REQUESTED, {"prompt": "a harbour"}, subject="ollama-down-2"
    )
    assert refused.status_code == 503
    assert int(refused.headers["retry-after"]) > 0
    assert refused.json()["retryable"] is True


def test_ollama_up_writes_the_prompt(start_server: StartServer, tmp_path: Path) -> None:
    with FakeOllama() as ollama:
        ollama.reply_with('{"prompt": "a quiet harbour at dawn, mist over the water"}')
        env = {**base_env(tmp_path / "store"), "IMAGEGEN_OLLAMA_HOST": ollama.url}
        server = start_server("enhance", env)
        reply = post_event(
            server.url, GENERATION_REQUESTED, {"prompt": "a harbour"}, subject="ollama-up-1"
        )
        assert reply.status_code == 200, reply.text
        data = reply.json()
        assert data["fallback"] is False and data["enhancer"].startswith("ollama:")
        assert data["prompt"].startswith("a quiet harbour at dawn")


def test_storage_down_is_503_and_the_same_event_succeeds_later(
    start_server: StartServer, tmp_path: Path
) -> None:
    with S3Server() as s3:
        s3.create_bucket("images")
        env = {**base_env(tmp_path / "unused"), **s3_env(s3, "s3://images")}
        enhance = start_server("enhance", env)
        render = start_server("render", env)
        render.wait("/readyz", timeout=120)
        job = _job(enhance.url, width=256, height=256, generation_id="storage-down-1")

        s3.down()
        refused = post_event(
            render.url, PROMPT_ENHANCED, job, subject="storage-down-1", event_id="r-1"
        )
        assert refused.status_code == 503, refused.text
        assert int(refused.headers["retry-after"]) > 0
        assert refused.json()["retryable"] is True
        assert SECRET_ACCESS_KEY not in refused.text

        s3.up()
        accepted = post_event(
            render.url, PROMPT_ENHANCED, job, subject="storage-down-1", event_id="r-1"
        )
        assert accepted.status_code == 200, accepted.text
        assert accepted.headers["ce-type"] == IMAGE_RENDERED


def test_render_at_capacity_answers_429(start_server: StartServer, tmp_path: Path) -> None:
    env = {**base_env(tmp_path / "store"), "IMAGEGEN_RENDER_QUEUE_SIZE": "0"}
    enhance = start_server("enhance", env)
    render = start_server("render", env)
    render.wait("/readyz", timeout=120)
    jobs = [
        _job(enhance.url, width=1024, height=1024, steps=30, generation_id=f"busy-{i}")
        for i in range(3)
    ]
    with ThreadPoolExecutor(3) as pool:
        replies = list(pool.map(lambda job: httpx.post(render.url, json=job, timeout=300), jobs))
    statuses = sorted(r.status_code for r in replies)
    assert statuses[0] == 200 and 429 in statuses, statuses
    for reply in replies:
        if reply.status_code == 429:
            assert int(reply.headers["retry-after"]) > 0
            assert reply.json()["error"] == "overloaded"


def test_render_killed_mid_request_produces_the_image_once(
    start_server: StartServer, tmp_path: Path
) -> None:
    store = tmp_path / "store"
    env = base_env(store)
    enhance = start_server("enhance", env)
    render = start_server("render", env)
    render.wait("/readyz", timeout=120)
    job = _job(enhance.url, width=1024, height=1024, steps=40, generation_id="killed-1")

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

    again = start_server("render", env)
    again.wait("/readyz", timeout=120)
    first = post_event(
        again.url, PROMPT_ENHANCED, job, subject="killed-1", event_id="k-1", timeout=300
    )
    second = post_event(
        again.url, PROMPT_ENHANCED, job, subject="killed-1", event_id="k-1", timeout=300
    )
    assert first.status_code == second.status_code == 200
    assert first.json() == second.json()
    stored = sorted(p.name for p in store.rglob("killed-1*") if not p.name.startswith("."))
    assert stored == ["killed-1.png", "killed-1.prompt.json"]


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
    }
    try:
        render = start_server("render", env)
        assert httpx.get(render.url + "/healthz").status_code == 200
        for _ in range(3):
            ready = httpx.get(render.url + "/readyz")
            assert ready.status_code == 503 and ready.json()["status"] == "loading"
            assert int(ready.headers["retry-after"]) > 0
            time.sleep(0.3)
        early = httpx.post(render.url, json={"generation_id": "early"}, timeout=10)
        assert early.status_code == 503 and int(early.headers["retry-after"]) > 0
        assert early.json()["retryable"] is True
    finally:
        hub.close()
