"""Replays reach the broker: the ledger, and only the ledger, has it as K_SINK.

The stages never publish on their own (their events are HTTP replies), so a SinkBinding that
selected them would only patch their Services: a new revision at each rollout, for render a
spare GPU pod while it rolls.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from .conftest import OVERLAYS


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_only_the_ledger_publishes_to_the_broker(
    render: Callable[[str], list[dict[str, Any]]], overlay: str
) -> None:
    docs = render(overlay)
    [binding] = [d for d in docs if d["kind"] == "SinkBinding"]
    [broker] = [d for d in docs if d["kind"] == "Broker"]
    assert binding["spec"]["sink"]["ref"]["kind"] == "Broker"
    assert binding["spec"]["sink"]["ref"]["name"] == broker["metadata"]["name"]
    subject = binding["spec"]["subject"]
    assert (subject["apiVersion"], subject["kind"]) == ("serving.knative.dev/v1", "Service")
    # By name, not by a selector that could grow to match a stage.
    assert "selector" not in subject
    services = {
        d["metadata"]["name"]
        for d in docs
        if d["kind"] == "Service" and d["apiVersion"] == subject["apiVersion"]
    }
    assert subject["name"] == "imagegen-ledger"
    assert subject["name"] in services
