"""The manifests agree with the adapters in functions/: types consumed and emitted, time budgets."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

import pytest

from .conftest import OVERLAYS, REPO
from .routing import Routing, ServiceInfo
from .test_event_routing import REPLIES

RoutingOf = Callable[[str], Routing]
FUNCTIONS = REPO / "functions"


@pytest.fixture
def load_stage(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str], Any]]:
    """``load_stage("render")``: the Stage a function file declares, imported as it is served."""
    monkeypatch.syspath_prepend(str(FUNCTIONS))
    modules: dict[str, ModuleType] = {}

    def load(function: str) -> Any:
        if function not in modules:
            spec = importlib.util.spec_from_file_location(
                f"imagegen_function_{function}", FUNCTIONS / f"{function}.py"
            )
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            modules[function] = module
        return modules[function].runtime.stage

    yield load


def _settings(service: ServiceInfo, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The Settings the function builds from the Service's environment."""
    from imagegen import settings as settings_module

    with monkeypatch.context() as patch:
        for key in list(os.environ):
            if key.startswith("IMAGEGEN_"):
                patch.delenv(key)
        for key, value in service.env.items():
            patch.setenv(key, value)
        return settings_module.Settings(_env_file=None)


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
        accepted = {consumes} if isinstance(consumes, str) else set(consumes or ())
        event_type = trigger.filter["type"]
        if consumes is not None and event_type not in accepted:
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
        budget = load_stage(service.function).timeout(_settings(service, monkeypatch))
        assert budget < service.timeout_seconds, f"{service.name}: {budget} s"
