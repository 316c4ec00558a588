"""The agent runtime under cancellation: it never stops unless asked.

A handler cancelled while its report is being written must not take the agent down.
"""

from __future__ import annotations

import asyncio

import anyio
import grpc
import pytest
from google.protobuf import any_pb2
from google.protobuf.duration_pb2 import Duration
from google.protobuf.struct_pb2 import Struct
from google.protobuf.wrappers_pb2 import StringValue

from agent_kit import Agent, Backoff, OperatorClient, TaskContext, _agent
from task_manager.clock import ManualClock
from task_manager.server import TaskManagerServer
from task_manager.v1 import task_manager_pb2 as pb
from tests.helpers import AsyncStub, ServerProcess, create_request, running

pytestmark = pytest.mark.anyio
S = pb.Status
WAIT_S = 30.0
FAST_RECONNECT = Backoff(initial=0.02, maximum=0.3)


async def create_with_policy(server: TaskManagerServer, policy: pb.TaskPolicy) -> pb.Task:
    request = create_request("d1")
    request.policy.CopyFrom(policy)
    async with grpc.aio.insecure_channel(server.address) as channel:
        return (await AsyncStub(channel).CreateTask(request)).task


def progress_text(progress: any_pb2.Any) -> str | None:
    """A StringValue's text, a Struct as its dict's repr, None for no progress."""
    text, structured = StringValue(), Struct()
    if progress.Unpack(text):
        return text.value
    if progress.Unpack(structured):
        return repr(dict(structured))
    return None


async def wait_for_progress(client: OperatorClient, task_id: str, text: str | None) -> pb.Task:
    """Polls until the task's progress is this text (None: any progress at all)."""
    with anyio.fail_after(WAIT_S):
        while True:
            try:
                task = await client.get_task(task_id)
            except grpc.aio.AioRpcError as error:
                if error.code() != grpc.StatusCode.UNAVAILABLE:  # just after a restart
                    raise
            else:
                found = task.status.HasField("progress")
                if found and (text is None or progress_text(task.status.progress) == text):
                    return task
            await anyio.sleep(0.02)


async def wait_for_status(client: OperatorClient, task_id: str, status: int) -> pb.Task:
    with anyio.fail_after(WAIT_S):
        while True:
            task = await client.get_task(task_id)
            if task.status.status == status:
                return task
            await anyio.sleep(0.02)


