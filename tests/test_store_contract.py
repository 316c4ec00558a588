"""The store contract: what every backend must do, run on each of them.

Group commit (what one commit holds, what a failing unit undoes), revisions (dense, in
commit order, published before the writer's caller is answered), compare-and-set,
history and compaction, and two stores on one database.

The group-commit tests hold the writer inside a first unit (on an event it waits for),
queue more units behind it, then let it go, so what shares a commit does not depend on
timing.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import psycopg
import pytest

from storage import open_blob_store, open_store
from storage.base import (
    Change,
    ConcurrentModification,
    HistoryCompacted,
    PayloadMissing,
    Store,
    StoreClosed,
    StoreError,
    TaskExists,
    TaskQuery,
    Uptime,
    WriteTransaction,
)
from storage.blobs import BlobRef
from storage.group_commit import MAX_BATCH, WRITER_NICENESS
from task_manager import lifecycle
from task_manager.config import Settings
from task_manager.errors import TaskIdTaken
from task_manager.v1 import task_manager_pb2 as pb

pytestmark = pytest.mark.anyio

NOW_NS = 1_700_000_000_000_000_000


def create(task_id: str, display_name: str = "") -> Callable[[WriteTransaction], pb.Task]:
    """A unit that creates a task with no assignee (named display_name, or task_id):
    one change (CREATED)."""
    request = pb.CreateTaskRequest(display_name=display_name or task_id)

    def unit(tx: WriteTransaction) -> pb.Task:
        return lifecycle.create_task(tx, request, task_id, Settings().task_policy(), NOW_NS).task

    return unit


@pytest.fixture
def published() -> list[Change]:
    return []


@pytest.fixture
async def store(database: str, published: list[Change]) -> AsyncIterator[Store]:
    opened = await open_store(database)
    opened.feed.subscribe(published.extend)
    yield opened
    await opened.close()  # a no-op for a test that closed it


@asynccontextmanager
async def writer_held(store: Store) -> AsyncIterator[asyncio.Future[pb.Task]]:
    """Keeps the writer inside a first unit (creating held-1) while the body queues
    more; lets it go on the way out. Yields the first unit's result."""
    entered, released = threading.Event(), threading.Event()

    def held(tx: WriteTransaction) -> pb.Task:
        entered.set()
        assert released.wait(30), "the test never released the writer"
        return create("held-1")(tx)

    try:
        first = store.submit(held)
        assert await anyio.to_thread.run_sync(entered.wait, 30), "the writer never ran"
        yield first
    finally:
        released.set()  # a failing test must not leave the writer stuck


async def test_writes_queued_while_a_batch_runs_join_its_commit(
    store: Store, published: list[Change]
) -> None:
    stats = store.writer_stats
    commits_before, six_writes_before = store.commits, stats.batch_writes.counts[3]
    async with writer_held(store) as first:
        later = [store.submit(create(f"late-{n}")) for n in range(5)]
    await asyncio.gather(first, *later)

    # One commit for the six writes, applied in the order they were queued, with the
    # revisions they would have had one commit each.
    assert store.commits == commits_before + 1
    assert stats.batch_writes.bounds[3] == 8  # six writes: the bucket of 5 to 8
    assert stats.batch_writes.counts[3] == six_writes_before + 1
    assert stats.commit_seconds.count == store.commits
    assert [change.task.version.task_id for change in published] == [
        "held-1",
        *(f"late-{n}" for n in range(5)),
    ]
    assert [change.revision for change in published] == list(range(1, 7))
    for n in range(5):
        assert await store.get(f"late-{n}") is not None


async def test_a_failing_unit_undoes_only_its_own_writes(
    store: Store, published: list[Change]
) -> None:
    def create_then_fail(tx: WriteTransaction) -> pb.Task:
        create("doomed-1")(tx)
        raise ValueError("refused after writing")

    commits_before = store.commits
    async with writer_held(store) as first:
        doomed = store.submit(create_then_fail)
        after = store.submit(create("after-1"))
    results = await asyncio.gather(first, doomed, after, return_exceptions=True)

    assert isinstance(results[1], ValueError)
    assert isinstance(results[2], pb.Task)
    assert store.commits == commits_before + 1
    assert await store.get("doomed-1") is None
    assert await store.get("after-1") is not None
    # The refused unit's revision is not spent: numbering has no gap.
    assert [(c.task.version.task_id, c.revision) for c in published] == [
        ("held-1", 1),
        ("after-1", 2),
    ]


