"""What a stored PNG carries, so that any replica can answer for it later.

Render writes these as the object's metadata on the first (winning) write; a redelivery, on
this replica or another, reads them back instead of rendering again (docs/adr/0003), and
:func:`answer` and :func:`rendered_image` make the same reply from either side.
"""

from __future__ import annotations

import hashlib
import json
import math
from datetime import UTC, datetime

from imagegen.errors import DependencyUnavailable, ImageGenError, InvalidRequest, NotFound
from imagegen.models import EnhancedPrompt, RenderedImage
from imagegen.storage.base import GenerationKeys, Storage, StoredObject


def fingerprint(job: EnhancedPrompt) -> str:
    """A digest of everything that decides the pixels and the record of ``job``, as its JSON
    is written: the ``job`` metadata of every stored PNG, one of the digests that
    :func:`matches` (render's and persist's check) compares a job with.

    Every field is in it, those at their defaults too: a release that adds a field to the job
    (with a default) digests every job otherwise. Still written, for releases that compare
    this digest alone; :func:`stable_fingerprint` is the one that outlasts such a release.

    Not ``enhanced_at``: when enhance wrote the job decides neither, and a job kept before
    that time was (none) must still match the image rendered from it. The same job written
    otherwise (its metadata's keys in another order, its time at another offset) has another
    digest: :func:`canonical_fingerprint` is the one that tells them apart.
    """
    return hashlib.sha256(job.model_dump_json(exclude={"enhanced_at"}).encode()).hexdigest()


def canonical_fingerprint(job: EnhancedPrompt) -> str:
    """:func:`fingerprint` of ``job`` however its JSON was written: every time in UTC, every
    object's keys sorted.

    Stored beside :func:`fingerprint` (``job-canonical``) rather than in its place: PNGs stored
    before it was kept carry only the other, and persist of a release before it compares an
    event with that one alone; :func:`matches` accepts any of the digests stored.
    """
    return _canonical(job, defaults=True)


def stable_fingerprint(job: EnhancedPrompt) -> str:
    """:func:`canonical_fingerprint` of ``job`` with every field left at its default left out,
    in nested objects too: stored as ``job-stable``.

    A release that adds a field to the job, with a default that means "as before", leaves this
    digest of every job as it was: during its rollout, the PNG a pod of either release stored
    matches the job as the other reads it (a redelivery can reach either). The other two
    digests count the new field at its default, so they differ across such a rollout. The rule
    of the prompt memo's request digest (:func:`imagegen.enhance.memo.request_digest`).
    """
    return _canonical(job, defaults=False)


def _canonical(job: EnhancedPrompt, *, defaults: bool) -> str:
    utc = job.model_copy(update={"requested_at": job.requested_at.astimezone(UTC)})
    data = utc.model_dump(mode="json", exclude={"enhanced_at"}, exclude_defaults=not defaults)
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def matches(job: EnhancedPrompt, stored: StoredObject, job_digest: str | None = None) -> bool:
    """Whether the PNG ``stored`` was rendered from ``job`` (``job_digest``: its
    :func:`fingerprint`, when known): any digest stored with it is ``job``'s by the same rule;
    one stored without any (by hand, or before digests were kept) says nothing against it.

    A redelivered event carries the bytes of its first delivery, so its :func:`fingerprint`
    is the stored one when the release reading it has the job's fields of the release that
    stored it. Across a release that adds a field to the job, only :func:`stable_fingerprint`
    (``job-stable``) is the same on both sides; a PNG stored before it was kept is matched by
    the other two alone. The same job written otherwise (a direct call retried with its
    metadata in another order) matches by :func:`canonical_fingerprint` and
    :func:`stable_fingerprint`.
    """
    meta = stored.metadata
    if all(meta.get(name) is None for name in _DIGESTS):
        return True
    return (
        meta.get("job-stable") == stable_fingerprint(job)
        or meta.get("job") == (job_digest or fingerprint(job))
        or meta.get("job-canonical") == canonical_fingerprint(job)
    )


# The job's digests a PNG is stored with: :func:`fingerprint`, :func:`canonical_fingerprint`
# and :func:`stable_fingerprint`.
_DIGESTS = ("job", "job-canonical", "job-stable")


