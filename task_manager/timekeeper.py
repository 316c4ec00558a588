"""Fires stored deadlines when they come: scheduled releases, and timeouts that end attempts.

It also ends the attempts of agents LOST past their tasks' lost_agent_timeout: presence
is in memory, so that timeout is checked on every round rather than stored.

Deadlines live in the store (one per task, set by the lifecycle on every write), so a
restart loses none: the timekeeper reads what is due, and each firing is a lifecycle unit
that re-checks the deadline inside its own transaction (a task that moved on is left
alone). It sleeps until the next stored deadline, and is woken early when a commit sets
an earlier one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from storage.base import Change, ConcurrentModification, Store
from task_manager import lifecycle, sessions
from task_manager.clock import Clock
from task_manager.presence import Presence
from task_manager.v1.task_manager_pb2 import Task

log = logging.getLogger(__name__)

BATCH = 1_000
"""Due tasks read and fired per round."""


class Timekeeper:
    def __init__(
        self,
        store: Store,
        clock: Clock,
        up_since_ns: int,
        restart_grace_ns: int | None,
        poll_ns: int,
        presence: Presence | None = None,
    ) -> None:
        self._store = store
        self._presence = presence
        self._clock = clock
        self._up_since_ns = up_since_ns
        """When the gateway came up (task_manager/cluster.py): the restart grace runs
        from then, not from this process's start, so a replica joining a gateway that
        stayed up holds no timeout back."""
        self._restart_grace_ns = restart_grace_ns
        self._poll_ns = poll_ns
        self._wake = asyncio.Event()
        self._target_ns: int | None = None
        """When the current sleep ends; None while scanning (any new deadline wakes)."""
        self.fired = 0
        self._scanned_ns = -1
        self._scanned = asyncio.Condition()

    def notice(self, changes: Sequence[Change]) -> None:
        """Called after each commit: wakes the timekeeper for an earlier deadline."""
        for change in changes:
            deadline = change.deadline_ns
            if deadline is not None and (self._target_ns is None or deadline < self._target_ns):
                self._wake.set()
                return

    async def run(self) -> None:
        held: dict[str, int] = {}  # due tasks whose timeout waits out the restart grace
        while True:
            self._wake.clear()
            self._target_ns = None
            now_ns = self._clock.now_ns()
            due = await self._store.due(now_ns, BATCH)
            due_ids = {task_id for task_id, _ in due}
            held = {task_id: at for task_id, at in held.items() if task_id in due_ids}
            work = [task_id for task_id, _ in due if held.get(task_id, 0) <= now_ns]
            await self._fire(work, now_ns, held)
            await self._expire_sessions(now_ns)
            await self._end_lost_attempts(now_ns)
            if len(due) == BATCH and work:
                continue  # more may be due
            upcoming = await self._store.next_deadline(now_ns)
            candidates = [now_ns + self._poll_ns, *held.values()]
            if upcoming is not None:
                candidates.append(upcoming)
            self._target_ns = min(candidates)
            async with self._scanned:
                self._scanned_ns = now_ns
                self._scanned.notify_all()
            if not self._wake.is_set():
                timer = self._clock.call_at(self._target_ns, self._wake.set)
                try:
                    await self._wake.wait()
                finally:
                    timer.cancel()

    async def idle_at(self, at_ns: int) -> None:
        """Returns once everything due at at_ns has been fired (or held for the grace)."""
        self._wake.set()  # the clock may have moved without reaching a timer of ours
        async with self._scanned:
            await self._scanned.wait_for(lambda: self._scanned_ns >= at_ns)

    async def _expire_sessions(self, now_ns: int) -> None:
        """Acts on the sessions whose timeout has come (task_manager/sessions.py)."""
        due = await self._store.due_sessions(now_ns, BATCH)

        def expire(session_id: str) -> asyncio.Future[bool]:
            return self._store.submit(lambda tx: sessions.expire(tx, session_id, now_ns))

        outcomes = await asyncio.gather(*map(expire, due), return_exceptions=True)
        for session_id, outcome in zip(due, outcomes, strict=True):
            if isinstance(outcome, ConcurrentModification):
                continue  # a task of it changed meanwhile: the next round tries again
            if isinstance(outcome, BaseException):
                log.error("session %s could not time out", session_id, exc_info=outcome)
            elif outcome:
                self.fired += 1

    async def _end_lost_attempts(self, now_ns: int) -> None:
        """Ends the attempts whose agent has been LOST for their lost_agent_timeout."""
        lost = self._presence.lost(now_ns) if self._presence is not None else []
        if not lost:
            return
        since = dict(lost)
        due = [
            (task.version.task_id, task.attempts[-1].entity_id)
            for task in await self._store.tasks_held_by(since)
            if task.policy.HasField("lost_agent_timeout") and task.attempts
        ]

        def end(task_id: str, agent: str) -> asyncio.Future[Task | None]:
            lost_since_ns = since.get(agent, now_ns)
            return self._store.submit(
                lambda tx: lifecycle.end_lost_attempt(tx, task_id, agent, lost_since_ns, now_ns)
            )

        outcomes = await asyncio.gather(*(end(*pair) for pair in due), return_exceptions=True)
        for (task_id, _), outcome in zip(due, outcomes, strict=True):
            if isinstance(outcome, ConcurrentModification):
                continue  # changed meanwhile, by its agent or another replica
            if isinstance(outcome, BaseException):
                log.error("lost agent's task %s could not be ended", task_id, exc_info=outcome)
            elif outcome is not None:
                self.fired += 1

    async def _fire(self, task_ids: list[str], now_ns: int, held: dict[str, int]) -> None:
        def expire(task_id: str) -> asyncio.Future[lifecycle.Expiry]:
            return self._store.submit(
                lambda tx: lifecycle.expire(
                    tx, task_id, now_ns, self._up_since_ns, self._restart_grace_ns
                )
            )

        outcomes = await asyncio.gather(*map(expire, task_ids), return_exceptions=True)
        for task_id, outcome in zip(task_ids, outcomes, strict=True):
            if isinstance(outcome, ConcurrentModification):
                continue  # another replica's timekeeper (or a report) changed it first
            if isinstance(outcome, BaseException):
                log.error("deadline of task %s could not fire", task_id, exc_info=outcome)
                held[task_id] = now_ns + self._poll_ns  # try again later, not in a loop
            elif outcome.task is not None:
                self.fired += 1
                held.pop(task_id, None)
            elif outcome.not_before_ns is not None and outcome.not_before_ns > now_ns:
                held[task_id] = outcome.not_before_ns
