"""Group commit, for every backend: one writer thread, many units of work per transaction.

Callers on the event loop submit units of work; the writer thread takes the first one
waiting and every one queued behind it (up to MAX_BATCH), runs them in one transaction,
commits once, and only then hands the batch's changes back to the loop. A backend
supplies the connection side (BatchConnection); this module owns the queue, the
batching, and who hears what when.

A failing unit fails alone. Most failures undo nothing: a unit checks (the task's
state, its version, a taken id) before it writes, so it fails having written nothing,
and the batch goes on. So a batch first runs its units without savepoints, which cost a
round trip each on PostgreSQL. Only a unit that fails after it wrote, or whose
statement failed (PostgreSQL then refuses the rest of the transaction), makes the
batch start over: rolled back, and its units run again, each in a savepoint of its own.
A unit must therefore act only through its transaction: it may run twice.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from storage.base import Change, StoreClosed, StoreError
from storage.stats import WriterStats

T = TypeVar("T")
Tx = TypeVar("Tx")
Tx_contra = TypeVar("Tx_contra", contravariant=True)
Tx_co = TypeVar("Tx_co", covariant=True)
log = logging.getLogger(__name__)

MAX_BATCH = 512
"""Writes committed together at most: bounds how long a batch's first caller waits for
the jobs that join it, and the latency one batch adds to the next."""

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


class UnitNeedsIsolation(Exception):
    """Raised by BatchConnection.run in a batch begun without savepoints, for a unit
    that failed after it wrote or whose statement failed: the batch must run again,
    isolated."""

    def __init__(self, error: Exception | None = None) -> None:
        super().__init__()
        self.error = error
        """The unit's own error if it wrote nothing (its statement failed: a lock
        timeout, a deadlock): the rerun answers it so, without running it again to wait
        on the same lock."""


class BatchConnection(Protocol[Tx_co]):
    """A backend's side of group commit: its writer connection, used by one thread."""

    def begin(self, isolated: bool) -> None:
        """Starts the batch's transaction; isolated: each unit gets a savepoint."""
        ...

    def run(self, unit: Callable[[Any], Any]) -> UnitResult:
        """Runs unit with the backend's WriteTransaction. If unit raises, the batch goes
        on without its writes: rolled back to its savepoint in an isolated batch; else,
        if it wrote nothing, there is nothing to undo, and if it did (or its statement
        failed), raises UnitNeedsIsolation. Raises StoreError only if the connection
        failed: then the whole batch does."""
        ...

    def commit(self, changes: Sequence[Change]) -> None:
        """Commits the batch, whose units made changes (oldest first). Raises StoreError
        if the database could not commit; the batch is then rolled back."""
        ...

    def rollback(self) -> None:
        """Abandons the batch's transaction, if one is open."""
        ...

    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class UnitResult:
    """What one unit of work came to: its value and changes, or its error."""

    value: Any = None
    error: Exception | None = None
    changes: Sequence[Change] = ()


Committed = Callable[[Sequence[Change], Callable[[], None]], None]
"""Called on the event loop after each commit with its changes and `answer`, which tells
the batch's callers their outcomes. It must publish the changes before it calls answer."""


@dataclass(slots=True)
class _Job:
    unit: Callable[[Any], Any]
    future: asyncio.Future[Any]


@dataclass(slots=True)
class _Outcome:
    job: _Job
    value: Any = None
    error: BaseException | None = None


