"""The enhanced prompt of each generation, kept in storage so a redelivery gets the same one.

An LLM's reply can differ between two deliveries of one request (Ollama up for one, down for
the other), and so can a plugin that reads remote context. Keeping the first answer under
``<yyyy>/<mm>/<dd>/<generation-id>.prompt.json`` (written only if absent: the first replica
wins) makes enhance idempotent whatever the dependencies do, across replicas too. Storage
trouble never fails enhance: the memo is skipped and logged.
"""

from __future__ import annotations

import hashlib
import json
import logging

from imagegen.errors import DependencyUnavailable, InvalidRequest
from imagegen.models import EnhancedPrompt, GenerationRequest
from imagegen.storage.base import GenerationKeys, Storage
from imagegen.validation import parse_model

__all__ = ["EnhanceMemo", "request_digest"]

logger = logging.getLogger("imagegen.enhance")


def request_digest(request: GenerationRequest) -> str:
    """A digest of what was asked, the generation id aside."""
    body = request.model_dump_json(exclude={"generation_id"})
    return hashlib.sha256(body.encode()).hexdigest()


class EnhanceMemo:
    """Recalls and remembers enhanced prompts by generation."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage

    async def recall(self, keys: GenerationKeys, digest: str) -> EnhancedPrompt | None:
        """The prompt already written for this generation, if any.

        Raises:
            InvalidRequest: the generation id was used by a different request.
        """
        try:
            if await self.storage.head(keys.prompt) is None:
                return None
            memo = json.loads(await self.storage.get(keys.prompt))
        except DependencyUnavailable as exc:
            logger.warning("prompt memo unavailable: %s", exc.message)
            return None
        if memo.get("request") != digest:
            raise InvalidRequest(
                f"generation {keys.generation_id!r} was already requested with other parameters",
                errors=[{"field": "generation_id", "message": "already used by another request"}],
            )
        return parse_model(EnhancedPrompt, memo["prompt"])

    async def remember(
        self, keys: GenerationKeys, digest: str, prompt: EnhancedPrompt
    ) -> EnhancedPrompt:
        """Keep ``prompt`` unless a replica kept one first; return the one that stands.

        Raises:
            InvalidRequest: the generation id was used by a different request.
        """
        memo = {"request": digest, "prompt": prompt.model_dump(mode="json")}
        # Durable as far as the storage's create makes it, and no further is needed: the memo
        # must be there for every replica before this reply leaves (a redelivery comes after
        # it, to any replica, perhaps after this process died), and it must never be read half
        # written. A completed PUT gives both; on a local disk the file is flushed before it is
        # renamed into place, so a host that crashes keeps the whole memo or none, never a
        # torn one that every redelivery would then fail to read.
        try:
            created = await self.storage.create(
                keys.prompt, json.dumps(memo).encode(), content_type="application/json"
            )
        except DependencyUnavailable as exc:
            logger.warning("prompt memo not written: %s", exc.message)
            return prompt
        if created:
            return prompt
        # Another replica enhanced the same request at the same moment: its answer stands.
        return await self.recall(keys, digest) or prompt
