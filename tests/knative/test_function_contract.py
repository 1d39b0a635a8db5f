"""The manifests agree with the adapters in functions/: types consumed and emitted, time budgets."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from imagegen import stages
from imagegen.stages import Stage

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
