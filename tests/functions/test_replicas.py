"""Two replicas of a stage, one event, the same moment: one object, one record, one reply.

Kafka redelivers to another pod after a rebalance while the first pod still works on the
event. Each stage runs twice here as real servers sharing one S3 server, and the S3 server
holds the uploads back until both replicas have tried, so the writers race for certain.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import httpx
import pytest

from imagegen.events import IMAGE_DERIVED, IMAGE_PERSISTED, IMAGE_RENDERED, PROMPT_ENHANCED
from imagegen.storage import GenerationKeys
from tests.fakes.render_backend import enhanced_prompt
from tests.fakes.s3_server import S3Server
from tests.functions.conftest import StartServer, base_env, s3_env
from tests.functions.servers import FunctionServer, cloudevent_headers

PREFIX = "generated"


def at_once(servers: list[FunctionServer], headers: dict[str, str], body: bytes) -> list[Any]:
    """POST the same delivery to every server at the same moment."""
    start = threading.Barrier(len(servers))
    replies: list[Any] = [None] * len(servers)

    def deliver(i: int) -> None:
        start.wait(timeout=30)
        replies[i] = httpx.post(servers[i].url, headers=headers, content=body, timeout=120)

    threads = [threading.Thread(target=deliver, args=(i,)) for i in range(len(servers))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(150)
    return replies


def versions(s3: S3Server, key: str) -> int:
    """How many times ``key`` was written (the bucket keeps every version)."""
    listed = s3.client().list_object_versions(Bucket="images", Prefix=f"{PREFIX}/{key}")
    return sum(1 for v in listed.get("Versions", []) if v["Key"] == f"{PREFIX}/{key}")


def assert_same(replies: list[httpx.Response], event_type: str) -> dict[str, Any]:
    for reply in replies:
        assert reply.status_code == 200, reply.text
        assert reply.headers["ce-type"] == event_type
    first, second = replies
    assert first.json() == second.json()
    for attribute in ("ce-id", "ce-subject", "ce-source", "ce-dataref", "ce-time"):
        assert first.headers.get(attribute) == second.headers.get(attribute), attribute
    body: dict[str, Any] = first.json()
    return body


@pytest.mark.slow
def test_two_replicas_of_render_persist_and_derive_write_once_and_answer_alike(
    start_server: StartServer, tmp_path: Path
) -> None:
    with S3Server() as s3:
        s3.create_bucket("images")
        s3.client().put_bucket_versioning(
            Bucket="images", VersioningConfiguration={"Status": "Enabled"}
        )
        env = {**base_env(tmp_path / "unused"), **s3_env(s3, f"s3://images/{PREFIX}")}
        renders = [start_server("render", env, wait=False) for _ in range(2)]
        persists = [start_server("persist", env) for _ in range(2)]
        derives = [start_server("derive", env) for _ in range(2)]
        for server in renders:
            server.wait("/readyz", timeout=120)

        job = enhanced_prompt(generation_id="replicas-1", prompt="a lighthouse in fog", seed=11)
        keys = GenerationKeys(job.generation_id, job.requested_at)

        # 1. render: both replicas render; the first upload wins, the other answers with it.
        s3.gate(".png", 2)
        headers = cloudevent_headers(PROMPT_ENHANCED, subject=job.generation_id, event_id="e-1")
        rendered = assert_same(
            at_once(renders, headers, job.model_dump_json().encode()), IMAGE_RENDERED
        )
        png_puts = [r for r in s3.requests if r.method == "PUT" and r.path.endswith(".png")]
        assert [r.header("if-none-match") for r in png_puts] == ["*", "*"]
        assert versions(s3, keys.image) == 1
        logs = "".join(server.logs() for server in renders)
        assert logs.count("another replica stored this image first") == 1
        assert rendered["rendered_at"] is not None

        # 2. persist: one record; both replies name the same created_at.
        s3.gate(".json", 2)
        headers = cloudevent_headers(IMAGE_RENDERED, subject=job.generation_id, event_id="e-2")
        body = httpx.Response(200, json=rendered).content
        persisted = assert_same(at_once(persists, headers, body), IMAGE_PERSISTED)
        puts = [r for r in s3.requests if r.method == "PUT"]
        record_puts = [r for r in puts if r.path.endswith(keys.metadata)]
        assert len(record_puts) == 2
        assert versions(s3, keys.metadata) == 1
        assert persisted["created_at"] == rendered["rendered_at"]

        # 3. A later redelivery to either replica: the same answer, nothing written.
        before = len(s3.requests)
        again = httpx.post(persists[1].url, headers=headers, content=body, timeout=60)
        assert again.json() == persisted
        assert all(r.method in ("GET", "HEAD") for r in s3.requests[before:])

        # 4. derive, from persist's reply: one derivatives record, each object once.
        s3.gate(".derivatives.json", 2)
        headers = cloudevent_headers(IMAGE_PERSISTED, subject=job.generation_id, event_id="e-3")
        body = httpx.Response(200, json=persisted).content
        derived = assert_same(at_once(derives, headers, body), IMAGE_DERIVED)
        assert versions(s3, keys.derivatives) == 1
        assert versions(s3, keys.thumbnail) == 1
        assert derived["keys"]["avif:256"] == keys.image.replace(".png", ".w256.avif")
        assert versions(s3, derived["keys"]["avif:256"]) == 1
        before = len(s3.requests)
        again = httpx.post(derives[0].url, headers=headers, content=body, timeout=60)
        assert again.json() == derived
        assert all(r.method in ("GET", "HEAD") for r in s3.requests[before:])
