"""The SQL both backends share: one schema shape, the same statements, over DB-API.

SQLite and PostgreSQL keep the same tables (tasks, history, definitions, agents,
credentials, meta) and answer the same statements, written here once with `?`
placeholders. A backend supplies connections (a Session each) and transactions.

Revisions are given at commit, the same way on both: the units of a batch make their
changes unnumbered; then, as the batch's last statements, one counter row (meta's
'revision') is advanced by the batch's size, the changes are numbered from it, and
appended to history. While the batch holds that row's lock, no other batch can number
anything, so revisions are dense and in commit order even with several writers on one
PostgreSQL database (DESIGN.md section 7).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Generic, Protocol, TypeVar

from storage.base import (
    AgentBacklog,
    Change,
    ConcurrentModification,
    Credential,
    HistoryCompacted,
    PayloadMissing,
    QueriedTask,
    SeenAgent,
    SessionTasks,
    Snapshot,
    StoreClosed,
    StoredSession,
    StoredTask,
    TaskExists,
    TaskQuery,
    TaskSelector,
    Uptime,
    WriteTransaction,
    assignee_entity_id,
    holder_entity_id,
)
from storage.group_commit import GroupCommitWriter
from storage.history import entry_for, ns, replay
from storage.stats import WriterStats
from task_manager import statuses
from task_manager.v1.task_manager_pb2 import Session as SessionMessage
from task_manager.v1.task_manager_pb2 import (
    Status,
    StatusUpdate,
    Task,
    TaskHistoryEntry,
    TaskType,
)

T = TypeVar("T")

WITH_AN_AGENT = ", ".join(str(status) for status in sorted(statuses.WITH_AN_AGENT))
"""The statuses of a task its agent holds, as SQL (they are integers)."""
FINISHED = ", ".join(str(status) for status in sorted(statuses.TERMINAL))
"""The statuses of a finished task, as SQL."""

READER_THREADS = 2

CHUNK = 500
"""Ids per IN (...) list: under SQLite's parameter limit, and PostgreSQL's."""


class Cursor(Protocol):
    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    def __iter__(self) -> Iterator[Any]: ...


class Session(Protocol):
    """A connection as the shared SQL sees it: statements with `?` placeholders."""

    def execute(self, sql: str, params: Sequence[object] = ()) -> Cursor: ...

    def executemany(self, sql: str, params: Sequence[Sequence[object]]) -> object: ...


def marks(count: int) -> str:
    return ", ".join("?" * count)


def database_now_ns(session: Session, clock_sql: str | None) -> int:
    """Now on the clock leases are timed by: the database's (clock_sql), where several
    servers must agree on one, else this process's."""
    if clock_sql is None:
        return time.time_ns()
    return int(session.execute(clock_sql).fetchone()[0])


def last_revision(session: Session) -> int:
    """The newest committed revision: every revision up to it is committed and visible
    to whoever reads this in the same transaction (both backends keep that true)."""
    value: int = session.execute("SELECT value FROM meta WHERE key = 'revision'").fetchone()[0]
    return value


def compacted_revision(session: Session) -> int:
    value: int = session.execute(
        "SELECT value FROM meta WHERE key = 'compacted_revision'"
    ).fetchone()[0]
    return value


def _parse_task(blob: bytes | None) -> Task | None:
    return None if blob is None else Task.FromString(blob)


# -- writes -------------------------------------------------------------------------------


class PayloadPresence(Protocol):
    """How a backend's write transaction sees the payloads it stores (storage/blobs.py):
    in files beside the database, or in the database's own tables."""

    def missing(self, session: Session, digests: Sequence[str]) -> str | None:
        """The first of digests not stored; those stored cannot be collected until the
        transaction ends."""
        ...

    def hold_if_idle(self, session: Session, digest: str, before_ns: int) -> bool:
        """Whether the payload is stored and was last stored before before_ns; if so,
        no other transaction references it until this one ends."""
        ...

    def delete_if_idle(self, session: Session, digest: str, before_ns: int) -> bool:
        """Deletes a payload held by hold_if_idle, if it is still idle (an upload of the
        same bytes meanwhile makes it fresh)."""
        ...


