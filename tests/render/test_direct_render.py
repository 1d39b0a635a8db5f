"""A direct render (plain JSON, no enhance before it) retried with the same body."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest

from imagegen.errors import InvalidRequest
from imagegen.models import EnhancedPrompt, RenderRequest
from imagegen.render import stored_png
from imagegen.render.stage import RenderStage
from imagegen.settings import Settings
from imagegen.stages import render as render_stage
from imagegen.stages.render import STAGE
from imagegen.storage import LocalStorage
from imagegen.storage.base import GenerationKeys
from tests.render.test_stage import SlowBackend

EVENING = datetime(2026, 3, 1, 23, 59, tzinfo=UTC)
NEXT_DAY = datetime(2026, 3, 2, 0, 1, tzinfo=UTC)
BODY = {"generation_id": "late-1", "prompt": "a red fox", "width": 256, "height": 256}


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


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Callable[[datetime], None]:
    """Sets the time a direct call is made at."""

    def at(when: datetime) -> None:
        class Fixed(datetime):
            @classmethod
            def now(cls, tz: object = None) -> Fixed:
                return cls.fromtimestamp(when.timestamp(), UTC)

        monkeypatch.setattr(render_stage, "datetime", Fixed)

    return at


async def test_a_retry_after_midnight_gets_the_reply_of_the_day_it_was_rendered(
    tmp_path: Path, clock: Callable[[datetime], None]
) -> None:
    """A call that timed out (a retryable 503) at 23:59 and is sent again after midnight."""
    settings = Settings()
    backend = SlowBackend(0.0)
    stage = RenderStage(settings, LocalStorage(tmp_path), lambda: backend)
    clock(EVENING)
    first = await stage.render(_job(settings, BODY))
    clock(NEXT_DAY)
    again = await stage.render(_job(settings, BODY))

    assert again == first
    assert backend.finished == 1
    assert first.key == "2026/03/01/late-1.png"
    assert [p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.png")] == [first.key]


async def test_another_body_after_midnight_is_refused_before_rendering(
    tmp_path: Path, clock: Callable[[datetime], None]
) -> None:
    settings = Settings()
    backend = SlowBackend(0.0)
    stage = RenderStage(settings, LocalStorage(tmp_path), lambda: backend)
    clock(EVENING)
    await stage.render(_job(settings, BODY))
    clock(NEXT_DAY)

    with pytest.raises(InvalidRequest) as caught:
        await stage.render(_job(settings, {**BODY, "prompt": "a grey wolf"}))

    assert caught.value.fields == ["generation_id"]
    assert backend.finished == 1  # no GPU time for a 400


async def test_a_retry_after_midnight_is_rendered_under_the_day_its_generation_was_claimed(
    tmp_path: Path, clock: Callable[[datetime], None]
) -> None:
    """The first render claimed the id and ended before its PNG was stored (a crash)."""
    settings = Settings()
    backend = SlowBackend(0.0)
    storage = LocalStorage(tmp_path)
    stage = RenderStage(settings, storage, lambda: backend)
    clock(EVENING)
    evening = _job(settings, BODY)
    await stored_png.claim(storage, evening, GenerationKeys(evening.generation_id, EVENING))
    clock(NEXT_DAY)

    rendered = await stage.render(_job(settings, BODY))

    assert rendered.key == "2026/03/01/late-1.png"
    assert rendered.prompt == evening
    assert backend.finished == 1