async def test_a_handler_cancelled_while_its_report_is_written_leaves_the_agent_running(
    server: TaskManagerServer, client: OperatorClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    writing, release, handler_cancelled = anyio.Event(), anyio.Event(), anyio.Event()
    real_write = _agent._ReportStream._write

    async def held_write(
        self: _agent._ReportStream,
        call: grpc.aio.StreamStreamCall[pb.StatusReport, pb.StatusReportResult],
        report: pb.StatusReport,
    ) -> None:
        if report.status_update.status.HasField("progress"):
            writing.set()
            try:
                await release.wait()
            except asyncio.CancelledError:
                # What grpc.aio's call.write() does when the coroutine in it is cancelled
                # (grpc/aio/_call.py, _StreamRequestMixin._write): it cancels the whole call.
                call.cancel()
                raise
        await real_write(self, call, report)

    monkeypatch.setattr(_agent._ReportStream, "_write", held_write)

    async def mission(task: TaskContext) -> StringValue | None:
        if task.task.display_name != "hold":
            return StringValue(value="second done")
        try:
            await task.progress(StringValue(value="halfway"))
            await anyio.sleep_forever()
        finally:
            handler_cancelled.set()
        return None

    agent = Agent(server.address, "drone-1", mission)
    run_ended = anyio.Event()

    async def run_agent() -> None:
        try:
            await agent.run()
        finally:
            run_ended.set()

    async with anyio.create_task_group() as group:
        group.start_soon(run_agent)
        with anyio.fail_after(WAIT_S):
            await agent.wait_connected()
        held = await client.create_task(assignee_entity_id="drone-1", display_name="hold")
        with anyio.fail_after(WAIT_S):
            await writing.wait()  # the handler's progress report is in the write now
        await client.cancel_task(held.version.task_id)
        with anyio.fail_after(WAIT_S):
            await handler_cancelled.wait()
        release.set()
        done = await wait_for_status(client, held.version.task_id, S.STATUS_DONE_NOT_OK)
        second = await client.create_task(assignee_entity_id="drone-1", display_name="next")
        finished = await wait_for_status(client, second.version.task_id, S.STATUS_DONE_OK)
        assert not run_ended.is_set(), "Agent.run() returned without stop()"
        agent.stop()
        with anyio.fail_after(WAIT_S):
            await run_ended.wait()
    assert done.status.task_error.code == pb.ERROR_CODE_CANCELLED
    result = StringValue()
    assert finished.status.result.Unpack(result)
    assert result.value == "second done"


async def test_a_later_attempt_delivered_while_the_earlier_handler_runs_is_run_after_it(
    clocked: tuple[TaskManagerServer, ManualClock],
) -> None:
    server, clock = clocked
    attempts: list[int] = []
    first_running = anyio.Event()

    async def mission(task: TaskContext) -> StringValue:
        attempts.append(task.task.attempt)
        if task.task.attempt == 1:
            first_running.set()
            await anyio.sleep_forever()  # never notices that its attempt ended
        return StringValue(value=f"attempt {task.task.attempt}")

    # 300 s heartbeat_timeout: the agent's own heartbeats (every 100 s of real time) never
    # come within the test; the server's clock is moved past the deadline instead.
    policy = pb.TaskPolicy(heartbeat_timeout=Duration(seconds=300), max_attempts=2)
    async with (
        OperatorClient(server.address) as client,
        running(Agent(server.address, "d1", mission)),
    ):
        task = await create_with_policy(server, policy)
        with anyio.fail_after(WAIT_S):
            await first_running.wait()
        await wait_for_status(client, task.version.task_id, S.STATUS_EXECUTING)
        clock.advance(301)  # attempt 1 times out; attempt 2 is sent to the same agent
        done = await wait_for_status(client, task.version.task_id, S.STATUS_DONE_OK)
    assert attempts == [1, 2]
    assert done.attempt == 2


async def test_a_cancel_for_a_later_attempt_than_the_one_the_agent_ran_is_answered(
    clocked: tuple[TaskManagerServer, ManualClock],
) -> None:
    server, clock = clocked

    async def mission(task: TaskContext) -> None:
        if task.task.display_name == "blocker":
            await anyio.sleep_forever()
        raise RuntimeError("attempt 1 fails")

    policy = pb.TaskPolicy(max_attempts=2, retry_backoff=Duration(seconds=60))
    agent = Agent(server.address, "d1", mission, max_in_flight=1)
    async with OperatorClient(server.address) as client, running(agent):
        task = await create_with_policy(server, policy)
        await wait_for_status(client, task.version.task_id, S.STATUS_SCHEDULED_IN_MANAGER)
        blocker = await client.create_task(assignee_entity_id="d1", display_name="blocker")
        await wait_for_status(client, blocker.version.task_id, S.STATUS_EXECUTING)
        clock.advance(61)  # attempt 2 is sent, and held back: the agent's one slot is full
        await wait_for_status(client, task.version.task_id, S.STATUS_SENT)
        # The agent ran attempt 1 and never received attempt 2: the cancel is for that one.
        await client.cancel_task(task.version.task_id)
        done = await wait_for_status(client, task.version.task_id, S.STATUS_DONE_NOT_OK)
    assert done.status.task_error.code == pb.ERROR_CODE_CANCELLED
    assert done.attempt == 2


async def test_progress_never_waits_for_a_server_that_is_down_and_the_latest_is_sent(
    database: str,
) -> None:
    server = ServerProcess(database).start()
    server_down, posted, release = anyio.Event(), anyio.Event(), anyio.Event()

    async def mission(task: TaskContext) -> None:
        await task.progress("before the outage")
        await server_down.wait()
        await task.progress("first")
        await task.progress({"step": 2})
        await task.progress("latest")
        posted.set()  # reached only if progress() did not wait for the server
        await release.wait()

    agent = Agent(server.address, "d1", mission, reconnect_backoff=FAST_RECONNECT)
    async with running(agent):
        async with OperatorClient(server.address) as client:
            task = await client.create_task(assignee_entity_id="d1")
            await wait_for_progress(client, task.version.task_id, "before the outage")
        await anyio.to_thread.run_sync(server.kill)
        server_down.set()
        with anyio.fail_after(WAIT_S):
            await posted.wait()
        restarted = await anyio.to_thread.run_sync(ServerProcess(server.db, port=server.port).start)
        try:
            async with OperatorClient(restarted.address) as client:
                await wait_for_progress(client, task.version.task_id, "latest")
                release.set()
                await wait_for_status(client, task.version.task_id, S.STATUS_DONE_OK)
                history = await client.history(task.version.task_id)
        finally:
            assert await anyio.to_thread.run_sync(restarted.terminate) == 0
    sent = [progress_text(entry.status.progress) for entry in history]
    assert "before the outage" in sent
    assert sent[-2] == "latest"  # the last EXECUTING before DONE_OK
    # Posted while no report could reach the server: replaced by the latest, never sent.
    assert "first" not in sent
    assert "{'step': 2.0}" not in sent


async def test_progress_takes_a_string_or_a_dict_as_well_known_types(
    server: TaskManagerServer, client: OperatorClient
) -> None:
    step = anyio.Event()
    seen: list[pb.Task] = []

    async def mission(task: TaskContext) -> None:
        await task.progress({"battery": 0.5, "leg": "north"})
        await step.wait()
        await task.progress("halfway")
        await anyio.sleep_forever()

    async with running(Agent(server.address, "d1", mission)):
        task = await client.create_task(assignee_entity_id="d1")
        seen.append(await wait_for_progress(client, task.version.task_id, None))
        step.set()
        seen.append(await wait_for_progress(client, task.version.task_id, "halfway"))
    structured = Struct()
    assert seen[0].status.progress.Unpack(structured)
    assert dict(structured) == {"battery": 0.5, "leg": "north"}


async def test_progress_posted_just_before_the_handler_returns_is_reported(
    server: TaskManagerServer, client: OperatorClient
) -> None:
    async def mission(task: TaskContext) -> None:
        await task.progress("last words")

    async with running(Agent(server.address, "d1", mission)):
        task = await client.create_task(assignee_entity_id="d1")
        await wait_for_status(client, task.version.task_id, S.STATUS_DONE_OK)
        history = await client.history(task.version.task_id)
    assert progress_text(history[-2].status.progress) == "last words"
    assert history[-2].status.status == S.STATUS_EXECUTING