class SqlTransaction:
    """WriteTransaction over a backend's writer session, inside one savepoint. Its
    changes are numbered when the batch commits (record_batch)."""

    def __init__(
        self,
        session: Session,
        payloads: PayloadPresence,
        load_clause: str = "",
        claim_clause: str = "",
        clock_sql: str | None = None,
    ) -> None:
        self._session = session
        self._payloads = payloads
        self._load_clause = load_clause
        """How load() locks the row it reads, where other writers may change it
        (PostgreSQL: FOR UPDATE): a second writer then waits and reads the first one's
        result, as it would behind SQLite's one writer. Empty for one writer."""
        self._claim_clause = claim_clause
        """How claim() locks a row, where other writers may want it (PostgreSQL: FOR
        UPDATE SKIP LOCKED); empty for a database with one writer."""
        self._clock_sql = clock_sql
        """A query of the database's clock (ns since the epoch), where several servers
        must agree on one; None: this process's clock (one server)."""
        self.changes: list[Change] = []
        self.wrote = False
        """Whether a statement of this transaction changed the database: a unit that
        fails before it writes has nothing to undo (group_commit.py)."""

    def load(self, task_id: str) -> StoredTask | None:
        return load(self._session, task_id, self._load_clause)

    def claim(self, task_id: str) -> StoredTask | None:
        return load(self._session, task_id, self._claim_clause)

    def insert(
        self, stored: StoredTask, reason: str = "", then: StoredTask | None = None
    ) -> Change:
        task = stored.task
        encoded_task = task.SerializeToString()
        # With then, the row is written once, at the state the task moves on to.
        row = stored if then is None else then
        encoded_row = encoded_task if then is None else then.task.SerializeToString()
        # The id check is the insert itself: one statement, and a taken id writes nothing.
        # The cursor (creation order) is the revision of the first change, once numbered.
        inserted = self._session.execute(
            "INSERT INTO tasks (task_id, cursor, parent_task_id, session_id, scope,"
            " assignee_entity_id, status, status_version, last_update_ns, agent_status,"
            " agent_last_update_ns, task, agent_task, last_update, deadline_ns,"
            " holder_entity_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (task_id) DO NOTHING",
            (
                task.version.task_id,
                None,
                task.relations.parent_task_id or None,
                task.session_id or None,
                task.scope or None,
                assignee_entity_id(task),
                *_state_columns(row, encoded_row),
            ),
        ).rowcount
        if inserted != 1:
            raise TaskExists(task.version.task_id)
        self.wrote = True
        change = self._append(stored, reason, encoded_task)
        if then is not None:
            change = self._append(then, reason, encoded_row)
        return change

    def replace(self, stored: StoredTask, expected_status_version: int, reason: str = "") -> Change:
        task_id = stored.task.version.task_id
        encoded_task = stored.task.SerializeToString()
        # A task's relations (parent, assignee) are fixed when it is created, so their
        # columns, and the indexes over them, are written by insert() only.
        updated = self._session.execute(
            "UPDATE tasks SET status = ?, status_version = ?, last_update_ns = ?,"
            " agent_status = ?, agent_last_update_ns = ?, task = ?, agent_task = ?,"
            " last_update = ?, deadline_ns = ?, holder_entity_id = ?"
            " WHERE task_id = ? AND status_version = ?",
            (*_state_columns(stored, encoded_task), task_id, expected_status_version),
        ).rowcount
        if updated != 1:
            row = self._session.execute(
                "SELECT status_version FROM tasks WHERE task_id = ?", (task_id,)
            ).fetchone()
            raise ConcurrentModification(task_id, row[0] if row else 0)
        self.wrote = True
        return self._append(stored, reason, encoded_task)

    def encoded(self, task: Task) -> bytes:
        for change in reversed(self.changes):
            if change.task is task:
                return change.encoded_task
        return task.SerializeToString()

    def reference_payloads(self, digests: Collection[str]) -> None:
        wanted = sorted(set(digests))
        if not wanted:
            return
        absent = self._payloads.missing(self._session, wanted)
        if absent is not None:
            raise PayloadMissing(absent)
        self.wrote = True
        self._session.executemany(
            "INSERT INTO payload_refs (digest) VALUES (?) ON CONFLICT DO NOTHING",
            [(digest,) for digest in wanted],
        )

    def collect_payload(self, digest: str, idle_before_ns: int) -> bool:
        # Held first, then the references read: on PostgreSQL a transaction that has
        # just referenced it has committed by the time the hold is granted, and this
        # later statement sees its reference.
        if not self._payloads.hold_if_idle(self._session, digest, idle_before_ns):
            return False
        referenced = self._session.execute(
            "SELECT 1 FROM payload_refs WHERE digest = ?", (digest,)
        ).fetchone()
        if referenced is not None:
            return False
        if not self._payloads.delete_if_idle(self._session, digest, idle_before_ns):
            return False
        self._session.execute(
            "UPDATE payload_usage SET bytes = bytes - (SELECT size FROM payload_uploads u"
            " WHERE u.principal = payload_usage.principal AND u.digest = ?)"
            " WHERE principal IN (SELECT principal FROM payload_uploads WHERE digest = ?)",
            (digest, digest),
        )
        self._session.execute("DELETE FROM payload_uploads WHERE digest = ?", (digest,))
        return True

    def charge_upload(self, principal: str, digest: str, size: int, quota_bytes: int) -> int | None:
        charged = self._session.execute(
            "SELECT 1 FROM payload_uploads WHERE principal = ? AND digest = ?", (principal, digest)
        ).fetchone()
        if charged is not None:
            return stored_bytes(self._session, principal)
        # One conditional statement: where replicas charge the same principal at once,
        # the row lock orders them and each checks the quota against the other's sum.
        limit = quota_bytes or _NO_QUOTA
        if size > limit:
            return None
        row = self._session.execute(
            "INSERT INTO payload_usage (principal, bytes) VALUES (?, ?)"
            " ON CONFLICT (principal) DO UPDATE SET bytes = payload_usage.bytes + excluded.bytes"
            " WHERE payload_usage.bytes + excluded.bytes <= ? RETURNING bytes",
            (principal, size, limit),
        ).fetchone()
        if row is None:
            return None
        self.wrote = True
        inserted = self._session.execute(
            "INSERT INTO payload_uploads (principal, digest, size) VALUES (?, ?, ?)"
            " ON CONFLICT DO NOTHING",
            (principal, digest, size),
        ).rowcount
        if inserted == 0:  # another replica charged it meanwhile: once is enough
            self._session.execute(
                "UPDATE payload_usage SET bytes = bytes - ? WHERE principal = ?",
                (size, principal),
            )
            return int(row[0]) - size
        return int(row[0])

    def save_definition(self, definition: Task) -> None:
        self.wrote = True
        self._session.execute(
            "INSERT INTO definitions (task_id, definition_version, definition) VALUES (?, ?, ?)",
            (
                definition.version.task_id,
                definition.version.definition_version,
                definition.SerializeToString(),
            ),
        )

    def load_definition(self, task_id: str, definition_version: int) -> Task | None:
        return load_definition(self._session, task_id, definition_version)

    def insert_session(self, stored: StoredSession) -> bool:
        inserted = self._session.execute(
            "INSERT INTO sessions (session_id, session, fingerprint, task_ids, cancelled_ns,"
            " deadline_ns, timed_out_ns) VALUES (?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (session_id) DO NOTHING",
            (
                stored.session.session_id,
                stored.session.SerializeToString(),
                stored.fingerprint,
                json.dumps(list(stored.task_ids)),
                stored.cancelled_ns,
                stored.deadline_ns,
                stored.timed_out_ns,
            ),
        ).rowcount
        if inserted == 1:
            self.wrote = True
        return inserted == 1

    def load_session(self, session_id: str) -> StoredSession | None:
        return load_session(self._session, session_id, self._load_clause)

    def claim_session(self, session_id: str) -> StoredSession | None:
        return load_session(self._session, session_id, self._claim_clause)

    def unfinished_session_tasks(self, session_id: str) -> list[str]:
        rows = self._session.execute(
            f"SELECT task_id FROM tasks WHERE session_id = ? AND status NOT IN ({FINISHED})"
            " ORDER BY cursor",
            (session_id,),
        ).fetchall()
        return [task_id for (task_id,) in rows]

    def insert_task_type(self, task_type: TaskType) -> bool:
        inserted = self._session.execute(
            "INSERT INTO task_types (name, version, task_type) VALUES (?, ?, ?)"
            " ON CONFLICT (name, version) DO NOTHING",
            (task_type.name, task_type.version, task_type.SerializeToString()),
        ).rowcount
        self.wrote = self.wrote or inserted == 1
        return inserted == 1

    def load_task_type(self, name: str, version: int) -> TaskType | None:
        return read_task_type(self._session, name, version)

    def update_session(self, stored: StoredSession) -> None:
        self.wrote = True
        self._session.execute(
            "UPDATE sessions SET cancelled_ns = ?, deadline_ns = ?, timed_out_ns = ?"
            " WHERE session_id = ?",
            (
                stored.cancelled_ns,
                stored.deadline_ns,
                stored.timed_out_ns,
                stored.session.session_id,
            ),
        )

    def add_credential(self, credential: Credential) -> None:
        self.wrote = True
        insert_credential(self._session, credential)

    def revoke_credential(self, credential_id: str, now_ns: int) -> bool:
        self.wrote = True
        return revoke_credential(self._session, credential_id, now_ns)

    def agent_seen(self, entity_id: str, now_ns: int) -> None:
        self.wrote = True
        self._session.execute(
            "INSERT INTO agents (entity_id, first_seen_ns, last_seen_ns) VALUES (?, ?, ?)"
            " ON CONFLICT (entity_id) DO UPDATE SET last_seen_ns = excluded.last_seen_ns",
            (entity_id, now_ns, now_ns),
        )

    def renew_streams(self, replica_id: str, entity_ids: Collection[str], lease_ns: int) -> None:
        self.wrote = True
        now_ns = database_now_ns(self._session, self._clock_sql)
        ids = sorted(entity_ids)
        keep = f" AND entity_id NOT IN ({marks(len(ids))})" if ids else ""
        self._session.execute(
            f"DELETE FROM agent_streams WHERE lease_expires_ns <= ? OR (replica_id = ?{keep})",
            (now_ns, replica_id, *ids),
        )
        if ids:
            self._session.executemany(
                "INSERT INTO agent_streams (entity_id, replica_id, lease_expires_ns)"
                " VALUES (?, ?, ?) ON CONFLICT (entity_id, replica_id)"
                " DO UPDATE SET lease_expires_ns = excluded.lease_expires_ns",
                [(entity_id, replica_id, now_ns + lease_ns) for entity_id in ids],
            )

    def take_lease(self, name: str, holder: str, ttl_ns: int) -> bool:
        self.wrote = True
        now_ns = database_now_ns(self._session, self._clock_sql)
        taken = self._session.execute(
            "INSERT INTO leases (name, holder, expires_ns) VALUES (?, ?, ?)"
            " ON CONFLICT (name) DO UPDATE SET holder = excluded.holder,"
            " expires_ns = excluded.expires_ns"
            " WHERE leases.holder = excluded.holder OR leases.expires_ns <= ?",
            (name, holder, now_ns + ttl_ns, now_ns),
        ).rowcount
        return taken == 1

    def forget_other_replicas(self, replica_id: str) -> None:
        self.wrote = True
        self._session.execute("DELETE FROM agent_streams WHERE replica_id <> ?", (replica_id,))

    def join_cluster(self, replica_id: str, down_after_ns: int | None) -> Uptime:
        self.wrote = True
        # The row is locked first (where other servers write): a second replica joining
        # at once waits here, then finds the first one's renewal and keeps its up_since.
        (up_since_ns,) = self._session.execute(
            "SELECT value FROM meta WHERE key = 'up_since_ns'" + self._load_clause
        ).fetchone()
        now_ns = database_now_ns(self._session, self._clock_sql)
        if down_after_ns is None:
            self._session.execute("DELETE FROM replicas")
            came_up = True
        else:
            (newest_ns,) = self._session.execute("SELECT MAX(renewed_ns) FROM replicas").fetchone()
            came_up = newest_ns is None or now_ns - newest_ns > down_after_ns
            # Replicas silent that long are down: forgotten, as they would be if stopped.
            self._session.execute(
                "DELETE FROM replicas WHERE renewed_ns < ?", (now_ns - down_after_ns,)
            )
        if came_up:
            up_since_ns = now_ns
            self._session.execute(
                "UPDATE meta SET value = ? WHERE key = 'up_since_ns'", (up_since_ns,)
            )
        self._renewed(replica_id, now_ns)
        return Uptime(up_since_ns=up_since_ns, now_ns=now_ns)

    def renew_replica(self, replica_id: str) -> int:
        self.wrote = True
        now_ns = database_now_ns(self._session, self._clock_sql)
        self._renewed(replica_id, now_ns)
        return now_ns

    def leave_cluster(self, replica_id: str) -> None:
        self.wrote = True
        self._session.execute("DELETE FROM replicas WHERE replica_id = ?", (replica_id,))

    def _renewed(self, replica_id: str, now_ns: int) -> None:
        # Each replica writes its own row: no replica waits on another's lock to renew.
        self._session.execute(
            "INSERT INTO replicas (replica_id, renewed_ns) VALUES (?, ?)"
            " ON CONFLICT (replica_id) DO UPDATE SET renewed_ns = excluded.renewed_ns",
            (replica_id, now_ns),
        )

    def compact(self, keep_revisions: int, older_than_ns: int) -> int:
        """Removes history entries outside the newest keep_revisions and older than
        older_than_ns; returns the compacted revision."""
        newest = last_revision(self._session)
        row = self._session.execute(
            "SELECT MAX(revision) FROM history WHERE revision <= ? AND time_ns < ?",
            (newest - keep_revisions, older_than_ns),
        ).fetchone()
        compacted = compacted_revision(self._session)
        if row[0] is not None and row[0] > compacted:
            compacted = row[0]
            self.wrote = True
            self._session.execute("DELETE FROM history WHERE revision <= ?", (compacted,))
            self._session.execute(
                "UPDATE meta SET value = ? WHERE key = 'compacted_revision'", (compacted,)
            )
        return compacted

    def _append(self, stored: StoredTask, reason: str, encoded_task: bytes) -> Change:
        entry = entry_for(stored.task, 0, reason)  # numbered at commit
        change = Change(entry, stored.task, encoded_task, stored.deadline_ns)
        self.changes.append(change)
        return change


