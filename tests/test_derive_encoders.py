"""derive on a Pillow without an encoder of a derivative format (a wheel without libavif, as
Pillow 11.2's are): refused before it says ready, not a 500 for every image."""

from __future__ import annotations

import asyncio
import os
from datetime import UTC, datetime
from pathlib import Path

import PIL
import pytest
from PIL import Image, features

from imagegen import ImageGenService, Settings
from imagegen.derivatives import FORMATS, check_encoders
from imagegen.errors import ConfigurationError
from imagegen.events import IMAGE_PERSISTED
from imagegen.models import PersistedImage
from tests.conftest import RunCli
from tests.fakes.images import gradient_png, store_rendered
from tests.functions.clients import InProcessFunction
from tests.functions.conftest import base_env
from tests.functions.servers import post_event

SAID = (
    f"Pillow {PIL.__version__} has no AVIF encoder, which derive needs (Pillow's wheels carry it"
    " since 11.3; a Pillow built from source needs libavif and libwebp)"
)


@pytest.fixture
def no_avif(monkeypatch: pytest.MonkeyPatch) -> None:
    """This Pillow as a wheel without libavif: its features say so, and it has no AVIF save
    handler (``Image.save`` raises ``KeyError: 'AVIF'``)."""
    check = features.check
    monkeypatch.setattr(features, "check", lambda feature: feature != "avif" and check(feature))
    Image.init()  # every plugin registered: none registers again after this
    monkeypatch.delitem(Image.SAVE, "AVIF")


def test_this_pillow_encodes_every_format() -> None:
    assert all(features.check(fmt) for fmt in FORMATS)
    check_encoders()  # nothing refused


@pytest.mark.usefixtures("no_avif")
def test_a_pillow_without_avif_is_refused_naming_it() -> None:
    with pytest.raises(ConfigurationError) as refused:
        check_encoders()
    assert refused.value.message == SAID
    assert refused.value.errors == []  # no setting is at fault
    assert refused.value.retryable  # the event waits for a Pillow that can, never fails for good


async def _persisted(store: Path) -> PersistedImage:
    async with ImageGenService(Settings(storage_url=str(store))) as service:
        now = datetime(2026, 11, 24, 18, 30, tzinfo=UTC)
        rendered = await store_rendered(service.storage, "d-avif", now, gradient_png(256, 256), "x")
        return await service.persist(rendered)


@pytest.mark.usefixtures("no_avif")
def test_derive_without_avif_never_turns_ready(tmp_path: Path) -> None:
    """It turned ready, and answered every image a 500 (KeyError: 'AVIF'), never retried."""
    store = tmp_path / "store"
    event = asyncio.run(_persisted(store))
    with InProcessFunction("derive", base_env(store)) as derive:
        ready = derive.get("/readyz")
        reply = post_event(derive, IMAGE_PERSISTED, event.model_dump(mode="json"))
    assert ready.status_code == 503 and ready.json()["status"] == "start-up failed"
    assert reply.status_code == 503, reply.text
    assert "Retry-After" in reply.headers
    assert reply.json()["error"] == "not_configured"
    assert reply.json()["message"] == f"derive could not start: {SAID}"
    assert not list(store.rglob("*.derivatives.json"))


@pytest.mark.usefixtures("no_avif")
def test_serve_derive_without_avif_is_refused_before_it_starts(
    cli: RunCli, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "execv", lambda *_: pytest.fail("serve started the server"))
    result = cli("serve", "derive", "--port", "26011")
    assert result.returncode == 2, result.stderr
    assert result.stderr == f"imagegen: error: {SAID}\n"
    assert "serving" not in result.stdout + result.stderr
