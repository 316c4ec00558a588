"""Restart recovery: what an agent that (re)connects learns of the tasks it holds.

A task past SENT whose agent's process restarted is reported lost (or resumed); one the
agent still runs is kept; a Lattice agent that does not ask sees only tasks at SENT.
"""

from __future__ import annotations

import anyio
import grpc
import pytest
from google.protobuf.wrappers_pb2 import StringValue

from agent_kit import Agent, OperatorClient, TaskContext
from task_manager.server import TaskManagerServer
from task_manager.v1 import task_manager_pb2 as pb
from tests.helpers import AsyncStub, create_request, running, status_update

pytestmark = pytest.mark.anyio
S = pb.Status
WAIT_S = 30.0


async def wait_for(client: OperatorClient, task_id: str, status: int, attempt: int = 1) -> pb.Task:
    with anyio.fail_after(WAIT_S):
        while True:
            task = await client.get_task(task_id)
            if task.status.status == status and task.attempt == attempt:
                return task
            await anyio.sleep(0.02)


async def executing_with_progress(server: TaskManagerServer, max_attempts: int) -> pb.Task:
    """A task for d1 that its agent took to EXECUTING with progress, as one that then
    crashed leaves it (the reports sent directly: no agent process survives in memory)."""
    request = create_request("d1")
    request.policy.max_attempts = max_attempts
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = AsyncStub(channel)
        task = (await stub.CreateTask(request)).task
        progress = pb.TaskStatus(status=S.STATUS_EXECUTING)
        progress.progress.Pack(StringValue(value="halfway"))
        update = status_update(task, S.STATUS_EXECUTING, progress=progress.progress)
        return (await stub.UpdateStatus(update)).task


async def test_a_task_its_restarted_agent_lost_is_failed_and_retried(
    server: TaskManagerServer,
) -> None:
    task = await executing_with_progress(server, max_attempts=2)
    runs: list[int] = []

    async def mission(ctx: TaskContext) -> StringValue:
        runs.append(ctx.task.attempt)
        return StringValue(value="done again")

    async with (
        OperatorClient(server.address) as client,
        running(Agent(server.address, "d1", mission)),
    ):
        done = await wait_for(client, task.version.task_id, S.STATUS_DONE_OK, attempt=2)
    first = done.attempts[0]
    assert first.outcome == S.STATUS_DONE_NOT_OK
    assert first.error.code == pb.ERROR_CODE_FAILED
    assert first.error.message == (
        "agent d1 restarted and lost the task (it was STATUS_EXECUTING on attempt 1)"
    )
    assert runs == [2]  # the lost attempt is not run again under the same attempt


async def test_a_resumable_handler_is_called_again_with_its_last_progress(
    server: TaskManagerServer,
) -> None:
    task = await executing_with_progress(server, max_attempts=1)
    seen: list[tuple[bool, str]] = []
    agent = Agent(server.address, "d1")

    @agent.handler(resumable=True)
    async def mission(ctx: TaskContext) -> StringValue:
        progress = StringValue()
        assert ctx.last_progress is not None
        assert ctx.last_progress.Unpack(progress)
        seen.append((ctx.resumed, progress.value))
        return StringValue(value="resumed and done")

    async with OperatorClient(server.address) as client, running(agent):
        done = await wait_for(client, task.version.task_id, S.STATUS_DONE_OK)
    assert seen == [(True, "halfway")]
    assert done.attempt == 1


async def test_a_held_task_redelivered_to_the_agent_that_runs_it_is_kept(
    server: TaskManagerServer,
) -> None:
    release, calls = anyio.Event(), []

    async def mission(ctx: TaskContext) -> None:
        calls.append(ctx.task.attempt)
        await release.wait()

    agent = Agent(server.address, "d1", mission)
    async with OperatorClient(server.address) as client, running(agent):
        task = await client.create_task(assignee_entity_id="d1")
        await wait_for(client, task.version.task_id, S.STATUS_EXECUTING)
        # What a reconnect looks like to the agent: its held task, redelivered.
        async with grpc.aio.insecure_channel(server.address) as channel:
            held = AsyncStub(channel).ListenAsAgent(
                pb.ListenAsAgentRequest(
                    entity_ids=pb.EntityIds(entity_ids=["d1"]), include_held_tasks=True
                )
            )
            message = await held.read()
            held.cancel()
        assert isinstance(message, pb.ListenAsAgentResponse)
        agent._on_request(message)
        release.set()
        done = await wait_for(client, task.version.task_id, S.STATUS_DONE_OK)
    assert calls == [1]
    assert done.attempt == 1


async def listen(
    stub: AsyncStub, include_held: bool
) -> grpc.aio.UnaryStreamCall[pb.ListenAsAgentRequest, pb.ListenAsAgentResponse]:
    return stub.ListenAsAgent(
        pb.ListenAsAgentRequest(
            entity_ids=pb.EntityIds(entity_ids=["d1"]), include_held_tasks=include_held
        )
    )


async def test_only_a_stream_that_asks_gets_the_tasks_held_past_sent(
    server: TaskManagerServer,
) -> None:
    held = await executing_with_progress(server, max_attempts=1)
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = AsyncStub(channel)
        asking = await listen(stub, include_held=True)
        first = await asking.read()
        assert isinstance(first, pb.ListenAsAgentResponse)
        assert first.execute_request.task == held
        assert first.execute_request.task.status.status == S.STATUS_EXECUTING
        asking.cancel()

        lattice = await listen(stub, include_held=False)
        await lattice.initial_metadata()  # subscribed: the backlog comes first
        fresh = (await stub.CreateTask(create_request("d1"))).task
        message = await lattice.read()
        assert isinstance(message, pb.ListenAsAgentResponse)
        assert message.execute_request.task.version.task_id == fresh.version.task_id
        lattice.cancel()


async def test_list_agents_names_the_tasks_an_agent_holds(server: TaskManagerServer) -> None:
    held = await executing_with_progress(server, max_attempts=1)
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = AsyncStub(channel)
        stream = await listen(stub, include_held=False)
        await stream.initial_metadata()
        stream.cancel()
        with anyio.fail_after(WAIT_S):
            while True:
                agents = (await stub.ListAgents(pb.ListAgentsRequest(entity_ids=["d1"]))).agents
                if agents and agents[0].streams_open == 0:
                    break
                await anyio.sleep(0.02)
    assert agents[0].tasks_in_flight == 1
    assert list(agents[0].held_task_ids) == [held.version.task_id]
