"""The ``imagegenmodel`` attribute render's Triggers filter on: a model name a header cannot
carry as it is travels percent-encoded, the form docs/deploy.md tells a Trigger to name
(Knative's broker neither decodes nor encodes it)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from imagegen.events import MODEL_ATTRIBUTE, PROMPT_ENHANCED
from tests.conftest import ROOT
from tests.functions.clients import InProcessFunction
from tests.functions.conftest import base_env

MODEL = "/opt/my models/tiny"


def test_a_model_needing_encoding_is_routed_on_the_form_deploy_md_names(tmp_path: Path) -> None:
    said = (ROOT / "docs" / "deploy.md").read_text(encoding="utf-8")
    named = re.search(rf"`{MODEL_ATTRIBUTE}: ([^`]+)`", said)
    assert named is not None, "deploy.md names no Trigger filter for an encoded model"
    env = {**base_env(tmp_path / "store"), "IMAGEGEN_ALLOWED_MODELS": f"tiny,{MODEL}"}
    with InProcessFunction("enhance", env) as enhance:
        reply = enhance.post(
            headers={
                "ce-specversion": "1.0",
                "ce-type": "dev.orchestr8.imagegen.generation.requested",
                "ce-source": "/tests",
                "ce-id": "model-1",
                "content-type": "application/json",
            },
            content=json.dumps({"prompt": "a fox", "enhance": False, "model": MODEL}),
        )
    assert reply.status_code == 200, reply.text
    assert reply.headers["ce-type"] == PROMPT_ENHANCED
    assert reply.json()["model"] == MODEL
    # What the broker keeps and a Trigger's exact filter compares: the header as it was sent.
    assert reply.headers[f"ce-{MODEL_ATTRIBUTE}"] == named.group(1) == "/opt/my%20models/tiny"
