"""``imagegen doctor`` against what fails a generation later: a model cache cut short, a full
disk, a ledger function that refuses the key, a server that takes connections and never
answers, a name longer than the file system allows, settings that cannot work.

Each runs the command line in this process (``cli``) against real files, sockets and HTTP
servers on loopback.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from imagegen.cli._ollama import ollama_advice
from imagegen.settings import Settings
from tests.conftest import RunCli
from tests.fakes.ollama_server import FakeOllama

MODEL = "black-forest-labs/FLUX.2-klein-4B"
REVISION = "e7b7dc27f91deacad38e78976d1f2b499d76a294"  # the revision render loads it at
LONG = "a" * 300  # longer than any file system's NAME_MAX (255)


def _rows(stdout: str) -> dict[str, dict[str, str]]:
    return {row["check"]: row for row in json.loads(stdout)["checks"]}


@pytest.fixture
def online(monkeypatch: pytest.MonkeyPatch) -> None:
    """As where the Hub may be asked: the tests' package sets ``HF_HUB_OFFLINE=1``, which
    huggingface_hub reads as it is imported."""
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "is_offline_mode", lambda: False)


# -- The model --------------------------------------------------------------------------------


def _pipeline(folder: Path, *, damaged: bool = False) -> Path:
    """A pipeline's ``model_index.json`` naming a transformer and a VAE, neither of them there
    (a pull cut short); ``damaged``: the file itself cut short."""
    folder.mkdir(parents=True)
    index = {
        "_class_name": "Flux2KleinPipeline",
        "transformer": ["diffusers", "Flux2Transformer2DModel"],
        "vae": ["diffusers", "AutoencoderKLFlux2"],
    }
    text = json.dumps(index)
    (folder / "model_index.json").write_text(text[:20] if damaged else text)
    return folder


@pytest.mark.parametrize("damaged", [False, True], ids=["components-missing", "index-cut"])
@pytest.mark.usefixtures("online")
def test_doctor_fails_a_cached_model_that_models_list_calls_incomplete(
    cli: RunCli, tmp_path: Path, damaged: bool
) -> None:
    cache = tmp_path / "cache"
    name = "models--" + MODEL.replace("/", "--")
    _pipeline(cache / name / "snapshots" / REVISION, damaged=damaged)
    env = {
        "IMAGEGEN_MODEL": MODEL,
        "IMAGEGEN_SERVED_MODELS": MODEL,
        "IMAGEGEN_MODEL_CACHE_DIR": str(cache),
    }
    listed = {
        row["model"]: row for row in json.loads(cli("models", "list", "--json", env=env).stdout)
    }
    assert listed[MODEL]["here"] == "incomplete"

    result = cli("doctor", "--json", env=env)
    assert result.returncode == 1, result.stderr
    row = _rows(result.stdout)["model"]
    assert row["status"] == "error"
    said = "model_index.json" if damaged else "its transformer is missing"
    assert row["summary"].startswith(f"Model {MODEL} is incomplete in the model cache: {said}")
    assert f"imagegen models pull {MODEL}" in row["next_step"]


def test_doctor_fails_a_pipeline_directory_render_cannot_load(cli: RunCli, tmp_path: Path) -> None:
    folder = _pipeline(tmp_path / "pipeline")
    env = {"IMAGEGEN_MODEL": str(folder), "IMAGEGEN_SERVED_MODELS": str(folder)}
    result = cli("doctor", "--json", env=env)
    assert result.returncode == 1, result.stderr
    row = _rows(result.stdout)["model"]
    assert row["status"] == "error"
    assert row["summary"] == (
        f"Pipeline directory {folder} is incomplete: its transformer is missing."
    )


def test_doctor_fails_a_model_not_cached_when_the_hub_is_not_asked(
    cli: RunCli, tmp_path: Path
) -> None:
    """``HF_HUB_OFFLINE=1`` (set for the tests' process): every render fails, not only the
    first image's download."""
    env = {
        "IMAGEGEN_MODEL": MODEL,
        "IMAGEGEN_SERVED_MODELS": MODEL,
        "IMAGEGEN_MODEL_CACHE_DIR": str(tmp_path / "cache"),
    }
    result = cli("doctor", "--json", env=env)
    assert result.returncode == 1, result.stderr
    row = _rows(result.stdout)["model"]
    assert row["status"] == "error" and "HF_HUB_OFFLINE is set" in row["summary"]
    assert "imagegen models pull" in row["next_step"]


@pytest.mark.parametrize(
    "model", ["org/name with space", "org/na:me", "x@main", "org/ñame", "-rf", "org/name.git"]
)
def test_doctor_refuses_a_model_that_is_no_hub_id_as_pull_does(cli: RunCli, model: str) -> None:
    """It said to run ``imagegen models pull``, which refuses the name: render and pull say it
    is not a local path nor a valid Hub id, and so does the model row now."""
    env = {"IMAGEGEN_MODEL": model, "IMAGEGEN_SERVED_MODELS": model}
    result = cli("doctor", "--json", env=env)
    assert result.returncode == 1, result.stderr
    row = _rows(result.stdout)["model"]
    assert row["status"] == "error"
    said = f"model {model!r} at revision main (not pinned): not a local path nor a valid Hub id"
    assert row["summary"] == f"IMAGEGEN_MODEL: {said}."
    assert "imagegen models pull" not in row["next_step"]
    pulled = cli("models", "pull", "--", model, env=env)
    assert pulled.returncode == 2, pulled.stderr
    assert pulled.stderr.strip() == f"imagegen: error: {said}"


# -- Storage ----------------------------------------------------------------------------------


@pytest.fixture
def full_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A folder on a file system with no block left: a one-page tmpfs, filled. Where no tmpfs
    can be mounted (not root), the probe's file is ``/dev/full``, which refuses every byte
    written as a full disk does (ENOSPC)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mount = shutil.which("mount")
    made = mount and subprocess.run(
        [mount, "-t", "tmpfs", "-o", "size=4k", "imagegen-test", str(disk)],
        capture_output=True,
        check=False,
    )
    if made and made.returncode == 0:
        try:
            (disk / "out").mkdir()
            filler = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT)
            try:
                while os.write(filler, b"\0" * 1024):
                    pass
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
            finally:
                os.close(filler)
            yield disk / "out"
        finally:
            subprocess.run(["umount", str(disk)], check=True)
        return
    import tempfile

    real = tempfile.TemporaryFile
    (disk / "out").mkdir()

    def temporary(**kwargs: Any) -> Any:
        if kwargs.get("dir") != disk / "out":
            return real(**kwargs)
        return open("/dev/full", "wb", buffering=0)  # closed by its caller

    monkeypatch.setattr(tempfile, "TemporaryFile", temporary)
    yield disk / "out"


