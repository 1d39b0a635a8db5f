"""The enhanced prompt of each generation, kept in storage so a redelivery gets the same one.

An LLM's reply can differ between two deliveries of one request (Ollama up for one, down for
the other), and so can a plugin that reads remote context or the time of day. Keeping the first
answer under ``prompts/<generation-id>.json`` (written only if absent: the first replica wins)
makes enhance idempotent whatever the dependencies do, across replicas too.

The memo is what makes a reply final, so storage trouble fails the request with a retryable
503 rather than answering without it: a prompt that was not kept, or a memo that exists but
cannot be read, would let the next delivery answer differently. A chain cannot go further
without storage anyway (render stores the image there). A memo that is there but corrupt (cut
short, not a memo, another generation's) is a 503 too, naming its key for an operator to
restore or remove.
"""

from __future__ import annotations

import hashlib
import json
import logging

from pydantic import ValidationError

from imagegen.errors import DependencyUnavailable, InvalidRequest, NotFound
from imagegen.models import EnhancedPrompt, GenerationRequest
from imagegen.storage.base import Storage, prompt_memo_key
from imagegen.telemetry import answered_again

__all__ = ["EnhanceMemo", "request_digest"]

logger = logging.getLogger("imagegen.enhance")


def request_digest(request: GenerationRequest) -> str:
    """A digest of what was asked, the generation id aside.

    Fields left at their defaults are left out: a release that adds a field (with a default)
    must still recognise the requests it finds in flight, whose memos were written before.
    """
    return _digest(request, defaults=False)


def _digest_with_defaults(request: GenerationRequest) -> str:
    """The digest memos were kept under before :func:`request_digest` left defaults out."""
    return _digest(request, defaults=True)


def _digest(request: GenerationRequest, *, defaults: bool) -> str:
    body = request.model_dump_json(exclude={"generation_id"}, exclude_defaults=not defaults)
    return hashlib.sha256(body.encode()).hexdigest()


def _read_memo(key: str, body: bytes) -> tuple[str, EnhancedPrompt]:
    """The request digest and the prompt of the memo stored under ``key``.

    Raises:
        DependencyUnavailable: the memo is corrupt (:func:`_corrupt_memo`).
    """
    try:
        memo = json.loads(body)
    except (ValueError, RecursionError) as exc:  # ValueError: bad JSON, bad UTF-8
        raise _corrupt_memo(key, f"not JSON: {type(exc).__name__}") from None
    if not isinstance(memo, dict):
        raise _corrupt_memo(key, "not a JSON object")
    for part in ("request", "prompt"):
        if part not in memo:
            raise _corrupt_memo(key, f"no {part!r}")
    if not isinstance(memo["request"], str):
        raise _corrupt_memo(key, "'request' is no digest")
    try:
        # Fields this release does not know are left out: a newer release, mid-rollout, may
        # have kept one (an optional field added to the prompt), and the prompt it kept is
        # still the generation's.
        prompt = EnhancedPrompt.model_validate(memo["prompt"], extra="ignore")
    except ValidationError as exc:
        fields = ", ".join(dict.fromkeys(".".join(map(str, e["loc"])) for e in exc.errors()))
        why = f"'prompt' is no valid EnhancedPrompt: {fields or 'its shape'}"
        raise _corrupt_memo(key, why) from None
    return memo["request"], prompt


def _corrupt_memo(key: str, why: str) -> DependencyUnavailable:
    """The error for a prompt memo that is there but is no memo of its generation.

    A 503, retried, as :func:`imagegen.persist.corrupt_record` answers a corrupt record, and
    for its reasons: the request is fine and the store answers, but the memo is written once,
    so no delivery mends it, and taken for absent it would let this delivery answer a prompt
    other than the one the first delivery answered. Unlike an outage it says which object an
    operator must restore or remove (``docs/runbook.md``, "Repair a corrupt record").
    """
    return DependencyUnavailable(
        f"the prompt memo {key!r} is corrupt ({why[:200]}): it is written once, so no retry"
        " mends it; restore it, or remove it and the next delivery enhances again (a new"
        " prompt, which may differ from the one answered first)",
        retry_after=60,
    )


class EnhanceMemo:
    """Recalls and remembers enhanced prompts by generation."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage

    async def recall(self, generation_id: str, request: GenerationRequest) -> EnhancedPrompt | None:
        """The prompt already written for this generation, if any.

        Raises:
            InvalidRequest: the generation id was used by a different request.
            DependencyUnavailable: storage cannot say whether there is one, or the memo under
                its key is corrupt (:func:`_corrupt_memo`); both retryable.
        """
        key = prompt_memo_key(generation_id)
        if await self.storage.head(key) is None:
            return None
        try:
            body = await self.storage.get(key)
        except NotFound:
            return None  # removed since the head (a lifecycle rule): none is kept
        asked, prompt = _read_memo(key, body)
        if prompt.generation_id != generation_id:
            # Another generation's memo, copied or restored under this key: answering its
            # prompt would reply for this generation with another's id, which render refuses.
            raise _corrupt_memo(key, f"it holds the prompt of generation {prompt.generation_id!r}")
        if asked not in (request_digest(request), _digest_with_defaults(request)):
            raise InvalidRequest(
                f"generation {generation_id!r} was already requested with other parameters",
                errors=[{"field": "generation_id", "message": "already used by another request"}],
            )
        return prompt

    async def remember(
        self, generation_id: str, request: GenerationRequest, prompt: EnhancedPrompt
    ) -> EnhancedPrompt:
        """Keep ``prompt`` unless a replica kept one first; return the one that stands:
        ``prompt`` itself, or the one kept first (the current stage then answers again,
        :func:`~imagegen.telemetry.answered_again`, as the delivery that kept it was counted).

        Raises:
            InvalidRequest: the generation id was used by a different request.
            DependencyUnavailable: the prompt could not be kept, or the one kept first read.
        """
        memo = {"request": request_digest(request), "prompt": prompt.model_dump(mode="json")}
        # Durable as far as the storage's create makes it, and no further is needed: the memo
        # must be there for every replica before this reply leaves (a redelivery comes after
        # it, to any replica, perhaps after this process died), and it must never be read half
        # written. A completed PUT gives both; on a local disk the file is flushed before it is
        # renamed into place, so a host that crashes keeps the whole memo or none, never a
        # torn one that every redelivery would then fail to read.
        key = prompt_memo_key(generation_id)
        if await self.storage.create(
            key, json.dumps(memo).encode(), content_type="application/json"
        ):
            return prompt
        # Another replica enhanced the same request at the same moment: its answer stands.
        kept = await self.recall(generation_id, request)
        if kept is None:  # written, then gone before it could be read: a deletion meanwhile
            logger.warning("prompt memo of %s vanished after another writer kept it", generation_id)
            raise DependencyUnavailable(f"the prompt memo of generation {generation_id!r} vanished")
        answered_again()
        return kept
