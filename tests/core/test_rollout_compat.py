"""A rolling upgrade: pods of two releases side by side, a redelivery reaching either.

The release after this one is stood for by models with fields added the way docs/events.md
says a field is added (optional, its default meaning "as before"), at the top of the job and
in an object it holds. What one release stored must be the generation's to the other, both
ways; a different job must still be refused.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
from pydantic import Field

from imagegen.derive import DeriveStage
from imagegen.errors import InvalidRequest
from imagegen.models import Contribution, EnhancedPrompt, RenderedImage
from imagegen.persist import PersistStage
from imagegen.render import stored_png
from imagegen.render.stage import RenderStage
from imagegen.settings import Settings
from imagegen.storage import LocalStorage
from imagegen.storage.base import GenerationKeys
from tests.fakes.render_backend import CountingBackend, enhanced_prompt

SIZE = 256


class NextContribution(Contribution):
    """A plugin's contribution as the next release has it: a field more."""

    weight: float = 1.0


class NextEnhancedPrompt(EnhancedPrompt):
    """The job as the next release has it: fields more, each at a default meaning "as before"."""

    style: str | None = None
    tags: list[str] = Field(default_factory=list)
    contributions: list[NextContribution] = Field(default_factory=list)  # type: ignore[assignment]


def wire(generation_id: str) -> str:
    """A job as enhance (of either release: it is deployed last) sends it."""
    job = enhanced_prompt(
        generation_id=generation_id,
        width=SIZE,
        height=SIZE,
        contributions=[Contribution(plugin="time", text="at dusk")],
        metadata={"campaign": "spring"},
        requested_at=datetime(2026, 12, 6, 10, tzinfo=UTC),
    )
    return job.model_dump_json()


def today(generation_id: str) -> EnhancedPrompt:
    return EnhancedPrompt.model_validate_json(wire(generation_id))


def next_release(generation_id: str) -> EnhancedPrompt:
    return NextEnhancedPrompt.model_validate_json(wire(generation_id))


def render_stage(root: Path, backend: CountingBackend) -> RenderStage:
    return RenderStage(Settings(storage_url=str(root)), LocalStorage(root), lambda: backend)


Reader = Callable[[str], EnhancedPrompt]  # a job by its generation id, as a release reads it
READERS: dict[str, tuple[Reader, Reader]] = {
    "next reads today's": (today, next_release),
    "today reads next's": (next_release, today),
}


def test_the_job_read_by_either_release_is_the_same_job() -> None:
    # What the tests below rest on: either release reads the same JSON as one job, and
    # dumps it otherwise (the fields added, at their defaults).
    first, second = today("g-same"), next_release("g-same")
    assert isinstance(second, NextEnhancedPrompt)
    assert second.contributions[0].model_dump() != first.contributions[0].model_dump()
    assert second.model_dump_json() != first.model_dump_json()


@pytest.mark.parametrize("stored_by, read_by", list(READERS.values()), ids=list(READERS))
async def test_a_png_stored_by_either_release_answers_the_other_releases_redelivery(
    tmp_path: Path, stored_by: Reader, read_by: Reader
) -> None:
    backend = CountingBackend()
    first = await render_stage(tmp_path, backend).render(stored_by("g-roll"))

    # Another pod, of the other release, gets the same prompt.enhanced again.
    again = await render_stage(tmp_path, backend).render(read_by("g-roll"))

    assert backend.renders == 1
    assert (again.key, again.sha256, again.rendered_at) == (
        first.key,
        first.sha256,
        first.rendered_at,
    )


@pytest.mark.parametrize("stored_by, read_by", list(READERS.values()), ids=list(READERS))
async def test_persist_of_either_release_records_the_image_the_other_stored(
    tmp_path: Path, stored_by: Reader, read_by: Reader
) -> None:
    """Render of one release stored the PNG; its redelivery was answered from storage by a
    render of the other, whose image.rendered persist of that other release checks against
    the PNG's digests."""
    first = await render_stage(tmp_path, CountingBackend()).render(stored_by("g-persist"))
    # The other release's reply from storage: the same, but for the job as it reads it.
    rendered = first.model_copy(update={"prompt": read_by("g-persist")})
    storage = LocalStorage(tmp_path)

    persisted = await PersistStage(Settings(storage_url=str(tmp_path)), storage).run(rendered)

    assert (persisted.key, persisted.sha256) == (rendered.key, rendered.sha256)


@pytest.mark.parametrize(
    "other",
    [
        lambda gid: next_release(gid).model_copy(update={"style": "noir"}),
        lambda gid: next_release(gid).model_copy(update={"tags": ["sea"]}),
        lambda gid: today(gid).model_copy(update={"seed": 7}),
        lambda gid: NextEnhancedPrompt.model_validate_json(
            wire(gid).replace('"text":"at dusk"', '"text":"at dusk","weight":2.0')
        ),
    ],
    ids=["a new field set", "a new list filled", "another seed", "a nested new field set"],
)
async def test_a_different_job_is_still_refused_across_releases(
    tmp_path: Path, other: Reader
) -> None:
    backend = CountingBackend()
    rendered = await render_stage(tmp_path, backend).render(today("g-other"))
    job = other("g-other")

    with pytest.raises(InvalidRequest) as caught:
        await render_stage(tmp_path, backend).render(job)
    assert caught.value.fields == ["generation_id"]
    assert backend.renders == 1

    # Nor does persist take it for the stored image's job.
    claim = rendered.model_copy(update={"prompt": job, "seed": job.seed})
    settings = Settings(storage_url=str(tmp_path))
    with pytest.raises(InvalidRequest) as refused:
        await PersistStage(settings, LocalStorage(tmp_path)).run(claim)
    assert refused.value.fields == ["prompt"]


async def test_derive_reads_a_record_a_newer_persist_wrote(tmp_path: Path) -> None:
    """The metadata record of a persist one release ahead, with fields this release does not
    know, is the image's record to derive (not a corrupt one, a 503 at every delivery)."""
    backend = CountingBackend()
    rendered: RenderedImage = await render_stage(tmp_path, backend).render(today("g-derive"))
    settings = Settings(storage_url=str(tmp_path), derivative_widths=[32])
    storage = LocalStorage(tmp_path)
    persisted = await PersistStage(settings, storage).run(rendered)
    path = tmp_path / GenerationKeys("g-derive", rendered.prompt.requested_at).metadata
    record = json.loads(path.read_text())
    record["persisted"]["thumbnail_format"] = "webp"
    record["request"]["style"] = None
    path.write_text(json.dumps(record))

    derived = await DeriveStage(settings, storage).run(persisted)

    assert (derived.generation_id, derived.sha256) == ("g-derive", persisted.sha256)


async def test_the_png_keeps_every_digest_within_its_metadata_limit(tmp_path: Path) -> None:
    """S3 keeps 2 KB of user metadata (names and values), which storage holds every backend
    to: a generation id of the longest, a hub model id and a render's timings still fit."""
    settings = Settings(storage_url=str(tmp_path))
    backend = CountingBackend()
    job = today("g" * 128).model_copy(update={"model": "black-forest-labs/FLUX.1-schnell"})
    stage = RenderStage(settings, LocalStorage(tmp_path), lambda: backend)

    rendered = await stage.render(job)

    stored = await LocalStorage(tmp_path).head(rendered.key)
    assert stored is not None
    assert {"job", "job-canonical", "job-stable"} <= set(stored.metadata)
    assert stored_png.matches(
        next_release("g" * 128).model_copy(update={"model": job.model}), stored
    )
