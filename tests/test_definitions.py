"""UpdateTask: versioned definitions, delivered to the agent, accepted or rejected."""

from __future__ import annotations

import anyio
import grpc
import pytest
from google.protobuf.wrappers_pb2 import StringValue

from agent_kit import Agent, TaskContext
from task_manager.server import TaskManagerServer
from task_manager.v1 import task_manager_pb2 as pb
from tests.helpers import AsyncStub, create_request, trailer

pytestmark = pytest.mark.anyio
S = pb.Status


def update_request(
    task: pb.Task, display_name: str | None = None, description: str | None = None
) -> pb.UpdateTaskRequest:
    return pb.UpdateTaskRequest(
        task_id=task.version.task_id,
        definition_version=task.version.definition_version,
        display_name=display_name,
        description=description,
    )


async def report(
    stub: AsyncStub, task: pb.Task, status: pb.Status.ValueType, definition_version: int
) -> pb.Task:
    update = pb.StatusUpdate(
        version=pb.TaskVersion(
            task_id=task.version.task_id,
            status_version=task.version.status_version,
            definition_version=definition_version,
        ),
        status=pb.TaskStatus(status=status),
    )
    return (await stub.UpdateStatus(pb.UpdateStatusRequest(status_update=update))).task


async def get(
    stub: AsyncStub,
    task: pb.Task,
    view: pb.TaskView.ValueType = pb.TASK_VIEW_MANAGER,
    version: int = 0,
) -> pb.Task:
    request = pb.GetTaskRequest(
        task_id=task.version.task_id, task_view=view, definition_version=version
    )
    return (await stub.GetTask(request)).task


async def test_an_update_is_sent_to_the_agent_who_may_take_it(stub: AsyncStub) -> None:
    listen = stub.ListenAsAgent(
        pb.ListenAsAgentRequest(entity_ids=pb.EntityIds(entity_ids=["agent-1"]))
    )
    await listen.initial_metadata()
    task = (await stub.CreateTask(create_request(display_name="survey north"))).task
    first = await listen.read()
    assert isinstance(first, pb.ListenAsAgentResponse)
    executing = await report(stub, task, S.STATUS_EXECUTING, 1)
    updated = (await stub.UpdateTask(update_request(executing, display_name="survey south"))).task
    assert updated.version.definition_version == 2
    assert updated.version.status_version == executing.version.status_version + 1
    assert updated.status.status == S.STATUS_SENT and updated.display_name == "survey south"
    again = await listen.read()
    assert isinstance(again, pb.ListenAsAgentResponse)
    assert again.execute_request.task.version.definition_version == 2
    # Until the agent answers, the agent view is still what it runs.
    assert (await get(stub, task, pb.TASK_VIEW_AGENT)).display_name == "survey north"
    taken = await report(stub, updated, S.STATUS_EXECUTING, 2)
    assert taken.version.definition_version == 2
    agent_view = await get(stub, task, pb.TASK_VIEW_AGENT)
    assert agent_view.display_name == "survey south"
    assert agent_view.version.definition_version == 2
    old = await get(stub, task, version=1)
    assert old.display_name == "survey north" and old.version.definition_version == 1
    assert old.status.status == S.STATUS_EXECUTING  # the status is always the current one
    listen.cancel()


async def test_an_agent_may_reject_an_update_and_keep_the_old_definition(
    stub: AsyncStub,
) -> None:
    task = (await stub.CreateTask(create_request(description="v1 plan"))).task
    executing = await report(stub, task, S.STATUS_EXECUTING, 1)
    updated = (await stub.UpdateTask(update_request(executing, description="v2 plan"))).task
    rejected = await report(stub, updated, S.STATUS_VERSION_REJECTED, 0)
    assert rejected.status.status == S.STATUS_VERSION_REJECTED
    assert rejected.description == "v2 plan"  # the manager holds the new definition
    agent_view = await get(stub, task, pb.TASK_VIEW_AGENT)
    assert agent_view.description == "v1 plan" and agent_view.version.definition_version == 1
    assert agent_view.status.status == S.STATUS_VERSION_REJECTED
    done = await report(stub, rejected, S.STATUS_DONE_OK, 1)
    assert done.status.status == S.STATUS_DONE_OK


