"""Each process loads what its stage uses and nothing more: checked in a fresh interpreter."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT

HEAVY = ("torch", "diffusers", "transformers", "ollama", "tenacity", "httpx", "boto3", "botocore")
# Loaded only when configured: PyJWT for OIDC tokens, the metrics SDK for a metrics exporter.
HEAVY += ("jwt", "opentelemetry.sdk.metrics")

SERVE = """
import json, sys, threading, functions_framework
app = functions_framework.create_app({stage!r}, {source!r})
client = app.test_client()
stopped = threading.Event()
while (ready := client.get("/readyz")).json["status"] == "loading" and not stopped.wait(0.05):
    pass
assert ready.status_code == 200, ready.data
reply = client.post("/", json={{"width": 1}})
assert reply.status_code == 400, reply.data
print(json.dumps(sorted(m for m in {heavy!r} if m in sys.modules)))
"""


def _run(code: str, env: dict[str, str], cwd: Path) -> tuple[Any, str]:
    """``code`` run in a new interpreter, which must succeed: the JSON its last line prints,
    and what it wrote to stderr (the function's log)."""
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1]), result.stderr


def _loaded(code: str, env: dict[str, str], cwd: Path) -> list[str]:
    loaded: list[str] = _run(code, env, cwd)[0]
    return loaded


def _function_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """A function's environment: local storage under ``tmp_path``, the tiny model, no Ollama."""
    return {
        "PATH": "/usr/bin",
        "IMAGEGEN_STORAGE_URL": str(tmp_path / "store"),
        "IMAGEGEN_OLLAMA_HOST": "http://127.0.0.1:9",
        "IMAGEGEN_MODEL": "tiny",
        "IMAGEGEN_ALLOWED_MODELS": "tiny",
        "HF_HUB_OFFLINE": "1",
        **extra,
    }


def test_importing_the_package_loads_no_stage_machinery(tmp_path: Path) -> None:
    code = (
        f"import imagegen, sys, json; print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    )
    assert _loaded(code, {"PATH": "/usr/bin"}, tmp_path) == []


@pytest.mark.slow
@pytest.mark.parametrize(
    ("stage", "allowed"),
    [
        ("persist", set()),
        ("derive", set()),
        # The sink tries a write that storage refused again (tenacity), as enhance tries Ollama.
        ("deadletter", {"tenacity"}),
        ("enhance", {"ollama", "tenacity", "httpx"}),
        # accelerate (under diffusers) imports boto3 for its SageMaker config, itself.
        ("render", {"torch", "diffusers", "transformers", "httpx", "boto3", "botocore"}),
    ],
)
def test_a_function_on_local_storage_loads_only_what_it_uses(
    stage: str, allowed: set[str], tmp_path: Path
) -> None:
    env = _function_env(tmp_path)
    source = str(ROOT / "functions" / f"{stage}.py")
    code = SERVE.format(stage=stage, source=source, heavy=HEAVY)
    if stage == "deadletter":  # the sink takes anything: a 202, not a 400
        code = code.replace("== 400", "== 202")
    loaded = set(_loaded(code, env, tmp_path))
    assert loaded <= allowed, f"{stage} loaded {sorted(loaded - allowed)}"


TALK_TO_OLLAMA = """
import json, sys, functions_framework
app = functions_framework.create_app("enhance", {source!r})
reply = app.test_client().post("/", json={{"prompt": "a fox", "model": "tiny"}})
assert reply.status_code == 200, reply.data
assert reply.json["fallback"] is True, reply.json  # Ollama refused: asked over HTTP
loader = sys.modules["pydantic.plugin._loader"]
print(json.dumps({{"loaded": sorted(m for m in ("httpx", "rich", "pygments") if m in sys.modules),
                  "cli": sys.modules.get("httpx._main", "absent") is None,
                  "plugins_looked_for": loader._plugins is not None}}))
"""


@pytest.mark.parametrize("plugins", [None, ""], ids=["default", "plugins-allowed"])
def test_enhance_skips_httpx_command_line_and_pydantic_plugin_scan(
    plugins: str | None, tmp_path: Path
) -> None:
    """httpx imports its terminal UI when click is installed, and pydantic scans every
    package for plugins: a function does neither, unless told to let plugins load."""
    env = _function_env(tmp_path, IMAGEGEN_OLLAMA_RETRIES="0")
    if plugins is not None:
        env["PYDANTIC_DISABLE_PLUGINS"] = plugins
    code = TALK_TO_OLLAMA.format(source=str(ROOT / "functions" / "enhance.py"))
    state = _run(code, env, tmp_path)[0]
    expected = {"loaded": ["httpx"], "cli": True, "plugins_looked_for": plugins == ""}
    assert state == expected, state


def test_a_bad_local_storage_url_does_not_load_boto3(tmp_path: Path) -> None:
    code = (
        "import sys, json\n"
        "from imagegen.errors import ConfigurationError\n"
        "from imagegen.settings import Settings\n"
        "from imagegen.storage import open_storage\n"
        "try:\n"
        "    open_storage(Settings(storage_url='file://host/x'))\n"
        "except ConfigurationError as exc:\n"
        "    assert exc.fields == ['storage_url'], exc.fields\n"
        f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))\n"
    )
    assert _loaded(code, {"PATH": "/usr/bin", "HF_HUB_OFFLINE": "1"}, tmp_path) == []


