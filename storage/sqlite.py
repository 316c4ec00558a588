"""The embedded SQLite store: one writer thread with group commit, WAL readers.

Every write of a batch runs in one transaction (a savepoint each, so one failing unit
rolls back alone), committed with synchronous=FULL before any caller hears back.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import queue
import sqlite3
import sys
import threading
from collections.abc import Callable, Collection, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any, TypeVar

import sqlite_utils
from google.protobuf.timestamp_pb2 import Timestamp

from storage.base import (
    AgentBacklog,
    Change,
    ConcurrentModification,
    Credential,
    HistoryCompacted,
    OnCommit,
    QueriedTask,
    SeenAgent,
    Snapshot,
    StoreClosed,
    StoredTask,
    StoreError,
    TaskExists,
    TaskQuery,
    TaskSelector,
    WriteTransaction,
    assignee_entity_id,
    holder_entity_id,
    with_definition,
)
from task_manager.v1.task_manager_pb2 import Status, StatusUpdate, Task, TaskHistoryEntry

T = TypeVar("T")
log = logging.getLogger(__name__)

MAX_BATCH = 512
"""Writes committed together at most: bounds how long a batch's first caller waits for
the jobs that join it, and the latency one batch adds to the next."""
READER_THREADS = 2
WRITER_NICENESS = 10
"""By default, how far below the rest of the process the writer thread's priority is
(Linux only; `task-manager serve --writer-niceness`).

Under load the event loop holds the GIL most of the time. Whenever the writer became
runnable (a job arrived, an SQL call returned), the kernel preempted the loop to run it,
only for it to wait for the GIL the loop held: two context switches, dear on a virtual
machine. At a lower priority the writer runs while the loop waits, and does more each
turn: UpdateStatus 3,752 to 3,821 against 3,210 to 3,329 calls/s (three pairs), about 30
writes per commit against 13; the lifecycle and dispatch unchanged. On an idle core the
writer still gets all of it; against busy threads of other processes, a tenth of a
normal thread's share (nice 19 would leave it almost none)."""


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
        time_ns = _ns(TaskHistoryEntry.FromString(entry).time)
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


MIGRATIONS: Sequence[Callable[[sqlite_utils.Database], None]] = (
    _migrate_to_1,
    _migrate_to_2,
    _migrate_to_3,
    _migrate_to_4,
    _migrate_to_5,
    _migrate_to_6,
    _migrate_to_7,
)
"""MIGRATIONS[n] takes the schema from version n to n + 1 (PRAGMA user_version)."""


def _connect(path: Path) -> sqlite3.Connection:
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


def _lock_database(path: Path) -> IO[bytes]:
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


def _migrate(conn: sqlite3.Connection, path: Path) -> None:
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


# -- credentials: read by the server, written by `task-manager tokens` --------------------


def _read_credentials(conn: sqlite3.Connection) -> list[Credential]:
    rows = conn.execute(
        "SELECT credential_id, kind, principal, role, entity_ids, secret_hash, created_ns,"
        " revoked_ns FROM credentials ORDER BY created_ns, credential_id"
    ).fetchall()
    return [
        Credential(row[0], row[1], row[2], row[3], tuple(json.loads(row[4])), *row[5:])
        for row in rows
    ]


@contextmanager
def _credentials_connection(path: Path) -> Iterator[sqlite3.Connection]:
    """A connection for managing credentials, whether or not a server has the database
    open (the server reloads credentials as they change). Creates and migrates the
    database if no server holds it."""
    try:
        lock = _lock_database(path)
    except StoreError:
        lock = None  # a server holds it, and has migrated it
    conn = _connect(path)
    try:
        if lock is not None:
            _migrate(conn, path)
        yield conn
    finally:
        conn.close()
        if lock is not None:
            lock.close()


def _insert_credential(conn: sqlite3.Connection, credential: Credential) -> None:
    sqlite_utils.Database(conn).table("credentials").insert(
        {**asdict(credential), "entity_ids": json.dumps(list(credential.entity_ids))}
    )


def _revoke_credential(conn: sqlite3.Connection, credential_id: str, now_ns: int) -> bool:
    cursor = conn.execute(
        "UPDATE credentials SET revoked_ns = ? WHERE credential_id = ? AND revoked_ns IS NULL",
        (now_ns, credential_id),
    )
    return cursor.rowcount == 1


