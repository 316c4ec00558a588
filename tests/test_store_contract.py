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
import os
import sys
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import anyio
import pytest

from storage import open_store
from storage.base import Change, Store, StoreClosed, WriteTransaction
from storage.group_commit import MAX_BATCH, WRITER_NICENESS
from task_manager import lifecycle
from task_manager.config import Settings
from task_manager.v1 import task_manager_pb2 as pb

pytestmark = pytest.mark.anyio

NOW_NS = 1_700_000_000_000_000_000


def create(task_id: str) -> Callable[[WriteTransaction], pb.Task]:
    """A unit that creates a task with no assignee: one change (CREATED)."""
    request = pb.CreateTaskRequest(display_name=task_id)

    def unit(tx: WriteTransaction) -> pb.Task:
        return lifecycle.create_task(tx, request, task_id, Settings().task_policy(), NOW_NS)

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
    commits_before = store.commits
    async with writer_held(store) as first:
        later = [store.submit(create(f"late-{n}")) for n in range(5)]
    await asyncio.gather(first, *later)

    # One commit for the six writes, applied in the order they were queued, with the
    # revisions they would have had one commit each.
    assert store.commits == commits_before + 1
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
    (writer,) = [thread for thread in threading.enumerate() if thread.name.endswith("-writer")]
    assert writer.native_id is not None
    loop_thread = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    expected = min(19, loop_thread + WRITER_NICENESS)
    assert os.getpriority(os.PRIO_PROCESS, writer.native_id) == expected
