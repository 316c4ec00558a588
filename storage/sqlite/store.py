"""The embedded SQLite store: one writer thread with group commit, WAL readers.

Every write of a batch runs in one transaction (a savepoint each, so one failing unit
rolls back alone), committed with synchronous=FULL before any caller hears back.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any, TypeVar

from storage.base import (
    AgentBacklog,
    Change,
    ConcurrentModification,
    Credential,
    HistoryCompacted,
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
)
from storage.feed import ChangeFeed
from storage.group_commit import WRITER_NICENESS, GroupCommitWriter, UnitResult
from storage.history import entry_for, ns, replay
from storage.sqlite.credentials import insert_credential, read_credentials, revoke
from storage.sqlite.schema import connect, lock_database, migrate
from task_manager import statuses
from task_manager.v1.task_manager_pb2 import StatusUpdate, Task, TaskHistoryEntry

_WITH_AN_AGENT = ", ".join(str(status) for status in sorted(statuses.WITH_AN_AGENT))
"""The statuses of a task its agent holds, as SQL (they are integers)."""

T = TypeVar("T")
log = logging.getLogger(__name__)

READER_THREADS = 2


def _load_definition(conn: sqlite3.Connection, task_id: str, version: int) -> Task | None:
    row = conn.execute(
        "SELECT definition FROM definitions WHERE task_id = ? AND definition_version = ?",
        (task_id, version),
    ).fetchone()
    return None if row is None else Task.FromString(row[0])


def _parse_task(blob: bytes | None) -> Task | None:
    return None if blob is None else Task.FromString(blob)


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
        insert_credential(self._conn, credential)

    def revoke_credential(self, credential_id: str, now_ns: int) -> bool:
        return revoke(self._conn, credential_id, now_ns)

    def agent_seen(self, entity_id: str, now_ns: int) -> None:
        self._conn.execute(
            "INSERT INTO agents (entity_id, first_seen_ns, last_seen_ns) VALUES (?, ?, ?)"
            " ON CONFLICT (entity_id) DO UPDATE SET last_seen_ns = excluded.last_seen_ns",
            (entity_id, now_ns, now_ns),
        )

    def _append(self, stored: StoredTask, reason: str, encoded_task: bytes) -> Change:
        entry = entry_for(stored.task, self.next_revision, reason)
        self._conn.execute(
            "INSERT INTO history (revision, task_id, entry, time_ns) VALUES (?, ?, ?, ?)",
            (entry.revision, entry.task_id, entry.SerializeToString(), ns(entry.time)),
        )
        self.next_revision += 1
        change = Change(entry, stored.task, encoded_task, stored.deadline_ns)
        self.changes.append(change)
        return change

    def compact(self, keep_revisions: int, older_than_ns: int) -> int:
        newest = _last_revision(self._conn)
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
            ns(task.last_update_time),
            None if agent_task is None else agent_task.status.status,
            None if agent_task is None else ns(agent_task.last_update_time),
            encoded_task,
            agent_bytes,
            None if stored.last_update is None else stored.last_update.SerializeToString(),
            stored.deadline_ns,
            holder_entity_id(task),
        )


class _WriterConnection:
    """The writer's side of group commit (BatchConnection) on SQLite.

    Revisions are counted here, in memory: the writer is the database's only one (the
    store holds `<db>.lock`), so the next revision is the last committed one plus one,
    and a reader that sees revision R has every revision below it."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        self._next_revision = _last_revision(conn) + 1
        self._batch_start = self._next_revision

    def begin(self) -> None:
        self._batch_start = self._next_revision
        self._execute("BEGIN IMMEDIATE")

    def run(self, unit: Callable[[Any], Any]) -> UnitResult:
        self._execute("SAVEPOINT unit")
        tx = _Transaction(self._conn, self._next_revision)
        try:
            value = unit(tx)
        except Exception as exc:
            self._execute("ROLLBACK TO unit")
            self._execute("RELEASE unit")
            return UnitResult(error=exc)
        self._execute("RELEASE unit")
        self._next_revision = tx.next_revision
        return UnitResult(value=value, changes=tx.changes)

    def commit(self, changes: Sequence[Change]) -> None:
        self._execute("COMMIT")

    def rollback(self) -> None:
        self._next_revision = self._batch_start
        try:
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
        except sqlite3.Error:
            log.exception("rolling back a failed batch failed")

    def close(self) -> None:
        self._conn.close()

    def _execute(self, sql: str) -> None:
        try:
            self._conn.execute(sql)
        except sqlite3.Error as exc:
            raise StoreError(f"the database could not commit: {exc}") from exc