def record_batch(session: Session, changes: Sequence[Change]) -> None:
    """Numbers a batch's changes (oldest first) and appends them to history: the last
    statements of the batch's transaction, so its commit follows the commit of every
    batch numbered before it."""
    if not changes:
        return
    (newest,) = session.execute(
        "UPDATE meta SET value = value + ? WHERE key = 'revision' RETURNING value",
        (len(changes),),
    ).fetchall()[0]
    first = newest - len(changes) + 1
    rows = []
    created = []
    for offset, change in enumerate(changes):
        entry = change.entry
        entry.revision = first + offset
        rows.append(
            (
                entry.revision,
                entry.task_id,
                entry.SerializeToString(),
                ns(entry.time),
                change.deadline_ns,
            )
        )
        if entry.status_version == 1:  # the task's first change: its creation
            created.append((entry.revision, entry.task_id))
    session.executemany(
        "INSERT INTO history (revision, task_id, entry, time_ns, deadline_ns)"
        " VALUES (?, ?, ?, ?, ?)",
        rows,
    )
    if created:
        session.executemany("UPDATE tasks SET cursor = ? WHERE task_id = ?", created)


def _state_columns(stored: StoredTask, encoded_task: bytes) -> tuple[object, ...]:
    """The columns a change may alter, from status to holder_entity_id. encoded_task is
    the change's one serialisation of stored.task."""
    task, agent_task = stored.task, stored.agent_task
    if agent_task is None:
        agent_bytes = None
    elif agent_task is task:  # an agent's report: both views are the same task
        agent_bytes = encoded_task
    else:
        agent_bytes = agent_task.SerializeToString()
    return (
        task.status.status,
        task.version.status_version,
        ns(task.last_update_time),
        None if agent_task is None else agent_task.status.status,
        None if agent_task is None else ns(agent_task.last_update_time),
        encoded_task,
        agent_bytes,
        None if stored.last_update is None else stored.last_update.SerializeToString(),
        stored.deadline_ns,
        holder_entity_id(task),
    )


