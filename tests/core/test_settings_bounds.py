"""Settings a job carries are bounded as the job's fields are: one too long is refused at
start-up, naming its variable; the longest taken goes through enhance and render.

They were taken as given: a served model whose path was 274 characters loaded, then every
direct render naming none was refused 400 and every enhance failed 500.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from imagegen.errors import ConfigurationError, InvalidRequest
from imagegen.events import GENERATION_REQUESTED, PROMPT_ENHANCED
from imagegen.models import (
    MAX_ENHANCER_CHARS,
    MAX_LORA_PATH_CHARS,
    MAX_MODEL_CHARS,
    MAX_PLUGIN_NAME_CHARS,
    MAX_PLUGINS,
    GenerationRequest,
)
from imagegen.settings import Settings
from imagegen.validation import parse_model
from tests.fakes.ollama_server import FakeOllama
from tests.functions.clients import InProcessFunction
from tests.functions.conftest import base_env
from tests.functions.servers import free_port, post_event
from tests.render.tiny_files import FLUX_LORA_TARGETS, save_lora, save_pipeline

MODEL_SAID = f"longer than {MAX_MODEL_CHARS} characters, the most a job's model may have"
LORA_SAID = f"longer than {MAX_LORA_PATH_CHARS} characters (~ expanded), the most a LoRA's path"
# A file's name: at most 255 bytes on Linux's file systems (NAME_MAX).
NAME_MAX = 255
LONGEST_LORA_DIR = MAX_LORA_PATH_CHARS - 1 - NAME_MAX


def _path_of_length(base: Path, length: int) -> Path:
    """A path under ``base`` of exactly ``length`` characters, in folders of at most 200."""
    path = base
    while len(str(path)) < length:
        room = length - len(str(path)) - 1  # after the "/"
        path /= "p" * (room if room <= 200 else min(200, room - 2))
    assert len(str(path)) == length
    return path


def _ollama_name(length: int) -> str:
    """An Ollama model name of ``length`` characters, each part within Ollama's own bounds
    (ollama/ollama types/model/name.go, ``isValidLen``: a host of 350, the rest of 80)."""
    rest = "/imagegen/prompt-writer:latest"
    host = "ollama." + "r" * (length - len(rest) - len(".ollama.example.com"))
    return f"{host}.example.com{rest}"


def _refusal(monkeypatch: pytest.MonkeyPatch, variable: str, value: str) -> ConfigurationError:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValidationError) as caught:
        Settings()
    # Named by their variables, as a function and the CLI name them.
    return ConfigurationError.of("", caught.value, name=Settings.variable)


@pytest.mark.parametrize(
    ("variable", "value", "said"),
    [
        ("IMAGEGEN_MODEL", "/m/" + "m" * (MAX_MODEL_CHARS - 2), MODEL_SAID),
        (
            "IMAGEGEN_SERVED_MODELS",
            "tiny,/m/" + "m" * (MAX_MODEL_CHARS - 2),
            f"entry 2 of 2 is {MODEL_SAID}",
        ),
        ("IMAGEGEN_ALLOWED_MODELS", "/m/" + "m" * MAX_MODEL_CHARS, f"entry 1 of 1 is {MODEL_SAID}"),
        (
            "IMAGEGEN_OLLAMA_MODEL",
            _ollama_name(MAX_ENHANCER_CHARS - len("ollama:") + 1),
            "longer than 249 characters: a prompt it writes is signed ollama:<model>, at most"
            " 256 characters",
        ),
        ("IMAGEGEN_LORAS", "someone/" + "l" * MAX_LORA_PATH_CHARS, f"entry 1 of 1 is {LORA_SAID}"),
        (
            "IMAGEGEN_LORA_DIR",
            "/l/" + "l" * (LONGEST_LORA_DIR - 2),
            f"longer than {LONGEST_LORA_DIR} characters (~ expanded): with the name of a LoRA in"
            f" it (up to 255), its path may be longer than {MAX_LORA_PATH_CHARS}",
        ),
        (
            "IMAGEGEN_PLUGINS",
            ",".join(f"plugin_{i}" for i in range(MAX_PLUGINS + 1)),
            f"{MAX_PLUGINS + 1} plugins, more than the {MAX_PLUGINS} a request runs",
        ),
        (
            "IMAGEGEN_PLUGINS",
            "time_of_day," + "p" * (MAX_PLUGIN_NAME_CHARS + 1),
            f"entry 2 of 2 is longer than {MAX_PLUGIN_NAME_CHARS} characters, the most a"
            " contribution's plugin name may have",
        ),
    ],
)
def test_a_setting_longer_than_its_job_field_is_refused_naming_its_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, said: str
) -> None:
    refusal = _refusal(monkeypatch, variable, value)
    assert refusal.message == f"invalid settings: {variable}"
    [error] = refusal.errors
    assert error["field"] == variable
    assert error["message"].startswith(said)
    assert value not in error["message"]


def test_a_lora_path_that_grows_past_its_bound_as_home_is_expanded_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The lora plugin names a local LoRA by its path with ``~`` expanded."""
    monkeypatch.setenv("HOME", "/h/" + "h" * (MAX_LORA_PATH_CHARS - 20))
    entry = "~/loras/ink.safetensors"
    assert len(entry) < MAX_LORA_PATH_CHARS
    assert _refusal(monkeypatch, "IMAGEGEN_LORAS", entry).message == (
        "invalid settings: IMAGEGEN_LORAS"
    )


