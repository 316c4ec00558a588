"""The Store protocol: the narrow interface the Task Manager depends on.

A backend keeps tasks and their append-only history; every write runs as a unit of work
inside one transaction, and committed changes are announced only after the commit.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, TypeVar

from task_manager.v1.task_manager_pb2 import (
    Session,
    StatusUpdate,
    Task,
    TaskHistoryEntry,
    TaskType,
    TaskVersion,
)

if TYPE_CHECKING:
    from storage.feed import ChangeFeed
    from storage.stats import TailStats, WriterStats

T = TypeVar("T")

MAX_REVISION = 2**63 - 1
"""The largest revision any store holds: revisions are signed 64-bit integers (SQLite's
INTEGER), though the protocol carries them as uint64."""


class StoreError(Exception):
    """The store could not do what was asked (not a client mistake)."""


class StoreClosed(StoreError):
    """The store is shutting down and takes no more writes."""


@dataclass(frozen=True, slots=True)
class StoredSession:
    """A session as submitted: what does not change (its state is its tasks')."""

    session: Session
    """Its id, display_name, task_count, create_time and created_by."""
    fingerprint: bytes
    """A digest of the submission: a retry with the same content has the same one."""
    task_ids: Sequence[str]
    """Its tasks, in the submission's order."""
    cancelled_ns: int | None = None
    """When CancelSession was called, if it was."""
    deadline_ns: int | None = None
    """When its timeout passes, while that is still to be acted on."""
    timed_out_ns: int | None = None
    """When its timeout passed with tasks unfinished, if it did."""


@dataclass(frozen=True, slots=True)
class SessionTasks:
    """A session's tasks as they stand: counts by status, and their newest update."""

    counts: dict[int, int]
    newest_update_ns: int
    received: int = 0
    """Tasks whose agent's last report is past SENT: received at some point."""


@dataclass(frozen=True, slots=True)
class StoredTask:
    """A task as stored: both views plus what the idempotent-retry check needs."""

    task: Task
    """The manager view: the task as the manager holds it now."""
    agent_task: Task | None
    """The agent view: the task as last reported by its agent; None until it is sent."""
    last_update: StatusUpdate | None
    """The StatusUpdate that produced the current status_version, if one did."""
    deadline_ns: int | None = None
    """When the task manager must next act on the task by itself (a timeout, a scheduled
    release), if ever. Stored, so timers survive restarts."""


@dataclass(frozen=True, slots=True)
class Change:
    """One committed change: the history entry and the task right after it."""

    entry: TaskHistoryEntry
    task: Task
    encoded_task: bytes
    """task serialised, once: every message that carries this change embeds these bytes."""
    deadline_ns: int | None = None

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


def holder_entity_id(task: Task) -> str | None:
    """The agent holding the task's current attempt (for a pool task, the member it went
    to; None while it has none), indexed so what an agent holds is one lookup."""
    if task.attempts:
        return task.attempts[-1].entity_id or None
    return task.relations.assignee.system.entity_id or None


def definition_only(task: Task) -> Task:
    """The definition of a task (what UpdateTask may change): its id, definition_version,
    display_name, description and specification."""
    definition = Task(
        version=TaskVersion(
            task_id=task.version.task_id, definition_version=task.version.definition_version
        ),
        display_name=task.display_name,
        description=task.description,
    )
    if task.HasField("specification"):
        definition.specification.CopyFrom(task.specification)
    return definition


def with_definition(task: Task, definition: Task) -> Task:
    """task with the definition (and definition_version) of definition."""
    combined = Task()
    combined.CopyFrom(task)
    combined.version.definition_version = definition.version.definition_version
    combined.display_name = definition.display_name
    combined.description = definition.description
    combined.ClearField("specification")
    if definition.HasField("specification"):
        combined.specification.CopyFrom(definition.specification)
    return combined


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
    session_id: str | None = None
    scopes: frozenset[str] | None = None
    """Only tasks of these scopes (task_manager/scopes.py); None: any, also unscoped."""


@dataclass(frozen=True, slots=True)
class TaskSelector:
    """Which tasks a watcher wants: every non-empty field must match (AND)."""

    task_ids: frozenset[str] = frozenset()
    assignee_entity_ids: frozenset[str] = frozenset()
    statuses: frozenset[int] = frozenset()
    parent_task_id: str = ""
    session_id: str = ""
    scopes: frozenset[str] = frozenset()

    def matches(self, task: Task) -> bool:
        if self.session_id and task.session_id != self.session_id:
            return False
        if self.scopes and task.scope not in self.scopes:
            return False
        if self.task_ids and task.version.task_id not in self.task_ids:
            return False
        if self.statuses and task.status.status not in self.statuses:
            return False
        if self.parent_task_id and task.relations.parent_task_id != self.parent_task_id:
            return False
        return not self.assignee_entity_ids or (
            assignee_entity_id(task) in self.assignee_entity_ids
        )


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Tasks as they were at one store revision."""

    tasks: Sequence[Task]
    revision: int


class HistoryCompacted(StoreError):
    """The history asked for was removed by compaction."""

    def __init__(self, requested: int, compacted: int) -> None:
        super().__init__(
            f"revision {requested} is compacted (history is kept after revision {compacted});"
            f" re-list with include_preexisting, or start after {compacted}"
        )
        self.compacted = compacted


@dataclass(frozen=True, slots=True)
class QueriedTask:
    cursor: int
    """Position in creation order; pass it back as TaskQuery.after_cursor."""
    task: Task


@dataclass(frozen=True, slots=True)
class AgentBacklog:
    """What an agent must be sent on connect, read at one store revision."""

    tasks: Sequence[tuple[Task, bytes]]
    """Oldest first, each with its stored encoding (as Change.encoded_task)."""
    revision: int


@dataclass(frozen=True, slots=True)
class Credential:
    """A bearer token (only its secret's hash) or a client-certificate name, with the
    role and entity ids it gives whoever presents it."""

    credential_id: str
    kind: str  # "token" or "certificate"
    principal: str
    role: str
    entity_ids: tuple[str, ...]
    secret_hash: str  # empty for certificates
    created_ns: int
    revoked_ns: int | None = None
    scopes: tuple[str, ...] = ()
    """The scopes an operator or viewer credential is limited to; empty: none."""


@dataclass(frozen=True, slots=True)
class Uptime:
    """Since when the gateway (every server on one database) has been up, as a replica
    joining it finds, both times on the database's clock."""

    up_since_ns: int
    """When the gateway last came up: it had been down, or only this server writes."""
    now_ns: int
    """When the replica joined."""


@dataclass(frozen=True, slots=True)
class SeenAgent:
    """An agent entity id that has listened, as stored."""

    entity_id: str
    first_seen_ns: int
    last_seen_ns: int


class WriteTransaction(Protocol):
    """What a unit of work may do inside a write transaction."""

    def load(self, task_id: str) -> StoredTask | None:
        """The task as this transaction sees it (including its own earlier writes)."""
        ...

    def claim(self, task_id: str) -> StoredTask | None:
        """As load, and the task is this transaction's until it commits; None also if
        another writer holds it now (it is being changed elsewhere: leave it to that
        one). What a timekeeper firing a deadline uses, so two never fire one."""
        ...

    def insert(
        self, stored: StoredTask, reason: str = "", then: StoredTask | None = None
    ) -> Change:
        """Adds a new task and its first history entry. then is the state the task
        moves on to in the same change, if any: it gets a second entry, as replace()
        would give it, and the row is stored at that state. Returns the last Change.
        Raises TaskExists, having written nothing, if a task with that id is stored."""
        ...

    def replace(self, stored: StoredTask, expected_status_version: int, reason: str = "") -> Change:
        """Compare-and-set: replaces the task only if its stored status_version is
        expected_status_version, and appends a history entry. Raises
        ConcurrentModification otherwise."""
        ...

    def encoded(self, task: Task) -> bytes:
        """task serialised. A task this transaction stored is not serialised again: its
        Change's encoded_task is returned."""
        ...

    def save_definition(self, definition: Task) -> None:
        """Keeps a superseded definition of a task (its definition fields and version)."""
        ...

    def load_definition(self, task_id: str, definition_version: int) -> Task | None:
        """A superseded definition saved with save_definition."""
        ...

    def insert_session(self, stored: StoredSession) -> bool:
        """Stores a new session (its tasks are inserted apart); False, writing nothing,
        if its session_id is taken."""
        ...

    def load_session(self, session_id: str) -> StoredSession | None:
        """The session, locked for this transaction where other writers may change it."""
        ...

    def claim_session(self, session_id: str) -> StoredSession | None:
        """As load_session; None also if another writer holds it now (as claim)."""
        ...

    def unfinished_session_tasks(self, session_id: str) -> Sequence[str]:
        """The ids of the session's tasks not yet finished, in creation order."""
        ...

    def insert_task_type(self, task_type: TaskType) -> bool:
        """Registers a task type version; False, writing nothing, if its (name, version)
        is taken."""
        ...

    def load_task_type(self, name: str, version: int) -> TaskType | None: ...

    def reference_payloads(self, digests: Collection[str]) -> None:
        """Records that a task refers to these payloads: the collector keeps them as long
        as the task is kept. Raises PayloadMissing if one is not stored (or is being
        collected right now)."""
        ...

    def collect_payload(self, digest: str, idle_before_ns: int) -> bool:
        """Deletes the payload if no task refers to it and it was last stored before
        idle_before_ns (wall clock); True if it did. A reference_payloads racing it
        either sees it gone or keeps it."""
        ...

    def charge_upload(self, principal: str, digest: str, size: int, quota_bytes: int) -> int | None:
        """Counts a stored payload against the bytes principal has stored, unless it is
        counted already: answers those bytes now, or None (writing nothing) if they would
        go past quota_bytes (0: no quota). A payload collected is uncounted for all."""
        ...

    def update_session(self, stored: StoredSession) -> None:
        """Records what changes of a session: cancelled_ns, deadline_ns, timed_out_ns."""
        ...

    def agent_seen(self, entity_id: str, now_ns: int) -> None:
        """Records that an agent entity id was seen now (first seen, if it is new)."""
        ...

    def renew_streams(self, replica_id: str, entity_ids: Collection[str], lease_ns: int) -> None:
        """Records that this replica has streams open for exactly these agents, for
        lease_ns from now on the database's clock; forgets every lease expired by now."""
        ...

    def take_lease(self, name: str, holder: str, ttl_ns: int) -> bool:
        """Holds the lease called name for holder until ttl_ns from now on the database's
        clock, if it is free, expired or holder's already; False if another holds it.
        For work one server of several does at a time."""
        ...

    def forget_other_replicas(self, replica_id: str) -> None:
        """Forgets the streams of every other replica: for a database only this server
        writes (a restarted server's old leases are its own, and void)."""
        ...

    def join_cluster(self, replica_id: str, down_after_ns: int | None) -> Uptime:
        """Records that replica_id is up, as of now on the database's clock. If no other
        replica renewed within down_after_ns, the gateway was down and comes up now;
        else it stays up since it last came up (a rolling restart). down_after_ns None:
        only this server writes the database, so the gateway comes up now. Replicas
        joining at once take turns: only the first of them brings the gateway up."""
        ...

    def renew_replica(self, replica_id: str) -> int:
        """Records that replica_id is still up; returns now on the database's clock."""
        ...

    def leave_cluster(self, replica_id: str) -> None:
        """Records that replica_id stopped: if it was the last, the gateway is down."""
        ...

    def add_credential(self, credential: Credential) -> None: ...

    def revoke_credential(self, credential_id: str, now_ns: int) -> bool:
        """False if there is no such credential, or it was already revoked."""
        ...


class TaskExists(StoreError):
    """insert() found a task with the same id already stored."""

    def __init__(self, task_id: str) -> None:
        super().__init__(f"task {task_id} is already stored")
        self.task_id = task_id


class PayloadMissing(StoreError):
    """reference_payloads() named a payload that is not stored."""

    def __init__(self, digest: str) -> None:
        super().__init__(f"payload {digest} is not stored")
        self.digest = digest


class ConcurrentModification(StoreError):
    """The compare-and-set inside the transaction found another status_version."""

    def __init__(self, task_id: str, stored_status_version: int) -> None:
        super().__init__(
            f"task {task_id} was changed by another write meanwhile (it is now at"
            f" status_version {stored_status_version}): read it again and retry"
        )
        self.task_id = task_id
        self.stored_status_version = stored_status_version


class Store(Protocol):
    """The durable task store.

    Its feed carries every committed change, in revision order and without a gap, and
    hears of each commit before the writer's caller is answered (storage/feed.py)."""

    @property
    def feed(self) -> ChangeFeed: ...

    @property
    def durable(self) -> bool:
        """Whether a commit is on disk before the writer's caller hears of it."""
        ...

    @property
    def commits(self) -> int:
        """Transactions committed by this store; with `writes`, how much group commit
        batches."""
        ...

    @property
    def writes(self) -> int: ...

    @property
    def isolated_batches(self) -> int:
        """Batches rolled back and run again with a savepoint per unit, after a unit
        failed having written (storage/group_commit.py)."""
        ...

    @property
    def writer_stats(self) -> WriterStats:
        """Batch sizes and commit times (storage/stats.py)."""
        ...

    @property
    def tail_stats(self) -> TailStats | None:
        """How far behind the other replicas' commits this store reads; None for a
        backend with no other replicas."""
        ...

    @property
    def shared(self) -> bool:
        """Whether other servers may write this database at the same time."""
        ...

    async def write(self, unit: Callable[[WriteTransaction], T]) -> T:
        """Runs unit in a write transaction and returns its result once committed.

        An exception raised by unit rolls back only that unit's writes and is re-raised
        here; other units committed with it are not affected. unit must act only through
        its transaction: to undo one unit's writes, a batch may run its units again.
        """
        ...

    def submit(self, unit: Callable[[WriteTransaction], T]) -> asyncio.Future[T]:
        """Like write, without waiting: queues unit and returns the future of its result.
        Units run and commit in the order they were submitted."""
        ...

    async def get(self, task_id: str) -> StoredTask | None: ...

    async def get_session(self, session_id: str) -> tuple[StoredSession, SessionTasks] | None:
        """The session and its tasks as they stand, read at one revision."""
        ...

    async def due_sessions(self, now_ns: int, limit: int) -> Sequence[str]:
        """The sessions whose deadline has come, earliest first."""
        ...

    async def task_type(self, name: str, version: int = 0) -> TaskType | None:
        """One registered version of a task type; version 0: the latest."""
        ...

    async def stored_bytes(self, principal: str, digest: str) -> tuple[int, bool]:
        """The bytes of payloads charged to principal (charge_upload), and whether the
        payload digest is one of them."""
        ...

    async def task_types(self, name: str = "") -> Sequence[TaskType]:
        """Every registered version (of one type, if named), by name then version."""
        ...

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

    async def current_revision(self) -> int:
        """The revision of the latest committed change (0 for an empty store)."""
        ...

    async def task_counts(self) -> dict[int, int]:
        """How many tasks the store holds, by status (those with none left out)."""
        ...

    async def changes_after(
        self, after_revision: int, limit: int, task_ids: Collection[str] = ()
    ) -> Sequence[Change]:
        """Committed changes after a revision, oldest first, each with the task as it
        was right after it (of these tasks only, if task_ids is given). Raises
        HistoryCompacted if some of them are no longer kept."""
        ...

    async def snapshot(self, selector: TaskSelector) -> Snapshot:
        """The tasks the selector matches, oldest first, read at one revision."""
        ...

    async def compact(self, keep_revisions: int, older_than_ns: int) -> int:
        """Removes history entries that are both outside the newest keep_revisions and
        older than older_than_ns; returns the compacted revision (everything at or
        below it is gone)."""
        ...

    async def due(self, now_ns: int, limit: int) -> Sequence[tuple[str, int]]:
        """(task_id, deadline_ns) of tasks whose deadline is at or before now_ns, earliest
        first."""
        ...

    async def next_deadline(self, after_ns: int) -> int | None:
        """The earliest deadline after after_ns (of a task or a session), if any."""
        ...

    async def definition(self, task_id: str, definition_version: int) -> Task | None:
        """A superseded definition of a task, if it was saved."""
        ...

    async def seen_agents(self) -> Sequence[SeenAgent]:
        """Every agent entity id ever seen, by entity id."""
        ...

    async def in_flight_task_ids(self, entity_ids: Collection[str]) -> dict[str, list[str]]:
        """For these agents, the ids of the tasks they hold (sent to them, for a pool task
        the member it went to, and not ended), oldest first."""
        ...

    async def tasks_held_by(self, entity_ids: Collection[str]) -> Sequence[Task]:
        """The tasks these agents hold (as in_flight_task_ids), oldest first."""
        ...

    async def credentials(self) -> Sequence[Credential]:
        """Every stored credential, revoked ones included."""
        ...

    async def live_streams(self) -> Sequence[tuple[str, str]]:
        """(entity_id, replica_id) of every agent stream lease unexpired now, on the
        database's clock."""
        ...

    async def orphaned_pool_tasks(self, limit: int) -> Sequence[Task]:
        """Pool tasks sent to a member (not yet received) for which no replica holds a
        live stream lease now, oldest first."""
        ...

    async def close(self) -> None:
        """Finishes queued writes, then releases every resource."""
        ...
