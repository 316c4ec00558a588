"""The agent runtime's task group, kept alive: a child that ends must not end the rest.

anyio cancels a whole task group, recording no error, when a child ends in CancelledError.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVarTuple

import anyio.abc

log = logging.getLogger("agent_kit")
Ts = TypeVarTuple("Ts")


def being_cancelled() -> bool:
    """Whether the current task is being cancelled (Agent.stop(), a cancel scope). grpc.aio
    raises CancelledError from a call that was cancelled locally in every task that reads
    or writes it, also in tasks nobody cancelled: such a CancelledError comes while this
    is False, and is not a reason to stop."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


class Supervisor:
    """Starts the runtime's background tasks (handlers, heartbeats, report streams) in one
    task group, so that only a real cancellation (Agent.stop(), or of run() itself) ends
    them all. A child that fails or ends in a stray CancelledError is logged; the group
    and the agent go on."""

    def __init__(self, group: anyio.abc.TaskGroup, owner: str) -> None:
        self._group = group
        self._owner = owner

    def spawn(self, function: Callable[[*Ts], Awaitable[None]], *args: *Ts, name: str) -> None:
        self._group.start_soon(self._guarded, function, args, name, name=name)

    async def _guarded(
        self,
        function: Callable[[*Ts], Awaitable[None]],
        args: tuple[*Ts],
        name: str,
    ) -> None:
        try:
            await function(*args)
        except asyncio.CancelledError:
            if being_cancelled():
                raise
            log.error("%s: %s ended in a stray cancellation; the agent goes on", self._owner, name)
        except Exception:
            log.exception("%s: %s failed unexpectedly; the agent goes on", self._owner, name)
