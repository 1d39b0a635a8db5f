"""``imagegen serve`` on an IPv6 address, given bare or in brackets."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROOT, RunCli
from tests.functions.servers import free_port


def _port() -> int:
    """A port free on IPv6 loopback too, below the ephemeral range (:func:`free_port`)."""
    while True:
        port = free_port()
        with socket.socket(socket.AF_INET6) as sock:
            try:
                sock.bind(("::1", port))
            except OSError:
                continue
            return port


@pytest.mark.slow
@pytest.mark.parametrize("host", ["::1", "[::1]"])
def test_serve_listens_on_an_ipv6_address(tmp_path: Path, host: str) -> None:
    port = _port()
    command = [sys.executable, "-m", "imagegen.cli", "serve", "persist"]
    proc = subprocess.Popen(
        [*command, "--host", host, "--port", str(port)],
        cwd=tmp_path,
        env={"IMAGEGEN_FUNCTIONS_DIR": str(ROOT / "functions"), "PATH": "/usr/bin:/bin"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://[::1]:{port}/healthz"
    try:
        deadline = time.monotonic() + 60
        with httpx.Client() as client:
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    reply = client.get(url)
                    break
                except httpx.HTTPError:
                    time.sleep(0.1)
        assert proc.poll() is None, proc.communicate()
        assert reply.json()["stage"] == "persist"
    finally:
        proc.terminate()
        _, stderr = proc.communicate(timeout=30)
    assert stderr.splitlines()[0] == f"serving persist on http://[::1]:{port}", stderr


def test_a_bracketed_name_is_refused(cli: RunCli) -> None:
    refused = cli("serve", "persist", "--host", "[localhost]", "--port", str(_port()))
    assert refused.returncode == 2, refused.stderr
    assert "'[localhost]' is not an address to listen on" in refused.stderr
