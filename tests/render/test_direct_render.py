"""A direct render (plain JSON, no enhance before it) retried with the same body."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from imagegen.models import EnhancedPrompt, RenderRequest
from imagegen.render.stage import RenderStage
from imagegen.settings import Settings
from imagegen.stages.render import STAGE
from imagegen.storage import LocalStorage
from tests.render.test_stage import SlowBackend


def _job(settings: Settings, body: dict[str, object]) -> EnhancedPrompt:
    assert STAGE.direct is not None
    job = STAGE.direct.complete(settings, RenderRequest.model_validate(body))
    assert isinstance(job, EnhancedPrompt)
    return job


async def test_a_retry_naming_its_generation_but_no_time_gets_the_same_reply(
    tmp_path: Path,
) -> None:
    settings = Settings()
    backend = SlowBackend(0.0)
    stage = RenderStage(settings, LocalStorage(tmp_path), lambda: backend)
    body = {"generation_id": "direct-retry-1", "prompt": "a red fox", "width": 256, "height": 256}
    days = {f"{datetime.now(UTC):%Y/%m/%d}"}
    first = await stage.render(_job(settings, body))
    again = await stage.render(_job(settings, body))  # the same body, sent again
    assert again == first
    assert backend.finished == 1
    # Dated by the day of the request: the key's date is today's.
    days.add(f"{datetime.now(UTC):%Y/%m/%d}")
    assert first.key.rsplit("/", 1)[0] in days


def test_a_direct_call_without_a_generation_keeps_the_time_of_its_request() -> None:
    job = _job(Settings(), {"prompt": "a red fox"})
    assert abs((datetime.now(UTC) - job.requested_at).total_seconds()) < 60


def test_a_direct_call_naming_its_time_keeps_it() -> None:
    at = "2026-03-04T05:06:07Z"
    job = _job(Settings(), {"generation_id": "g-at", "prompt": "p", "requested_at": at})
    assert job.requested_at == datetime(2026, 3, 4, 5, 6, 7, tzinfo=UTC)