def _last_revision(conn: sqlite3.Connection) -> int:
    value: int = conn.execute("SELECT COALESCE(MAX(revision), 0) FROM history").fetchone()[0]
    return value


class SqliteStore:
    """Store backed by one SQLite file. Create it with `await SqliteStore.open(...)`."""

    def __init__(
        self,
        path: Path,
        writer_conn: sqlite3.Connection,
        loop: asyncio.AbstractEventLoop,
        writer_niceness: int = WRITER_NICENESS,
    ) -> None:
        self.path = path
        # FULL (2) or EXTRA (3): every commit of the writer is fsynced before it returns.
        self.durable: bool = writer_conn.execute("PRAGMA synchronous").fetchone()[0] >= 2
        self.feed = ChangeFeed(_last_revision(writer_conn))
        self._loop = loop
        self._closed = False
        self._lock: IO[bytes] | None = None
        self._reader_conns: list[sqlite3.Connection] = []
        self._reader_lock = threading.Lock()
        self._local = threading.local()
        self._readers = ThreadPoolExecutor(READER_THREADS, thread_name_prefix="sqlite-reader")
        self._writer: GroupCommitWriter[_Transaction] = GroupCommitWriter(
            _WriterConnection(writer_conn), self._publish, loop, "sqlite-writer", writer_niceness
        )

    @classmethod
    async def open(cls, path: Path | str, writer_niceness: int = WRITER_NICENESS) -> SqliteStore:
        """Opens (creating or migrating) the database at path; its writer thread runs
        writer_niceness below the caller's thread (Linux).

        Raises StoreError with a readable message if it cannot be opened.
        """
        path = Path(path)

        lock = lock_database(path)

        def prepare() -> sqlite3.Connection:
            conn = connect(path)
            try:
                migrate(conn, path)
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
        store = cls(path, conn, asyncio.get_running_loop(), writer_niceness)
        store._lock = lock
        return store

    @property
    def commits(self) -> int:
        """Transactions committed; with `writes`, shows how much group commit batches."""
        return self._writer.commits

    @property
    def writes(self) -> int:
        return self._writer.writes

    # -- writes -------------------------------------------------------------------------

    async def write(self, unit: Callable[[WriteTransaction], T]) -> T:
        return await self._writer.submit(unit)

    def submit(self, unit: Callable[[WriteTransaction], T]) -> asyncio.Future[T]:
        return self._writer.submit(unit)

    def _publish(self, changes: Sequence[Change], answer: Callable[[], None]) -> None:
        # On the event loop, after the commit: the one writer's commits come in revision
        # order, so they are published as they are, then the callers answered.
        try:
            self.feed.publish(changes)
        finally:
            answer()

    # -- reads --------------------------------------------------------------------------

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._closed:
            raise StoreClosed("the store is closed")
        return await self._loop.run_in_executor(self._readers, self._with_reader, fn)

    def _with_reader(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = connect(self.path)
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
            return AgentBacklog(tasks=tasks, revision=_last_revision(conn))

        return await self._read(read)

    async def current_revision(self) -> int:
        return await self._read(_last_revision)

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
                f" AND status IN ({_WITH_AN_AGENT}) ORDER BY cursor",
                ids,
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
                f" AND status IN ({_WITH_AN_AGENT}) ORDER BY cursor",
                ids,
            )
            return [Task.FromString(blob) for (blob,) in rows]

        return await self._read(read)

    async def credentials(self) -> Sequence[Credential]:
        return await self._read(read_credentials)

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
            return replay(
                [(entry, None) for entry in entries],
                current,
                lambda task_id, version: _load_definition(conn, task_id, version),
            )

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
            return Snapshot(tasks=tasks, revision=_last_revision(conn))

        return await self._read(read)

    async def compact(self, keep_revisions: int, older_than_ns: int) -> int:
        if keep_revisions < 1:
            raise ValueError("compaction must keep at least the newest revision")

        def compact(tx: _Transaction) -> int:
            return tx.compact(keep_revisions, older_than_ns)

        return await self._writer.submit(compact)

    # -- shutdown -----------------------------------------------------------------------

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self._writer.close()
        await asyncio.to_thread(self._readers.shutdown)
        with self._reader_lock:
            for conn in self._reader_conns:
                conn.close()
            self._reader_conns.clear()
        if self._lock is not None:
            self._lock.close()  # releases the flock
