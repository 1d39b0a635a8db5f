"""Final failures and replays reach the broker: the stages and the ledger have it as K_SINK."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from .conftest import OVERLAYS


def _selected(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expression in selector.get("matchExpressions") or []:
        present = expression["key"] in labels
        value = labels.get(expression["key"])
        operator = expression["operator"]
        if operator == "In" and value not in expression["values"]:
            return False
        if operator == "NotIn" and value in expression["values"]:
            return False
        if operator == "Exists" and not present:
            return False
        if operator == "DoesNotExist" and present:
            return False
    return True


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_stages_and_the_ledger_and_nothing_else_publish_to_the_broker(
    render: Callable[[str], list[dict[str, Any]]], overlay: str
) -> None:
    docs = render(overlay)
    [binding] = [d for d in docs if d["kind"] == "SinkBinding"]
    [broker] = [d for d in docs if d["kind"] == "Broker"]
    assert binding["spec"]["sink"]["ref"]["kind"] == "Broker"
    assert binding["spec"]["sink"]["ref"]["name"] == broker["metadata"]["name"]
    subject = binding["spec"]["subject"]
    assert (subject["apiVersion"], subject["kind"]) == ("serving.knative.dev/v1", "Service")
    services = [
        d for d in docs if d["kind"] == "Service" and d["apiVersion"] == subject["apiVersion"]
    ]
    bound = {
        s["metadata"]["name"]
        for s in services
        if _selected(subject["selector"], s["metadata"].get("labels") or {})
    }
    # The ledger publishes too: the replays it is asked for.
    assert bound == {"imagegen-enhance", "imagegen-render", "imagegen-persist", "imagegen-ledger"}