# -- task types ---------------------------------------------------------------------------


PAYLOAD_QUOTA_TABLES = (
    "CREATE TABLE payload_usage (principal TEXT PRIMARY KEY, bytes BIGINT NOT NULL)",
    "CREATE TABLE payload_uploads (principal TEXT NOT NULL, digest TEXT NOT NULL,"
    " size BIGINT NOT NULL, PRIMARY KEY (principal, digest))",
    "CREATE INDEX payload_uploads_by_digest ON payload_uploads (digest)",
)
"""The tables of payload quotas, in both backends' migrations."""

_NO_QUOTA = 2**62
"""A quota no principal reaches (its bytes fit an int64 column)."""


def stored_bytes(session: Session, principal: str) -> int:
    row = session.execute(
        "SELECT bytes FROM payload_usage WHERE principal = ?", (principal,)
    ).fetchone()
    return 0 if row is None else int(row[0])


def read_task_type(session: Session, name: str, version: int) -> TaskType | None:
    """Version 0: the latest."""
    if version:
        row = session.execute(
            "SELECT task_type FROM task_types WHERE name = ? AND version = ?", (name, version)
        ).fetchone()
    else:
        row = session.execute(
            "SELECT task_type FROM task_types WHERE name = ? ORDER BY version DESC LIMIT 1",
            (name,),
        ).fetchone()
    return None if row is None else TaskType.FromString(row[0])


