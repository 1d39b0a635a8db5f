"""Storage that says what a stage asks of it: how often it looks objects up, which it reads."""

from __future__ import annotations

import pytest

from imagegen.storage import LocalStorage
from imagegen.storage.base import Storage, StoredObject

__all__ = ["CountingStorage", "reads_of"]


class CountingStorage(LocalStorage):
    """Counts the lookups of stored objects (``head``)."""

    heads = 0

    async def head(self, key: str) -> StoredObject | None:
        self.heads += 1
        return await super().head(key)


def reads_of(storage: Storage, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The keys ``storage`` is asked to read (``get``) from now on, in order."""
    read: list[str] = []
    get = storage.get

    async def spy(key: str) -> bytes:
        read.append(key)
        return await get(key)

    monkeypatch.setattr(storage, "get", spy)
    return read