async def test_a_unit_refused_before_it_writes_fails_alone_without_a_rerun(
    store: Store, published: list[Change]
) -> None:
    runs: list[str] = []

    def counted(task_id: str, display_name: str = "") -> Callable[[WriteTransaction], pb.Task]:
        def unit(tx: WriteTransaction) -> pb.Task:
            runs.append(task_id)
            return create(task_id, display_name)(tx)

        return unit

    await store.write(create("taken-1"))
    async with writer_held(store) as first:
        # A taken id (another request): checked, nothing written.
        refused = store.submit(counted("taken-1", display_name="another"))
        after = store.submit(counted("after-1"))
    results = await asyncio.gather(first, refused, after, return_exceptions=True)

    assert isinstance(results[1], TaskIdTaken)
    assert isinstance(results[2], pb.Task)
    assert store.isolated_batches == 0
    assert runs == ["taken-1", "after-1"]  # each unit ran once


async def test_a_unit_failing_after_it_wrote_reruns_its_batch_isolated(
    store: Store, published: list[Change]
) -> None:
    runs: list[str] = []

    def counted(task_id: str, fail: bool = False) -> Callable[[WriteTransaction], pb.Task]:
        def unit(tx: WriteTransaction) -> pb.Task:
            runs.append(task_id)
            task = create(task_id)(tx)
            if fail:
                raise ValueError("refused after writing")
            return task

        return unit

    async with writer_held(store) as first:
        before = store.submit(counted("before-1"))
        doomed = store.submit(counted("doomed-1", fail=True))
        after = store.submit(counted("after-1"))
    results = await asyncio.gather(first, before, doomed, after, return_exceptions=True)

    assert isinstance(results[2], ValueError)
    assert [type(result) for result in (results[1], results[3])] == [pb.Task, pb.Task]
    assert store.isolated_batches == 1
    # The batch ran to the failure, then again from its start, each unit in a savepoint.
    assert runs == ["before-1", "doomed-1", "before-1", "doomed-1", "after-1"]
    assert await store.get("doomed-1") is None
    assert [(c.task.version.task_id, c.revision) for c in published] == [
        ("held-1", 1),
        ("before-1", 2),
        ("after-1", 3),
    ]


async def test_a_batch_holds_at_most_max_batch_writes(
    store: Store, published: list[Change]
) -> None:
    commits_before = store.commits
    async with writer_held(store) as first:
        later = [store.submit(create(f"late-{n}")) for n in range(MAX_BATCH)]
    await asyncio.gather(first, *later)

    assert store.commits == commits_before + 2  # MAX_BATCH writes, then the last one
    assert [change.revision for change in published] == list(range(1, MAX_BATCH + 2))


async def test_closing_finishes_the_batch_in_progress_and_what_was_queued(
    store: Store,
) -> None:
    async with writer_held(store) as first:
        later = [store.submit(create(f"late-{n}")) for n in range(3)]
        closing = asyncio.create_task(store.close())
        await asyncio.sleep(0)  # one turn of the loop: close() queues its stop marker
        refused = store.submit(create("too-late"))
    await closing

    tasks = await asyncio.gather(first, *later)
    assert [task.version.task_id for task in tasks] == ["held-1", "late-0", "late-1", "late-2"]
    assert store.commits == 1
    with pytest.raises(StoreClosed):
        await refused


@pytest.mark.skipif(sys.platform != "linux", reason="thread priorities are set on Linux only")
async def test_the_writer_thread_alone_runs_at_a_lower_priority(store: Store) -> None:
    # The writer lowers its priority as it starts: once it has run a unit, it has.
    await store.write(create("any-1"))
    # Every writer thread of this process (a store another test left open is one too).
    writers = [thread for thread in threading.enumerate() if thread.name.endswith("-writer")]
    assert writers
    loop_thread = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    expected = min(19, loop_thread + WRITER_NICENESS)
    for writer in writers:
        assert writer.native_id is not None
        assert os.getpriority(os.PRIO_PROCESS, writer.native_id) == expected


