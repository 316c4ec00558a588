"""agent_kit against a real server: the Agent runtime and the operator clients."""

from __future__ import annotations

from collections.abc import Iterable

import anyio
import grpc
import pytest
from google.protobuf.wrappers_pb2 import Int64Value, StringValue

from agent_kit import Agent, AgentError, Backoff, OperatorClient, SyncOperatorClient, TaskContext
from task_manager.server import TaskManagerServer
from task_manager.v1 import task_manager_pb2 as pb
from tests.helpers import AsyncStub, ServerProcess, running, server_settings, status_update

pytestmark = pytest.mark.anyio
S = pb.Status
WAIT_S = 30.0
FAST_RECONNECT = Backoff(initial=0.02, maximum=0.3)


async def wait_for_status(client: OperatorClient, task_id: str, statuses: Iterable[int]) -> pb.Task:
    """Polls GetTask until the task reaches one of statuses (or fails the test)."""
    wanted = set(statuses)
    with anyio.fail_after(WAIT_S):
        while True:
            try:
                task = await client.get_task(task_id)
            except grpc.aio.AioRpcError as error:
                # Just after a server restart the channel may still be backing off.
                if error.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
            else:
                if task.status.status in wanted:
                    return task
            await anyio.sleep(0.02)


def statuses(history: list[pb.TaskHistoryEntry]) -> list[int]:
    return [entry.status.status for entry in history]


async def test_agent_walks_a_task_through_every_step_to_done_ok_with_its_result(
    server: TaskManagerServer, client: OperatorClient
) -> None:
    async def echo(task: TaskContext) -> StringValue:
        return StringValue(value=f"done {task.task.display_name}")

    async with running(Agent(server.address, "drone-1", echo)):
        task = await client.create_task(assignee_entity_id="drone-1", display_name="survey")
        done = await wait_for_status(client, task.version.task_id, [S.STATUS_DONE_OK])
    result = StringValue()
    assert done.status.result.Unpack(result)
    assert result.value == "done survey"
    assert statuses(await client.history(task.version.task_id)) == [
        S.STATUS_CREATED,
        S.STATUS_SENT,
        S.STATUS_MACHINE_RECEIPT,
        S.STATUS_ACK,
        S.STATUS_WILCO,
        S.STATUS_EXECUTING,
        S.STATUS_DONE_OK,
    ]
    assert done.last_updated_by.system.entity_id == "drone-1"


async def test_handler_exception_becomes_done_not_ok_failed_with_its_text(
    server: TaskManagerServer, client: OperatorClient
) -> None:
    async def broken(task: TaskContext) -> None:
        raise RuntimeError("battery at 3%")

    async with running(Agent(server.address, "drone-1", broken)):
        task = await client.create_task(assignee_entity_id="drone-1")
        done = await wait_for_status(client, task.version.task_id, [S.STATUS_DONE_NOT_OK])
    assert done.status.task_error.code == pb.ERROR_CODE_FAILED
    assert done.status.task_error.message == "RuntimeError: battery at 3%"


async def test_cancel_request_cancels_the_handler_and_reports_cancelled(
    server: TaskManagerServer, client: OperatorClient
) -> None:
    started, cancelled = anyio.Event(), anyio.Event()

    async def long_mission(task: TaskContext) -> None:
        started.set()
        try:
            await anyio.sleep_forever()
        finally:
            cancelled.set()

    async with running(Agent(server.address, "drone-1", long_mission)):
        task = await client.create_task(assignee_entity_id="drone-1")
        with anyio.fail_after(WAIT_S):
            await started.wait()
        await client.cancel_task(task.version.task_id, reason="weather")
        done = await wait_for_status(client, task.version.task_id, [S.STATUS_DONE_NOT_OK])
        assert cancelled.is_set()
    assert done.status.task_error.code == pb.ERROR_CODE_CANCELLED


async def test_complete_request_stops_the_handler_and_reports_done_ok(
    server: TaskManagerServer, client: OperatorClient
) -> None:
    started = anyio.Event()

    async def loiter(task: TaskContext) -> None:
        started.set()
        await anyio.sleep_forever()

    async with running(Agent(server.address, "drone-1", loiter)):
        task = await client.create_task(assignee_entity_id="drone-1")
        with anyio.fail_after(WAIT_S):
            await started.wait()
        await client.complete_task(task.version.task_id)
        await wait_for_status(client, task.version.task_id, [S.STATUS_DONE_OK])


