"""Group commit in the SQLite store: what one commit holds, and what a failing unit undoes.

Each test holds the writer inside a first unit (on an event it waits for), queues more
units behind it, then lets it go, so what shares a commit does not depend on timing.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import anyio
import pytest

from storage.base import Change, StoreClosed, WriteTransaction
from storage.sqlite import MAX_BATCH, SqliteStore
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


class HeldWriter:
    """Keeps the writer inside a unit until released."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.released = threading.Event()

    def unit(
        self, then: Callable[[WriteTransaction], pb.Task]
    ) -> Callable[[WriteTransaction], pb.Task]:
        def held(tx: WriteTransaction) -> pb.Task:
            self.entered.set()
            assert self.released.wait(30), "the test never released the writer"
            return then(tx)

        return held

    async def wait_entered(self) -> None:
        assert await anyio.to_thread.run_sync(self.entered.wait, 30), "the writer never ran"


@contextmanager
def releasing(held: HeldWriter) -> Iterator[None]:
    try:
        yield
    finally:
        held.released.set()  # a failing test must not leave the writer stuck


async def test_writes_queued_while_a_batch_runs_join_its_commit(tmp_path: Path) -> None:
    published: list[Change] = []
    store = await SqliteStore.open(tmp_path / "t.db", on_commit=published.extend)
    try:
        held = HeldWriter()
        commits_before = store.commits
        with releasing(held):
            first = store.submit(held.unit(create("held-1")))
            await held.wait_entered()
            later = [store.submit(create(f"late-{n}")) for n in range(5)]
        await asyncio.gather(first, *later)

        # One commit for the six writes, applied in the order they were queued, with
        # the revisions they would have had one commit each.
        assert store.commits == commits_before + 1
        assert [change.task.version.task_id for change in published] == [
            "held-1",
            *(f"late-{n}" for n in range(5)),
        ]
        assert [change.revision for change in published] == list(range(1, 7))
        for n in range(5):
            assert await store.get(f"late-{n}") is not None
    finally:
        await store.close()


async def test_a_failing_unit_undoes_only_its_own_writes(tmp_path: Path) -> None:
    published: list[Change] = []
    store = await SqliteStore.open(tmp_path / "t.db", on_commit=published.extend)
    try:

        def create_then_fail(tx: WriteTransaction) -> pb.Task:
            create("doomed-1")(tx)
            raise ValueError("refused after writing")

        held = HeldWriter()
        commits_before = store.commits
        with releasing(held):
            first = store.submit(held.unit(create("held-1")))
            await held.wait_entered()
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
    finally:
        await store.close()


async def test_a_batch_holds_at_most_max_batch_writes(tmp_path: Path) -> None:
    published: list[Change] = []
    store = await SqliteStore.open(tmp_path / "t.db", on_commit=published.extend)
    try:
        held = HeldWriter()
        commits_before = store.commits
        with releasing(held):
            first = store.submit(held.unit(create("held-1")))
            await held.wait_entered()
            later = [store.submit(create(f"late-{n}")) for n in range(MAX_BATCH)]
        await asyncio.gather(first, *later)

        assert store.commits == commits_before + 2  # MAX_BATCH writes, then the last one
        assert [change.revision for change in published] == list(range(1, MAX_BATCH + 2))
    finally:
        await store.close()


async def test_closing_finishes_the_batch_in_progress_and_what_was_queued(
    tmp_path: Path,
) -> None:
    store = await SqliteStore.open(tmp_path / "t.db", on_commit=lambda changes: None)
    held = HeldWriter()
    with releasing(held):
        first = store.submit(held.unit(create("held-1")))
        await held.wait_entered()
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