# -- revisions, compare-and-set, history ----------------------------------------------


def execute(
    task_id: str, after_load: Callable[[], object] = lambda: None
) -> Callable[[WriteTransaction], pb.Task]:
    """A unit that moves a task on by one status, with compare-and-set (after_load runs
    between the load and the write)."""

    def unit(tx: WriteTransaction) -> pb.Task:
        stored = tx.load(task_id)
        assert stored is not None
        after_load()
        task = pb.Task()
        task.CopyFrom(stored.task)
        task.version.status_version += 1
        task.status.status = pb.STATUS_EXECUTING
        tx.replace(type(stored)(task, stored.agent_task, None), stored.task.version.status_version)
        return task

    return unit


async def test_revisions_are_dense_commit_ordered_and_published_before_the_answer(
    store: Store, published: list[Change]
) -> None:
    answered_at: dict[str, int] = {}

    async def write(n: int) -> None:
        task = await store.write(create(f"t-{n}"))
        # Published before this caller heard back: the feed already holds it.
        answered_at[task.version.task_id] = store.feed.revision
        assert any(c.task.version.task_id == f"t-{n}" for c in published)

    await asyncio.gather(*(write(n) for n in range(40)))
    assert [change.revision for change in published] == list(range(1, 41))
    assert await store.current_revision() == store.feed.revision == 40
    read_back = await store.changes_after(0, 100)
    assert [c.revision for c in read_back] == list(range(1, 41))
    assert [c.encoded_task for c in read_back] == [c.encoded_task for c in published]
    # Creation order is commit order: QueryTasks pages by it.
    queried = await store.query(TaskQuery(limit=100))
    assert [q.task.version.task_id for q in queried] == [c.task.version.task_id for c in published]
    assert [q.cursor for q in queried] == [c.revision for c in published]


async def test_a_lost_compare_and_set_raises_and_writes_nothing(
    store: Store, published: list[Change]
) -> None:
    created = await store.write(create("cas-1"))
    await store.write(execute("cas-1"))
    before = list(published)

    def stale(tx: WriteTransaction) -> None:
        stored = tx.load("cas-1")
        assert stored is not None
        tx.replace(stored, created.version.status_version)  # two versions behind

    with pytest.raises(ConcurrentModification) as raised:
        await store.write(stale)
    assert raised.value.stored_status_version == created.version.status_version + 1
    assert published == before
    assert [e.status_version for e in await store.history("cas-1", 0, 10)] == [1, 2]


async def test_a_taken_id_raises_and_writes_nothing(store: Store, published: list[Change]) -> None:
    await store.write(create("taken-1"))

    def insert_again(tx: WriteTransaction) -> None:
        stored = tx.load("taken-1")
        assert stored is not None
        tx.insert(stored)

    with pytest.raises(TaskExists):
        await store.write(insert_again)
    assert [c.revision for c in published] == [1]


async def test_compaction_removes_old_history_and_says_so(store: Store) -> None:
    for n in range(5):
        await store.write(create(f"old-{n}"))
    compacted = await store.compact(keep_revisions=2, older_than_ns=NOW_NS + 1)
    assert compacted == 3
    with pytest.raises(HistoryCompacted):
        await store.changes_after(0, 10)
    assert [c.revision for c in await store.changes_after(3, 10)] == [4, 5]
    assert await store.history("old-0", 0, 10) == []
    assert await store.get("old-0") is not None  # the task itself stays


# -- two stores on one database -------------------------------------------------------


async def test_a_second_store_on_one_sqlite_file_is_refused(tmp_path: Path) -> None:
    first = await open_store(str(tmp_path / "tasks.db"))
    try:
        with pytest.raises(StoreError, match="in use by another task manager"):
            await open_store(str(tmp_path / "tasks.db"))
    finally:
        await first.close()


