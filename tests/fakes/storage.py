"""Local storage that counts the lookups of stored objects: how often a stage asks storage."""

from __future__ import annotations

from imagegen.storage import LocalStorage
from imagegen.storage.base import StoredObject

__all__ = ["CountingStorage"]


class CountingStorage(LocalStorage):
    """Counts the lookups of stored objects (``head``)."""

    heads = 0

    async def head(self, key: str) -> StoredObject | None:
        self.heads += 1
        return await super().head(key)