# -- credentials --------------------------------------------------------------------------


def read_credentials(session: Session) -> list[Credential]:
    rows = session.execute(
        "SELECT credential_id, kind, principal, role, entity_ids, secret_hash, created_ns,"
        " revoked_ns, scopes FROM credentials ORDER BY created_ns, credential_id"
    ).fetchall()
    return [
        Credential(
            credential_id,
            kind,
            principal,
            role,
            tuple(json.loads(entity_ids)),
            secret_hash,
            created_ns,
            revoked_ns,
            tuple(json.loads(scopes)),
        )
        for (
            credential_id,
            kind,
            principal,
            role,
            entity_ids,
            secret_hash,
            created_ns,
            revoked_ns,
            scopes,
        ) in rows
    ]


def insert_credential(session: Session, credential: Credential) -> None:
    session.execute(
        "INSERT INTO credentials (credential_id, kind, principal, role, entity_ids,"
        " secret_hash, created_ns, revoked_ns, scopes) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            credential.credential_id,
            credential.kind,
            credential.principal,
            credential.role,
            json.dumps(list(credential.entity_ids)),
            credential.secret_hash,
            credential.created_ns,
            credential.revoked_ns,
            json.dumps(list(credential.scopes)),
        ),
    )


def revoke_credential(session: Session, credential_id: str, now_ns: int) -> bool:
    """False if there is no such credential, or it was already revoked."""
    cursor = session.execute(
        "UPDATE credentials SET revoked_ns = ? WHERE credential_id = ? AND revoked_ns IS NULL",
        (now_ns, credential_id),
    )
    return cursor.rowcount == 1


# -- reads: each runs in one read transaction of the backend's --------------------------


def load(session: Session, task_id: str, lock_clause: str = "") -> StoredTask | None:
    row = session.execute(
        "SELECT task, agent_task, last_update, deadline_ns FROM tasks WHERE task_id = ?"
        + lock_clause,
        (task_id,),
    ).fetchone()
    if row is None:
        return None
    return StoredTask(
        task=Task.FromString(row[0]),
        agent_task=_parse_task(row[1]),
        last_update=None if row[2] is None else StatusUpdate.FromString(row[2]),
        deadline_ns=row[3],
    )


def load_session(session: Session, session_id: str, lock_clause: str = "") -> StoredSession | None:
    row = session.execute(
        "SELECT session, fingerprint, task_ids, cancelled_ns, deadline_ns, timed_out_ns"
        " FROM sessions WHERE session_id = ?" + lock_clause,
        (session_id,),
    ).fetchone()
    if row is None:
        return None
    return StoredSession(
        session=SessionMessage.FromString(row[0]),
        fingerprint=bytes(row[1]),
        task_ids=json.loads(row[2]),
        cancelled_ns=row[3],
        deadline_ns=row[4],
        timed_out_ns=row[5],
    )


def session_tasks(session: Session, session_id: str) -> SessionTasks:
    counts: dict[int, int] = {}
    newest_ns = received = 0
    for status, count, newest, reported in session.execute(
        "SELECT status, COUNT(*), MAX(last_update_ns),"
        " SUM(CASE WHEN agent_status IS NULL OR agent_status = ? THEN 0 ELSE 1 END)"
        " FROM tasks WHERE session_id = ? GROUP BY status",
        (Status.STATUS_SENT, session_id),
    ):
        counts[status] = count
        newest_ns = max(newest_ns, newest)
        received += reported
    return SessionTasks(counts=counts, newest_update_ns=newest_ns, received=received)


def load_definition(session: Session, task_id: str, version: int) -> Task | None:
    row = session.execute(
        "SELECT definition FROM definitions WHERE task_id = ? AND definition_version = ?",
        (task_id, version),
    ).fetchone()
    return None if row is None else Task.FromString(row[0])


Read = Callable[[Session], T]


