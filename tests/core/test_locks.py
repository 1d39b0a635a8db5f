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


async def test_a_holder_knows_whether_anyone_was_there_before_it() -> None:
    locks = KeyedLocks()
    entered = asyncio.Event()
    waited: list[bool] = []

    async def first() -> None:
        async with locks("a") as was_there:
            waited.append(was_there)
            entered.set()
            await asyncio.sleep(0.01)

    async def second() -> None:
        await entered.wait()
        assert "a" in locks
        async with locks("a") as was_there:
            waited.append(was_there)

    await asyncio.gather(first(), second())
    assert waited == [False, True]
    assert "a" not in locks