def test_a_request_names_as_many_plugins_as_the_settings_enable() -> None:
    """Each plugin adds one contribution at most, and a job holds as many."""
    names = [f"plugin_{i}" for i in range(MAX_PLUGINS + 1)]
    assert Settings(plugins=names[:MAX_PLUGINS]).plugins == names[:MAX_PLUGINS]
    assert len(parse_model(GenerationRequest, {"plugins": names[:MAX_PLUGINS]}).plugins or ()) == (
        MAX_PLUGINS
    )
    with pytest.raises(InvalidRequest) as caught:
        parse_model(GenerationRequest, {"plugins": names})
    assert caught.value.fields == ["plugins"]


def test_the_longest_values_are_taken() -> None:
    model = "/m/" + "m" * (MAX_MODEL_CHARS - 3)
    settings = Settings(
        model=model,
        served_models=["tiny", model],
        ollama_model=_ollama_name(MAX_ENHANCER_CHARS - len("ollama:")),
        loras=["someone/" + "l" * (MAX_LORA_PATH_CHARS - 8)],
        lora_dir=Path("/l/" + "l" * (LONGEST_LORA_DIR - 3)),
        plugins=["p" * MAX_PLUGIN_NAME_CHARS],
    )
    assert len(settings.model) == MAX_MODEL_CHARS
    assert settings.plugins == ["p" * MAX_PLUGIN_NAME_CHARS]
    assert len(str(settings.lora_dir)) == LONGEST_LORA_DIR


