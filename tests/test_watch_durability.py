"""The watch guarantee end to end: a watcher that lives through three SIGKILLs of the
server sees exactly the stored history, with no gap, duplicate or reordering."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from functools import partial
from typing import TypeVar

import grpc
import pytest

from agent_kit import OperatorClient
from task_manager.v1 import task_manager_pb2 as pb
from tests.helpers import AsyncStub, ServerProcess, create_request, status_update

pytestmark = pytest.mark.anyio
S = pb.Status
T = TypeVar("T")
WRITERS, TASKS_PER_WRITER, KILLS = 5, 200, 3


async def until_accepted(call: Callable[[], Awaitable[T]]) -> T:
    """Retries a call across server restarts (writes are idempotent when repeated)."""
    while True:
        try:
            return await call()
        except grpc.aio.AioRpcError as error:
            if error.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
                raise
            await asyncio.sleep(0.05)


async def walk_task(stub: AsyncStub, task_id: str) -> None:
    """Creates a task and walks it to DONE_OK, whatever restarts happen meanwhile."""
    # A retry of a create that landed before a kill answers the task (already_existed).
    await until_accepted(lambda: stub.CreateTask(create_request(task_id=task_id)))
    task = (await until_accepted(lambda: stub.GetTask(pb.GetTaskRequest(task_id=task_id)))).task
    for status in (S.STATUS_MACHINE_RECEIPT, S.STATUS_EXECUTING, S.STATUS_DONE_OK):
        update = status_update(task, status)
        task = (await until_accepted(partial(stub.UpdateStatus, update))).task


async def write_tasks(stub: AsyncStub, writer: int) -> None:
    for n in range(TASKS_PER_WRITER):
        await walk_task(stub, f"w{writer}-task-{n:04d}")


async def test_watcher_sees_exactly_the_history_across_three_server_kills(database: str) -> None:
    server = ServerProcess(database).start()
    port = server.port
    seen: list[int] = []
    enough, everything = asyncio.Event(), asyncio.Event()
    total = WRITERS * TASKS_PER_WRITER * 5  # CREATED, SENT, RECEIPT, EXECUTING, DONE_OK

    async def watcher(client: OperatorClient) -> None:
        async for response in client.watch(start_revision=1, heartbeat_interval_ms=200):
            seen.append(response.revision)
            if len(seen) % 700 == 0:
                enough.set()
            if len(seen) >= total:
                everything.set()

    async with (
        OperatorClient(server.address) as client,
        grpc.aio.insecure_channel(server.address) as channel,
    ):
        stub = AsyncStub(channel)
        watching = asyncio.create_task(watcher(client))
        writers = [asyncio.create_task(write_tasks(stub, w)) for w in range(WRITERS)]
        for _ in range(KILLS):
            await asyncio.wait_for(enough.wait(), 120)
            enough.clear()
            await asyncio.to_thread(server.kill)  # mid-write, mid-watch
            server = await asyncio.to_thread(ServerProcess(database, port=port).start)
        await asyncio.wait_for(asyncio.gather(*writers), 300)
        await asyncio.wait_for(everything.wait(), 120)
        watching.cancel()
        history: list[int] = []
        tasks = [t async for t in client.query_tasks(page_size=1000)]
        assert len(tasks) == WRITERS * TASKS_PER_WRITER
        for task in tasks:
            history.extend(entry.revision for entry in await client.history(task.version.task_id))
    assert server.terminate() == 0
    assert sorted(history) == list(range(1, total + 1))
    assert seen == list(range(1, total + 1))  # no gap, no duplicate, no reordering
