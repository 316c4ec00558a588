"""The PostgreSQL store: the SQLite store's shape, for several gateway replicas.

Writes go through one writer thread per replica with group commit, as on SQLite, and
number their changes from one counter row at commit (storage/sql.py), which keeps
revisions dense and in commit order across replicas. Every replica learns of every
commit, its own and the others', from one tail (ChangeTail) that publishes to its feed
in revision order: its own commits at once, from memory, and the others' read back
from history when a NOTIFY (or the fallback poll) says there are any.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import psycopg
from psycopg.pq import TransactionStatus

from storage.base import Change, StoreClosed, StoreError
from storage.feed import TAIL_POLL_S, ChangeFeed, RevisionGap
from storage.group_commit import (
    WRITER_NICENESS,
    GroupCommitWriter,
    UnitNeedsIsolation,
    UnitResult,
)
from storage.postgres.prepared import PreparedSession
from storage.postgres.schema import (
    Connection,
    PgSession,
    connect,
    describe,
    first_line,
    migrate,
)
from storage.sql import (
    Read,
    Session,
    SqlStore,
    SqlTransaction,
    last_revision,
    marks,
    record_batch,
)
from storage.stats import TailStats

T = TypeVar("T")
log = logging.getLogger(__name__)

CHANNEL = "task_manager_commits"
"""The NOTIFY channel: its payload is the newest revision of the commit."""
CLOCK = "SELECT (EXTRACT(EPOCH FROM clock_timestamp()) * 1000000000)::BIGINT"
"""The database's clock: every replica's leases are timed by the same one."""
TAIL_PAGE = 1_000
"""Changes read back from history per query of the tail."""
RECONNECT_S = 0.5
"""Pause between attempts to reconnect the LISTEN connection."""


class _TablePayloads:
    """The payloads in the database's own tables (storage/postgres/blobs.py). A reference
    takes a share lock on each payload's row and a collection an exclusive one, so of a
    reference and a collection racing on any replica, the second waits for the first."""

    def missing(self, session: Session, digests: Sequence[str]) -> str | None:
        rows = session.execute(
            f"SELECT digest FROM payloads WHERE digest IN ({marks(len(digests))}) FOR SHARE",
            list(digests),
        ).fetchall()
        stored = {row[0] for row in rows}
        return next((d for d in digests if d not in stored), None)

    def hold_if_idle(self, session: Session, digest: str, before_ns: int) -> bool:
        row = session.execute(
            "SELECT 1 FROM payloads WHERE digest = ? AND stored_ns < ? FOR UPDATE",
            (digest, before_ns),
        ).fetchone()
        return row is not None

    def delete_if_idle(self, session: Session, digest: str, before_ns: int) -> bool:
        # Held since hold_if_idle: no upload has touched it meanwhile.
        row = session.execute(
            "DELETE FROM payloads WHERE digest = ? RETURNING upload_id", (digest,)
        ).fetchone()
        if row is None:
            return False
        session.execute("DELETE FROM payload_chunks WHERE upload_id = ?", (row[0],))
        return True


class _WriterConnection:
    """The writer's side of group commit (BatchConnection) on PostgreSQL. It reconnects
    at the next batch after losing its connection."""

    def __init__(self, url: str, conn: Connection) -> None:
        self._url = url
        self._conn: Connection | None = conn
        self._session = PreparedSession(conn)
        self.backend_pid = conn.info.backend_pid
        """The server process of this connection: the sender of our own NOTIFYs."""
        self._isolated = False
        self._savepoint = "SAVEPOINT unit"
        """What an isolated batch sends before its next unit: the first unit's savepoint,
        then the previous one's release with the next one's (one round trip a unit; a
        batch keeps one savepoint level at a time, as PostgreSQL slows down past 64
        subtransactions open at once)."""
        self.lock_hold_ns = 0
        """Time spent holding the revision counter's lock (numbering to commit)."""

    def begin(self, isolated: bool) -> None:
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._drop()
            self._conn = connect(self._url, "writer")
            self._session = PreparedSession(self._conn)
            self.backend_pid = self._conn.info.backend_pid
        self._isolated = isolated
        self._savepoint = "SAVEPOINT unit"
        self._execute("BEGIN")

    def run(self, unit: Callable[[Any], Any]) -> UnitResult:
        assert self._conn is not None
        if self._isolated:
            self._execute(self._savepoint)
            self._savepoint = "RELEASE SAVEPOINT unit; SAVEPOINT unit"
        tx = SqlTransaction(
            self._session,
            _TablePayloads(),
            load_clause=" FOR UPDATE",
            claim_clause=" FOR UPDATE SKIP LOCKED",
            clock_sql=CLOCK,
        )
        try:
            value = unit(tx)
            if self._conn.info.transaction_status != TransactionStatus.INTRANS:
                # A statement failed and the unit went on: PostgreSQL refuses the rest.
                raise StoreError("the database refused a statement of the write")
        except Exception as exc:
            # A database error inside a unit (a lock timeout, a deadlock with another
            # replica) fails the unit alone.
            error = exc
            if isinstance(exc, psycopg.Error):
                error = StoreError(f"the database refused the write: {first_line(exc)}")
            if self._isolated:
                # If even the rollback fails, the connection is gone, and so is the batch.
                self._execute("ROLLBACK TO SAVEPOINT unit")
            elif tx.wrote:  # its writes are in the transaction
                raise UnitNeedsIsolation() from exc
            elif self._conn.info.transaction_status != TransactionStatus.INTRANS:
                # PostgreSQL refuses the rest of the transaction: the others run again.
                raise UnitNeedsIsolation(error) from exc
            return UnitResult(error=error)
        return UnitResult(value=value, changes=tx.changes)

    def commit(self, changes: Sequence[Change]) -> None:
        assert self._conn is not None
        started = time.perf_counter_ns()
        try:
            record_batch(self._session, changes)
            # COMMIT also releases an isolated batch's last savepoint. The NOTIFY is
            # delivered only if the commit succeeds; the revision is an integer, safe inline.
            notify = f"NOTIFY {CHANNEL}, '{changes[-1].revision}'; " if changes else ""
            if self._session.execute_script(notify + "COMMIT") != b"COMMIT":
                # PostgreSQL answers COMMIT of a failed transaction with ROLLBACK.
                raise StoreError("the database rolled the batch back")
        except psycopg.Error as exc:
            raise StoreError(f"the database could not commit: {first_line(exc)}") from exc
        if changes:
            self.lock_hold_ns += time.perf_counter_ns() - started

    def rollback(self) -> None:
        if self._conn is None or self._conn.closed:
            return
        try:
            # Not by psycopg's execute: seeing a ROLLBACK, psycopg deallocates every
            # prepared statement of the connection, the session's too.
            self._session.execute_script("ROLLBACK")
        except psycopg.Error:
            self._drop()  # reconnected at the next batch

    def close(self) -> None:
        self._drop()

    def _drop(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(psycopg.Error):
                self._conn.close()
        self._conn = None

    def _execute(self, sql: str) -> None:
        try:
            self._session.execute_script(sql)
        except psycopg.Error as exc:
            raise StoreError(f"the database could not commit: {first_line(exc)}") from exc


@dataclass(slots=True)
class _OwnBatch:
    changes: Sequence[Change]
    answer: Callable[[], None]

    @property
    def first(self) -> int:
        return self.changes[0].revision

    @property
    def last(self) -> int:
        return self.changes[-1].revision


class ChangeTail:
    """Publishes every commit to the database, in revision order, to one feed.

    Commits of this store's writer arrive by `committed`: published at once when they
    follow the feed, their callers answered right after. Commits of other replicas are
    read from history, from the feed's revision on, when woken (a NOTIFY, an own commit
    that does not follow the feed, the poll every poll_s), and published first."""

    def __init__(
        self,
        store: PostgresStore,
        url: str,
        feed: ChangeFeed,
        writer_pid: Callable[[], int],
        poll_s: float,
    ) -> None:
        self._store = store
        self._poll_s = poll_s
        self._writer_pid = writer_pid
        self._url = url
        self._feed = feed
        self._own: collections.deque[_OwnBatch] = collections.deque()
        self._reading = False
        self._wake = asyncio.Event()
        self.reads = 0
        """Pages of history read back (others' commits, or a gap before our own)."""
        self.stats = TailStats()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._follow(), name="postgres-tail"),
            asyncio.create_task(self._listen(), name="postgres-listen"),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        # Writes committed but not yet published (another replica's commit came
        # first and was never read): their callers still hear back.
        for batch in self._own:
            batch.answer()
        self._own.clear()

    def committed(self, changes: Sequence[Change], answer: Callable[[], None]) -> None:
        """The writer's commits (GroupCommitWriter's Committed), on the event loop."""
        if not changes and not self._own:
            answer()
            return
        # A batch without changes still waits behind earlier ones: callers hear back in
        # the order their writes committed.
        self._own.append(_OwnBatch(changes, answer))
        if not self._reading:
            self._publish_own()
        if self._own:  # another replica's commits come first: read them
            self._wake.set()

    def _publish_own(self) -> None:
        feed = self._feed
        while self._own:
            batch = self._own[0]
            if batch.changes and batch.first > feed.revision + 1:
                return
            self._own.popleft()
            if batch.changes and batch.last > feed.revision:  # else read back already
                feed.publish(batch.changes[feed.revision + 1 - batch.first :])
            batch.answer()

    async def _follow(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._poll_s)
            self._wake.clear()
            try:
                await self._catch_up()
            except StoreClosed:
                return
            except (StoreError, RevisionGap) as exc:
                log.error("following the database's commits failed: %s", exc)
            except Exception:  # a bug: loud, and the tail keeps following
                log.exception("following the database's commits failed")

    async def _catch_up(self) -> None:
        """Reads and publishes history until the feed has everything committed so far
        (at least up to this store's own commits waiting to be published)."""
        empty_reads = 0
        while True:
            self._reading = True
            try:
                page = await self._store.changes_after(self._feed.revision, TAIL_PAGE)
            finally:
                self._reading = False
            self.reads += 1
            full = len(page) == TAIL_PAGE
            if self._own:  # our own commits are published from memory, as they were made
                page = [change for change in page if change.revision < self._own[0].first]
            # A gap in a page, or a page that does not follow the feed, raises
            # RevisionGap: revisions are dense, so that is a bug to report, never skip.
            self._feed.publish(page)
            if page:
                made = page[-1].task.last_update_time
                self.stats.lag_seconds.observe(max(0.0, time.time() - made.ToNanoseconds() / 1e9))
            self._publish_own()
            if full:
                continue
            if not self._own:
                return
            # Our commit is waiting for revisions before it. They committed before it
            # did, so a read begun after our commit sees them; one begun before may not.
            empty_reads = empty_reads + 1 if not page else 0
            if empty_reads >= 2:
                raise RevisionGap(
                    f"revisions {self._feed.revision + 1} to {self._own[0].first - 1} are"
                    " missing from history, though a later commit is in"
                )

    async def _listen(self) -> None:
        """Holds the LISTEN connection, reconnecting when it drops, and catches up after
        each (re)connect: notifications sent while it was down are lost."""
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(
                    self._url, autocommit=True, application_name="task-manager listen"
                ) as conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    self._wake.set()
                    async for notify in conn.notifies():
                        # Our own commits come by committed(), often after their NOTIFY:
                        # reading them back would only delay them.
                        if notify.pid == self._writer_pid():
                            continue
                        if not notify.payload.isdigit():
                            self._wake.set()  # not ours to parse: the read will tell
                            continue
                        announced = int(notify.payload)
                        if announced > self.stats.announced_revision:
                            self.stats.announced_revision = announced
                        if announced > self._feed.revision:
                            self._wake.set()
            except (psycopg.Error, OSError) as exc:
                log.warning(
                    "listening for commits on %s failed (%s); reconnecting",
                    describe(self._url),
                    first_line(exc),
                )
                await asyncio.sleep(RECONNECT_S)


