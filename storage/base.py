"""The Store protocol: the narrow interface the Task Manager depends on.

A backend keeps tasks and their append-only history; every write runs as a unit of work
inside one transaction, and committed changes are announced only after the commit.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

from task_manager.v1.task_manager_pb2 import StatusUpdate, Task, TaskHistoryEntry

T = TypeVar("T")


class StoreError(Exception):
    """The store could not do what was asked (not a client mistake)."""


class StoreClosed(StoreError):
    """The store is shutting down and takes no more writes."""


@dataclass(frozen=True, slots=True)
class StoredTask:
    """A task as stored: both views plus what the idempotent-retry check needs."""

    task: Task
    """The manager view: the task as the manager holds it now."""
    agent_task: Task | None
    """The agent view: the task as last reported by its agent; None until it is sent."""
    last_update: StatusUpdate | None
    """The StatusUpdate that produced the current status_version, if one did."""


@dataclass(frozen=True, slots=True)
class Change:
    """One committed change: the history entry and the task right after it."""

    entry: TaskHistoryEntry
    task: Task

    @property
    def revision(self) -> int:
        return self.entry.revision


def assignee_entity_id(task: Task) -> str | None:
    """The entity id a task is addressed to (its assignee's system or team), indexed so
    an agent's backlog is one lookup."""
    assignee = task.relations.assignee
    kind = assignee.WhichOneof("agent")
    if kind == "system":
        return assignee.system.entity_id or None
    if kind == "team":
        return assignee.team.entity_id or None
    return None


@dataclass(frozen=True, slots=True)
class TaskQuery:
    """Which tasks QueryTasks wants, in creation order, after a cursor."""

    after_cursor: int = 0
    limit: int = 100
    parent_task_id: str | None = None
    statuses: frozenset[int] = frozenset()
    exclude_statuses: bool = False
    updated_from_ns: int | None = None
    updated_to_ns: int | None = None
    agent_view: bool = False


@dataclass(frozen=True, slots=True)
class QueriedTask:
    cursor: int
    """Position in creation order; pass it back as TaskQuery.after_cursor."""
    task: Task


@dataclass(frozen=True, slots=True)
class AgentBacklog:
    """What an agent must be sent on connect, read at one store revision."""

    tasks: Sequence[Task]
    revision: int


class WriteTransaction(Protocol):
    """What a unit of work may do inside a write transaction."""

    def load(self, task_id: str) -> StoredTask | None:
        """The task as this transaction sees it (including its own earlier writes)."""
        ...

    def insert(self, stored: StoredTask, reason: str = "") -> Change:
        """Adds a new task (its id must be free) and its first history entry."""
        ...

    def replace(self, stored: StoredTask, expected_status_version: int, reason: str = "") -> Change:
        """Compare-and-set: replaces the task only if its stored status_version is
        expected_status_version, and appends a history entry. Raises
        ConcurrentModification otherwise."""
        ...


class ConcurrentModification(StoreError):
    """The compare-and-set inside the transaction found another status_version."""

    def __init__(self, task_id: str, stored_status_version: int) -> None:
        super().__init__(f"task {task_id} changed underneath the write")
        self.task_id = task_id
        self.stored_status_version = stored_status_version


OnCommit = Callable[[Sequence[Change]], None]
"""Called on the event loop, after a commit, with that commit's changes in revision order."""


class Store(Protocol):
    """The durable task store."""

    async def write(self, unit: Callable[[WriteTransaction], T]) -> T:
        """Runs unit in a write transaction and returns its result once committed.

        An exception raised by unit rolls back only that unit's writes and is re-raised
        here; other units committed with it are not affected.
        """
        ...

    def submit(self, unit: Callable[[WriteTransaction], T]) -> asyncio.Future[T]:
        """Like write, without waiting: queues unit and returns the future of its result.
        Units run and commit in the order they were submitted."""
        ...

    async def get(self, task_id: str) -> StoredTask | None: ...

    async def query(self, query: TaskQuery) -> Sequence[QueriedTask]: ...

    async def history(
        self, task_id: str, after_revision: int, limit: int
    ) -> Sequence[TaskHistoryEntry]: ...

    async def agent_backlog(
        self, assignee_entity_ids: Collection[str], statuses: Collection[int]
    ) -> AgentBacklog:
        """Tasks assigned to these entity ids whose status is one of statuses,
        oldest first, with the store revision the read saw."""
        ...

    async def close(self) -> None:
        """Finishes queued writes, then releases every resource."""
        ...