def query(query: TaskQuery) -> Read[list[QueriedTask]]:
    prefix = "agent_" if query.agent_view else ""
    where = ["cursor > ?"]
    params: list[object] = [query.after_cursor]
    if query.agent_view:
        where.append("agent_task IS NOT NULL")
    if query.parent_task_id is not None:
        where.append("parent_task_id = ?")
        params.append(query.parent_task_id)
    if query.session_id is not None:
        where.append("session_id = ?")
        params.append(query.session_id)
    if query.scopes is not None:
        where.append(f"scope IN ({marks(len(query.scopes))})")
        params.extend(sorted(query.scopes))
    if query.statuses:
        negation = "NOT " if query.exclude_statuses else ""
        where.append(f"{prefix}status {negation}IN ({marks(len(query.statuses))})")
        params.extend(sorted(query.statuses))
    if query.updated_from_ns is not None:
        where.append(f"{prefix}last_update_ns >= ?")
        params.append(query.updated_from_ns)
    if query.updated_to_ns is not None:
        where.append(f"{prefix}last_update_ns <= ?")
        params.append(query.updated_to_ns)
    sql = (
        f"SELECT cursor, {'agent_task' if query.agent_view else 'task'} FROM tasks"
        f" WHERE {' AND '.join(where)} ORDER BY cursor LIMIT ?"
    )
    params.append(query.limit)

    def read(session: Session) -> list[QueriedTask]:
        return [
            QueriedTask(cursor=row[0], task=Task.FromString(row[1]))
            for row in session.execute(sql, params)
        ]

    return read


def history(task_id: str, after_revision: int, limit: int) -> Read[list[TaskHistoryEntry]]:
    def read(session: Session) -> list[TaskHistoryEntry]:
        rows = session.execute(
            "SELECT entry FROM history WHERE task_id = ? AND revision > ?"
            " ORDER BY revision LIMIT ?",
            (task_id, after_revision, limit),
        )
        return [TaskHistoryEntry.FromString(row[0]) for row in rows]

    return read


def agent_backlog(
    assignee_entity_ids: Collection[str], wanted: Collection[int]
) -> Read[AgentBacklog]:
    ids, status_list = sorted(assignee_entity_ids), sorted(wanted)
    sql = (
        f"SELECT task FROM tasks WHERE assignee_entity_id IN ({marks(len(ids))})"
        f" AND status IN ({marks(len(status_list))}) ORDER BY cursor"
    )

    def read(session: Session) -> AgentBacklog:
        rows = session.execute(sql, (*ids, *status_list))
        tasks = [(Task.FromString(blob), bytes(blob)) for (blob,) in rows]
        return AgentBacklog(tasks=tasks, revision=last_revision(session))

    return read


def due(now_ns: int, limit: int) -> Read[list[tuple[str, int]]]:
    def read(session: Session) -> list[tuple[str, int]]:
        rows = session.execute(
            "SELECT task_id, deadline_ns FROM tasks WHERE deadline_ns <= ?"
            " ORDER BY deadline_ns LIMIT ?",
            (now_ns, limit),
        ).fetchall()
        return [(task_id, deadline_ns) for task_id, deadline_ns in rows]

    return read


def next_deadline(after_ns: int) -> Read[int | None]:
    """The earliest deadline after after_ns, of a task or a session."""

    def read(session: Session) -> int | None:
        found = [
            session.execute(
                f"SELECT MIN(deadline_ns) FROM {table} WHERE deadline_ns > ?", (after_ns,)
            ).fetchone()[0]
            for table in ("tasks", "sessions")
        ]
        return min((int(at) for at in found if at is not None), default=None)

    return read


def due_sessions(now_ns: int, limit: int) -> Read[list[str]]:
    def read(session: Session) -> list[str]:
        rows = session.execute(
            "SELECT session_id FROM sessions WHERE deadline_ns <= ? ORDER BY deadline_ns LIMIT ?",
            (now_ns, limit),
        ).fetchall()
        return [session_id for (session_id,) in rows]

    return read


def seen_agents(session: Session) -> list[SeenAgent]:
    rows = session.execute(
        "SELECT entity_id, first_seen_ns, last_seen_ns FROM agents ORDER BY entity_id"
    ).fetchall()
    return [SeenAgent(*row) for row in rows]


def in_flight_task_ids(entity_ids: Collection[str]) -> Read[dict[str, list[str]]]:
    ids = sorted(entity_ids)

    def read(session: Session) -> dict[str, list[str]]:
        held: dict[str, list[str]] = {}
        if not ids:
            return held
        rows = session.execute(
            f"SELECT holder_entity_id, task_id FROM tasks WHERE holder_entity_id IN"
            f" ({marks(len(ids))}) AND status IN ({WITH_AN_AGENT}) ORDER BY cursor",
            ids,
        )
        for entity_id, task_id in rows:
            held.setdefault(entity_id, []).append(task_id)
        return held

    return read


def tasks_held_by(entity_ids: Collection[str]) -> Read[list[Task]]:
    ids = sorted(entity_ids)

    def read(session: Session) -> list[Task]:
        if not ids:
            return []
        rows = session.execute(
            f"SELECT task FROM tasks WHERE holder_entity_id IN ({marks(len(ids))})"
            f" AND status IN ({WITH_AN_AGENT}) ORDER BY cursor",
            ids,
        )
        return [Task.FromString(blob) for (blob,) in rows]

    return read