@asynccontextmanager
async def two_stores(url: str) -> AsyncIterator[tuple[Store, Store]]:
    first = await open_store(url)
    try:
        second = await open_store(url)
        try:
            yield first, second
        finally:
            await second.close()
    finally:
        await first.close()


async def test_two_stores_on_one_postgresql_database_each_publish_every_commit(
    postgres_url: str,
) -> None:
    async with two_stores(postgres_url) as (first, second):
        seen: dict[str, list[int]] = {"first": [], "second": []}
        first.feed.subscribe(lambda changes: seen["first"].extend(c.revision for c in changes))
        second.feed.subscribe(lambda changes: seen["second"].extend(c.revision for c in changes))
        await asyncio.gather(
            *(first.write(create(f"a-{n}")) for n in range(30)),
            *(second.write(create(f"b-{n}")) for n in range(30)),
        )
        await until(lambda: len(seen["first"]) == 60 and len(seen["second"]) == 60)
        assert seen["first"] == seen["second"] == list(range(1, 61))
        # What one store acknowledged, the other reads at once.
        await second.write(create("late-1"))
        assert await first.get("late-1") is not None


async def waiting_on_a_lock(url: str) -> bool:
    """Whether a writer's session on this database waits for a row lock."""
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        cursor = await conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND application_name = 'task-manager writer' AND wait_event_type = 'Lock'"
        )
        row = await cursor.fetchone()
    return row is not None and row[0] > 0


async def test_a_write_on_another_store_waits_for_the_first_and_builds_on_it(
    postgres_url: str,
) -> None:
    """Two stores writing one task serialise, as behind SQLite's one writer: the second
    loads the task only once the first has committed, and sees its write (not a stale
    version it would then lose a compare-and-set with)."""
    async with two_stores(postgres_url) as (first, second):
        await first.write(create("raced-1"))
        entered, released = threading.Event(), threading.Event()

        def execute_then_wait(tx: WriteTransaction) -> pb.Task:
            task = execute("raced-1")(tx)  # the row stays locked until this commits
            entered.set()
            assert released.wait(30), "the test never released the first writer"
            return task

        winner = first.submit(execute_then_wait)
        try:
            assert await anyio.to_thread.run_sync(entered.wait, 30)
            later = second.submit(execute("raced-1"))
            async with asyncio.timeout(20):
                while not await waiting_on_a_lock(postgres_url):  # noqa: ASYNC110 - polls pg
                    await asyncio.sleep(0.02)
        finally:
            released.set()
        won = await winner
        after = await later
        assert after.version.status_version == won.version.status_version + 1


async def until(condition: Callable[[], bool], timeout_s: float = 20.0) -> None:
    """Polls condition with a deadline."""
    async with asyncio.timeout(timeout_s):
        while not condition():  # noqa: ASYNC110 - a counter has no event to wait on
            await asyncio.sleep(0.01)


async def test_a_claim_skips_a_task_another_store_is_writing(postgres_url: str) -> None:
    async with two_stores(postgres_url) as (first, second):
        await first.write(create("claimed-1"))
        entered, released = threading.Event(), threading.Event()

        def execute_then_wait(tx: WriteTransaction) -> pb.Task:
            task = execute("claimed-1")(tx)
            entered.set()
            assert released.wait(30), "the test never released the first writer"
            return task

        def claim(tx: WriteTransaction) -> bool:
            return tx.claim("claimed-1") is not None

        writing = first.submit(execute_then_wait)
        try:
            assert await anyio.to_thread.run_sync(entered.wait, 30)
            assert await second.write(claim) is False  # at once: not waiting for the lock
        finally:
            released.set()
        await writing
        assert await second.write(claim) is True


async def test_a_claim_is_a_load_where_the_task_is_free(store: Store) -> None:
    await store.write(create("free-1"))

    def claim(tx: WriteTransaction) -> str | None:
        stored = tx.claim("free-1")
        return None if stored is None else stored.task.version.task_id

    assert await store.write(claim) == "free-1"


# -- leases ---------------------------------------------------------------------------


def take(name: str, holder: str, ttl_ns: int) -> Callable[[WriteTransaction], bool]:
    return lambda tx: tx.take_lease(name, holder, ttl_ns)


