"""The embedded SQLite store: one writer thread with group commit, WAL readers.

Every write of a batch runs in one transaction (one failing unit fails alone:
storage/group_commit.py), committed with synchronous=FULL before any caller hears back. The
statements are the shared ones (storage/sql.py); this module owns the connections.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any, TypeVar

from storage.base import Change, StoreError
from storage.directory_blobs import DirectoryBlobStore, payload_directory
from storage.feed import ChangeFeed
from storage.group_commit import (
    WRITER_NICENESS,
    GroupCommitWriter,
    UnitNeedsIsolation,
    UnitResult,
)
from storage.sql import Read, Session, SqlStore, SqlTransaction, last_revision, record_batch
from storage.sqlite.schema import connect, lock_database, migrate
from storage.stats import TailStats

T = TypeVar("T")
log = logging.getLogger(__name__)


class _DirectoryPayloads:
    """The payloads in files beside the database (storage/directory_blobs.py), as the
    writer sees them. The writer is the database's only one, so a reference and a
    collection never run at once; an upload's commit and a deletion take the
    directory's lock."""

    def __init__(self, blobs: DirectoryBlobStore) -> None:
        self._blobs = blobs

    def missing(self, session: Session, digests: Sequence[str]) -> str | None:
        return next((d for d in digests if not self._blobs.present(d)), None)

    def hold_if_idle(self, session: Session, digest: str, before_ns: int) -> bool:
        return self._blobs.present(digest)  # its age is checked as it is deleted

    def delete_if_idle(self, session: Session, digest: str, before_ns: int) -> bool:
        return self._blobs.delete_if_idle(digest, before_ns)


class _WriterConnection:
    """The writer's side of group commit (BatchConnection) on SQLite. It is the
    database's only writer: the store holds `<db>.lock` while it is open."""

    def __init__(self, conn: sqlite3.Connection, payloads: _DirectoryPayloads) -> None:
        self._conn = conn
        self._payloads = payloads
        self._isolated = False

    def begin(self, isolated: bool) -> None:
        self._isolated = isolated
        self._execute("BEGIN IMMEDIATE")

    def run(self, unit: Callable[[Any], Any]) -> UnitResult:
        if self._isolated:
            self._execute("SAVEPOINT unit")
        tx = SqlTransaction(self._conn, self._payloads)
        try:
            value = unit(tx)
        except Exception as exc:
            if self._isolated:
                self._execute("ROLLBACK TO unit")
                self._execute("RELEASE unit")
            elif tx.wrote or not self._conn.in_transaction:
                # Its writes are in the transaction, or SQLite rolled all of it back (as
                # it may on a full disk or an I/O error).
                raise UnitNeedsIsolation from exc
            if isinstance(exc, sqlite3.Error):  # as on PostgreSQL: UNAVAILABLE, not INTERNAL
                exc = StoreError(f"the database refused the write: {exc}")
            return UnitResult(error=exc)
        if self._isolated:
            self._execute("RELEASE unit")
        return UnitResult(value=value, changes=tx.changes)

    def commit(self, changes: Sequence[Change]) -> None:
        try:
            record_batch(self._conn, changes)
            self._conn.execute("COMMIT")
        except sqlite3.Error as exc:
            raise StoreError(f"the database could not commit: {exc}") from exc

    def rollback(self) -> None:
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


class SqliteStore(SqlStore[sqlite3.Connection]):
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
        self.shared = False  # the store holds <db>.lock: no other server writes the file
        self.tail_stats: TailStats | None = None  # no other replicas' commits to read
        self.feed = ChangeFeed(last_revision(writer_conn))
        super().__init__(loop, "sqlite-reader")
        self._lock: IO[bytes] | None = None
        self._writer = GroupCommitWriter(
            _WriterConnection(
                writer_conn, _DirectoryPayloads(DirectoryBlobStore(payload_directory(path)))
            ),
            self._publish,
            loop,
            "sqlite-writer",
            writer_niceness,
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

    def _publish(self, changes: Sequence[Change], answer: Callable[[], None]) -> None:
        # On the event loop, after the commit: the one writer's commits come in revision
        # order, so they are published as they are, then the callers answered.
        try:
            self.feed.publish(changes)
        finally:
            answer()

    # -- reads --------------------------------------------------------------------------

    def _connect_reader(self, stale: sqlite3.Connection | None) -> sqlite3.Connection | None:
        if stale is not None:
            return None
        conn = connect(self.path)
        conn.execute("PRAGMA query_only=1")
        return conn

    def _read_in(self, conn: sqlite3.Connection, read: Read[T]) -> T:
        try:
            conn.execute("BEGIN")  # one snapshot for every statement of read
            try:
                return read(conn)
            finally:
                conn.execute("COMMIT")
        except sqlite3.Error as exc:  # as on PostgreSQL: UNAVAILABLE, not INTERNAL
            raise StoreError(f"the database could not be read: {exc}") from exc

    def _close_reader(self, conn: sqlite3.Connection) -> None:
        conn.close()

    # -- shutdown -----------------------------------------------------------------------

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self._writer.close()
        await self._close_readers()
        if self._lock is not None:
            self._lock.close()  # releases the flock
