"""The README stays true: its settings table and its local-invoke commands."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from imagegen.settings import Settings
from tests.conftest import ROOT

README = (ROOT / "README.md").read_text()


def _section(title: str) -> str:
    start = README.index(title)
    end = README.find("\n## ", start + len(title))
    return README[start : end if end != -1 else None]


def _blocks(text: str) -> list[str]:
    return re.findall(r"```sh\n(.*?)```", text, flags=re.S)


def test_every_setting_is_in_the_configuration_table() -> None:
    table = _section("## Configuration")
    for name in Settings.model_fields:
        assert f"`IMAGEGEN_{name.upper()}`" in table, f"IMAGEGEN_{name.upper()} is not documented"
    documented = set(re.findall(r"`IMAGEGEN_([A-Z0-9_]+)`", table))
    assert documented <= {n.upper() for n in Settings.model_fields}, (
        "the table names unknown settings"
    )


def test_the_local_invoke_commands_work(tmp_path: Path) -> None:
    serve, event, plain = _blocks(_section("### Invoke a function locally"))
    # `imagegen` and `curl` as a user has them: the project's environment first on PATH.
    env = {
        **os.environ,
        "THREADS": "4",
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    servers = []
    try:
        for line in serve.strip().splitlines():
            command = line.rstrip("& ").strip()
            servers.append(
                subprocess.Popen(
                    ["bash", "-c", command],
                    cwd=tmp_path,
                    env=env,
                    start_new_session=True,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        ports = [int(p) for p in re.findall(r"--port (\d+)", serve)]
        for port in ports:
            _wait(f"http://localhost:{port}/readyz")

        run = {"cwd": tmp_path, "env": env, "capture_output": True, "text": True, "check": True}
        reply = subprocess.run(["bash", "-c", event], **run)
        assert reply.stdout.startswith("HTTP/1.1 200"), reply.stdout
        assert "ce-type: dev.orchestr8.imagegen.prompt.enhanced" in reply.stdout.lower()
        assert "ce-subject: my-first-image" in reply.stdout.lower()

        persisted = subprocess.run(["bash", "-c", plain], **run)
        body = json.loads(persisted.stdout)
        assert (tmp_path / "output" / body["key"]).is_file()
        assert (tmp_path / "lighthouse.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert json.loads((tmp_path / "enhanced.json").read_text())["seed"] == 7
    finally:
        for server in servers:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(10)


def _wait(url: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(url)


def test_the_quick_start_commands_exist() -> None:
    quick = _blocks(_section("## Quick start"))[0]
    targets = re.findall(r"^make (\w+)", quick, flags=re.M)
    makefile = (ROOT / "Makefile").read_text()
    assert targets == ["demo", "test"]
    for target in targets:
        assert re.search(rf"^{target}:", makefile, flags=re.M), target
    assert "make test" in (ROOT / ".ci" / "run").read_text()  # CI runs the README's test command
