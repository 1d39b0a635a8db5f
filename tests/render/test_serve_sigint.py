"""A served render told to exit at once (SIGINT: gunicorn's worker leaves its main thread with
``sys.exit``) while a render is under way: its request is answered, never failed."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from imagegen.errors import DependencyUnavailable
from tests.functions.conftest import base_env
from tests.functions.servers import FunctionServer, free_port
from tests.render.test_batching import BatchingBackend, _until_queued, job, make_stage


def _port() -> int:
    return free_port()


@pytest.mark.slow
def test_sigint_during_a_render_answers_its_request(tmp_path: Path) -> None:
    store = tmp_path / "store"
    # Two threads per PNG: the parallel encoder's pool, made at the first image, is refused
    # as well once the interpreter exits.
    env = {**base_env(store), "WORKERS": "1", "IMAGEGEN_PNG_ENCODE_THREADS": "2"}
    # A new interpreter, as in the container: a process forked from the suite's preloaded
    # one ends without the interpreter's exit.
    server = FunctionServer("render", env, log_dir=tmp_path, fresh=True)
    server.port = _port()
    server.url = f"http://127.0.0.1:{server.port}"
    server.env["PORT"] = str(server.port)
    replies: list[httpx.Response] = []
    body = {"prompt": "a red door", "width": 256, "height": 256, "steps": 12, "seed": 5}
    with server:
        server.wait("/readyz")
        assert server.process is not None
        worker = server.worker()
        request = threading.Thread(target=lambda: replies.append(server.post("/", json=body)))
        request.start()
        server.logged("rendering")
        os.kill(worker, signal.SIGINT)  # Ctrl-C, as gunicorn's worker gets it
        request.join(120)
        deadline = time.monotonic() + 60
        while Path(f"/proc/{worker}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
    logs = server.logs()
    assert not Path(f"/proc/{worker}").exists(), logs  # it has exited
    [reply] = replies
    if reply.status_code == 200:  # the render ended, and its image is stored
        rendered = reply.json()
        assert (store / rendered["key"]).stat().st_size == rendered["size"], logs
    else:  # or it was stopped, and the job is sent again
        assert reply.status_code == 503, (reply.text, logs)
        assert reply.json()["retryable"] and int(reply.headers["Retry-After"]) > 0
    assert "Traceback" not in logs, logs
    assert not [r for r in server.log_records() if r.get("status") == 500], logs


async def test_a_closing_stage_refuses_the_requests_still_waiting_as_retryable(
    tmp_path: Path,
) -> None:
    backend = BatchingBackend()
    backend.gate.clear()
    stage = make_stage(backend, tmp_path, render_batch_size=1)
    running = asyncio.ensure_future(stage.render(job("running")))  # stored
    await asyncio.to_thread(backend.running.wait, 10)
    queued = asyncio.ensure_future(stage.render_png(job("queued")))  # behind it
    await _until_queued(stage, 2)
    stage.close()  # the process exits with both requests waiting: the call stops at its step
    backend.gate.set()
    for refused in await asyncio.gather(running, queued, return_exceptions=True):
        assert isinstance(refused, DependencyUnavailable), refused
        assert refused.retryable and refused.retry_after
    assert backend.calls == [["running"]]  # the queued job never ran
    assert not list(tmp_path.rglob("*.png"))  # nothing of the stopped call is stored


async def test_a_request_cancelled_itself_is_still_cancelled_when_the_stage_closes(
    tmp_path: Path,
) -> None:
    backend = BatchingBackend()
    backend.gate.clear()
    stage = make_stage(backend, tmp_path, render_batch_size=1)
    gone = asyncio.ensure_future(stage.render_png(job("gone")))
    await asyncio.to_thread(backend.running.wait, 10)
    gone.cancel()  # its request timed out
    stage.close()
    backend.gate.set()
    with pytest.raises(asyncio.CancelledError):
        await gone


_EXITING = """
import asyncio, sys, threading
from pathlib import Path
from imagegen.render.stage import RenderStage
from imagegen.settings import Settings
from imagegen.storage import LocalStorage
from tests.render.test_batching import TwoPhaseBackend, job

backend = TwoPhaseBackend()
backend.seconds = 0.5  # the pipeline's part: still running when the main thread has left
stage = RenderStage(Settings(), LocalStorage(Path(sys.argv[1])), lambda: backend)
loop = asyncio.new_event_loop()
threading.Thread(target=loop.run_forever, daemon=True).start()

def request():  # a server's request thread: no daemon, it waits for its answer
    future = asyncio.run_coroutine_threadsafe(stage.render_png(job("late")), loop)
    print(future.result(30).png.decode("latin-1"), flush=True)

threading.Thread(target=request).start()
backend.running.wait(10)
sys.exit(0)  # as gunicorn's worker leaves at SIGINT: the interpreter exits, threads joined
"""


def test_a_render_under_way_as_the_interpreter_exits_is_encoded(tmp_path: Path) -> None:
    import subprocess
    import sys

    from tests.conftest import ROOT

    done = subprocess.run(
        [sys.executable, "-c", _EXITING, str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "\x89PNG late\n", done.stderr
    assert "Traceback" not in done.stderr, done.stderr


_ENCODING_AT_EXIT = """
import hashlib, sys, threading
from PIL import Image
from imagegen.render.png import encode_png

image = Image.radial_gradient("L").convert("RGB").resize((512, 512))
options = {"text": {"prompt": "a red door"}, "level": 6, "strategy": "default", "threads": 2}
print(hashlib.sha256(encode_png(image, **options)).hexdigest(), flush=True)
left = threading.Event()

def encode():  # a render's PNG, encoded once the main thread has left
    left.wait(10)
    threading.main_thread().join()
    print(hashlib.sha256(encode_png(image, **options)).hexdigest(), flush=True)

threading.Thread(target=encode).start()
left.set()
sys.exit(0)
"""


def test_a_png_encoded_in_parts_as_the_interpreter_exits_is_the_same_file() -> None:
    import subprocess
    import sys

    from tests.conftest import ROOT

    done = subprocess.run(
        [sys.executable, "-c", _ENCODING_AT_EXIT], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    hashes = done.stdout.split()  # before the exit, and during it
    assert len(hashes) == 2 and hashes[0] == hashes[1], done.stderr
