"""The PostgreSQL schema, its migrations by version, and how connections are made.

The tables are SQLite's (storage/sql.py runs the same statements on both). Migrations
run in one transaction under an advisory lock, so replicas starting together migrate
once: the first takes the lock, the others wait and find nothing left to do.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict

from storage.base import StoreError
from storage.sql import PAYLOAD_QUOTA_TABLES, Cursor

MIGRATION_LOCK = 0x7A5C_0001
"""The advisory lock key migrations run under (any constant the database shares)."""

LOCK_TIMEOUT = "10s"
"""How long a write waits for a row lock (the revision counter, a task another replica
is writing) before it fails with UNAVAILABLE: a stalled writer elsewhere holds it up
this long at most."""
IDLE_IN_TRANSACTION_TIMEOUT = "30s"
"""PostgreSQL ends a session that sits inside a transaction this long without a
statement (a replica stopped mid-batch), releasing its locks."""

MIGRATIONS: Sequence[str] = (
    """
    CREATE TABLE tasks (
        task_id TEXT PRIMARY KEY,
        cursor BIGINT,
        parent_task_id TEXT,
        assignee_entity_id TEXT,
        status INTEGER NOT NULL,
        status_version BIGINT NOT NULL,
        last_update_ns BIGINT NOT NULL,
        agent_status INTEGER,
        agent_last_update_ns BIGINT,
        task BYTEA NOT NULL,
        agent_task BYTEA,
        last_update BYTEA,
        deadline_ns BIGINT,
        holder_entity_id TEXT
    );
    CREATE INDEX tasks_by_cursor ON tasks (cursor);
    CREATE INDEX tasks_by_assignee ON tasks (assignee_entity_id, status);
    CREATE INDEX tasks_by_parent ON tasks (parent_task_id, cursor);
    CREATE INDEX tasks_by_holder ON tasks (holder_entity_id, status);
    CREATE INDEX tasks_by_deadline ON tasks (deadline_ns) WHERE deadline_ns IS NOT NULL;
    CREATE TABLE history (
        revision BIGINT PRIMARY KEY,
        task_id TEXT NOT NULL,
        entry BYTEA NOT NULL,
        time_ns BIGINT NOT NULL,
        deadline_ns BIGINT
    );
    CREATE INDEX history_by_task ON history (task_id, revision);
    CREATE TABLE meta (key TEXT PRIMARY KEY, value BIGINT NOT NULL);
    INSERT INTO meta (key, value) VALUES ('revision', 0), ('compacted_revision', 0);
    CREATE TABLE credentials (
        credential_id TEXT PRIMARY KEY,
        kind TEXT NOT NULL,
        principal TEXT NOT NULL,
        role TEXT NOT NULL,
        entity_ids TEXT NOT NULL,
        secret_hash TEXT NOT NULL,
        created_ns BIGINT NOT NULL,
        revoked_ns BIGINT
    );
    CREATE TABLE agents (
        entity_id TEXT PRIMARY KEY,
        first_seen_ns BIGINT NOT NULL,
        last_seen_ns BIGINT NOT NULL
    );
    CREATE TABLE agent_streams (
        entity_id TEXT NOT NULL,
        replica_id TEXT NOT NULL,
        lease_expires_ns BIGINT NOT NULL,
        PRIMARY KEY (entity_id, replica_id)
    );
    CREATE TABLE leases (
        name TEXT PRIMARY KEY,
        holder TEXT NOT NULL,
        expires_ns BIGINT NOT NULL
    );
    CREATE TABLE definitions (
        task_id TEXT NOT NULL,
        definition_version BIGINT NOT NULL,
        definition BYTEA NOT NULL,
        PRIMARY KEY (task_id, definition_version)
    );
    """,
    # When the gateway last came up, and which replicas serve it (storage/sql.py): the
    # restart grace is measured from the first, not from one process's start.
    """
    CREATE TABLE replicas (replica_id TEXT PRIMARY KEY, renewed_ns BIGINT NOT NULL);
    INSERT INTO meta (key, value) VALUES ('up_since_ns', 0);
    """,
    # Sessions of tasks (task_manager/sessions.py): each task names its session, and a
    # session keeps what it was submitted with.
    """
    ALTER TABLE tasks ADD COLUMN session_id TEXT;
    CREATE INDEX tasks_by_session ON tasks (session_id, status);
    CREATE TABLE sessions (
        session_id TEXT PRIMARY KEY,
        session BYTEA NOT NULL,
        fingerprint BYTEA NOT NULL,
        task_ids TEXT NOT NULL,
        cancelled_ns BIGINT
    );
    """,
    # A session's timeout is a stored deadline, as a task's (task_manager/sessions.py).
    """
    ALTER TABLE sessions ADD COLUMN deadline_ns BIGINT, ADD COLUMN timed_out_ns BIGINT;
    CREATE INDEX sessions_by_deadline ON sessions (deadline_ns) WHERE deadline_ns IS NOT NULL;
    -- Only tasks of a session in the session indexes: the others (most, and the hot
    -- path's) do not update them. By cursor too: QueryTasks pages a session's tasks.
    DROP INDEX tasks_by_session;
    CREATE INDEX tasks_of_sessions ON tasks (session_id, status) WHERE session_id IS NOT NULL;
    CREATE INDEX tasks_of_sessions_in_order ON tasks (session_id, cursor)
        WHERE session_id IS NOT NULL;
    """,
    # Scoped ids (task_manager/scopes.py): QueryTasks and WatchTasks filter by scope, and
    # a credential may be limited to scopes. Only scoped tasks in the index.
    """
    ALTER TABLE tasks ADD COLUMN scope TEXT;
    CREATE INDEX tasks_of_scopes ON tasks (scope, cursor) WHERE scope IS NOT NULL;
    ALTER TABLE credentials ADD COLUMN scopes TEXT NOT NULL DEFAULT '[]';
    """,
    # Task types (task_manager/task_types.py): each registered version, never changed.
    """
    CREATE TABLE task_types (
        name TEXT NOT NULL,
        version BIGINT NOT NULL,
        task_type BYTEA NOT NULL,
        PRIMARY KEY (name, version)
    );
    """,
    # Payloads (storage/postgres/blobs.py): each upload's chunks by offset, and one row
    # per stored content naming the upload that holds it.
    """
    CREATE TABLE payload_chunks (
        upload_id TEXT NOT NULL,
        start BIGINT NOT NULL,
        data BYTEA NOT NULL,
        PRIMARY KEY (upload_id, start)
    );
    CREATE TABLE payloads (
        digest TEXT PRIMARY KEY,
        upload_id TEXT NOT NULL,
        size BIGINT NOT NULL
    );
    """,
    # Payload lifetime (WriteTransaction.reference_payloads, collect_payload): when each
    # was last stored, and the payloads tasks refer to (kept as long as the tasks are).
    """
    ALTER TABLE payloads ADD COLUMN stored_ns BIGINT NOT NULL DEFAULT 0;
    CREATE INDEX payloads_by_age ON payloads (stored_ns);
    CREATE TABLE payload_refs (digest TEXT PRIMARY KEY);
    """,
    # Payload quotas (WriteTransaction.charge_upload): each principal's stored bytes, and
    # the payloads they count (uncounted when collected).
    ";\n".join(PAYLOAD_QUOTA_TABLES),
)
"""MIGRATIONS[n] takes the schema from version n to n + 1 (table schema_version)."""

Connection = psycopg.Connection[Any]


@functools.lru_cache(maxsize=4096)
def _placeholders(sql: str) -> str:
    # The shared statements use `?`, and none has a `%` or a `?` of its own.
    return sql.replace("?", "%s")


class PgSession:
    """A psycopg connection as the shared SQL's Session: `?` placeholders, and results
    in binary (bytea arrives as bytes, without hex decoding)."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def execute(self, sql: str, params: Sequence[object] = ()) -> Cursor:
        return self.conn.execute(_placeholders(sql), params, binary=True)

    def executemany(self, sql: str, params: Sequence[Sequence[object]]) -> None:
        with self.conn.cursor() as cursor:
            cursor.executemany(_placeholders(sql), params)


def describe(url: str) -> str:
    """The database a URL names, without its password: for messages."""
    try:
        parts = conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "the PostgreSQL URL given"
    host, port, name = (
        parts.get("host", "localhost"),
        parts.get("port", "5432"),
        parts.get("dbname"),
    )
    return f"PostgreSQL database {name or '(default)'} at {host}:{port}"


def connect(url: str, purpose: str) -> Connection:
    """An autocommit connection (transactions are begun explicitly), its purpose shown in
    pg_stat_activity. Raises StoreError if the database cannot be reached."""
    try:
        conn = psycopg.connect(url, autocommit=True, application_name=f"task-manager {purpose}")
        conn.execute(f"SET lock_timeout = '{LOCK_TIMEOUT}'")
        conn.execute(f"SET idle_in_transaction_session_timeout = '{IDLE_IN_TRANSACTION_TIMEOUT}'")
    except psycopg.Error as exc:
        raise StoreError(f"cannot connect to {describe(url)}: {first_line(exc)}") from exc
    return conn


def first_line(exc: BaseException) -> str:
    """An error's message, its first line: what a one-line error or log needs."""
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def migrate(conn: Connection, url: str) -> None:
    """Brings the schema up to date, in one transaction, under MIGRATION_LOCK."""
    try:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = conn.execute("SELECT version FROM schema_version").fetchone()
            version = 0 if row is None else int(row[0])
            if version > len(MIGRATIONS):
                raise StoreError(
                    f"{describe(url)} has schema version {version}, newer than this server"
                    f" knows ({len(MIGRATIONS)}): upgrade the server"
                )
            for migration in MIGRATIONS[version:]:
                conn.execute(migration)
            if row is None:
                conn.execute("INSERT INTO schema_version (version) VALUES (%s)", (len(MIGRATIONS),))
            else:
                conn.execute("UPDATE schema_version SET version = %s", (len(MIGRATIONS),))
    except psycopg.Error as exc:
        raise StoreError(f"cannot prepare {describe(url)}: {first_line(exc)}") from exc
