"""What render finds under a generation's image key when its conditional store is refused.

A finished image (one with render's metadata) is the answer; nothing else is ever written over:
a store that cannot say what is there is retried, an object render did not write is refused.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from imagegen.errors import DependencyUnavailable, InvalidRequest
from imagegen.models import EnhancedPrompt
from imagegen.render.base import ProgressCallback, RenderOutput
from imagegen.render.stage import RenderStage
from imagegen.settings import Settings
from imagegen.storage import LocalStorage, S3Storage, s3_options
from imagegen.storage.base import GenerationKeys, Storage, StoredObject
from tests.fakes.render_backend import ReadyBackend, enhanced_prompt
from tests.fakes.s3_server import ACCESS_KEY_ID, SECRET_ACCESS_KEY, S3Server

JOB = enhanced_prompt(generation_id="stored-1", prompt="p")
KEY = GenerationKeys(JOB.generation_id, JOB.requested_at).image


class ReplicaBackend(ReadyBackend):
    """Renders bytes of its own: two replicas' images of one job differ, as real renders may
    (nondeterministic kernels), so a second stored image shows."""

    def __init__(self, replica: str) -> None:
        self.replica = replica
        self.renders = 0

    def render(
        self, job: EnhancedPrompt, *, progress: ProgressCallback | None = None
    ) -> RenderOutput:
        self.renders += 1
        png = b"\x89PNG " + self.replica.encode() + job.generation_id.encode()
        return RenderOutput(png=png, width=job.width, height=job.height)


def replica(storage: Storage, name: str) -> tuple[RenderStage, ReplicaBackend]:
    backend = ReplicaBackend(name)
    return RenderStage(Settings(), storage, lambda: backend), backend


async def test_a_redelivery_while_the_sidecar_cannot_be_read_is_retried_not_stored_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A transient EMFILE read as "no metadata" must not make a second replica
    render again and put its own image over the one already announced."""
    first, _ = replica(LocalStorage(tmp_path), "a")
    announced = await first.render(JOB)
    second, backend = replica(LocalStorage(tmp_path), "b")

    read_text = Path.read_text

    def failing(self: Path, *args: Any, **kwargs: Any) -> str:
        if self.name.endswith(".meta"):
            raise OSError(errno.EMFILE, "Too many open files", str(self))
        return read_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", failing)
    with pytest.raises(DependencyUnavailable) as error:
        await second.render(JOB)
    monkeypatch.undo()

    assert error.value.retryable and "Too many open files" in error.value.message
    assert hashlib.sha256((tmp_path / KEY).read_bytes()).hexdigest() == announced.sha256
    # The fault passed: the redelivery is answered with the announced image, not rendered.
    assert await second.render(JOB) == announced
    assert backend.renders == 0


async def test_an_object_render_did_not_write_is_refused_not_replaced(tmp_path: Path) -> None:
    """Locally: an object with a sidecar but no render metadata (a put by another tool). A put
    over it would race: two replicas that both found it would each store their own image."""
    storage = LocalStorage(tmp_path)
    await storage.put(KEY, b"by hand", content_type="image/png", metadata={"by": "hand"})
    stage, backend = replica(storage, "a")

    with pytest.raises(InvalidRequest) as error:
        await stage.render(JOB)

    assert not error.value.retryable and error.value.fields == ["generation_id"]
    assert KEY in error.value.message
    assert (tmp_path / KEY).read_bytes() == b"by hand"
    assert backend.renders == 1  # the first look cannot tell it from an interrupted write


async def test_two_replicas_that_find_an_object_render_did_not_write_store_nothing(
    tmp_path: Path,
) -> None:
    storage = LocalStorage(tmp_path)
    await storage.put(KEY, b"by hand", content_type="image/png", metadata={"by": "hand"})
    (a, _), (b, _) = replica(LocalStorage(tmp_path), "a"), replica(LocalStorage(tmp_path), "b")

    results = await asyncio.gather(a.render(JOB), b.render(JOB), return_exceptions=True)

    assert [type(result) for result in results] == [InvalidRequest, InvalidRequest]
    assert (tmp_path / KEY).read_bytes() == b"by hand"


async def test_a_sidecar_left_without_its_object_is_written_over(tmp_path: Path) -> None:
    """Locally, what an interrupted create leaves: its sidecar, put in place before the object,
    describing no image yet; the render stores its PNG and metadata over it."""
    (tmp_path / KEY).parent.mkdir(parents=True)
    stale = {"content_type": "image/png", "metadata": {"sha256": "0" * 64}}
    (tmp_path / KEY).with_name(f".{Path(KEY).name}.meta").write_text(json.dumps(stale))
    storage = LocalStorage(tmp_path)
    stage, _ = replica(storage, "a")

    rendered = await stage.render(JOB)

    assert hashlib.sha256((tmp_path / KEY).read_bytes()).hexdigest() == rendered.sha256
    stored = await storage.head(KEY)
    assert stored is not None and stored.metadata["sha256"] == rendered.sha256


async def test_an_object_left_without_its_sidecar_is_refused_not_replaced(tmp_path: Path) -> None:
    """Locally, an object is put in place after its sidecar: one without it was not written by
    render (a copy by hand), and is never written over, as on S3."""
    (tmp_path / KEY).parent.mkdir(parents=True)
    (tmp_path / KEY).write_bytes(b"a copy by hand")
    stage, backend = replica(LocalStorage(tmp_path), "a")

    with pytest.raises(InvalidRequest):
        await stage.render(JOB)

    assert (tmp_path / KEY).read_bytes() == b"a copy by hand"
    assert backend.renders == 1  # rendered, then refused the store: nothing written over


class VanishingStorage(LocalStorage):
    """Refuses the create of the image, then finds nothing: removed between the two calls."""

    async def create(self, key: str, data: bytes, **options: Any) -> bool:
        return False if key == KEY else await super().create(key, data, **options)

    async def head(self, key: str) -> StoredObject | None:
        return None if key == KEY else await super().head(key)


async def test_an_object_removed_while_the_image_is_stored_is_retried(tmp_path: Path) -> None:
    stage, _ = replica(VanishingStorage(tmp_path), "a")

    with pytest.raises(DependencyUnavailable) as error:
        await stage.render(JOB)

    assert KEY in error.value.message and error.value.retryable


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    with S3Server() as server:
        yield server


async def test_an_s3_object_without_render_metadata_is_refused_not_replaced(
    s3: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On S3 an object and its metadata are one PutObject: an object at the key without
    render's metadata was put there by something else (``aws s3 cp``, say)."""
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    bucket = s3.create_bucket("stored-object")
    s3.client().put_object(Bucket=bucket, Key=KEY, Body=b"copied", ContentType="image/png")
    options = s3_options(
        "minio",
        endpoint_url=s3.endpoint,
        access_key_id=SecretStr(ACCESS_KEY_ID),
        secret_access_key=SecretStr(SECRET_ACCESS_KEY),
    )
    stage, _ = replica(S3Storage(bucket, options=options), "a")

    with pytest.raises(InvalidRequest) as error:
        await stage.render(JOB)

    assert KEY in error.value.message
    assert s3.client().get_object(Bucket=bucket, Key=KEY)["Body"].read() == b"copied"
