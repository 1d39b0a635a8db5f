"""A library caller's ``call=``: checked as the request it stands for would be, before any
stage runs."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from imagegen import GenerationRequest, ImageGenService, InvalidRequest, Settings
from imagegen.plugins import PluginSet
from imagegen.stages import Call

REQUEST = GenerationRequest(prompt="a kite", width=256, height=256, enhance=False)


@pytest.fixture
def service(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ImageGenService:
    """A service whose enhance stage must not be reached: each call here is refused first."""
    settings = Settings(storage_url=str(tmp_path / "out"), model="tiny", ollama_retries=0)
    built = ImageGenService(settings, plugins=PluginSet([], settings=settings))

    async def reached(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the plugins and the LLM ran for a call that is refused")

    monkeypatch.setattr(built.enhance_stage, "run", reached)
    return built


async def refusal(service: ImageGenService, **fields: Any) -> InvalidRequest:
    """What enhance answers for ``request`` with ``fields`` in its data."""
    with pytest.raises(InvalidRequest) as caught:
        await service.enhance({**REQUEST.model_dump(), **fields})
    return caught.value


@pytest.mark.parametrize("call", ["call-1", {"generation_id": "call-1"}])
async def test_a_call_that_is_no_call_is_a_type_error(service: ImageGenService, call: Any) -> None:
    with pytest.raises(TypeError, match=f"call must be a Call or None, not {type(call).__name__}"):
        await service.enhance(REQUEST, call=call)
    with pytest.raises(TypeError, match="call must be a Call"):
        await service.generate(REQUEST, call=call)


@pytest.mark.parametrize("gid", [5, b"call-1", ["call-1"]])
async def test_a_generation_id_that_is_no_string_is_refused_by_name(
    service: ImageGenService, gid: Any
) -> None:
    for when in (None, datetime.now(UTC)):
        with pytest.raises(InvalidRequest) as caught:
            await service.enhance(REQUEST, call=Call(generation_id=gid, requested_at=when))
        assert caught.value.fields == ["generation_id"]


@pytest.mark.parametrize(
    "when", ["2024-01-01T00:00:00Z", 1_700_000_000, datetime(2024, 1, 1).date()]
)
async def test_a_time_that_is_no_datetime_is_refused_by_name(
    service: ImageGenService, when: Any
) -> None:
    for gid in ("call-1", None):
        with pytest.raises(InvalidRequest) as caught:
            await service.generate(REQUEST, call=Call(generation_id=gid, requested_at=when))
        assert caught.value.fields == ["requested_at"]
        assert "must be a datetime" in str(caught.value.errors)


@pytest.mark.parametrize(
    "when",
    [
        datetime(1, 1, 1, tzinfo=timezone(timedelta(hours=5))),  # before year 1 in UTC
        datetime(9999, 12, 31, 23, 59, tzinfo=timezone(timedelta(hours=-5))),  # after 9999
        datetime(999, 1, 1, tzinfo=UTC),
        datetime(1969, 12, 31, 23, 30, tzinfo=UTC),
        datetime(1970, 1, 1, 0, 30, tzinfo=timezone(timedelta(hours=1))),  # 1969 in UTC
    ],
)
async def test_a_time_out_of_range_is_refused_as_the_requests_own_is(
    service: ImageGenService, when: datetime
) -> None:
    for gid in ("call-1", None):
        with pytest.raises(InvalidRequest) as caught:
            await service.generate(REQUEST, call=Call(generation_id=gid, requested_at=when))
        assert caught.value.fields == ["requested_at"]
        assert caught.value.errors == [
            {"field": "requested_at", "message": "must be between 1970 and 2999 (UTC)"}
        ]
    # The request's own time, where it can be written as one (RFC 3339 has four-digit years).
    if 1 <= when.year <= 9998:
        assert (await refusal(service, requested_at=when)).errors == caught.value.errors


@pytest.mark.parametrize(
    "ahead", [timedelta(minutes=6), timedelta(days=1), timedelta(days=320_000)]
)
async def test_a_time_ahead_of_the_clock_is_refused_as_the_requests_own_is(
    service: ImageGenService, ahead: timedelta
) -> None:
    when = min(datetime.now(UTC) + ahead, datetime(2999, 12, 31, tzinfo=UTC))
    with pytest.raises(InvalidRequest) as caught:
        await service.generate(REQUEST, call=Call(generation_id="call-1", requested_at=when))
    in_request = await refusal(service, requested_at=when)
    assert (str(caught.value), caught.value.errors) == (str(in_request), in_request.errors)
    assert caught.value.fields == ["requested_at"]


async def test_a_call_within_range_keeps_its_time_a_naive_one_in_utc(tmp_path: Path) -> None:
    settings = Settings(storage_url=str(tmp_path / "out"), model="tiny", ollama_retries=0)
    service = ImageGenService(settings, plugins=PluginSet([], settings=settings))
    soon = datetime.now(UTC).replace(microsecond=0) + timedelta(minutes=4)  # a clock ahead
    for i, (when, stored) in enumerate(
        (
            (datetime(2024, 5, 1, 12), datetime(2024, 5, 1, 12, tzinfo=UTC)),
            (datetime(1970, 1, 1, tzinfo=UTC), datetime(1970, 1, 1, tzinfo=UTC)),
            (soon, soon),
        )
    ):
        enhanced = await service.enhance(
            REQUEST, call=Call(generation_id=f"call-{i}", requested_at=when)
        )
        assert (enhanced.generation_id, enhanced.requested_at) == (f"call-{i}", stored)