def live_streams(clock_sql: str | None) -> Read[list[tuple[str, str]]]:
    def read(session: Session) -> list[tuple[str, str]]:
        now_ns = database_now_ns(session, clock_sql)
        rows = session.execute(
            "SELECT entity_id, replica_id FROM agent_streams WHERE lease_expires_ns > ?"
            " ORDER BY entity_id, replica_id",
            (now_ns,),
        ).fetchall()
        return [(entity_id, replica_id) for entity_id, replica_id in rows]

    return read


def orphaned_pool_tasks(clock_sql: str | None, limit: int) -> Read[list[Task]]:
    # A pool task's holder is a member, not the pool (its assignee); SENT: not received.
    def read(session: Session) -> list[Task]:
        now_ns = database_now_ns(session, clock_sql)
        rows = session.execute(
            "SELECT task FROM tasks WHERE status = ? AND holder_entity_id IS NOT NULL"
            " AND holder_entity_id <> assignee_entity_id AND NOT EXISTS (SELECT 1 FROM"
            " agent_streams s WHERE s.entity_id = tasks.holder_entity_id"
            " AND s.lease_expires_ns > ?) ORDER BY cursor LIMIT ?",
            (Status.STATUS_SENT, now_ns, limit),
        )
        return [Task.FromString(blob) for (blob,) in rows]

    return read


def changes_after(
    after_revision: int, limit: int, task_ids: Collection[str] = ()
) -> Read[list[Change]]:
    ids = sorted(task_ids)
    where = "revision > ?"
    if ids:
        where += f" AND task_id IN ({marks(len(ids))})"

    def read(session: Session) -> list[Change]:
        compacted = compacted_revision(session)
        if after_revision < compacted:
            raise HistoryCompacted(after_revision + 1, compacted)
        rows = session.execute(
            f"SELECT entry, deadline_ns FROM history WHERE {where} ORDER BY revision LIMIT ?",
            (after_revision, *ids, limit),
        ).fetchall()
        entries = [(TaskHistoryEntry.FromString(row[0]), row[1]) for row in rows]
        current = _tasks_by_id(session, {entry.task_id for entry, _ in entries})
        return replay(
            entries,
            current,
            lambda task_id, version: load_definition(session, task_id, version),
        )

    return read


def _tasks_by_id(session: Session, task_ids: set[str]) -> dict[str, Task]:
    tasks: dict[str, Task] = {}
    ids = sorted(task_ids)
    for start in range(0, len(ids), CHUNK):
        chunk = ids[start : start + CHUNK]
        rows = session.execute(
            f"SELECT task_id, task FROM tasks WHERE task_id IN ({marks(len(chunk))})", chunk
        )
        tasks.update((row[0], Task.FromString(row[1])) for row in rows)
    return tasks


def snapshot(selector: TaskSelector) -> Read[Snapshot]:
    where, params = ["1 = 1"], []
    for column, values in (
        ("task_id", selector.task_ids),
        ("assignee_entity_id", selector.assignee_entity_ids),
        ("status", selector.statuses),
        ("scope", selector.scopes),
    ):
        if values:
            where.append(f"{column} IN ({marks(len(values))})")
            params.extend(sorted(values))
    if selector.parent_task_id:
        where.append("parent_task_id = ?")
        params.append(selector.parent_task_id)
    if selector.session_id:
        where.append("session_id = ?")
        params.append(selector.session_id)
    sql = f"SELECT task FROM tasks WHERE {' AND '.join(where)} ORDER BY cursor"

    def read(session: Session) -> Snapshot:
        tasks = [Task.FromString(row[0]) for row in session.execute(sql, params)]
        return Snapshot(tasks=tasks, revision=last_revision(session))

    return read


