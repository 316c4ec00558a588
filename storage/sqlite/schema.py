"""The SQLite schema: its migrations by version (PRAGMA user_version), and how a
database file is opened, locked and brought up to date."""

from __future__ import annotations

import fcntl
import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO

import sqlite_utils

from storage.base import StoreError, holder_entity_id
from storage.history import ns
from storage.sql import PAYLOAD_QUOTA_TABLES
from task_manager.v1.task_manager_pb2 import Task, TaskHistoryEntry


def _migrate_to_1(db: sqlite_utils.Database) -> None:
    db.table("tasks").create(
        {
            "task_id": str,
            "cursor": int,  # the revision that created the task: creation order
            "parent_task_id": str,
            "assignee_entity_id": str,
            "status": int,
            "status_version": int,
            "last_update_ns": int,
            "agent_status": int,
            "agent_last_update_ns": int,
            "task": bytes,
            "agent_task": bytes,
            "last_update": bytes,
        },
        pk="task_id",
        not_null={"cursor", "status", "status_version", "last_update_ns", "task"},
    )
    db.table("tasks").create_index(["cursor"], unique=True)
    db.table("tasks").create_index(["assignee_entity_id", "status"])
    db.table("tasks").create_index(["parent_task_id", "cursor"])
    db.table("history").create(
        {"revision": int, "task_id": str, "entry": bytes},
        pk="revision",
        not_null={"task_id", "entry"},
    )
    db.table("history").create_index(["task_id", "revision"])


def _migrate_to_2(db: sqlite_utils.Database) -> None:
    # Compaction keeps history by age too, so each entry's time becomes a column.
    history = db.table("history")
    history.add_column("time_ns", int)
    rows = db.execute("SELECT revision, entry FROM history").fetchall()
    for revision, entry in rows:
        time_ns = ns(TaskHistoryEntry.FromString(entry).time)
        db.execute("UPDATE history SET time_ns = ? WHERE revision = ?", (time_ns, revision))
    db.table("meta").create({"key": str, "value": int}, pk="key")
    db.execute("INSERT INTO meta (key, value) VALUES ('compacted_revision', 0)")


def _migrate_to_3(db: sqlite_utils.Database) -> None:
    db.table("credentials").create(
        {
            "credential_id": str,
            "kind": str,
            "principal": str,
            "role": str,
            "entity_ids": str,  # a JSON list
            "secret_hash": str,
            "created_ns": int,
            "revoked_ns": int,
        },
        pk="credential_id",
        not_null={"kind", "principal", "role", "entity_ids", "secret_hash", "created_ns"},
    )


def _migrate_to_4(db: sqlite_utils.Database) -> None:
    # Timeouts and scheduled releases are stored deadlines; existing tasks have none.
    db.table("tasks").add_column("deadline_ns", int)
    db.table("tasks").create_index(["deadline_ns"])


def _migrate_to_5(db: sqlite_utils.Database) -> None:
    db.table("agents").create(
        {"entity_id": str, "first_seen_ns": int, "last_seen_ns": int},
        pk="entity_id",
        not_null={"first_seen_ns", "last_seen_ns"},
    )


def _migrate_to_6(db: sqlite_utils.Database) -> None:
    # Superseded task definitions (UpdateTask), for GetTask(definition_version) and replay.
    db.table("definitions").create(
        {"task_id": str, "definition_version": int, "definition": bytes},
        pk=("task_id", "definition_version"),
        not_null={"definition"},
    )


def _migrate_to_7(db: sqlite_utils.Database) -> None:
    # Who holds each task's attempt (a pool task's member too): what an agent holds.
    tasks = db.table("tasks")
    tasks.add_column("holder_entity_id", str)
    rows = db.execute("SELECT task_id, task FROM tasks").fetchall()
    for task_id, blob in rows:
        holder = holder_entity_id(Task.FromString(blob))
        db.execute("UPDATE tasks SET holder_entity_id = ? WHERE task_id = ?", (holder, task_id))
    tasks.create_index(["holder_entity_id", "status"])


def _migrate_to_8(db: sqlite_utils.Database) -> None:
    # Revisions are numbered at commit from a counter row (storage/sql.py), as on
    # PostgreSQL: a task's cursor is set once its first change is numbered, and history
    # keeps each change's deadline, so a change read back is whole.
    db.table("tasks").transform(not_null={"cursor": False})
    db.table("history").add_column("deadline_ns", int)
    (newest,) = db.execute(
        "SELECT COALESCE(MAX(revision), (SELECT value FROM meta"
        " WHERE key = 'compacted_revision')) FROM history"
    ).fetchone()
    db.execute("INSERT INTO meta (key, value) VALUES ('revision', ?)", (newest,))


def _migrate_to_9(db: sqlite_utils.Database) -> None:
    # Which server has streams open for which agent, until when (storage/sql.py).
    db.table("agent_streams").create(
        {"entity_id": str, "replica_id": str, "lease_expires_ns": int},
        pk=("entity_id", "replica_id"),
        not_null={"lease_expires_ns"},
    )


def _migrate_to_10(db: sqlite_utils.Database) -> None:
    # Work one server of several does at a time (compaction), held until it expires.
    db.table("leases").create(
        {"name": str, "holder": str, "expires_ns": int},
        pk="name",
        not_null={"holder", "expires_ns"},
    )