async def test_update_task_refusals_change_nothing(stub: AsyncStub) -> None:
    task = (await stub.CreateTask(create_request())).task
    updated = (await stub.UpdateTask(update_request(task, display_name="second"))).task
    with pytest.raises(grpc.aio.AioRpcError) as stale:
        await stub.UpdateTask(update_request(task, display_name="third"))
    assert stale.value.code() == grpc.StatusCode.ABORTED
    assert trailer(stale.value, "x-current-definition-version") == "2"
    with pytest.raises(grpc.aio.AioRpcError) as empty:
        await stub.UpdateTask(update_request(updated))
    assert empty.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await get(stub, task, version=3)
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    await stub.CancelTask(pb.CancelTaskRequest(task_id=task.version.task_id))
    with pytest.raises(grpc.aio.AioRpcError) as cancelling:
        await stub.UpdateTask(update_request(updated, display_name="fourth"))
    assert cancelling.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    finished = await report(stub, await get(stub, task), S.STATUS_DONE_NOT_OK, 0)
    with pytest.raises(grpc.aio.AioRpcError) as terminal:
        await stub.UpdateTask(update_request(finished, display_name="fifth"))
    assert terminal.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert (await get(stub, task)).display_name == "second"


async def test_history_replay_shows_each_definition_of_its_time(stub: AsyncStub) -> None:
    task = (await stub.CreateTask(create_request(display_name="first"))).task
    await stub.UpdateTask(update_request(task, display_name="second"))
    watch = stub.WatchTasks(pb.WatchTasksRequest(start_revision=1))
    names = []
    async for response in watch:
        assert isinstance(response, pb.WatchTasksResponse)
        if response.HasField("event"):
            event_task = response.event.task
            names.append((event_task.version.definition_version, event_task.display_name))
        if len(names) == 3:
            break
    watch.cancel()
    assert names == [(1, "first"), (1, "first"), (2, "second")]


async def test_agent_kit_keeps_a_running_handler_on_its_definition(
    server: TaskManagerServer, stub: AsyncStub
) -> None:
    started, release = anyio.Event(), anyio.Event()

    async def mission(ctx: TaskContext) -> StringValue:
        started.set()
        await release.wait()
        return StringValue(value=ctx.task.display_name)

    agent = Agent(server.address, "agent-1", mission)
    async with anyio.create_task_group() as group:
        group.start_soon(agent.run)
        task = (await stub.CreateTask(create_request(display_name="orbit"))).task
        with anyio.fail_after(20):
            await started.wait()
        current = await get(stub, task)
        await stub.UpdateTask(update_request(current, display_name="land"))
        with anyio.fail_after(20):
            while (seen := await get(stub, task)).status.status != S.STATUS_VERSION_REJECTED:  # noqa: ASYNC110
                await anyio.sleep(0.02)
        assert seen.display_name == "land"
        release.set()
        with anyio.fail_after(20):
            while (done := await get(stub, task)).status.status != S.STATUS_DONE_OK:  # noqa: ASYNC110
                await anyio.sleep(0.02)
        group.cancel_scope.cancel()
    result = StringValue()
    done.status.result.Unpack(result)
    assert result.value == "orbit"
    agent_view = await get(stub, task, pb.TASK_VIEW_AGENT)
    assert agent_view.display_name == "orbit" and agent_view.version.definition_version == 1


async def test_agent_kit_hands_updates_to_a_handler_that_accepts_them(
    server: TaskManagerServer, stub: AsyncStub
) -> None:
    started = anyio.Event()
    agent = Agent(server.address, "agent-1")

    @agent.handler(accepts_updates=True)
    async def mission(ctx: TaskContext) -> StringValue:
        started.set()
        async for task in ctx.updates():  # the first new definition is the last word
            return StringValue(value=task.display_name)
        raise AssertionError("no update came")

    async with anyio.create_task_group() as group:
        group.start_soon(agent.run)
        task = (await stub.CreateTask(create_request(display_name="orbit"))).task
        with anyio.fail_after(20):
            await started.wait()
        await stub.UpdateTask(update_request(await get(stub, task), display_name="land"))
        with anyio.fail_after(20):
            while (done := await get(stub, task)).status.status != S.STATUS_DONE_OK:  # noqa: ASYNC110
                await anyio.sleep(0.02)
        group.cancel_scope.cancel()
    result = StringValue()
    done.status.result.Unpack(result)
    assert result.value == "land"
    agent_view = await get(stub, task, pb.TASK_VIEW_AGENT)
    assert agent_view.version.definition_version == 2 and agent_view.display_name == "land"
    history = await stub.GetTaskHistory(pb.GetTaskHistoryRequest(task_id=task.version.task_id))
    assert S.STATUS_VERSION_REJECTED not in [entry.status.status for entry in history.entries]