class SqlReads:
    """The Store's reads, for a backend that runs a Read in one read transaction."""

    _clock_sql: str | None = None
    """How a read asks the database's clock (see database_now_ns); None: this process's."""

    async def _read(self, read: Read[T]) -> T:
        raise NotImplementedError

    async def get(self, task_id: str) -> StoredTask | None:
        return await self._read(lambda session: load(session, task_id))

    async def get_session(self, session_id: str) -> tuple[StoredSession, SessionTasks] | None:
        def read(session: Session) -> tuple[StoredSession, SessionTasks] | None:
            stored = load_session(session, session_id)
            return None if stored is None else (stored, session_tasks(session, session_id))

        return await self._read(read)

    async def task_type(self, name: str, version: int = 0) -> TaskType | None:
        return await self._read(lambda session: read_task_type(session, name, version))

    async def stored_bytes(self, principal: str, digest: str) -> tuple[int, bool]:
        def read(session: Session) -> tuple[int, bool]:
            charged = session.execute(
                "SELECT 1 FROM payload_uploads WHERE principal = ? AND digest = ?",
                (principal, digest),
            ).fetchone()
            return stored_bytes(session, principal), charged is not None

        return await self._read(read)

    async def task_types(self, name: str = "") -> Sequence[TaskType]:
        def read(session: Session) -> list[TaskType]:
            where, params = ("WHERE name = ?", (name,)) if name else ("", ())
            rows = session.execute(
                f"SELECT task_type FROM task_types {where} ORDER BY name, version", params
            )
            return [TaskType.FromString(row[0]) for row in rows]

        return await self._read(read)

    async def query(self, task_query: TaskQuery) -> Sequence[QueriedTask]:
        return await self._read(query(task_query))

    async def history(
        self, task_id: str, after_revision: int, limit: int
    ) -> Sequence[TaskHistoryEntry]:
        return await self._read(history(task_id, after_revision, limit))

    async def agent_backlog(
        self, assignee_entity_ids: Collection[str], statuses: Collection[int]
    ) -> AgentBacklog:
        return await self._read(agent_backlog(assignee_entity_ids, statuses))

    async def current_revision(self) -> int:
        return await self._read(last_revision)

    async def task_counts(self) -> dict[int, int]:
        def read(session: Session) -> dict[int, int]:
            rows = session.execute("SELECT status, COUNT(*) FROM tasks GROUP BY status")
            return {int(status): int(count) for status, count in rows}

        return await self._read(read)

    async def changes_after(
        self, after_revision: int, limit: int, task_ids: Collection[str] = ()
    ) -> Sequence[Change]:
        return await self._read(changes_after(after_revision, limit, task_ids))

    async def snapshot(self, selector: TaskSelector) -> Snapshot:
        return await self._read(snapshot(selector))

    async def due(self, now_ns: int, limit: int) -> Sequence[tuple[str, int]]:
        return await self._read(due(now_ns, limit))

    async def next_deadline(self, after_ns: int) -> int | None:
        return await self._read(next_deadline(after_ns))

    async def due_sessions(self, now_ns: int, limit: int) -> Sequence[str]:
        return await self._read(due_sessions(now_ns, limit))

    async def definition(self, task_id: str, definition_version: int) -> Task | None:
        return await self._read(
            lambda session: load_definition(session, task_id, definition_version)
        )

    async def seen_agents(self) -> Sequence[SeenAgent]:
        return await self._read(seen_agents)

    async def in_flight_task_ids(self, entity_ids: Collection[str]) -> dict[str, list[str]]:
        return await self._read(in_flight_task_ids(entity_ids))

    async def tasks_held_by(self, entity_ids: Collection[str]) -> Sequence[Task]:
        return await self._read(tasks_held_by(entity_ids))

    async def credentials(self) -> Sequence[Credential]:
        return await self._read(read_credentials)

    async def live_streams(self) -> Sequence[tuple[str, str]]:
        return await self._read(live_streams(self._clock_sql))

    async def orphaned_pool_tasks(self, limit: int) -> Sequence[Task]:
        return await self._read(orphaned_pool_tasks(self._clock_sql, limit))


Connection = TypeVar("Connection")


class SqlStore(SqlReads, Generic[Connection]):
    """What both backends' stores share: writes through the group-commit writer, reads
    on reader threads with a connection each, and closing them.

    A backend makes its writer, and says how a reader connects (_connect_reader), runs a
    Read in one read transaction (_read_in), and closes a connection (_close_reader)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, reader_name: str) -> None:
        self._loop = loop
        self._closed = False
        self._local = threading.local()
        self._reader_conns: list[Connection] = []
        self._reader_lock = threading.Lock()
        self._readers = ThreadPoolExecutor(READER_THREADS, thread_name_prefix=reader_name)
        self._writer: GroupCommitWriter[SqlTransaction]

    def _connect_reader(self, stale: Connection | None) -> Connection | None:
        """A new connection if there is none (stale is None) or it is no longer usable;
        None to keep stale."""
        raise NotImplementedError

    def _read_in(self, conn: Connection, read: Read[T]) -> T:
        raise NotImplementedError

    def _close_reader(self, conn: Connection) -> None:
        raise NotImplementedError

    @property
    def commits(self) -> int:
        return self._writer.commits

    @property
    def writes(self) -> int:
        return self._writer.writes

    @property
    def isolated_batches(self) -> int:
        return self._writer.isolated_batches

    @property
    def writer_stats(self) -> WriterStats:
        return self._writer.stats

    async def write(self, unit: Callable[[WriteTransaction], T]) -> T:
        return await self._writer.submit(unit)

    def submit(self, unit: Callable[[WriteTransaction], T]) -> asyncio.Future[T]:
        return self._writer.submit(unit)

    async def compact(self, keep_revisions: int, older_than_ns: int) -> int:
        if keep_revisions < 1:
            raise ValueError("compaction must keep at least the newest revision")

        def compact(tx: SqlTransaction) -> int:
            return tx.compact(keep_revisions, older_than_ns)

        return await self._writer.submit(compact)

    async def _read(self, read: Read[T]) -> T:
        if self._closed:
            raise StoreClosed("the store is closed")
        return await self._loop.run_in_executor(self._readers, self._with_reader, read)

    def _with_reader(self, read: Read[T]) -> T:
        conn: Connection | None = getattr(self._local, "conn", None)
        fresh = self._connect_reader(conn)
        if fresh is not None:
            conn = self._local.conn = fresh
            with self._reader_lock:
                self._reader_conns.append(fresh)
        assert conn is not None
        return self._read_in(conn, read)

    async def _close_readers(self) -> None:
        await asyncio.to_thread(self._readers.shutdown)
        with self._reader_lock:
            for conn in self._reader_conns:
                self._close_reader(conn)
            self._reader_conns.clear()