GC_STATE = """
import gc, json, sys, functions_framework
during_import = []  # collections from _process on while the adapter (all a function imports) loads
def collected(phase, info):
    adapter = sys.modules.get("_adapter")
    loading = "_process" in sys.modules and not hasattr(adapter, "entry_point")
    if phase == "start" and loading:
        during_import.append(info["generation"])
gc.callbacks.append(collected)
app = functions_framework.create_app({stage!r}, {source!r})
gc.callbacks.remove(collected)
imported = gc.get_freeze_count()
status = app.test_client().get("/readyz").status_code
print(json.dumps({{"status": status, "enabled": gc.isenabled(), "at_import": imported,
                  "during_import": during_import,
                  "frozen": gc.get_freeze_count(), "scanned": len(gc.get_objects())}}))
"""


@pytest.mark.parametrize("storage", ["store", "file://host/x"], ids=["started", "broken"])
def test_start_up_leaves_what_it_loaded_out_of_collections(storage: str, tmp_path: Path) -> None:
    """What the function loads is frozen, at import and at start; collection stays on, but
    not while the function's modules load (they are never garbage)."""
    env = {
        "PATH": "/usr/bin",
        "IMAGEGEN_STORAGE_URL": storage if "//" in storage else str(tmp_path / storage),
        "IMAGEGEN_OLLAMA_HOST": "http://127.0.0.1:9",
        "HF_HUB_OFFLINE": "1",
    }
    source = str(ROOT / "functions" / "persist.py")
    code = GC_STATE.format(stage="persist", source=source)
    state = _run(code, env, tmp_path)[0]
    assert state["status"] == (200 if storage == "store" else 503)
    assert state["enabled"], "start-up left garbage collection off"
    # Frozen before gunicorn forks (at import), and again once started: a full collection in
    # the worker would walk, and copy, every page the fork shared.
    assert state["at_import"] > 10_000, state
    assert state["during_import"] == [], state
    assert state["frozen"] > state["at_import"], state
    assert state["scanned"] < state["frozen"] // 10, state


NESTED = {"Contribution", "LoraHint", "ErrorInfo"}

MODELS_BUILT = """
import json, threading, functions_framework
from pydantic import BaseModel
from imagegen import models
app = functions_framework.create_app({stage!r}, {source!r})
client, stopped = app.test_client(), threading.Event()
def built():
    classes = vars(models).values()
    return sorted(c.__name__ for c in classes if isinstance(c, type) and issubclass(c, BaseModel)
                  and c.__module__ == models.__name__ and c.__pydantic_complete__)
at_import = built()
while not client.get("/readyz").json["warm"] and not stopped.wait(0.02):
    pass
print(json.dumps({{"at_import": at_import, "ready": built()}}))
"""


