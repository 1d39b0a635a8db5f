"""The manifests agree with the adapters in functions/: types consumed and emitted, time budgets."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from imagegen import stages
from imagegen.enhance.llm import OllamaEnhancer
from imagegen.plugins.pluginset import DEFAULT_PLUGIN_TIMEOUT
from imagegen.settings import Settings
from imagegen.stages import Stage
from imagegen.stages.enhance import KNATIVE_TIMEOUT_SECONDS, STORAGE_ALLOWANCE, llm_deadline
from tests.functions.clients import InProcessFunction
from tests.functions.conftest import base_env

from .conftest import OVERLAYS, service_settings
from .routing import Routing
from .test_event_routing import REPLIES

RoutingOf = Callable[[str], Routing]


@pytest.fixture
def load_stage() -> Callable[[str], Stage]:
    """``load_stage("render")``: the stage a function serves, from the stage registry."""
    return stages.get


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_function_accepts_what_its_triggers_send(
    routing: RoutingOf, overlay: str, load_stage: Callable[[str], Any]
) -> None:
    r = routing(overlay)
    refused = []
    for trigger in r.triggers:
        function = r.services[trigger.subscriber].function
        assert function is not None
        consumes = load_stage(function).consumes
        accepted = set(consumes)
        event_type = trigger.filter["type"]
        if consumes and event_type not in accepted:
            refused.append(f"{trigger.name}: {function} refuses {event_type} (accepts {accepted})")
    assert not refused, "\n".join(refused)


@pytest.mark.parametrize("function", sorted(REPLIES))
def test_each_function_replies_as_the_pipeline_expects(
    function: str, load_stage: Callable[[str], Any]
) -> None:
    stage = load_stage(function)
    assert stage.name == function
    if stage.emits is None:
        assert REPLIES[function] == set()
    else:
        assert stage.emits in REPLIES[function]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_function_gives_up_before_knative_does(
    routing: RoutingOf,
    overlay: str,
    load_stage: Callable[[str], Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The function's own timeout answers a retryable 503 that says which stage was slow;
    # Knative's 504 at timeoutSeconds would say nothing.
    for service in routing(overlay).services.values():
        assert service.function is not None and service.timeout_seconds is not None
        budget = load_stage(service.function).timeout(service_settings(service, monkeypatch))
        assert budget < service.timeout_seconds, f"{service.name}: {budget} s"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_registered_stage_is_deployed_and_nothing_else(
    routing: RoutingOf, overlay: str
) -> None:
    deployed = {service.function for service in routing(overlay).services.values()}
    assert deployed == set(stages.names())


# enhance's budget: the LLM's whole deadline, then every plugin at its limit, then the memo.


@pytest.mark.parametrize(
    ("timeout", "retries", "plugins"),
    [(30.0, 2, None), (30.0, 4, None), (45.0, 0, None), (30.0, 2, "time_of_day")],
    ids=["defaults", "more-retries", "no-retries", "one-plugin"],
)
def test_enhance_budget_leaves_the_memo_its_storage_calls(
    load_stage: Callable[[str], Stage], timeout: float, retries: int, plugins: str | None
) -> None:
    # The memo's recall and remember come before and after the LLM and the plugins: a budget
    # they used up would cut a request whose prompt was written, and write it again next time.
    given: dict[str, Any] = {"ollama_timeout": timeout, "ollama_retries": retries}
    if plugins is not None:
        given["plugins"] = plugins
    settings = Settings(_env_file=None, **given)
    llm = OllamaEnhancer(settings).deadline  # every attempt and the backoffs between them
    assert llm_deadline(settings) == llm  # counted at start-up without the client
    assert llm > timeout * (retries + 1) or retries == 0
    spent = llm + len(settings.plugins) * DEFAULT_PLUGIN_TIMEOUT
    assert load_stage("enhance").timeout(settings) - spent >= STORAGE_ALLOWANCE


def test_the_shipped_timeout_enhance_warns_of_is_the_base_manifests(routing: RoutingOf) -> None:
    # The warning below compares the budget with a number: the one knative/base ships.
    enhance = routing("base").services["imagegen-enhance"]
    assert enhance.timeout_seconds == KNATIVE_TIMEOUT_SECONDS


class _Warnings(logging.Handler):
    """The records of enhance's logger at WARNING and above, whatever the root logger's
    handlers are (a function's start-up replaces them with its own)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def of_timeout_seconds(self) -> list[logging.LogRecord]:
        return [r for r in self.records if "timeoutSeconds" in r.getMessage()]


@pytest.fixture
def enhance_warnings() -> Iterator[_Warnings]:
    handler = _Warnings()
    logger = logging.getLogger("imagegen.enhance")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


def test_a_budget_past_knative_is_warned_of_once_at_start_up(
    tmp_path: Path, enhance_warnings: _Warnings
) -> None:
    env = {
        **base_env(tmp_path / "store"),
        "IMAGEGEN_OLLAMA_TIMEOUT": "45",
        "IMAGEGEN_OLLAMA_RETRIES": "2",
    }
    settings = Settings(_env_file=None, ollama_timeout=45, ollama_retries=2)
    budget = stages.get("enhance").timeout(settings)
    assert budget >= KNATIVE_TIMEOUT_SECONDS
    with InProcessFunction("enhance", env) as enhance:
        assert enhance.get("/readyz").status_code == 200
        for prompt in ("a paper boat", "a kite"):  # requests say nothing of it again
            assert enhance.post("/", json={"prompt": prompt, "enhance": False}).status_code == 200
    [said] = enhance_warnings.of_timeout_seconds()
    assert said.levelno == logging.WARNING
    message = said.getMessage()
    assert "IMAGEGEN_OLLAMA_TIMEOUT=45 and IMAGEGEN_OLLAMA_RETRIES=2" in message
    assert f"enhance's budget is {budget:g} s" in message
    assert f"the {KNATIVE_TIMEOUT_SECONDS} s timeoutSeconds" in message
    assert "the Trigger's delivery timeout" in message


def test_the_shipped_budget_is_not_warned_of(tmp_path: Path, enhance_warnings: _Warnings) -> None:
    env = {**base_env(tmp_path / "store"), "IMAGEGEN_OLLAMA_RETRIES": "2"}
    with InProcessFunction("enhance", env) as enhance:
        assert enhance.get("/readyz").status_code == 200
        assert enhance.post("/", json={"prompt": "a kite", "enhance": False}).status_code == 200
    assert not enhance_warnings.of_timeout_seconds()
