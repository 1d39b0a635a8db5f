"""docs/runbook.md's "Recover dead-lettered generations": its command, run on a record the
dead-letter sink wrote, sends an event the prod broker routes where the original went."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

from imagegen.events import MODEL_ATTRIBUTE, PROMPT_ENHANCED
from tests.functions.clients import InProcessFunction
from tests.functions.conftest import base_env
from tests.functions.servers import cloudevent_headers
from tests.knative.cloudevents_http import Message, decode
from tests.knative.routing import Routing

RUNBOOK = Path(__file__).resolve().parents[2] / "docs" / "runbook.md"
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def _resend_filter() -> str:
    """The jq program of the runbook's re-send step."""
    section = RUNBOOK.read_text().split("## Recover dead-lettered generations", 1)[1]
    [program] = re.findall(r"jq -c '(.*?)' \"\$RECORD\"", section, flags=re.S)
    return program


def test_the_runbook_resends_a_dead_lettered_job_with_the_attributes_render_is_routed_on(
    tmp_path: Path, routing: Callable[[str], Routing], jq: str
) -> None:
    prod = routing("prod")
    [model] = [t.filter[MODEL_ATTRIBUTE] for t in prod.triggers if MODEL_ATTRIBUTE in t.filter]
    job = {"generation_id": "g" * 32, "prompt": "a fox", "model": model}
    headers = {
        **cloudevent_headers(PROMPT_ENHANCED, source="/imagegen/enhance", event_id="e-1"),
        f"ce-{MODEL_ATTRIBUTE}": model,
        "ce-traceparent": TRACEPARENT,
        "ce-subject": job["generation_id"],
        "ce-knativeerrorcode": "503",
        "ce-knativeerrordest": "http://imagegen-render.imagegen.svc.cluster.local",
        "ce-knativebrokerttl": "0",
        "content-type": "application/json",
    }
    sink = InProcessFunction("deadletter", base_env(tmp_path))
    try:
        assert sink.post(headers=headers, json=job).status_code == 202
    finally:
        sink.close()
    [record] = tmp_path.rglob("failures/**/*.json")

    sent = subprocess.run(
        [jq, "-c", _resend_filter(), str(record)], check=True, capture_output=True
    ).stdout
    event = decode(Message({"content-type": "application/cloudevents+json"}, sent))
    assert event is not None
    assert not [k for k in event.attributes if k.startswith("knative")]
    assert event[MODEL_ATTRIBUTE] == model and event["traceparent"] == TRACEPARENT
    assert (event["type"], event["source"], event["id"]) == (
        PROMPT_ENHANCED,
        "/imagegen/enhance",
        "e-1",
    )
    assert json.loads(event.data) == job
    reached = [t.subscriber for t in prod.triggers_for(PROMPT_ENHANCED, event.attributes)]
    assert any("render" in str(s) for s in reached), reached