def add_credential(path: Path, credential: Credential) -> None:
    with _credentials_connection(path) as conn:
        _insert_credential(conn, credential)


def list_credentials(path: Path) -> list[Credential]:
    with _credentials_connection(path) as conn:
        return _read_credentials(conn)


def revoke_credential(path: Path, credential_id: str, now_ns: int) -> bool:
    """Revokes a credential; False if there is no such credential or it was revoked."""
    with _credentials_connection(path) as conn:
        return _revoke_credential(conn, credential_id, now_ns)


def _load_definition(conn: sqlite3.Connection, task_id: str, version: int) -> Task | None:
    row = conn.execute(
        "SELECT definition FROM definitions WHERE task_id = ? AND definition_version = ?",
        (task_id, version),
    ).fetchone()
    return None if row is None else Task.FromString(row[0])


_NOT_IN_FLIGHT = (
    Status.STATUS_CREATED,
    Status.STATUS_SCHEDULED_IN_MANAGER,
    Status.STATUS_DONE_OK,
    Status.STATUS_DONE_NOT_OK,
)
"""A task at one of these is not with its agent."""


def _lower_this_threads_priority(by: int) -> None:
    # Linux keeps a nice value per thread; elsewhere this call would renice the process.
    if by == 0 or sys.platform != "linux":
        return
    thread_id = threading.get_native_id()
    try:
        niceness = os.getpriority(os.PRIO_PROCESS, thread_id)
        os.setpriority(os.PRIO_PROCESS, thread_id, min(19, niceness + by))
    except OSError as exc:  # not expected: lowering one's own priority needs no privilege
        log.warning("could not lower the writer thread's priority: %s", exc)


def _parse_task(blob: bytes | None) -> Task | None:
    return None if blob is None else Task.FromString(blob)


def _entry_for(task: Task, revision: int, reason: str) -> TaskHistoryEntry:
    # Field by field: about a quarter cheaper than the keyword constructor, and this
    # runs once per stored change.
    entry = TaskHistoryEntry(revision=revision, reason=reason, attempt=task.attempt)
    version = task.version
    entry.task_id = version.task_id
    entry.status_version = version.status_version
    entry.definition_version = version.definition_version
    entry.status.CopyFrom(task.status)
    entry.time.CopyFrom(task.last_update_time)
    if task.HasField("last_updated_by"):
        entry.author.CopyFrom(task.last_updated_by)
    if task.HasField("scheduled_time"):
        entry.scheduled_time.CopyFrom(task.scheduled_time)
    if task.attempts:
        entry.current_attempt.CopyFrom(task.attempts[-1])
    return entry


def _task_at(entry: TaskHistoryEntry, current: Task) -> Task:
    """The task right after the change of entry: the parts a change can alter come from
    the entry, the definition from the task as it is now."""
    task = Task()
    task.CopyFrom(current)
    task.version.status_version = entry.status_version
    task.version.definition_version = entry.definition_version
    task.status.CopyFrom(entry.status)
    task.last_update_time.CopyFrom(entry.time)
    if entry.HasField("author"):
        task.last_updated_by.CopyFrom(entry.author)
    else:
        task.ClearField("last_updated_by")
    if entry.HasField("scheduled_time"):
        task.scheduled_time.CopyFrom(entry.scheduled_time)
    else:
        task.ClearField("scheduled_time")
    # Earlier attempts never change once the next one starts; the current one may.
    task.attempt = entry.attempt
    del task.attempts[:]
    task.attempts.extend(current.attempts[: max(entry.attempt - 1, 0)])
    if entry.HasField("current_attempt"):
        task.attempts.add().CopyFrom(entry.current_attempt)
    return task


def _ns(timestamp: Timestamp) -> int:
    # Arithmetic rather than ToNanoseconds(): this runs three times per stored change,
    # and stored timestamps were checked (or made by the clock) before they got here.
    return timestamp.seconds * 1_000_000_000 + timestamp.nanos


def _compacted_revision(conn: sqlite3.Connection) -> int:
    value: int = conn.execute("SELECT value FROM meta WHERE key = 'compacted_revision'").fetchone()[
        0
    ]
    return value