async def test_a_lease_is_held_by_one_holder_until_it_expires(store: Store) -> None:
    hour = 3600 * 10**9
    assert await store.write(take("compaction", "replica-a", hour)) is True
    assert await store.write(take("compaction", "replica-a", hour)) is True  # renewed
    assert await store.write(take("compaction", "replica-b", hour)) is False
    assert await store.write(take("other-work", "replica-b", hour)) is True
    # A lease that has run out is anyone's.
    assert await store.write(take("short", "replica-a", 0)) is True
    assert await store.write(take("short", "replica-b", hour)) is True
    assert await store.write(take("short", "replica-a", hour)) is False


async def test_two_stores_contend_for_one_lease_and_one_holds_it(postgres_url: str) -> None:
    async with two_stores(postgres_url) as (first, second):
        hour = 3600 * 10**9
        contenders = [(first, "a"), (second, "b")] * 5
        outcomes = await asyncio.gather(
            *(store.write(take("compaction", name, hour)) for store, name in contenders)
        )
        holders = {name for (_, name), won in zip(contenders, outcomes, strict=True) if won}
        assert len(holders) == 1  # whoever took it first keeps it; the other is refused
        assert False in outcomes


async def test_a_database_error_in_a_unit_fails_it_as_a_store_error_and_the_batch_goes_on(
    store: Store, published: list[Change]
) -> None:
    created = await store.write(create("defined-1"))

    def save_twice(tx: WriteTransaction) -> None:
        tx.save_definition(created)
        tx.save_definition(created)  # the same key again: the database refuses it

    async with writer_held(store) as first:
        refused = store.submit(save_twice)
        after = store.submit(create("after-1"))
    outcomes = await asyncio.gather(first, refused, after, return_exceptions=True)
    assert type(outcomes[1]) is StoreError  # UNAVAILABLE on either backend, not INTERNAL
    assert isinstance(outcomes[2], pb.Task)
    assert await store.definition("defined-1", created.version.definition_version) is None


# -- the gateway's uptime ---------------------------------------------------------------

HOUR_NS = 3600 * 10**9


def join(replica_id: str, down_after_ns: int | None) -> Callable[[WriteTransaction], Uptime]:
    return lambda tx: tx.join_cluster(replica_id, down_after_ns)


def leave(replica_id: str) -> Callable[[WriteTransaction], None]:
    return lambda tx: tx.leave_cluster(replica_id)


async def test_a_replica_joining_a_running_gateway_keeps_when_it_came_up(store: Store) -> None:
    first = await store.write(join("replica-a", HOUR_NS))
    assert first.up_since_ns == first.now_ns  # nobody else was up: the gateway comes up
    renewed_ns = await store.write(lambda tx: tx.renew_replica("replica-a"))
    second = await store.write(join("replica-b", HOUR_NS))
    assert second.up_since_ns == first.up_since_ns  # A renewed within the hour
    assert first.now_ns <= renewed_ns <= second.now_ns


async def test_the_gateway_comes_up_again_once_every_replica_left(store: Store) -> None:
    first = await store.write(join("replica-a", HOUR_NS))
    await store.write(join("replica-b", HOUR_NS))
    await store.write(leave("replica-a"))
    assert (await store.write(join("replica-c", HOUR_NS))).up_since_ns == first.up_since_ns
    await store.write(leave("replica-b"))
    await store.write(leave("replica-c"))
    again = await store.write(join("replica-d", HOUR_NS))
    assert again.up_since_ns == again.now_ns > first.up_since_ns


async def test_a_server_alone_on_its_database_brings_the_gateway_up_at_every_join(
    store: Store,
) -> None:
    await store.write(join("replica-a", HOUR_NS))
    alone = await store.write(join("replica-b", None))
    assert alone.up_since_ns == alone.now_ns


