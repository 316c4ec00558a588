"""Time as an input: the service asks a Clock, tests bring a ManualClock and move it.

Timestamps and timers (heartbeats, rate-limit windows, compaction) use Clock.now_ns()
and Clock.wait(), never time.* or asyncio.sleep directly.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol

from google.protobuf.timestamp_pb2 import Timestamp


class Clock(Protocol):
    def now_ns(self) -> int:
        """Nanoseconds since the Unix epoch."""
        ...

    async def wait(self, event: asyncio.Event, deadline_ns: int) -> None:
        """Returns when event is set or the clock reaches deadline_ns, whichever is first."""
        ...


class SystemClock:
    def now_ns(self) -> int:
        return time.time_ns()

    async def wait(self, event: asyncio.Event, deadline_ns: int) -> None:
        delay = (deadline_ns - self.now_ns()) / 1e9
        if event.is_set() or delay <= 0:
            return
        # A timer handle, not wait_for: no task per wait on the hot path of watchers.
        timer = asyncio.get_running_loop().call_later(delay, event.set)
        try:
            await event.wait()
        finally:
            timer.cancel()


class ManualClock:
    """A clock that moves only when told to (for tests)."""

    def __init__(self, start_ns: int = 1_700_000_000 * 10**9) -> None:
        self._now_ns = start_ns
        self._ticks: set[asyncio.Event] = set()

    def now_ns(self) -> int:
        return self._now_ns

    def advance(self, seconds: float) -> None:
        self._now_ns += int(seconds * 1e9)
        for tick in self._ticks:
            tick.set()

    async def wait(self, event: asyncio.Event, deadline_ns: int) -> None:
        tick = asyncio.Event()
        self._ticks.add(tick)
        try:
            while not event.is_set() and self._now_ns < deadline_ns:
                tick.clear()
                waiters = [asyncio.ensure_future(event.wait()), asyncio.ensure_future(tick.wait())]
                try:
                    await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for waiter in waiters:
                        waiter.cancel()
        finally:
            self._ticks.discard(tick)


def timestamp(ns: int) -> Timestamp:
    stamp = Timestamp()
    stamp.FromNanoseconds(ns)
    return stamp
