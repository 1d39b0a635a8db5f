from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.functions.servers import FunctionServer

StartServer = Callable[..., FunctionServer]


def base_env(store: Path) -> dict[str, str]:
    """Settings shared by the functions of one test chain: the tiny model, local storage."""
    return {
        "IMAGEGEN_MODEL": "tiny",
        "IMAGEGEN_ALLOWED_MODELS": "tiny",
        "IMAGEGEN_STORAGE_URL": str(store),
        "IMAGEGEN_OLLAMA_HOST": "http://127.0.0.1:9",
        "IMAGEGEN_OLLAMA_RETRIES": "0",
        "IMAGEGEN_PUBLIC_BASE_URL": "https://img.example.com",
        "IMAGEGEN_LOG_LEVEL": "INFO",
        "HF_HUB_OFFLINE": "1",
    }


@pytest.fixture(scope="module")
def chain_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("store")


@pytest.fixture(scope="module")
def chain(
    tmp_path_factory: pytest.TempPathFactory, chain_store: Path
) -> Iterator[dict[str, FunctionServer]]:
    """enhance, render and persist over one local store, shared by a test module."""
    logs = tmp_path_factory.mktemp("logs")
    env = base_env(chain_store)
    servers = {
        stage: FunctionServer(stage, env, log_dir=logs)
        for stage in ("enhance", "render", "persist")
    }
    for server in servers.values():
        server.start(wait=False)
    try:
        for server in servers.values():
            server.wait("/readyz", timeout=120)
        yield servers
    finally:
        for server in servers.values():
            server.stop()
