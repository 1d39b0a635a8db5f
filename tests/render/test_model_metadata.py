"""A model whose name is not ASCII: its image is stored, on every backend.

Object metadata is printable ASCII (S3 sends it as ``x-amz-meta-*`` headers, and every backend
refuses anything else: :func:`imagegen.storage.base.validate_metadata`). A local model
directory may be named in any script, and the settings take it; its image must be stored all
the same, not refused after a full render at every delivery.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import SecretStr

from imagegen.render.stage import RenderStage
from imagegen.settings import Settings
from imagegen.storage import LocalStorage, S3Storage, s3_options
from imagegen.storage.base import GenerationKeys, Storage
from tests.fakes.render_backend import CountingBackend, enhanced_prompt
from tests.fakes.s3_server import ACCESS_KEY_ID, SECRET_ACCESS_KEY, S3Server


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    with S3Server() as server:
        yield server


@pytest.fixture(params=["local", "s3"])
def storage(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Storage:
    if request.param == "local":
        return LocalStorage(tmp_path / "output")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    s3: S3Server = request.getfixturevalue("s3")
    bucket = s3.create_bucket(f"model-{uuid.uuid4().hex[:12]}")
    options = s3_options(
        "minio",
        endpoint_url=s3.endpoint,
        access_key_id=SecretStr(ACCESS_KEY_ID),
        secret_access_key=SecretStr(SECRET_ACCESS_KEY),
    )
    return S3Storage(bucket, "images", options)


async def test_the_image_of_a_model_with_a_non_ascii_name_is_stored(
    storage: Storage, tmp_path: Path
) -> None:
    # A tiny pipeline's directory under a folder named in French: the family is read from the
    # name's last part, as for a directory enhance cannot see.
    model = str(tmp_path / "modèle" / "tiny")
    settings = Settings(model=model, served_models=[model])
    job = enhanced_prompt(generation_id="accented-1", model=model)
    first = CountingBackend()

    rendered = await RenderStage(settings, storage, lambda: first).render(job)

    assert first.renders == 1 and rendered.model == model
    stored = await storage.head(GenerationKeys(job.generation_id, job.requested_at).image)
    assert stored is not None and stored.metadata["sha256"] == rendered.sha256
    assert all(value.isascii() for value in stored.metadata.values())
    # What was stored answers a redelivery, on another replica, without rendering again.
    second = CountingBackend()
    assert await RenderStage(settings, storage, lambda: second).render(job) == rendered
    assert second.renders == 0
