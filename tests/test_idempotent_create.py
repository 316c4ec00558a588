"""A create whose answer was lost is repeated safely: across a SIGKILL of the server, every
retried create answers its one task, and no task is stored twice or lost."""

from __future__ import annotations

import asyncio
import itertools
import time

import grpc
import pytest

from task_manager.v1 import task_manager_pb2 as pb
from tests.helpers import AsyncStub, ServerProcess, create_request

pytestmark = pytest.mark.anyio

WORKERS = 8
KILL_AFTER = 100
"""Creates acknowledged before the kill; up to WORKERS more are in flight when it lands."""


async def create_until_killed(address: str, attempted: list[str], acknowledged: set[str]) -> None:
    """WORKERS clients create tasks one after another until the server goes away; the
    ids tried go to attempted, the acknowledged ones also to acknowledged. A call cut by
    the kill may or may not have committed."""
    numbers = itertools.count()
    async with grpc.aio.insecure_channel(address) as channel:
        stub = AsyncStub(channel)

        async def worker() -> None:
            while True:
                task_id = f"retried-{next(numbers):05d}"
                attempted.append(task_id)
                try:
                    await stub.CreateTask(create_request(task_id=task_id))
                except grpc.aio.AioRpcError as error:
                    assert error.code() == grpc.StatusCode.UNAVAILABLE, error
                    return
                acknowledged.add(task_id)

        await asyncio.gather(*(worker() for _ in range(WORKERS)))


async def test_creates_retried_across_a_server_kill_each_answer_their_one_task(
    database: str,
) -> None:
    attempted: list[str] = []
    acknowledged: set[str] = set()
    server = ServerProcess(database).start()
    try:
        creating = asyncio.create_task(create_until_killed(server.address, attempted, acknowledged))
        deadline = time.monotonic() + 30
        while len(acknowledged) < KILL_AFTER:
            assert time.monotonic() < deadline and not creating.done(), "creates stalled"
            await asyncio.sleep(0.005)
        server.kill()
        await creating
    finally:
        if server.process is not None and server.process.poll() is None:
            server.kill()

    restarted = ServerProcess(database).start()
    try:
        async with grpc.aio.insecure_channel(restarted.address) as channel:
            stub = AsyncStub(channel)
            for task_id in attempted:
                response = await stub.CreateTask(create_request(task_id=task_id))
                assert response.task.version.task_id == task_id
                if task_id in acknowledged:
                    assert response.already_existed, task_id
                history = (
                    await stub.GetTaskHistory(pb.GetTaskHistoryRequest(task_id=task_id))
                ).entries
                # Stored once: one CREATED and one release to SENT, whichever try landed.
                assert [entry.status.status for entry in history] == [
                    pb.Status.STATUS_CREATED,
                    pb.Status.STATUS_SENT,
                ], task_id
    finally:
        restarted.terminate()