def metadata(
    job: EnhancedPrompt,
    sha256: str,
    job_digest: str,
    stage_timings: dict[str, float],
    at: datetime,
) -> dict[str, str]:
    """The PNG object's metadata: ``job_digest`` is :func:`fingerprint` of ``job``.

    All three digests of the job (64 characters each) are kept, each for the releases that
    compare it. The object's metadata may hold 2 KB in all (S3's limit on user metadata, names
    and values, which :func:`imagegen.storage.base.validate_metadata` enforces for every
    backend): this takes some 600 bytes with a generation id of the longest (128 characters)
    and a render's timings.

    Every value is printable ASCII whatever the job holds, as S3 sends metadata as headers and
    every backend refuses anything else: digests, the id (ASCII by its pattern), numbers, JSON
    with its non-ASCII escaped, an ISO time. Not the model: its name is the deployment's text (a
    local directory may be named in any script), and a refused value would fail every delivery
    after a full render. Nothing reads it back; the job's digests cover it, and the records
    hold it.
    """
    return {
        "sha256": sha256,
        "job": job_digest,
        "job-canonical": canonical_fingerprint(job),
        "job-stable": stable_fingerprint(job),
        "generation-id": job.generation_id,
        "seed": str(job.seed),
        "timings": json.dumps(stage_timings, separators=(",", ":"), ensure_ascii=True),
        "rendered-at": at.isoformat(),
    }


def rendered_at(stored: StoredObject) -> datetime | None:
    """When the stored PNG was rendered; None for an object stored before that was kept."""
    try:
        value = datetime.fromisoformat(stored.metadata["rendered-at"])
    except (KeyError, ValueError):
        return None  # stored before the time was recorded
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def timings(stored: StoredObject) -> dict[str, float]:
    """The stage timings the stored PNG was rendered with; empty when unreadable.

    Unreadable includes JSON that is no object of finite numbers (``{"render": "fast"}``,
    ``{"render": null}``, ``NaN``): metadata render did not write. Raising would make a 500
    that every delivery of the event meets again. Empty, it is what render answers for the
    object as well (:func:`answer`), and persist refuses an event that claims other timings,
    naming ``timings``.
    """
    try:
        value = json.loads(stored.metadata.get("timings", "{}"))
        if not isinstance(value, dict):
            return {}
        # OverflowError: an integer too large for a float.
        read = {str(k): float(v) for k, v in value.items()}
    except (ValueError, TypeError, OverflowError):
        return {}
    # A non-finite number has no JSON: an event carrying it back could never match.
    return read if all(math.isfinite(v) for v in read.values()) else {}


def answer(
    job: EnhancedPrompt, stored: StoredObject | None, job_digest: str, location: str
) -> RenderedImage | None:
    """The reply for ``job`` that ``stored`` holds, if it is a finished image (one written with
    :func:`metadata`); refuses an image made from another job under the same generation id."""
    if stored is None or not _finished(stored):
        return None
    if not matches(job, stored, job_digest):
        raise InvalidRequest(
            f"generation {job.generation_id!r} was already rendered from a different job",
            errors=[{"field": "generation_id", "message": "already rendered from another job"}],
        )
    return rendered_image(
        job,
        stored.key,
        location,
        size=stored.size,
        sha256=stored.metadata["sha256"],
        stage_timings=timings(stored),
        at=rendered_at(stored),
    )


def not_rendered(job: EnhancedPrompt, key: str, *, gone: bool) -> ImageGenError:
    """The error for a refused store of ``job``'s PNG under ``key`` where :func:`answer` found
    no finished image: an object render did not write, or (``gone``) none at all.

    Not retried when the object is not render's: no delivery of the job can store its image
    while it is there, and none may replace it (see the caller). The error names the key; once
    an operator has removed the object, the dead-lettered event can be sent again. One that
    was gone by the time it was read was removed meanwhile: the key is free, and a retry
    stores the image.
    """
    if gone:
        return DependencyUnavailable(
            f"the object at {key!r} was removed while generation {job.generation_id!r} was"
            " being stored: retry",
            retry_after=1,
        )
    return InvalidRequest(
        f"an object render did not write is stored at {key!r}, the image key of generation"
        f" {job.generation_id!r}: remove it, then send the event again",
        errors=[{"field": "generation_id", "message": f"its image key {key} holds another object"}],
    )