def test_doctor_fails_local_storage_on_a_full_disk(cli: RunCli, full_disk: Path) -> None:
    result = cli("doctor", "--json", env={"IMAGEGEN_STORAGE_URL": str(full_disk)})
    assert result.returncode == 1, result.stderr
    row = _rows(result.stdout)["storage"]
    assert row["status"] == "error"
    assert row["summary"] == (
        f"local storage: cannot write to {str(full_disk)!r}: No space left on device."
    )


@pytest.fixture
def hole() -> Iterator[str]:
    """A loopback port that takes connections and never answers."""
    listener = socket.create_server(("127.0.0.1", 0))
    taken: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                taken.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join()
        for conn in taken:
            conn.close()
        listener.close()


def _s3_env(endpoint: str) -> dict[str, str]:
    return {
        "IMAGEGEN_STORAGE_URL": "s3://bucket/images",
        "IMAGEGEN_S3_PRESET": "minio",
        "IMAGEGEN_S3_REGION": "us-east-1",
        "IMAGEGEN_S3_ENDPOINT_URL": endpoint,
        "IMAGEGEN_S3_ACCESS_KEY_ID": "AKIAEXAMPLEKEY",
        "IMAGEGEN_S3_SECRET_ACCESS_KEY": "not-a-real-secret-value",
    }