async def test_a_repeated_execute_request_runs_the_handler_once(
    server: TaskManagerServer, client: OperatorClient
) -> None:
    calls: list[str] = []
    release = anyio.Event()

    async def count(task: TaskContext) -> None:
        calls.append(task.task_id)
        await release.wait()

    agent = Agent(server.address, "drone-1", count)
    async with running(agent):
        task = await client.create_task(assignee_entity_id="drone-1")
        await wait_for_status(client, task.version.task_id, [S.STATUS_EXECUTING])
        # What a reconnect during delivery looks like to the agent: the same request again.
        repeat = pb.ListenAsAgentResponse(execute_request=pb.ExecuteRequest(task=task))
        agent._on_request(repeat)
        release.set()
        await wait_for_status(client, task.version.task_id, [S.STATUS_DONE_OK])
        agent._on_request(repeat)  # and after it finished
        await anyio.wait_all_tasks_blocked()
    assert calls == [task.version.task_id]


async def test_handlers_are_chosen_by_specification_type(
    server: TaskManagerServer, client: OperatorClient
) -> None:
    agent = Agent(server.address, "drone-1")
    seen: list[str] = []

    @agent.handler(StringValue)
    async def strings(task: TaskContext) -> None:
        assert isinstance(task.specification, StringValue)
        seen.append(task.specification.value)

    async with running(agent):
        known = await client.create_task(
            assignee_entity_id="drone-1", specification=StringValue(value="hello")
        )
        unknown = await client.create_task(
            assignee_entity_id="drone-1", specification=Int64Value(value=7)
        )
        await wait_for_status(client, known.version.task_id, [S.STATUS_DONE_OK])
        refused = await wait_for_status(client, unknown.version.task_id, [S.STATUS_DONE_NOT_OK])
    assert seen == ["hello"]
    assert refused.status.task_error.code == pb.ERROR_CODE_REJECTED
    assert "google.protobuf.Int64Value" in refused.status.task_error.message


async def test_agent_resyncs_its_status_version_after_aborted(
    server: TaskManagerServer, client: OperatorClient
) -> None:
    release = anyio.Event()

    async def wait_for_release(task: TaskContext) -> None:
        await release.wait()

    async with running(Agent(server.address, "drone-1", wait_for_release)):
        task = await client.create_task(assignee_entity_id="drone-1")
        executing = await wait_for_status(client, task.version.task_id, [S.STATUS_EXECUTING])
        # Someone else moves the version on behind the agent's back.
        async with grpc.aio.insecure_channel(server.address) as channel:
            await AsyncStub(channel).UpdateStatus(status_update(executing, S.STATUS_EXECUTING))
        release.set()
        done = await wait_for_status(client, task.version.task_id, [S.STATUS_DONE_OK])
    assert done.version.status_version == executing.version.status_version + 2


async def test_cancel_of_a_task_the_agent_does_not_hold_is_reported_cancelled(
    server: TaskManagerServer, client: OperatorClient
) -> None:
    # As after an agent restart: the task is EXECUTING, but this process never saw it.
    task = await client.create_task(assignee_entity_id="drone-1")
    async with grpc.aio.insecure_channel(server.address) as channel:
        await AsyncStub(channel).UpdateStatus(status_update(task, S.STATUS_EXECUTING))
    await client.cancel_task(task.version.task_id)

    async def never_called(task: TaskContext) -> None:
        raise AssertionError("the handler must not run for a cancelled task")

    async with running(Agent(server.address, "drone-1", never_called)):
        done = await wait_for_status(client, task.version.task_id, [S.STATUS_DONE_NOT_OK])
    assert done.status.task_error.code == pb.ERROR_CODE_CANCELLED


async def test_agent_reconnects_after_a_graceful_server_restart(database: str) -> None:
    first = await TaskManagerServer.start(server_settings(database))
    restarted_settings = server_settings(database, listen=first.address)

    async def quick(task: TaskContext) -> None:
        return None

    agent = Agent(first.address, "drone-1", quick, reconnect_backoff=FAST_RECONNECT)
    async with running(agent):
        await first.stop()  # streams end with UNAVAILABLE
        second = await TaskManagerServer.start(restarted_settings)
        try:
            with anyio.fail_after(WAIT_S):
                await agent.wait_connected()
            async with OperatorClient(second.address) as client:
                task = await client.create_task(assignee_entity_id="drone-1")
                await wait_for_status(client, task.version.task_id, [S.STATUS_DONE_OK])
        finally:
            await second.stop()