class _Transaction:
    """WriteTransaction over the writer's connection, inside one savepoint."""

    def __init__(self, conn: sqlite3.Connection, next_revision: int) -> None:
        self._conn = conn
        self.next_revision = next_revision
        self.changes: list[Change] = []

    def load(self, task_id: str) -> StoredTask | None:
        row = self._conn.execute(
            "SELECT task, agent_task, last_update, deadline_ns FROM tasks WHERE task_id = ?",
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

    def insert(
        self, stored: StoredTask, reason: str = "", then: StoredTask | None = None
    ) -> Change:
        task = stored.task
        encoded_task = task.SerializeToString()
        # With then, the row is written once, at the state the task moves on to.
        row = stored if then is None else then
        encoded_row = encoded_task if then is None else then.task.SerializeToString()
        # The id check is the insert itself: one statement, and a taken id writes nothing.
        # The cursor is the revision of the history entry appended right after.
        inserted = self._conn.execute(
            "INSERT INTO tasks (task_id, cursor, parent_task_id, assignee_entity_id, status,"
            " status_version, last_update_ns, agent_status, agent_last_update_ns, task,"
            " agent_task, last_update, deadline_ns, holder_entity_id)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (task_id) DO NOTHING",
            (
                task.version.task_id,
                self.next_revision,
                task.relations.parent_task_id or None,
                assignee_entity_id(task),
                *self._state_columns(row, encoded_row),
            ),
        ).rowcount
        if inserted != 1:
            raise TaskExists(task.version.task_id)
        change = self._append(stored, reason, encoded_task)
        if then is not None:
            change = self._append(then, reason, encoded_row)
        return change

    def replace(self, stored: StoredTask, expected_status_version: int, reason: str = "") -> Change:
        task_id = stored.task.version.task_id
        encoded_task = stored.task.SerializeToString()
        # A task's relations (parent, assignee) are fixed when it is created, so their
        # columns, and the indexes over them, are written by insert() only.
        updated = self._conn.execute(
            "UPDATE tasks SET status = ?, status_version = ?, last_update_ns = ?,"
            " agent_status = ?, agent_last_update_ns = ?, task = ?, agent_task = ?,"
            " last_update = ?, deadline_ns = ?, holder_entity_id = ?"
            " WHERE task_id = ? AND status_version = ?",
            (*self._state_columns(stored, encoded_task), task_id, expected_status_version),
        ).rowcount
        if updated != 1:
            row = self._conn.execute(
                "SELECT status_version FROM tasks WHERE task_id = ?", (task_id,)
            ).fetchone()
            raise ConcurrentModification(task_id, row[0] if row else 0)
        return self._append(stored, reason, encoded_task)

    def encoded(self, task: Task) -> bytes:
        for change in reversed(self.changes):
            if change.task is task:
                return change.encoded_task
        return task.SerializeToString()

    def save_definition(self, definition: Task) -> None:
        self._conn.execute(
            "INSERT INTO definitions (task_id, definition_version, definition) VALUES (?, ?, ?)",
            (
                definition.version.task_id,
                definition.version.definition_version,
                definition.SerializeToString(),
            ),
        )

    def load_definition(self, task_id: str, definition_version: int) -> Task | None:
        return _load_definition(self._conn, task_id, definition_version)

    def add_credential(self, credential: Credential) -> None:
        _insert_credential(self._conn, credential)

    def revoke_credential(self, credential_id: str, now_ns: int) -> bool:
        return _revoke_credential(self._conn, credential_id, now_ns)

    def agent_seen(self, entity_id: str, now_ns: int) -> None:
        self._conn.execute(
            "INSERT INTO agents (entity_id, first_seen_ns, last_seen_ns) VALUES (?, ?, ?)"
            " ON CONFLICT (entity_id) DO UPDATE SET last_seen_ns = excluded.last_seen_ns",
            (entity_id, now_ns, now_ns),
        )

    def _append(self, stored: StoredTask, reason: str, encoded_task: bytes) -> Change:
        entry = _entry_for(stored.task, self.next_revision, reason)
        self._conn.execute(
            "INSERT INTO history (revision, task_id, entry, time_ns) VALUES (?, ?, ?, ?)",
            (entry.revision, entry.task_id, entry.SerializeToString(), _ns(entry.time)),
        )
        self.next_revision += 1
        change = Change(entry, stored.task, encoded_task, stored.deadline_ns)
        self.changes.append(change)
        return change

    def compact(self, keep_revisions: int, older_than_ns: int) -> int:
        newest = SqliteStore._last_revision(self._conn)
        row = self._conn.execute(
            "SELECT MAX(revision) FROM history WHERE revision <= ? AND time_ns < ?",
            (newest - keep_revisions, older_than_ns),
        ).fetchone()
        compacted = _compacted_revision(self._conn)
        if row[0] is not None and row[0] > compacted:
            compacted = row[0]
            self._conn.execute("DELETE FROM history WHERE revision <= ?", (compacted,))
            self._conn.execute(
                "UPDATE meta SET value = ? WHERE key = 'compacted_revision'", (compacted,)
            )
        return compacted

    @staticmethod
    def _state_columns(stored: StoredTask, encoded_task: bytes) -> tuple[object, ...]:
        """The columns a change may alter, from status to holder_entity_id. encoded_task
        is the change's one serialisation of stored.task."""
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
            _ns(task.last_update_time),
            None if agent_task is None else agent_task.status.status,
            None if agent_task is None else _ns(agent_task.last_update_time),
            encoded_task,
            agent_bytes,
            None if stored.last_update is None else stored.last_update.SerializeToString(),
            stored.deadline_ns,
            holder_entity_id(task),
        )