def test_doctor_waits_once_for_object_storage_that_never_answers(
    cli: RunCli, hole: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A generation's client tries three times, thirty seconds each: doctor asks once, and
    says which endpoint kept it waiting (its wait shortened here, as the one try)."""
    import asyncio

    from imagegen.cli import doctor
    from imagegen.errors import DependencyUnavailable
    from imagegen.storage import open_storage

    monkeypatch.setattr(doctor, "_S3_READ_TIMEOUT", 2.0, raising=False)
    result = cli("doctor", "--json", env=_s3_env(hole))
    assert result.returncode == 1, result.stderr
    row = _rows(result.stdout)["storage"]
    assert row["status"] == "error"
    assert row["summary"].startswith(f"S3 endpoint {hole} does not answer within 2s")
    # The storage check alone, timed (the command's other rows load libraries, slow on a
    # busy machine): one try of two seconds; three would be six at least.
    for name, value in _s3_env(hole).items():
        monkeypatch.setenv(name, value)
    store = doctor._bounded(open_storage(Settings()))
    started = time.monotonic()
    with pytest.raises(DependencyUnavailable):
        asyncio.run(store.check())
    waited = time.monotonic() - started
    assert waited < 5.5, waited


def test_doctor_waits_once_for_a_ledger_function_that_never_answers(
    cli: RunCli, hole: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``imagegen history`` waits 30 s for the ledger; doctor its ledger wait (shortened here)."""
    from imagegen.cli import doctor

    monkeypatch.setattr(doctor, "_LEDGER_WAIT", 2.0)
    result = cli("doctor", "--json", env={"IMAGEGEN_LEDGER_URL": hole})
    assert result.returncode == 1, result.stderr
    row = _rows(result.stdout)["ledger"]
    assert row["status"] == "error" and "unreachable" in row["summary"], row
    # The ledger check alone, timed: history's own wait would be thirty seconds.
    monkeypatch.setenv("IMAGEGEN_LEDGER_URL", hole)
    started = time.monotonic()
    assert doctor._ledger_check(Settings()).status == "error"
    waited = time.monotonic() - started
    assert waited < 5.5, waited


def test_doctor_names_the_object_storage_endpoint_it_cannot_reach(cli: RunCli) -> None:
    closed = socket.create_server(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there now: connections are refused
    endpoint = f"http://user:EndpointPass99@127.0.0.1:{port}"
    result = cli("doctor", "--json", env=_s3_env(endpoint))
    assert result.returncode == 1, result.stderr
    row = _rows(result.stdout)["storage"]
    assert row["status"] == "error"
    assert row["summary"].startswith(f"S3 endpoint http://***@127.0.0.1:{port} cannot be")
    assert "EndpointPass99" not in result.stdout


# -- Ollama -----------------------------------------------------------------------------------


def test_ollama_advice_says_the_checks_own_timeout_is_a_hung_server() -> None:
    advice = ollama_advice({"reachable": False, "error": "no answer within 10s"}, Settings())
    assert advice.summary.endswith("does not answer in time")
    assert "ollama serve" not in advice.next_step


def test_doctor_tells_a_hung_ollama_from_none(cli: RunCli, hole: str) -> None:
    env = {"IMAGEGEN_OLLAMA_HOST": hole, "IMAGEGEN_OLLAMA_TIMEOUT": "0.5"}
    row = _rows(cli("doctor", "--json", env=env).stdout)["ollama"]
    assert row["summary"] == f"The server at {hole} does not answer in time."
    assert row["next_step"].startswith("Check IMAGEGEN_OLLAMA_HOST, or restart Ollama")


# -- The ledger function ----------------------------------------------------------------------


class _LedgerApi(BaseHTTPRequestHandler):
    """``GET /generations`` as the ledger function answers it, to the key ``right-key``."""

    def do_GET(self) -> None:
        if self.headers.get("Authorization") != "Bearer right-key":
            self._answer(401, {"error": "unauthorized", "message": "a valid API key is needed"})
        elif self.path.startswith("/generations?") and "limit=1" in self.path:
            self._answer(200, {"items": [], "next_cursor": None})
        else:
            self._answer(404, {"error": "not_found", "message": self.path})

    def _answer(self, status: int, body: object) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def ledger_api() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _LedgerApi)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


def test_doctor_asks_the_ledger_function_with_the_key(cli: RunCli, ledger_api: str) -> None:
    env = {"IMAGEGEN_LEDGER_URL": ledger_api, "IMAGEGEN_API_KEY": "right-key"}
    row = _rows(cli("doctor", "--json", env=env).stdout)["ledger"]
    assert row == {
        "check": "ledger",
        "status": "ok",
        "summary": f"The cluster's ledger at {ledger_api} keeps history.",
        "next_step": "",
    }

    # The key refused, as by `imagegen history`, and never said.
    env = {"IMAGEGEN_LEDGER_URL": ledger_api, "IMAGEGEN_API_KEY": "wrong-key"}
    result = cli("doctor", "--json", env=env)
    assert result.returncode == 1, result.stderr
    row = _rows(result.stdout)["ledger"]
    assert row["status"] == "error"
    refused = f"The ledger at {ledger_api} refused the request: answered 401"
    assert row["summary"].startswith(refused)
    assert "IMAGEGEN_API_KEY" in row["next_step"]
    assert "wrong-key" not in result.stdout

    # A URL's password beside the key: httpx would send it in the key's stead. Refused, and
    # the password never said.
    url = ledger_api.replace("http://", "http://reader:LedgerPass55@")
    env = {"IMAGEGEN_LEDGER_URL": url, "IMAGEGEN_API_KEY": "right-key"}
    result = cli("doctor", "--json", env=env)
    assert result.returncode == 1, result.stderr
    row = _rows(result.stdout)["ledger"]
    redacted = ledger_api.replace("http://", "http://***@")
    assert row["status"] == "error"
    assert row["summary"].startswith(f"The ledger at {redacted}: ")
    assert "holds a user or password" in row["summary"]
    assert "LedgerPass55" not in result.stdout and "right-key" not in result.stdout


def test_doctor_fails_a_ledger_function_it_cannot_reach(cli: RunCli) -> None:
    closed = socket.create_server(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    env = {"IMAGEGEN_LEDGER_URL": f"http://u:LedgerPass55@127.0.0.1:{port}"}
    result = cli("doctor", "--json", env=env)
    assert result.returncode == 1, result.stderr
    row = _rows(result.stdout)["ledger"]
    assert row["status"] == "error"
    assert row["summary"].startswith(f"ledger http://***@127.0.0.1:{port} is unreachable")
    assert "LedgerPass55" not in result.stdout


# -- Names too long, and settings that cannot work -------------------------------------------


@pytest.mark.parametrize("setting", ["IMAGEGEN_STORAGE_URL", "IMAGEGEN_LEDGER_URL"])
def test_doctor_says_a_path_too_long_as_its_row(cli: RunCli, setting: str) -> None:
    path = f"/tmp/{LONG}/x"
    result = cli("doctor", "--json", env={setting: path})
    assert result.returncode == 1, result.stderr
    row = _rows(result.stdout)["storage" if setting == "IMAGEGEN_STORAGE_URL" else "ledger"]
    assert row["status"] == "error"
    assert path in row["summary"] and "File name too long" in row["summary"]


def test_a_model_path_too_long_is_said_as_the_setting_not_the_env_file(cli: RunCli) -> None:
    model = f"/tmp/{LONG}/m"
    result = cli("doctor", env={"IMAGEGEN_MODEL": model, "IMAGEGEN_SERVED_MODELS": model})
    assert result.returncode == 2
    # Longer than a job may carry, before any file is looked at: both variables named.
    [line] = result.stderr.splitlines()
    assert line.startswith(
        "imagegen: error: invalid settings: IMAGEGEN_MODEL, IMAGEGEN_SERVED_MODELS"
        " (IMAGEGEN_MODEL: longer than 200 characters"
    )
    assert model not in line


def test_doctor_json_says_settings_that_cannot_work(cli: RunCli) -> None:
    env = {"IMAGEGEN_THUMBNAIL_SIZE": "big", "IMAGEGEN_S3_SECRET_ACCESS_KEY": "SecretValue77"}
    result = cli("doctor", "--json", env=env)
    assert result.returncode == 2
    [line] = result.stderr.splitlines()
    body = json.loads(result.stdout)
    assert body["ok"] is False
    [row] = body["checks"]
    assert (row["check"], row["status"]) == ("settings", "error")
    assert row["summary"] == f"{line.removeprefix('imagegen: error: ')}."
    assert "IMAGEGEN_THUMBNAIL_SIZE" in row["summary"] and "SecretValue77" not in result.stdout


# -- Settings that do nothing here ------------------------------------------------------------


def test_doctor_says_what_a_function_warns_of_at_start_up(cli: RunCli) -> None:
    """A function logs these once as it starts; doctor said nothing of them, all rows ok."""
    env = {
        "IMAGEGEN_PROFILE": "prod",
        "IMAGEGEN_AUTH_REQUIRED": "false",
        "IMAGEGEN_DEVICE": "cpu",
        "IMAGEGEN_MODEL": "tiny",
        "IMAGEGEN_RENDER_FP8": "true",
        "IMAGEGEN_RENDER_COMPILE": "regional",
    }
    result = cli("doctor", "--json", env=env)
    assert result.returncode == 0, result.stdout  # warnings: images can still be made
    rows = json.loads(result.stdout)["checks"]
    said = [row for row in rows if row["check"] == "settings"]
    assert [row["status"] for row in said] == ["warning", "warning"]
    assert said[0]["summary"].startswith(
        "IMAGEGEN_AUTH_REQUIRED=false with IMAGEGEN_PROFILE=prod: authentication is off"
    )
    assert said[1]["summary"].startswith(
        "IMAGEGEN_RENDER_FP8=true with IMAGEGEN_RENDER_COMPILE=regional: the first render"
    )
    assert rows[:2] == said  # read before anything is checked
    human = cli("doctor", env=env)
    assert human.returncode == 0
    assert human.stdout.count("warning  settings") == 2


FAST = {
    "IMAGEGEN_MODEL": "tiny",
    "IMAGEGEN_RENDER_FP8": "true",
    "IMAGEGEN_RENDER_COMPILE": "regional",
    "IMAGEGEN_RENDER_FUSE_QKV": "true",
}


def test_doctor_says_the_fast_path_is_not_applied_off_cuda(cli: RunCli) -> None:
    pytest.importorskip("torch")
    result = cli("doctor", "--json", env={**FAST, "IMAGEGEN_DEVICE": "cpu"})
    assert result.returncode == 0, result.stdout
    rows = _rows(result.stdout)
    render = rows["render"]
    assert render["status"] == "warning"
    assert render["summary"].endswith(
        " renders on cpu (float32). IMAGEGEN_RENDER_FUSE_QKV=true, IMAGEGEN_RENDER_FP8=true and"
        " IMAGEGEN_RENDER_COMPILE=regional are not applied on cpu: the fast path is CUDA's alone"
        " (docs/rendering.md)."
    )
    assert rows["model"]["status"] == "ok"  # torch is there: the model is still checked
    plain = _rows(cli("doctor", "--json", env={"IMAGEGEN_MODEL": "tiny"}).stdout)
    assert plain["render"]["status"] == "ok"


@pytest.fixture
def on_cuda(monkeypatch: pytest.MonkeyPatch) -> Any:
    """torch, as where render runs on a CUDA GPU of compute capability 8.0, without torchao."""
    import importlib.util

    pytest.importorskip("torch")
    import torch

    from imagegen.render.diffusers_backend import DiffusersBackend

    described = {"torch": torch.__version__, "device": "cuda", "dtype": "bfloat16"}
    monkeypatch.setattr(DiffusersBackend, "describe", lambda self: described)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *args: None if name == "torchao" else real(name, *args),
    )
    return torch


def test_doctor_says_fusing_and_compiling_are_not_applied_with_loras(
    cli: RunCli, tmp_path: Path, on_cuda: Any
) -> None:
    loras = tmp_path / "loras"
    loras.mkdir()
    env = {**FAST, "IMAGEGEN_RENDER_FP8": "false", "IMAGEGEN_LORA_DIR": str(loras)}
    render = _rows(cli("doctor", "--json", env=env).stdout)["render"]
    assert render["status"] == "warning"
    assert render["summary"] == (
        f"torch {on_cuda.__version__} renders on cuda (bfloat16). IMAGEGEN_RENDER_FUSE_QKV=true and"
        " IMAGEGEN_RENDER_COMPILE=regional are not applied: LoRAs are configured"
        " (IMAGEGEN_LORA_DIR), whose adapters fusing and compiling would defeat"
        " (docs/rendering.md)."
    )
    env["IMAGEGEN_RENDER_FP8"] = "true"  # applied with LoRAs, but not on this GPU: both said
    both = _rows(cli("doctor", "--json", env=env).stdout)["render"]
    assert both["summary"].endswith(
        " would defeat (docs/rendering.md). IMAGEGEN_RENDER_FP8=true is not applied: fp8 needs"
        " compute capability 8.9+, this GPU has 8.0 (docs/rendering.md)."
    )
    assert both["next_step"] == (
        "Unset them, or the LoRAs. Unset it, or render on an Ada or Hopper GPU."
    )
    del env["IMAGEGEN_LORA_DIR"], env["IMAGEGEN_RENDER_FP8"]
    assert _rows(cli("doctor", "--json", env=env).stdout)["render"]["status"] == "ok"


def test_doctor_says_fp8_is_not_applied_where_the_gpu_or_torchao_lacks_it(
    cli: RunCli, on_cuda: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = {"IMAGEGEN_MODEL": "tiny", "IMAGEGEN_RENDER_FP8": "true"}
    render = _rows(cli("doctor", "--json", env=env).stdout)["render"]
    assert render["status"] == "warning"
    assert render["summary"].endswith(
        " IMAGEGEN_RENDER_FP8=true is not applied: fp8 needs compute capability 8.9+, this GPU"
        " has 8.0 (docs/rendering.md)."
    )
    monkeypatch.setattr(on_cuda.cuda, "get_device_capability", lambda device=None: (9, 0))
    render = _rows(cli("doctor", "--json", env=env).stdout)["render"]
    assert render["summary"].endswith(
        " IMAGEGEN_RENDER_FP8=true is not applied: torchao is not installed (docs/rendering.md)."
    )


def test_doctor_warns_of_loras_configured_but_not_there(cli: RunCli, tmp_path: Path) -> None:
    """The lora plugin said so only in its log, at each request; render at start-up."""
    there = tmp_path / "ink.safetensors"
    there.write_bytes(b"")
    missing = tmp_path / "gone.safetensors"
    env = {
        "IMAGEGEN_MODEL": "tiny",
        "IMAGEGEN_LORA_DIR": str(tmp_path / "not-mounted"),
        "IMAGEGEN_LORAS": f"{there},someone/hub-lora,{missing}",
    }
    result = cli("doctor", "--json", env=env)
    assert result.returncode == 0, result.stdout
    plugins = _rows(result.stdout)["plugins"]
    assert plugins["status"] == "warning"
    assert plugins["summary"].endswith(
        f"remote_context. IMAGEGEN_LORA_DIR={tmp_path / 'not-mounted'} is not a directory: the"
        f" lora plugin draws no LoRA from it. IMAGEGEN_LORAS: {missing} does not exist here: a"
        " job that draws one fails at render (503, retried)."
    )
    assert "hub-lora" not in plugins["summary"]  # a Hub id is not looked for
    env["IMAGEGEN_LORA_DIR"] = str(there)  # a file, not a directory
    env["IMAGEGEN_LORAS"] = str(there)
    plugins = _rows(cli("doctor", "--json", env=env).stdout)["plugins"]
    assert plugins["status"] == "warning"
    assert plugins["summary"].endswith(
        f"IMAGEGEN_LORA_DIR={there} is not a directory: the lora plugin draws no LoRA from it."
    )
    env["IMAGEGEN_LORA_DIR"] = str(tmp_path)
    assert _rows(cli("doctor", "--json", env=env).stdout)["plugins"]["status"] == "ok"


@pytest.mark.parametrize("userinfo", ["user:WrongPass77@", ""], ids=["wrong", "none"])
def test_doctor_says_a_proxy_in_front_of_ollama_refuses_the_credentials(
    cli: RunCli, userinfo: str
) -> None:
    fake = FakeOllama().start()
    fake.authorization = "Basic dXNlcjpyaWdodA=="  # user:right
    try:
        host = fake.url.replace("http://", f"http://{userinfo}")
        result = cli("doctor", "--json", env={"IMAGEGEN_OLLAMA_HOST": host})
    finally:
        fake.stop()
    row = _rows(result.stdout)["ollama"]
    shown = fake.url.replace("http://", "http://***@" if userinfo else "http://")
    assert row["summary"] == (
        f"The server at {shown} wants credentials or refuses those sent (HTTP 401)."
    )
    assert row["next_step"].startswith("Check the user-info in IMAGEGEN_OLLAMA_HOST")
    assert "OLLAMA_API_KEY" in row["next_step"]
    assert "WrongPass77" not in result.stdout + result.stderr
