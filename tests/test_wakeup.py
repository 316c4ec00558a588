"""Wakeup's contract: it wakes the task sleeping in wait(), and remembers nothing."""

from __future__ import annotations

import asyncio

import pytest

from task_manager.wakeup import Wakeup

pytestmark = pytest.mark.anyio


async def run_ready_callbacks() -> None:
    """Lets the loop run everything that is ready now (no timer is involved)."""
    for _ in range(5):
        await asyncio.sleep(0)


async def test_set_wakes_the_sleeper() -> None:
    wakeup = Wakeup()
    sleeper = asyncio.create_task(wakeup.wait())
    await run_ready_callbacks()
    assert not sleeper.done()
    wakeup.set()
    await asyncio.wait_for(sleeper, 10)


async def test_a_set_with_no_one_waiting_is_not_remembered() -> None:
    wakeup = Wakeup()
    wakeup.set()
    sleeper = asyncio.create_task(wakeup.wait())
    await run_ready_callbacks()
    assert not sleeper.done()  # an asyncio.Event would have let it through
    wakeup.set()
    await asyncio.wait_for(sleeper, 10)


async def test_a_cancelled_sleep_leaves_it_ready_for_the_next() -> None:
    wakeup = Wakeup()
    first = asyncio.create_task(wakeup.wait())
    await run_ready_callbacks()
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    wakeup.set()  # no one waits: dropped, and nothing raises
    second = asyncio.create_task(wakeup.wait())
    await run_ready_callbacks()
    assert not second.done()
    wakeup.set()
    await asyncio.wait_for(second, 10)