def rendered_image(
    job: EnhancedPrompt,
    key: str,
    location: str,
    *,
    size: int,
    sha256: str,
    stage_timings: dict[str, float],
    at: datetime | None,
) -> RenderedImage:
    """The reply for ``job``'s PNG stored under ``key``: the same from every replica."""
    return RenderedImage(
        generation_id=job.generation_id,
        key=key,
        location=location,
        size=size,
        sha256=sha256,
        width=job.width,
        height=job.height,
        seed=job.seed,
        model=job.model,
        steps=job.steps,
        guidance=job.guidance,
        timings=stage_timings,
        rendered_at=at,
        prompt=job,
    )


def claim_key(generation_id: str) -> str:
    """Where a generation id's claim on one image key lives: no date in it."""
    return f"renders/{generation_id}.json"


async def claimed(storage: Storage, generation_id: str) -> str | None:
    """The image key ``generation_id`` is claimed for; None while it is not.

    Raises:
        DependencyUnavailable: storage cannot say, or the claim stored cannot be read (a read
            cut short, a damaged object). Taken for no claim, it let a job of another day under
            a claimed id store a second image; retried, the next delivery reads it whole (one
            that stays unreadable must be repaired or removed by an operator).
    """
    key = claim_key(generation_id)
    try:
        body = await storage.get(key)
    except NotFound:
        return None
    try:
        image = json.loads(body).get("image")
    except (ValueError, RecursionError, AttributeError):  # not JSON, not an object
        image = None
    if not isinstance(image, str):
        raise DependencyUnavailable(
            f"the claim {key!r} of generation {generation_id!r} cannot be read: it says"
            " which job may store the generation's image, so none is stored until it is",
            retry_after=5,
        )
    return image


def claimed_day(generation_id: str, image: str | None) -> datetime | None:
    """The day (midnight, UTC) of the image key ``generation_id`` is claimed for, if any."""
    if image is None:
        return None
    try:
        return GenerationKeys.of_image(generation_id, image).requested_at
    except InvalidRequest:  # not a key this code claims
        return None


def check_claim(job: EnhancedPrompt, keys: GenerationKeys, image: str | None) -> None:
    """Refuse ``job`` when its id is claimed (``image``, from :func:`claimed`) for another key.

    Raises:
        InvalidRequest: the id was claimed for an image of another day.
    """
    if image is not None and image != keys.image:
        raise InvalidRequest(
            f"generation {job.generation_id!r} was already rendered from a different job"
            f" (as {image})",
            errors=[{"field": "generation_id", "message": "already rendered from another job"}],
        )


async def claim(storage: Storage, job: EnhancedPrompt, keys: GenerationKeys) -> None:
    """Claim ``job``'s generation id for its image key, before its PNG is stored.

    The image's key carries the request's day, so the stored PNG alone can tell a different
    job under a rendered id from this one only on the same day: a job of another day (an event
    dated otherwise) would find no PNG under its own key and store a second image. The claim
    has no date: the first job to store an id's image writes which key it stores it under
    (first writer wins, across replicas); a job whose key is another is refused, as a
    different job on the same day is. A direct call dated by the day has render look at the
    claim before it renders too (:func:`claimed`): its day is the claim's; this write decides
    between jobs that looked at once.

    Raises:
        InvalidRequest: the id was claimed for an image of another day.
        DependencyUnavailable: storage cannot say.
    """
    key = claim_key(job.generation_id)
    body = json.dumps({"image": keys.image}, separators=(",", ":")).encode()
    if await storage.create(key, body, content_type="application/json"):
        return
    image = await claimed(storage, job.generation_id)
    if image is not None and image != keys.image and not _finished(await storage.head(image)):
        # Claimed by a job whose image is not stored: its render failed, or another process
        # renders it now. Refused all the same: the claim cannot tell which, nor be taken
        # back safely while a job under its key may still store. Not called "rendered".
        raise InvalidRequest(
            f"generation {job.generation_id!r} is claimed by a different job (for {image}),"
            " whose image is not stored: its render failed or is under way",
            errors=[{"field": "generation_id", "message": "claimed by another job"}],
        )
    check_claim(job, keys, image)


def _finished(stored: StoredObject | None) -> bool:
    """Whether ``stored`` is a finished image, one written with :func:`metadata`."""
    return stored is not None and "sha256" in stored.metadata