class PostgresStore(SqlStore[Connection]):
    """Store on a PostgreSQL database, which other replicas may share. Create it with
    `await PostgresStore.open(url)`."""

    def __init__(
        self,
        url: str,
        writer_conn: Connection,
        revision: int,
        durable: bool,
        loop: asyncio.AbstractEventLoop,
        writer_niceness: int,
        tail_poll_s: float,
    ) -> None:
        self.url = url
        self.durable = durable
        self.shared = True  # other replicas may serve the same database
        self.feed = ChangeFeed(revision)
        super().__init__(loop, "postgres-reader")
        self._clock_sql = CLOCK
        self._writer_connection = _WriterConnection(url, writer_conn)
        self.tail = ChangeTail(
            self, url, self.feed, lambda: self._writer_connection.backend_pid, tail_poll_s
        )
        self._writer = GroupCommitWriter(
            self._writer_connection, self.tail.committed, loop, "postgres-writer", writer_niceness
        )
        self.tail.start()

    @classmethod
    async def open(
        cls, url: str, writer_niceness: int = WRITER_NICENESS, tail_poll_s: float = TAIL_POLL_S
    ) -> PostgresStore:
        """Connects to the database at url, creating or migrating its schema; its tail
        polls history every tail_poll_s. Raises StoreError with a readable message if it
        cannot."""

        def prepare() -> tuple[Connection, int, bool]:
            conn = connect(url, "writer")
            try:
                migrate(conn, url)
                revision = last_revision(PgSession(conn))
                fsync = conn.execute("SHOW fsync").fetchone()
                synchronous = conn.execute("SHOW synchronous_commit").fetchone()
            except BaseException:
                conn.close()
                raise
            durable = fsync is not None and fsync[0] == "on"
            durable = durable and synchronous is not None and synchronous[0] != "off"
            return conn, revision, durable

        conn, revision, durable = await asyncio.to_thread(prepare)
        loop = asyncio.get_running_loop()
        return cls(url, conn, revision, durable, loop, writer_niceness, tail_poll_s)

    @property
    def tail_stats(self) -> TailStats:
        return self.tail.stats

    @property
    def commit_lock_hold_ns(self) -> int:
        """Time this store's writer held the revision counter's lock, in total."""
        return self._writer_connection.lock_hold_ns

    # -- reads --------------------------------------------------------------------------

    def _connect_reader(self, stale: Connection | None) -> Connection | None:
        if stale is not None and not stale.closed and not stale.broken:
            return None
        return connect(self.url, "reader")

    def _read_in(self, conn: Connection, read: Read[T]) -> T:
        try:
            # One snapshot for every statement of read, as SQLite's WAL readers have.
            conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            try:
                return read(PgSession(conn))
            finally:
                if not conn.broken:
                    conn.execute("COMMIT")
        except psycopg.OperationalError as exc:
            raise StoreError(f"the database could not be read: {first_line(exc)}") from exc

    def _close_reader(self, conn: Connection) -> None:
        with contextlib.suppress(psycopg.Error):
            conn.close()

    # -- shutdown -----------------------------------------------------------------------

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        # The writer's last batches reached the tail before close() resumes: the writer
        # scheduled them on this loop before its thread ended.
        await self._writer.close()
        await self.tail.stop()
        log.info(
            "revision counter's lock held %d ns in all; %d pages of history read back",
            self.commit_lock_hold_ns,
            self.tail.reads,
        )
        await self._close_readers()