def test_the_longest_model_ollama_model_and_lora_go_through_enhance_and_render(
    tmp_path: Path,
) -> None:
    """A served model of the longest path, an Ollama model whose signature is the longest
    enhancer, a LoRA of the longest path (the longest lora_dir and name): enhance writes the
    job, render draws it, and a direct render naming no model draws with the served one."""
    from imagegen.render._family import build_offline

    model = save_pipeline(build_offline("tiny"), _path_of_length(tmp_path, MAX_MODEL_CHARS))
    lora_dir = _path_of_length(tmp_path / "loras", LONGEST_LORA_DIR)
    saved = save_lora(build_offline("tiny"), tmp_path / "lora", targets=FLUX_LORA_TARGETS)
    lora_dir.mkdir(parents=True)
    lora = lora_dir / ("a" * (NAME_MAX - len(".safetensors")) + ".safetensors")
    lora.write_bytes((saved / "pytorch_lora_weights.safetensors").read_bytes())
    ollama_model = _ollama_name(MAX_ENHANCER_CHARS - len("ollama:"))
    assert len(str(lora)) == MAX_LORA_PATH_CHARS

    fake = FakeOllama(models=(ollama_model,))
    fake.port = free_port()
    with fake:
        fake.reply_with({"prompt": "a red door in a white wall, morning light"})
        env = {
            **base_env(tmp_path / "store"),
            "IMAGEGEN_MODEL": str(model),
            "IMAGEGEN_ALLOWED_MODELS": f"tiny,{model}",
            "IMAGEGEN_OLLAMA_HOST": fake.url,
            "IMAGEGEN_OLLAMA_MODEL": ollama_model,
            "IMAGEGEN_LORA_DIR": str(lora_dir),
            "IMAGEGEN_LORA_PROBABILITY": "1",
        }
        with InProcessFunction("enhance", env) as enhance:
            enhanced = post_event(
                enhance,
                GENERATION_REQUESTED,
                {"prompt": "a red door", "width": 256, "height": 256},
                subject="long-1",
            )
    assert enhanced.status_code == 200, enhanced.text
    job = enhanced.json()
    assert job["model"] == str(model)
    assert job["enhancer"] == f"ollama:{ollama_model}"
    assert len(job["enhancer"]) == MAX_ENHANCER_CHARS
    assert [hint["path"] for hint in job["loras"]] == [str(lora)]

    with InProcessFunction("render", env) as render:
        headers = {k: v for k, v in enhanced.headers.items() if k.lower().startswith("ce-")}
        assert headers["ce-type"] == PROMPT_ENHANCED
        rendered = render.post("/", headers=headers, content=enhanced.content)
        assert rendered.status_code == 200, rendered.text
        assert rendered.json()["prompt"]["loras"] == job["loras"]

        direct = render.post(
            "/", json={"prompt": "a red door", "width": 256, "height": 256, "seed": 3}
        )
        assert direct.status_code == 200, direct.text
        assert direct.json()["prompt"]["model"] == str(model)


@pytest.mark.parametrize(
    ("variable", "said"),
    [
        ("IMAGEGEN_LORAS", "entry 1 of 1: ~ names no home directory this process can find"),
        ("IMAGEGEN_LORA_DIR", "~ names no home directory this process can find"),
    ],
)
def test_a_lora_path_whose_home_cannot_be_found_is_refused_naming_its_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, said: str
) -> None:
    """``~user`` of no such user (or ``~`` with no passwd entry and no ``HOME``, as in many
    containers) expands to nothing, and the lora plugin and render expand it at every draw and
    every job: refused at start-up instead."""
    value = "~nosuchuser/loras" + ("/ink.safetensors" if variable == "IMAGEGEN_LORAS" else "")
    refusal = _refusal(monkeypatch, variable, value)
    assert refusal.message == f"invalid settings: {variable}"
    [error] = refusal.errors
    assert error["field"] == variable
    assert error["message"] == said


@pytest.mark.parametrize("name", ["png_compress_level", "png_encode_threads", "render_batch_size"])
def test_the_documented_range_of_a_bounded_setting_is_the_one_taken(name: str) -> None:
    """The configuration table says each range (``lo`` and ``hi`` with an en dash between) as
    the first in its row; each end is taken and one past either is refused."""
    import re

    variable = f"IMAGEGEN_{name.upper()}"
    table = (Path(__file__).parents[2] / "docs" / "configuration.md").read_text()
    [row] = [line for line in table.splitlines() if line.startswith(f"| `{variable}` |")]
    found = re.search(r"`?(\d+)`?\N{EN DASH}`?(\d+)`?", row.split("|")[3])
    assert found, f"{variable}: the table gives no range"
    low, high = int(found[1]), int(found[2])
    assert getattr(Settings(**{name: low}), name) == low
    assert getattr(Settings(**{name: high}), name) == high
    for outside in (low - 1, high + 1):
        with pytest.raises(ValidationError) as caught:
            Settings(**{name: outside})
        assert [e["loc"] for e in caught.value.errors()] == [(name,)]
