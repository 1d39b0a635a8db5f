"""docs/runbook.md's model rollout replays the dead-lettered jobs' generations: its command,
run by a shell as an operator would (``IMAGEGEN_LEDGER_URL`` holding the ledger's database
URL, as the ``imagegen-ledger`` Secret does), replays through the ledger function, which
sends the request to the broker, and renders nothing on the operator's machine."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from imagegen.auth.api_keys import hash_api_key
from imagegen.events import GENERATION_REQUESTED
from tests.fakes.loopback import broker_ingress
from tests.fakes.oidc_issuer import Issuer
from tests.functions.conftest import auth_env
from tests.ledger.chain import binary, chain

RUNBOOK = Path(__file__).resolve().parents[2] / "docs" / "runbook.md"


def _replay_command() -> str:
    """The replay line of the runbook's "Roll out a new model", from its shell block."""
    section = RUNBOOK.read_text().split("## Roll out a new model", 1)[1].split("\n## ", 1)[0]
    blocks: list[str] = re.findall(r"```sh\n(.*?)```", section, flags=re.S)
    [line] = [
        line.strip() for block in blocks for line in block.splitlines() if "imagegen replay" in line
    ]
    return line


@pytest.mark.parametrize("ledger_url", ["sqlite"], indirect=True)
def test_the_runbooks_replay_goes_through_the_ledger_function_to_the_broker(
    ledger_url: str, start_server: Any, issuer: Issuer, tmp_path: Path
) -> None:
    key = "runbook-replay-key-0123456789abcdef"
    with broker_ingress() as (broker, received):
        ledger = start_server(
            "ledger",
            {
                "IMAGEGEN_LEDGER_URL": ledger_url,
                "K_SINK": broker,
                **auth_env(issuer.url, hash_api_key(key)),
            },
        )
        bearer = {"Authorization": f"Bearer {issuer.sign({}, audience='imagegen-ledger')}"}
        events = chain("gen-rollout")
        for name in ("requested", "enhanced"):
            sent = binary(events[name])
            reply = ledger.post("/", headers={**sent["headers"], **bearer}, json=sent["json"])
            assert reply.status_code == 202, reply.text

        operator = tmp_path / "operator"
        operator.mkdir()
        env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGEGEN_")}
        env.update(
            PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
            HOME=str(operator),
            NS="imagegen",
            GENERATION="gen-rollout",
            LEDGER=ledger.url,
            KEY=key,
            IMAGEGEN_LEDGER_URL=ledger_url,  # the Secret's database URL, in the operator's shell
        )
        done = subprocess.run(
            ["bash", "-c", _replay_command()],
            cwd=operator,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert done.returncode == 0, done.stderr
    [(headers, data)] = received
    assert headers["ce-type"] == GENERATION_REQUESTED
    assert done.stdout.strip() == headers["ce-subject"] != "gen-rollout"
    assert data["prompt"] == events["requested"].data["prompt"]
    assert list(operator.iterdir()) == []  # nothing rendered, stored or recorded here