@dataclass(slots=True)
class _WriteJob:
    unit: Callable[[_Transaction], Any]
    future: asyncio.Future[Any]


@dataclass(slots=True)
class _Outcome:
    job: _WriteJob
    value: Any = None
    error: BaseException | None = None


class SqliteStore:
    """Store backed by one SQLite file. Create it with `await SqliteStore.open(...)`."""

    def __init__(
        self,
        path: Path,
        writer_conn: sqlite3.Connection,
        on_commit: OnCommit,
        loop: asyncio.AbstractEventLoop,
        writer_niceness: int = WRITER_NICENESS,
    ) -> None:
        self.path = path
        # FULL (2) or EXTRA (3): every commit of the writer is fsynced before it returns.
        self.durable: bool = writer_conn.execute("PRAGMA synchronous").fetchone()[0] >= 2
        self._on_commit = on_commit
        self._loop = loop
        self._jobs: queue.SimpleQueue[_WriteJob | None] = queue.SimpleQueue()
        self.commits = 0
        """Transactions committed; with `writes`, shows how much group commit batches."""
        self.writes = 0
        self._closed = False
        self._lock: IO[bytes] | None = None
        self._reader_conns: list[sqlite3.Connection] = []
        self._reader_lock = threading.Lock()
        self._local = threading.local()
        self._readers = ThreadPoolExecutor(READER_THREADS, thread_name_prefix="sqlite-reader")
        self._writer = threading.Thread(
            target=self._write_loop,
            args=(writer_conn, writer_niceness),
            name="sqlite-writer",
            daemon=True,
        )
        self._writer.start()

    @classmethod
    async def open(
        cls, path: Path | str, on_commit: OnCommit, writer_niceness: int = WRITER_NICENESS
    ) -> SqliteStore:
        """Opens (creating or migrating) the database at path; its writer thread runs
        writer_niceness below the caller's thread (Linux).

        Raises StoreError with a readable message if it cannot be opened.
        """
        path = Path(path)

        lock = _lock_database(path)

        def prepare() -> sqlite3.Connection:
            conn = _connect(path)
            try:
                _migrate(conn, path)
            except BaseException as exc:
                conn.close()
                if isinstance(exc, sqlite3.Error):
                    raise StoreError(f"cannot prepare database {path}: {exc}") from exc
                raise
            return conn

        try:
            conn = await asyncio.to_thread(prepare)
        except BaseException:
            lock.close()
            raise
        store = cls(path, conn, on_commit, asyncio.get_running_loop(), writer_niceness)
        store._lock = lock
        return store

    # -- writes -------------------------------------------------------------------------

    async def write(self, unit: Callable[[WriteTransaction], T]) -> T:
        return await self.submit(unit)

    def submit(self, unit: Callable[[WriteTransaction], T]) -> asyncio.Future[T]:
        return self._submit(unit)

    def _submit(self, unit: Callable[[_Transaction], T]) -> asyncio.Future[T]:
        """Queues a unit for the writer; its own maintenance (compaction) goes this way too."""
        future: asyncio.Future[T] = self._loop.create_future()
        if self._closed:
            future.set_exception(StoreClosed("the store is closed"))
        else:
            self._jobs.put(_WriteJob(unit, future))
        return future

    def _write_loop(self, conn: sqlite3.Connection, niceness: int) -> None:
        _lower_this_threads_priority(niceness)
        next_revision = self._last_revision(conn) + 1
        while (first := self._jobs.get()) is not None:
            next_revision = self._commit_batch(conn, first, next_revision)
        conn.close()

    def _commit_batch(self, conn: sqlite3.Connection, first: _WriteJob, next_revision: int) -> int:
        """Runs first, then each job queued meanwhile until the queue is empty (or the
        batch is full), and commits them in one transaction. A job queued while earlier
        units run joins this commit instead of waiting for the next one: fewer commits,
        and each caller answered sooner."""
        batch: list[_WriteJob] = []
        outcomes: list[_Outcome] = []
        changes: list[Change] = []
        revision = next_revision
        try:
            conn.execute("BEGIN IMMEDIATE")
            job: _WriteJob | None = first
            while job is not None:
                batch.append(job)
                outcome, revision = self._run_unit(conn, job, revision, changes)
                outcomes.append(outcome)
                job = self._next_job(len(batch))
            conn.execute("COMMIT")
            self.commits += 1
            self.writes += len(batch)
        except sqlite3.Error as exc:
            log.exception("write batch of %d failed to commit", len(batch))
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            error = StoreError(f"the database could not commit: {exc}")
            outcomes = [_Outcome(job, error=error) for job in batch]
            changes, revision = [], next_revision
        self._loop.call_soon_threadsafe(self._announce, outcomes, changes)
        return revision

    def _next_job(self, batched: int) -> _WriteJob | None:
        """The next queued job, if there is one and the batch has room. The stop marker
        stays queued: the writer stops after this batch."""
        if batched >= MAX_BATCH:
            return None
        try:
            job = self._jobs.get_nowait()
        except queue.Empty:
            return None
        if job is None:
            self._jobs.put(None)
        return job

    @staticmethod
    def _run_unit(
        conn: sqlite3.Connection, job: _WriteJob, revision: int, changes: list[Change]
    ) -> tuple[_Outcome, int]:
        """One job's unit in a savepoint of its own, so a failing unit rolls back alone;
        its outcome and the next revision."""
        conn.execute("SAVEPOINT unit")
        tx = _Transaction(conn, revision)
        try:
            value = job.unit(tx)
        except Exception as exc:
            conn.execute("ROLLBACK TO unit")
            conn.execute("RELEASE unit")
            return _Outcome(job, error=exc), revision
        conn.execute("RELEASE unit")
        changes.extend(tx.changes)
        return _Outcome(job, value=value), tx.next_revision

    def _announce(self, outcomes: list[_Outcome], changes: list[Change]) -> None:
        # Runs on the event loop, after the commit: publish first, in revision order,
        # then answer the callers.
        if changes:
            try:
                self._on_commit(changes)
            except Exception:
                log.exception("publishing %d committed changes failed", len(changes))
        for outcome in outcomes:
            future = outcome.job.future
            if future.done():  # the caller went away; the write stands
                continue
            if outcome.error is not None:
                future.set_exception(outcome.error)
            else:
                future.set_result(outcome.value)

    @staticmethod
    def _last_revision(conn: sqlite3.Connection) -> int:
        value: int = conn.execute("SELECT COALESCE(MAX(revision), 0) FROM history").fetchone()[0]
        return value

    # -- reads --------------------------------------------------------------------------

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._closed:
            raise StoreClosed("the store is closed")
        return await self._loop.run_in_executor(self._readers, self._with_reader, fn)

    def _with_reader(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = _connect(self.path)
            conn.execute("PRAGMA query_only=1")
            self._local.conn = conn
            with self._reader_lock:
                self._reader_conns.append(conn)
        conn.execute("BEGIN")  # one snapshot for every statement of fn
        try:
            return fn(conn)
        finally:
            conn.execute("COMMIT")

    async def get(self, task_id: str) -> StoredTask | None:
        def read(conn: sqlite3.Connection) -> StoredTask | None:
            return _Transaction(conn, 0).load(task_id)

        return await self._read(read)

    async def query(self, query: TaskQuery) -> Sequence[QueriedTask]:
        prefix = "agent_" if query.agent_view else ""
        where = ["cursor > ?"]
        params: list[object] = [query.after_cursor]
        if query.agent_view:
            where.append("agent_task IS NOT NULL")
        if query.parent_task_id is not None:
            where.append("parent_task_id = ?")
            params.append(query.parent_task_id)
        if query.statuses:
            marks = ", ".join("?" * len(query.statuses))
            negation = "NOT " if query.exclude_statuses else ""
            where.append(f"{prefix}status {negation}IN ({marks})")
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

        def read(conn: sqlite3.Connection) -> list[QueriedTask]:
            return [
                QueriedTask(cursor=row[0], task=Task.FromString(row[1]))
                for row in conn.execute(sql, params)
            ]

        return await self._read(read)

    async def history(
        self, task_id: str, after_revision: int, limit: int
    ) -> Sequence[TaskHistoryEntry]:
        def read(conn: sqlite3.Connection) -> list[TaskHistoryEntry]:
            rows = conn.execute(
                "SELECT entry FROM history WHERE task_id = ? AND revision > ?"
                " ORDER BY revision LIMIT ?",
                (task_id, after_revision, limit),
            )
            return [TaskHistoryEntry.FromString(row[0]) for row in rows]

        return await self._read(read)

    async def agent_backlog(
        self, assignee_entity_ids: Collection[str], statuses: Collection[int]
    ) -> AgentBacklog:
        ids, wanted = sorted(assignee_entity_ids), sorted(statuses)
        sql = (
            "SELECT task FROM tasks"
            f" WHERE assignee_entity_id IN ({', '.join('?' * len(ids))})"
            f" AND status IN ({', '.join('?' * len(wanted))}) ORDER BY cursor"
        )

        def read(conn: sqlite3.Connection) -> AgentBacklog:
            rows = conn.execute(sql, (*ids, *wanted))
            tasks = [(Task.FromString(blob), blob) for (blob,) in rows]
            return AgentBacklog(tasks=tasks, revision=self._last_revision(conn))

        return await self._read(read)

    async def current_revision(self) -> int:
        return await self._read(self._last_revision)

    async def due(self, now_ns: int, limit: int) -> Sequence[tuple[str, int]]:
        def read(conn: sqlite3.Connection) -> list[tuple[str, int]]:
            return conn.execute(
                "SELECT task_id, deadline_ns FROM tasks WHERE deadline_ns <= ?"
                " ORDER BY deadline_ns LIMIT ?",
                (now_ns, limit),
            ).fetchall()

        return await self._read(read)

    async def next_deadline(self, after_ns: int) -> int | None:
        def read(conn: sqlite3.Connection) -> int | None:
            row = conn.execute(
                "SELECT MIN(deadline_ns) FROM tasks WHERE deadline_ns > ?", (after_ns,)
            ).fetchone()
            return None if row[0] is None else int(row[0])

        return await self._read(read)

    async def definition(self, task_id: str, definition_version: int) -> Task | None:
        return await self._read(lambda conn: _load_definition(conn, task_id, definition_version))

    async def seen_agents(self) -> Sequence[SeenAgent]:
        def read(conn: sqlite3.Connection) -> list[SeenAgent]:
            rows = conn.execute(
                "SELECT entity_id, first_seen_ns, last_seen_ns FROM agents ORDER BY entity_id"
            ).fetchall()
            return [SeenAgent(*row) for row in rows]

        return await self._read(read)

    async def in_flight_task_ids(self, entity_ids: Collection[str]) -> dict[str, list[str]]:
        ids = sorted(entity_ids)
        if not ids:
            return {}

        def read(conn: sqlite3.Connection) -> dict[str, list[str]]:
            rows = conn.execute(
                "SELECT holder_entity_id, task_id FROM tasks"
                f" WHERE holder_entity_id IN ({', '.join('?' * len(ids))})"
                " AND status NOT IN (?, ?, ?, ?) ORDER BY cursor",
                (*ids, *_NOT_IN_FLIGHT),
            )
            held: dict[str, list[str]] = {}
            for entity_id, task_id in rows:
                held.setdefault(entity_id, []).append(task_id)
            return held

        return await self._read(read)

    async def tasks_held_by(self, entity_ids: Collection[str]) -> Sequence[Task]:
        ids = sorted(entity_ids)
        if not ids:
            return []

        def read(conn: sqlite3.Connection) -> list[Task]:
            rows = conn.execute(
                "SELECT task FROM tasks"
                f" WHERE holder_entity_id IN ({', '.join('?' * len(ids))})"
                " AND status NOT IN (?, ?, ?, ?) ORDER BY cursor",
                (*ids, *_NOT_IN_FLIGHT),
            )
            return [Task.FromString(blob) for (blob,) in rows]

        return await self._read(read)

    async def credentials(self) -> Sequence[Credential]:
        return await self._read(_read_credentials)

    async def changes_after(
        self, after_revision: int, limit: int, task_ids: Collection[str] = ()
    ) -> Sequence[Change]:
        ids = sorted(task_ids)
        where = "revision > ?"
        if ids:
            where += f" AND task_id IN ({', '.join('?' * len(ids))})"

        def read(conn: sqlite3.Connection) -> list[Change]:
            compacted = _compacted_revision(conn)
            if after_revision < compacted:
                raise HistoryCompacted(after_revision + 1, compacted)
            rows = conn.execute(
                f"SELECT entry FROM history WHERE {where} ORDER BY revision LIMIT ?",
                (after_revision, *ids, limit),
            ).fetchall()
            entries = [TaskHistoryEntry.FromString(row[0]) for row in rows]
            current = self._tasks_by_id(conn, {entry.task_id for entry in entries})

            def definition(entry: TaskHistoryEntry) -> Task:
                task = current[entry.task_id]
                if entry.definition_version == task.version.definition_version:
                    return task
                # Before an UpdateTask: the definition of the time, saved when superseded.
                old = _load_definition(conn, entry.task_id, entry.definition_version)
                return task if old is None else with_definition(task, old)

            def change(entry: TaskHistoryEntry) -> Change:
                task = _task_at(entry, definition(entry))
                return Change(entry, task, task.SerializeToString())

            return [change(entry) for entry in entries]

        return await self._read(read)

    @staticmethod
    def _tasks_by_id(conn: sqlite3.Connection, task_ids: set[str]) -> dict[str, Task]:
        tasks: dict[str, Task] = {}
        ids = sorted(task_ids)
        for start in range(0, len(ids), 500):  # stay under SQLite's parameter limit
            chunk = ids[start : start + 500]
            rows = conn.execute(
                f"SELECT task_id, task FROM tasks WHERE task_id IN ({', '.join('?' * len(chunk))})",
                chunk,
            )
            tasks.update((row[0], Task.FromString(row[1])) for row in rows)
        return tasks

    async def snapshot(self, selector: TaskSelector) -> Snapshot:
        where, params = ["1 = 1"], []
        for column, values in (
            ("task_id", selector.task_ids),
            ("assignee_entity_id", selector.assignee_entity_ids),
            ("status", selector.statuses),
        ):
            if values:
                where.append(f"{column} IN ({', '.join('?' * len(values))})")
                params.extend(sorted(values))
        if selector.parent_task_id:
            where.append("parent_task_id = ?")
            params.append(selector.parent_task_id)
        sql = f"SELECT task FROM tasks WHERE {' AND '.join(where)} ORDER BY cursor"

        def read(conn: sqlite3.Connection) -> Snapshot:
            tasks = [Task.FromString(row[0]) for row in conn.execute(sql, params)]
            return Snapshot(tasks=tasks, revision=self._last_revision(conn))

        return await self._read(read)

    async def compact(self, keep_revisions: int, older_than_ns: int) -> int:
        if keep_revisions < 1:
            raise ValueError("compaction must keep at least the newest revision")
        return await self._submit(lambda tx: tx.compact(keep_revisions, older_than_ns))

    # -- shutdown -----------------------------------------------------------------------

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._jobs.put(None)
        await asyncio.to_thread(self._writer.join)
        await asyncio.to_thread(self._readers.shutdown)
        with self._reader_lock:
            for conn in self._reader_conns:
                conn.close()
            self._reader_conns.clear()
        if self._lock is not None:
            self._lock.close()  # releases the flock
