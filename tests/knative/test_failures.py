"""One failure path: replies carry failures; nothing binds or patches the Services."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from .conftest import OVERLAYS

# Kinds that inject into or patch the Services they select (sources.knative.dev bindings).
BINDINGS = {"SinkBinding", "ContainerSource", "ApiServerSource"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_nothing_binds_the_services(
    render: Callable[[str], list[dict[str, Any]]], overlay: str
) -> None:
    # A SinkBinding patches the Services it selects: a second render revision at the first
    # deploy, and a spare GPU for every rollout. Failures travel as replies instead.
    docs = render(overlay)
    assert not [d["kind"] for d in docs if d["kind"] in BINDINGS]
    for doc in docs:
        labels = doc["metadata"].get("labels") or {}
        assert "bindings.knative.dev/include" not in labels, doc["metadata"]["name"]
