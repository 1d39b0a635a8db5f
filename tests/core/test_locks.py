from __future__ import annotations

import asyncio

from imagegen._locks import KeyedLocks


async def test_one_holder_per_key_and_nothing_left_behind() -> None:
    locks = KeyedLocks()
    inside: dict[str, int] = {"a": 0, "b": 0}
    most: dict[str, int] = {"a": 0, "b": 0}

    async def hold(key: str) -> None:
        async with locks(key):
            inside[key] += 1
            most[key] = max(most[key], inside[key])
            await asyncio.sleep(0.01)
            inside[key] -= 1

    await asyncio.gather(*(hold(k) for k in "aabbab"))
    assert most == {"a": 1, "b": 1}
    assert len(locks) == 0


async def test_different_keys_do_not_wait_for_each_other() -> None:
    locks = KeyedLocks()
    async with locks("a"):
        await asyncio.wait_for(_enter(locks, "b"), timeout=1)


async def _enter(locks: KeyedLocks, key: str) -> None:
    async with locks(key):
        pass