async def test_replicas_joining_a_down_gateway_at_once_bring_it_up_once(postgres_url: str) -> None:
    async with two_stores(postgres_url) as (first, second):
        joins = [(first, "a"), (second, "b")] * 3
        uptimes = await asyncio.gather(
            *(
                store.write(join(f"replica-{name}-{n}", HOUR_NS))
                for n, (store, name) in enumerate(joins)
            )
        )
        # The first to take the row brought the gateway up; the others found it up.
        assert len({uptime.up_since_ns for uptime in uptimes}) == 1
        assert sum(uptime.up_since_ns == uptime.now_ns for uptime in uptimes) == 1


async def test_payload_references_and_collection(store: Store, database: str) -> None:
    blobs = open_blob_store(database)
    try:
        kept, dropped = b"referred to", b"referred to by nobody"
        for data in (kept, dropped):
            writer = blobs.writer()
            await writer.write(data)
            await writer.commit(BlobRef(hashlib.sha256(data).hexdigest(), len(data)))
        kept_digest, dropped_digest = (hashlib.sha256(d).hexdigest() for d in (kept, dropped))
        absent = hashlib.sha256(b"never stored").hexdigest()
        with pytest.raises(PayloadMissing) as missing:
            await store.write(lambda tx: tx.reference_payloads([kept_digest, absent]))
        assert missing.value.digest == absent
        await store.write(lambda tx: tx.reference_payloads([kept_digest, kept_digest]))
        before_now = time.time_ns()
        fresh = await store.write(lambda tx: tx.collect_payload(dropped_digest, 0))
        assert not fresh  # not idle before time 0
        for digest, collected in ((kept_digest, False), (dropped_digest, True), (absent, False)):
            assert (
                await store.write(
                    lambda tx, digest=digest: tx.collect_payload(digest, before_now)  # type: ignore[misc]
                )
                is collected
            )
        assert await blobs.stat(kept_digest) is not None
        assert await blobs.stat(dropped_digest) is None
        with pytest.raises(PayloadMissing):
            await store.write(lambda tx: tx.reference_payloads([dropped_digest]))
    finally:
        await blobs.close()


async def stored_blob(database: str, data: bytes) -> BlobRef:
    blobs = open_blob_store(database)
    try:
        writer = blobs.writer()
        await writer.write(data)
        ref, _ = await writer.commit(BlobRef(hashlib.sha256(data).hexdigest(), len(data)))
        return ref
    finally:
        await blobs.close()


def charge(principal: str, ref: BlobRef, quota: int) -> Callable[[WriteTransaction], int | None]:
    return lambda tx: tx.charge_upload(principal, ref.digest, ref.size, quota)


async def test_payloads_count_against_their_uploaders_quota_until_collected(
    store: Store, database: str
) -> None:
    mesh, log = await stored_blob(database, b"m" * 600), await stored_blob(database, b"l" * 500)
    assert await store.stored_bytes("ops", mesh.digest) == (0, False)
    assert await store.write(charge("ops", mesh, 1_000)) == 600
    assert await store.write(charge("ops", mesh, 1_000)) == 600  # counted once
    assert await store.write(charge("ops", log, 1_000)) is None  # 1,100 > 1,000
    assert await store.stored_bytes("ops", log.digest) == (600, False)  # nothing written
    assert await store.write(charge("ops", log, 0)) == 1_100  # 0: no quota
    assert await store.write(charge("other", mesh, 1_000)) == 600  # each its own sum
    before_now = time.time_ns()
    assert await store.write(lambda tx: tx.collect_payload(mesh.digest, before_now))
    assert await store.stored_bytes("ops", mesh.digest) == (500, False)
    assert await store.stored_bytes("other", log.digest) == (0, False)


async def test_two_stores_charging_one_principal_at_once_keep_to_its_quota(
    postgres_url: str,
) -> None:
    async with two_stores(postgres_url) as (first, second):
        refs = [await stored_blob(postgres_url, bytes([n]) * 100) for n in range(20)]
        results = await asyncio.gather(
            *((first, second)[n % 2].write(charge("ops", ref, 1_000)) for n, ref in enumerate(refs))
        )
        assert sorted(r for r in results if r is not None) == list(range(100, 1_001, 100))
        assert results.count(None) == 10
        assert await first.stored_bytes("ops", refs[0].digest) == (1_000, results[0] is not None)