@pytest.mark.parametrize(
    ("stage", "models"),
    [
        # With the models of their fields: a plugin makes its Contribution, the error its info.
        ("enhance", {"GenerationRequest", "EnhancedPrompt", "GenerationFailed"} | NESTED),
        # A rendered image carries its prompt, with the prompt's fields.
        (
            "persist",
            {"RenderedImage", "EnhancedPrompt", "PersistedImage", "GenerationFailed"} | NESTED,
        ),
        ("deadletter", {"GenerationFailed", "ErrorInfo"}),  # no warm-up: at start, before ready
    ],
)
def test_a_function_builds_only_its_stages_models_and_once_ready(
    stage: str, models: set[str], tmp_path: Path
) -> None:
    """imagegen.models defers its validators; a function builds those its stage uses (before
    its first request, after readiness where it has a warm-up) and no other."""
    code = MODELS_BUILT.format(stage=stage, source=str(ROOT / "functions" / f"{stage}.py"))
    built = _run(code, _function_env(tmp_path), tmp_path)[0]
    assert built["at_import"] == [], built
    assert set(built["ready"]) == models, built


# What only a request's trace context needs: OTEL_PROPAGATORS' propagators (the baggage one
# with them) and W3C Trace Context's, none of which a probe uses.
REQUEST_ONLY = ("opentelemetry.propagate", "opentelemetry.baggage", "opentelemetry.propagators")
REQUEST_ONLY += ("opentelemetry.trace.propagation.tracecontext",)

READY_THEN_REQUEST = """
import json, sys, functions_framework
app = functions_framework.create_app({stage!r}, {source!r})
client = app.test_client()
ready = client.get("/readyz")  # left open: the warm-up begins once it is closed
assert ready.status_code == 200, ready.data
at_ready = sorted(m for m in {modules!r} if m in sys.modules)
parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
reply = client.post("/", json={{"width": 1}}, headers={{"traceparent": parent}})
assert reply.status_code == 400, reply.data
print(json.dumps({{"at_ready": at_ready}}))
"""


@pytest.mark.parametrize("stage", ["enhance", "persist"])
def test_readiness_loads_no_trace_propagators(stage: str, tmp_path: Path) -> None:
    """The propagators are imported by the first request that reads a trace context, not
    before ``/readyz`` answers; that request is still logged in its caller's trace."""
    source = str(ROOT / "functions" / f"{stage}.py")
    code = READY_THEN_REQUEST.format(stage=stage, source=source, modules=REQUEST_ONLY)
    state, stderr = _run(code, _function_env(tmp_path), tmp_path)
    assert state["at_ready"] == [], state
    lines = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    failed = [line for line in lines if line["message"].startswith("request failed")]
    assert [line.get("trace_id") for line in failed] == ["0af7651916cd43dd8448eb211c80319c"]


BAD_PROPAGATOR = """
import json, functions_framework
app = functions_framework.create_app("persist", {source!r})
ready = app.test_client().get("/readyz")
print(json.dumps({{"status": ready.status_code, "body": ready.json}}))
"""


def test_a_propagator_not_installed_is_a_start_up_failure_not_an_import_error(
    tmp_path: Path,
) -> None:
    """With the propagators imported by the first request, ``OTEL_PROPAGATORS`` naming one not
    installed is said at start-up in imagegen's words (``check_propagators``): not ready, as
    for any setting that cannot work, instead of the API's ValueError while importing."""
    code = BAD_PROPAGATOR.format(source=str(ROOT / "functions" / "persist.py"))
    env = _function_env(tmp_path, OTEL_PROPAGATORS="tracecontext,b3")
    state, stderr = _run(code, env, tmp_path)
    assert state["status"] == 503 and state["body"]["status"] == "start-up failed", state
    # Said before the JSON log handler is installed (the check comes first), as Python's
    # last-resort handler writes it.
    said = [line for line in stderr.splitlines() if "start-up failed" in line]
    assert len(said) == 1 and "no propagator 'b3' is installed" in said[0], stderr


AFTER_READY = ("httpx", "aiohttp", "holidays")
"""What a fetch needs (the remote_context plugin's, Ollama's) and the holiday calendars: no
part of enhance's readiness, which makes its plugin set (the default plugins, no endpoint)."""


def test_enhance_is_ready_with_its_plugin_set_and_no_http_client(tmp_path: Path) -> None:
    source = str(ROOT / "functions" / "enhance.py")
    code = READY_THEN_REQUEST.format(stage="enhance", source=source, modules=AFTER_READY)
    state = _run(code, _function_env(tmp_path), tmp_path)[0]
    assert state["at_ready"] == [], state