async def test_agent_survives_a_server_crash_mid_task_and_finishes_it(database: str) -> None:
    server = ServerProcess(database).start()
    release = anyio.Event()

    async def mission(task: TaskContext) -> StringValue:
        await release.wait()
        return StringValue(value="landed")

    agent = Agent(server.address, "drone-1", mission, reconnect_backoff=FAST_RECONNECT)
    async with running(agent):
        async with OperatorClient(server.address) as client:
            task = await client.create_task(assignee_entity_id="drone-1")
            await wait_for_status(client, task.version.task_id, [S.STATUS_EXECUTING])
        await anyio.to_thread.run_sync(server.kill)
        release.set()  # the handler finishes while the server is down
        restarted = await anyio.to_thread.run_sync(ServerProcess(server.db, port=server.port).start)
        try:
            async with OperatorClient(restarted.address) as client:
                done = await wait_for_status(client, task.version.task_id, [S.STATUS_DONE_OK])
                with anyio.fail_after(WAIT_S):
                    await agent.wait_connected()
                second = await client.create_task(assignee_entity_id="drone-1")
                release_second = await wait_for_status(
                    client, second.version.task_id, [S.STATUS_DONE_OK]
                )
        finally:
            assert await anyio.to_thread.run_sync(restarted.terminate) == 0
    result = StringValue()
    assert done.status.result.Unpack(result)
    assert result.value == "landed"
    assert release_second.status.status == S.STATUS_DONE_OK


async def test_agent_refused_by_the_server_fails_loudly(server: TaskManagerServer) -> None:
    async def unused(task: TaskContext) -> None:
        return None

    agent = Agent(server.address, "", unused)
    with anyio.fail_after(WAIT_S), pytest.raises(AgentError, match="INVALID_ARGUMENT"):
        await agent.run()


async def test_operator_client_round_trip(
    server: TaskManagerServer, client: OperatorClient
) -> None:
    parent = await client.create_task(display_name="parent")
    children = [
        await client.create_task(
            assignee_entity_id="drone-1",
            parent_task_id=parent.version.task_id,
            task_id=f"child-{i}",
        )
        for i in range(5)
    ]
    assert await client.get_task("child-3") == children[3]
    found = [
        t async for t in client.query_tasks(parent_task_id=parent.version.task_id, page_size=2)
    ]
    assert found == children
    sent = [t async for t in client.query_tasks(statuses=[S.STATUS_SENT])]
    assert sent == children
    not_sent = [
        t async for t in client.query_tasks(statuses=[S.STATUS_SENT], exclude_statuses=True)
    ]
    assert not_sent == [parent]
    cancelled = await client.cancel_task("child-0", reason="not needed")
    assert cancelled.status.status == S.STATUS_CANCEL_REQUESTED
    completing = await client.complete_task("child-1")
    assert completing.status.status == S.STATUS_COMPLETE_REQUESTED
    history = await client.history("child-0")
    assert statuses(history) == [S.STATUS_CREATED, S.STATUS_SENT, S.STATUS_CANCEL_REQUESTED]
    assert history[-1].reason == "not needed"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await client.get_task("missing-task")
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_sync_operator_client_for_scripts(database: str) -> None:
    server = ServerProcess(database).start()
    try:
        with SyncOperatorClient(server.address) as client:
            task = client.create_task(assignee_entity_id="drone-1", task_id="script-task")
            assert client.get_task("script-task") == task
            assert client.query_tasks() == [task]
            assert client.cancel_task("script-task").status.status == S.STATUS_CANCEL_REQUESTED
            assert len(client.history("script-task")) == 3
    finally:
        assert server.terminate() == 0


async def test_an_agent_runs_at_most_max_in_flight_handlers(server: TaskManagerServer) -> None:
    running_now, most, limit = 0, 0, 2
    release = anyio.Event()

    async def work(task: TaskContext) -> None:
        nonlocal running_now, most
        running_now += 1
        most = max(most, running_now)
        if running_now == limit:
            release.set()  # the window is full: let every handler finish
        await release.wait()
        running_now -= 1

    agent = Agent(server.address, "drone-1", work, max_in_flight=limit)
    async with running(agent), OperatorClient(server.address) as client:
        tasks = [await client.create_task(assignee_entity_id="drone-1") for _ in range(6)]
        for task in tasks:
            await wait_for_status(client, task.version.task_id, [S.STATUS_DONE_OK])
    assert most == limit
