"""Wakeup: how a stream's one sending task sleeps until there is something to send."""

from __future__ import annotations

import asyncio


class Wakeup:
    """Wakes the one task sleeping in wait(). Unlike asyncio.Event it remembers nothing:
    a set() with no one waiting is dropped, so the sleeper must check for work after its
    last await and before wait(). In exchange it costs a bare future per sleep, which
    counts where one change wakes a thousand watches."""

    __slots__ = ("_waiter",)

    def __init__(self) -> None:
        self._waiter: asyncio.Future[None] | None = None

    def set(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self) -> None:
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None
