"""Jittered exponential backoff, for reconnects and retried reports.

"Full jitter": each wait is uniform in [0, min(maximum, initial * 2**attempt)], so many
agents coming back at once do not hammer the server in step.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import anyio


@dataclass
class Backoff:
    initial: float = 0.1
    maximum: float = 10.0
    attempt: int = field(default=0, init=False)

    def reset(self) -> None:
        self.attempt = 0

    def next_delay(self) -> float:
        ceiling = min(self.maximum, self.initial * (2 ** min(self.attempt, 30)))
        self.attempt += 1
        return random.uniform(0, ceiling)

    async def wait(self) -> None:
        await anyio.sleep(self.next_delay())
