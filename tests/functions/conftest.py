from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.fakes.s3_server import ACCESS_KEY_ID, SECRET_ACCESS_KEY, S3Server
from tests.functions.clients import InProcessFunction
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


def auth_env(issuer_url: str, *api_key_hashes: str) -> dict[str, str]:
    """Authentication on: OIDC tokens of the test issuer at ``issuer_url`` (over plain HTTP, no
    token of the pod's own), and API keys of ``api_key_hashes``."""
    env = {
        "IMAGEGEN_AUTH_REQUIRED": "true",
        "IMAGEGEN_OIDC_DISCOVERY_URL": issuer_url,
        "IMAGEGEN_OIDC_CA_FILE": "",
        "IMAGEGEN_OIDC_TOKEN_FILE": "",
    }
    if api_key_hashes:
        env["IMAGEGEN_API_KEY_HASHES"] = ",".join(api_key_hashes)
    return env


def s3_env(s3: S3Server, storage_url: str) -> dict[str, str]:
    """The settings of a function storing in the test S3 server."""
    return {
        "IMAGEGEN_STORAGE_URL": storage_url,
        "IMAGEGEN_S3_ENDPOINT_URL": s3.endpoint,
        "IMAGEGEN_S3_PRESET": "minio",
        "IMAGEGEN_S3_ACCESS_KEY_ID": ACCESS_KEY_ID,
        "IMAGEGEN_S3_SECRET_ACCESS_KEY": SECRET_ACCESS_KEY,
    }


@pytest.fixture(scope="module")
def chain_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("store")


@pytest.fixture(scope="module")
def chain(chain_store: Path) -> Iterator[dict[str, InProcessFunction]]:
    """enhance, render, persist and derive over one local store, in this process, per module.

    The concerns that need real processes (gunicorn, kills, concurrency, S3) start their own
    servers with ``start_server``.
    """
    env = base_env(chain_store)
    stages = ("enhance", "render", "persist", "derive")
    functions = {stage: InProcessFunction(stage, env) for stage in stages}
    yield functions
    for function in functions.values():
        function.client.close()