def _migrate_to_11(db: sqlite_utils.Database) -> None:
    # When the gateway last came up, and which servers serve it (storage/sql.py): the
    # restart grace is measured from the first, not from one process's start.
    db.table("replicas").create(
        {"replica_id": str, "renewed_ns": int}, pk="replica_id", not_null={"renewed_ns"}
    )
    db.execute("INSERT INTO meta (key, value) VALUES ('up_since_ns', 0)")


def _migrate_to_12(db: sqlite_utils.Database) -> None:
    # Sessions of tasks (task_manager/sessions.py): each task names its session, and a
    # session keeps what it was submitted with.
    tasks = db.table("tasks")
    tasks.add_column("session_id", str)
    tasks.create_index(["session_id", "status"])
    db.table("sessions").create(
        {
            "session_id": str,
            "session": bytes,
            "fingerprint": bytes,
            "task_ids": str,
            "cancelled_ns": int,
        },
        pk="session_id",
        not_null={"session", "fingerprint", "task_ids"},
    )


def _migrate_to_13(db: sqlite_utils.Database) -> None:
    # A session's timeout is a stored deadline, as a task's (task_manager/sessions.py).
    sessions = db.table("sessions")
    sessions.add_column("deadline_ns", int)
    sessions.add_column("timed_out_ns", int)
    sessions.create_index(["deadline_ns"])
    # Only tasks of a session in the session indexes: the others (most, and the hot
    # path's) do not update them. By cursor too: QueryTasks pages a session's tasks.
    db.execute("DROP INDEX idx_tasks_session_id_status")
    db.execute(
        "CREATE INDEX tasks_of_sessions ON tasks (session_id, status) WHERE session_id IS NOT NULL"
    )
    db.execute(
        "CREATE INDEX tasks_of_sessions_in_order ON tasks (session_id, cursor)"
        " WHERE session_id IS NOT NULL"
    )


def _migrate_to_14(db: sqlite_utils.Database) -> None:
    # Scoped ids (task_manager/scopes.py): QueryTasks and WatchTasks filter by scope, and
    # a credential may be limited to scopes. Only scoped tasks in the index.
    db.table("tasks").add_column("scope", str)
    db.execute("CREATE INDEX tasks_of_scopes ON tasks (scope, cursor) WHERE scope IS NOT NULL")
    db.execute("ALTER TABLE credentials ADD COLUMN scopes TEXT NOT NULL DEFAULT '[]'")


def _migrate_to_15(db: sqlite_utils.Database) -> None:
    # Task types (task_manager/task_types.py): each registered version, never changed.
    db.table("task_types").create(
        {"name": str, "version": int, "task_type": bytes},
        pk=("name", "version"),
        not_null={"task_type"},
    )


def _migrate_to_16(db: sqlite_utils.Database) -> None:
    # Payload lifetime (WriteTransaction.reference_payloads): the payloads tasks refer
    # to, kept as long as the tasks are.
    db.execute("CREATE TABLE payload_refs (digest TEXT PRIMARY KEY)")


def _migrate_to_17(db: sqlite_utils.Database) -> None:
    # Payload quotas (WriteTransaction.charge_upload): each principal's stored bytes, and
    # the payloads they count (uncounted when collected).
    for statement in PAYLOAD_QUOTA_TABLES:
        db.execute(statement)


MIGRATIONS: Sequence[Callable[[sqlite_utils.Database], None]] = (
    _migrate_to_1,
    _migrate_to_2,
    _migrate_to_3,
    _migrate_to_4,
    _migrate_to_5,
    _migrate_to_6,
    _migrate_to_7,
    _migrate_to_8,
    _migrate_to_9,
    _migrate_to_10,
    _migrate_to_11,
    _migrate_to_12,
    _migrate_to_13,
    _migrate_to_14,
    _migrate_to_15,
    _migrate_to_16,
    _migrate_to_17,
)
"""MIGRATIONS[n] takes the schema from version n to n + 1 (PRAGMA user_version)."""


def connect(path: Path) -> sqlite3.Connection:
    try:
        # isolation_level=None: transactions are begun and ended explicitly below.
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        # FULL: a commit is on disk (the WAL is fsynced) before the call returns.
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA busy_timeout=10000")
    except sqlite3.Error as exc:
        raise StoreError(f"cannot open database {path}: {exc}") from exc
    return conn


def lock_database(path: Path) -> IO[bytes]:
    """Holds `<db>.lock` while the store is open: revisions come from one writer, so
    two servers must never write one database at the same time."""
    lock_path = path.with_name(path.name + ".lock")
    try:
        lock = lock_path.open("ab")
    except OSError as exc:
        raise StoreError(f"cannot open database {path}: {exc.strerror}: {lock_path}") from exc
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        lock.close()
        raise StoreError(
            f"database {path} is in use by another task manager (it holds {lock_path})"
        ) from exc
    return lock


def migrate(conn: sqlite3.Connection, path: Path) -> None:
    db = sqlite_utils.Database(conn)
    version: int = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > len(MIGRATIONS):
        raise StoreError(
            f"database {path} has schema version {version}, newer than this server "
            f"knows ({len(MIGRATIONS)}): upgrade the server"
        )
    for target, migration in enumerate(MIGRATIONS[version:], start=version + 1):
        conn.execute("BEGIN IMMEDIATE")
        try:
            migration(db)
            conn.execute(f"PRAGMA user_version = {target}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
