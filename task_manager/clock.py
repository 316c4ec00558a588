"""Time as an input: the service asks a Clock, tests bring a ManualClock and move it.

Timestamps and timers (heartbeats, rate-limit windows, compaction) use Clock.now_ns()
and Clock.call_at() (or sleep_until), never time.* or asyncio.sleep directly.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import Callable
from typing import Protocol

from google.protobuf.timestamp_pb2 import Timestamp


class Timer(Protocol):
    def cancel(self) -> None: ...


class Clock(Protocol):
    def now_ns(self) -> int:
        """Nanoseconds since the Unix epoch."""
        ...

    def call_at(self, deadline_ns: int, callback: Callable[[], None]) -> Timer:
        """Runs callback on the event loop once the clock reaches deadline_ns."""
        ...


async def sleep_until(clock: Clock, deadline_ns: int) -> None:
    """Returns once the clock reaches deadline_ns."""
    woken = asyncio.Event()  # a fresh one each time: a set event would never wait again
    timer = clock.call_at(deadline_ns, woken.set)
    try:
        await woken.wait()
    finally:
        timer.cancel()


class SystemClock:
    def now_ns(self) -> int:
        return time.time_ns()

    def call_at(self, deadline_ns: int, callback: Callable[[], None]) -> Timer:
        delay = max(0.0, (deadline_ns - self.now_ns()) / 1e9)
        return asyncio.get_running_loop().call_later(delay, callback)


class _ManualTimer:
    def __init__(self, callback: Callable[[], None]) -> None:
        self.callback: Callable[[], None] | None = callback

    def cancel(self) -> None:
        self.callback = None

    def fire(self) -> None:
        if self.callback is not None:
            self.callback()


class ManualClock:
    """A clock that moves only when told to (for tests); due timers fire on advance()."""

    def __init__(self, start_ns: int = 1_700_000_000 * 10**9) -> None:
        self._now_ns = start_ns
        self._timers: list[tuple[int, int, _ManualTimer]] = []
        self._order = itertools.count()

    def now_ns(self) -> int:
        return self._now_ns

    def call_at(self, deadline_ns: int, callback: Callable[[], None]) -> Timer:
        timer = _ManualTimer(callback)
        if deadline_ns <= self._now_ns:
            # Already due: runs soon, as SystemClock would, not at the next advance().
            asyncio.get_running_loop().call_soon(timer.fire)
        else:
            heapq.heappush(self._timers, (deadline_ns, next(self._order), timer))
        return timer

    def advance(self, seconds: float) -> None:
        self._now_ns += int(seconds * 1e9)
        while self._timers and self._timers[0][0] <= self._now_ns:
            callback = heapq.heappop(self._timers)[2].callback
            if callback is not None:
                callback()


def timestamp(ns: int) -> Timestamp:
    # Built directly: FromNanoseconds validates, and this runs several times per write.
    seconds, nanos = divmod(ns, 1_000_000_000)
    return Timestamp(seconds=seconds, nanos=nanos)
