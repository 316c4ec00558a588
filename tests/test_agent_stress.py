"""The cancellation storm: hundreds of handlers cancelled while their reports are written.

Timeouts, cancels and completes race the agent's report writes, and the server restarts
in the middle. The agent must still be running afterwards, and every task must end.
`make stress` runs it bigger (STRESS_TASKS, STRESS_ROUNDS).
"""

from __future__ import annotations

import os
import random
from collections import Counter
from collections.abc import AsyncIterator

import anyio
import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from google.protobuf.wrappers_pb2 import StringValue

from agent_kit import Agent, Backoff, TaskContext
from task_manager.v1 import task_manager_pb2 as pb
from tests.helpers import AsyncStub, ServerProcess

pytestmark = pytest.mark.anyio
S = pb.Status
TERMINAL = {S.STATUS_DONE_OK, S.STATUS_DONE_NOT_OK}
TASKS = int(os.environ.get("STRESS_TASKS", "150"))
ROUNDS = int(os.environ.get("STRESS_ROUNDS", "1"))
ALL_END_WITHIN_S = 120.0


def policy() -> pb.TaskPolicy:
    return pb.TaskPolicy(
        heartbeat_timeout=Duration(nanos=150_000_000),
        max_attempts=3,
        retry_backoff=Duration(nanos=20_000_000),
    )


class Server:
    """A server process that can be restarted on the same port and database."""

    def __init__(self, db: str) -> None:
        self.process = ServerProcess(db).start()
        self.restarting = False

    def restart(self) -> None:
        self.restarting = True
        try:
            assert self.process.terminate() == 0
            self.process = ServerProcess(self.process.db, port=self.process.port).start()
        finally:
            self.restarting = False


@pytest.fixture
async def server(database: str) -> AsyncIterator[Server]:
    running = Server(database)
    yield running
    assert running.process.terminate() == 0


async def call_until_served(
    server: Server, stub: AsyncStub, method: str, request: object
) -> object:
    """Retries through the server's restart, as an operator script would."""
    with anyio.fail_after(60):
        while True:
            try:
                return await getattr(stub, method)(request)
            except grpc.aio.AioRpcError as error:
                # CANCELLED: a retry that reached the stopping server in the last instant
                # of its drain (test_server_process guards the calls made before SIGTERM).
                restarting = error.code() == grpc.StatusCode.CANCELLED and server.restarting
                if error.code() != grpc.StatusCode.UNAVAILABLE and not restarting:
                    raise
            await anyio.sleep(0.05)


async def storm(server: Server, stub: AsyncStub, agent: Agent, seed: int) -> list[str]:
    """Creates TASKS tasks at once; cancels a third and completes a sixth of them at
    random moments, and restarts the server halfway. Returns the task ids."""
    rng = random.Random(seed)
    task_ids = [f"storm-{seed}-{n}" for n in range(TASKS)]

    async def meddle(task_id: str) -> None:
        await anyio.sleep(rng.uniform(0.0, 0.5))
        choice = rng.random()
        try:
            if choice < 1 / 3:
                await call_until_served(
                    server, stub, "CancelTask", pb.CancelTaskRequest(task_id=task_id)
                )
            elif choice < 1 / 2:
                request = pb.CompleteTaskRequest(task_id=task_id)
                await call_until_served(server, stub, "CompleteTask", request)
        except grpc.aio.AioRpcError as error:
            # The task may have ended, or not been sent yet (complete needs an agent).
            assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, error

    async with anyio.create_task_group() as group:
        for n, task_id in enumerate(task_ids):
            request = pb.CreateTaskRequest(
                task_id=task_id,
                display_name=f"storm {n}",
                relations=pb.Relations(assignee=pb.Principal(system=pb.System(entity_id="d1"))),
                policy=policy(),
            )
            await call_until_served(server, stub, "CreateTask", request)
            group.start_soon(meddle, task_id)
            if n == TASKS // 2:
                await anyio.to_thread.run_sync(server.restart)
    return task_ids


async def unfinished(server: Server, stub: AsyncStub, task_ids: list[str]) -> list[pb.Task]:
    tasks = []
    for task_id in task_ids:
        response = await call_until_served(
            server, stub, "GetTask", pb.GetTaskRequest(task_id=task_id)
        )
        assert isinstance(response, pb.GetTaskResponse)
        if response.task.status.status not in TERMINAL:
            tasks.append(response.task)
    return tasks


async def test_the_agent_outlives_a_storm_of_handler_cancellations(server: Server) -> None:
    rng = random.Random(TASKS)

    async def handler(task: TaskContext) -> StringValue:
        for _ in range(rng.randint(0, 3)):
            await task.progress(StringValue(value="step"))
            await anyio.sleep(rng.uniform(0.01, 0.1))
        await anyio.sleep(rng.uniform(0.05, 0.4))
        return StringValue(value="done")

    agent = Agent(
        server.process.address, "d1", handler, reconnect_backoff=Backoff(initial=0.02, maximum=0.3)
    )
    run_ended = anyio.Event()

    async def run_agent() -> None:
        try:
            await agent.run()
        finally:
            run_ended.set()

    async with (
        grpc.aio.insecure_channel(server.process.address) as channel,
        anyio.create_task_group() as group,
    ):
        stub = AsyncStub(channel)
        group.start_soon(run_agent)
        with anyio.fail_after(60):
            await agent.wait_connected()
        for round_number in range(ROUNDS):
            task_ids = await storm(server, stub, agent, seed=round_number)
            with anyio.move_on_after(ALL_END_WITHIN_S):
                while left := await unfinished(server, stub, task_ids):
                    assert not run_ended.is_set(), "Agent.run() returned without stop()"
                    await anyio.sleep(0.2)
            left = await unfinished(server, stub, task_ids)
            stuck = Counter(S.Name(task.status.status) for task in left)
            assert not left, f"round {round_number}: tasks never ended: {stuck}; first: {left[0]}"
            assert not run_ended.is_set(), "Agent.run() returned without stop()"
        # Still listening and working after the storm.
        request = pb.CreateTaskRequest(
            task_id="after-the-storm",
            relations=pb.Relations(assignee=pb.Principal(system=pb.System(entity_id="d1"))),
        )
        await call_until_served(server, stub, "CreateTask", request)
        with anyio.fail_after(60):
            while await unfinished(server, stub, ["after-the-storm"]):  # noqa: ASYNC110 (polls gRPC)
                await anyio.sleep(0.05)
        after = await call_until_served(
            server, stub, "GetTask", pb.GetTaskRequest(task_id="after-the-storm")
        )
        assert isinstance(after, pb.GetTaskResponse)
        assert after.task.status.status == S.STATUS_DONE_OK
        agent.stop()