class GroupCommitWriter(Generic[Tx]):
    """The writer thread of a store, over a backend's BatchConnection."""

    def __init__(
        self,
        connection: BatchConnection[Tx],
        on_committed: Committed,
        loop: asyncio.AbstractEventLoop,
        name: str,
        niceness: int = WRITER_NICENESS,
    ) -> None:
        self._connection = connection
        self._on_committed = on_committed
        self._loop = loop
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._closed = False
        self.stats = WriterStats()
        self.isolated_batches = 0
        """Batches run again with a savepoint per unit (see the module's docstring)."""
        self._thread = threading.Thread(
            target=self._write_loop, args=(niceness,), name=name, daemon=True
        )
        self._thread.start()

    @property
    def commits(self) -> int:
        """Transactions committed; with `writes`, shows how much group commit batches."""
        return self.stats.batch_writes.count

    @property
    def writes(self) -> int:
        return int(self.stats.batch_writes.sum)

    def submit(self, unit: Callable[[Tx], T]) -> asyncio.Future[T]:
        """Queues unit; the future holds its result once its batch has committed and its
        changes are published. Units run and commit in the order they were submitted."""
        future: asyncio.Future[T] = self._loop.create_future()
        if self._closed:
            future.set_exception(StoreClosed("the store is closed"))
        else:
            self._jobs.put(_Job(unit, future))
        return future

    async def close(self) -> None:
        """Commits what is queued, then stops the thread and closes the connection."""
        if self._closed:
            return
        self._closed = True
        self._jobs.put(None)
        await asyncio.to_thread(self._thread.join)

    def _write_loop(self, niceness: int) -> None:
        _lower_this_threads_priority(niceness)
        try:
            while (first := self._jobs.get()) is not None:
                self._commit_batch(first)
        finally:
            self._connection.close()

    def _commit_batch(self, first: _Job) -> None:
        """Runs first, then each job queued meanwhile until the queue is empty (or the
        batch is full), and commits them in one transaction. A job queued while earlier
        units run joins this commit instead of waiting for the next one: fewer commits,
        and each caller answered sooner."""
        batch: list[_Job] = [first]  # before begin(): a batch that cannot begin fails it
        outcomes: list[_Outcome] = []
        changes: list[Change] = []
        began = time.perf_counter()
        try:
            try:
                self._run(batch, False, outcomes, changes)
            except UnitNeedsIsolation as needed:
                log.info("a unit failed after writing (%r); running its batch again", needed)
                failed = {len(outcomes): needed.error} if needed.error is not None else {}
                self._connection.rollback()
                self.isolated_batches += 1
                outcomes.clear()
                changes.clear()
                self._run(batch, True, outcomes, changes, failed)
            self._connection.commit(changes)
            self.stats.commit_seconds.observe(time.perf_counter() - began)
            self.stats.batch_writes.observe(len(batch))
        except Exception as exc:  # a StoreError, or a bug: the batch fails, the writer goes on
            if isinstance(exc, StoreError):
                log.error("write batch of %d failed: %s", len(batch), exc)
            else:  # its callers hear the bug itself (INTERNAL), not a retryable error
                log.exception("write batch of %d failed", len(batch))
            self._connection.rollback()
            outcomes = [_Outcome(job, error=exc) for job in batch]
            changes = []
        try:
            self._loop.call_soon_threadsafe(self._on_committed, changes, lambda: _answer(outcomes))
        except RuntimeError:  # the loop is closed: its owner left without close()
            log.error("a batch of %d committed after its event loop closed", len(batch))

    def _run(
        self,
        batch: list[_Job],
        isolated: bool,
        outcomes: list[_Outcome],
        changes: list[Change],
        failed: dict[int, Exception] | None = None,
    ) -> None:
        """Begins a transaction and runs batch's jobs in it, then the jobs queued
        meanwhile, which join batch. failed: the jobs (by position) answered with an
        error without running."""
        self._connection.begin(isolated)
        index = 0
        while index < len(batch) or self._take_next_job(batch):
            job = batch[index]
            index += 1
            if failed and (error := failed.get(index - 1)) is not None:
                outcomes.append(_Outcome(job, error=error))
                continue
            result = self._connection.run(job.unit)
            outcomes.append(_Outcome(job, result.value, result.error))
            changes.extend(result.changes)

    def _take_next_job(self, batch: list[_Job]) -> bool:
        job = self._next_job(len(batch))
        if job is not None:
            batch.append(job)
        return job is not None

    def _next_job(self, batched: int) -> _Job | None:
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


def _answer(outcomes: Sequence[_Outcome]) -> None:
    for outcome in outcomes:
        future = outcome.job.future
        if future.done():  # the caller went away; the write stands
            continue
        if outcome.error is not None:
            future.set_exception(outcome.error)
        else:
            future.set_result(outcome.value)


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
