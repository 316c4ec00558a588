"""The agent runtime under cancellation: it never stops unless asked.

A handler cancelled while its report is being written must not take the agent down.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import anyio
import grpc
import pytest
from google.protobuf.wrappers_pb2 import StringValue

from agent_kit import Agent, OperatorClient, TaskContext, _agent
from task_manager.server import TaskManagerServer
from task_manager.v1 import task_manager_pb2 as pb

pytestmark = pytest.mark.anyio
S = pb.Status
WAIT_S = 30.0


@pytest.fixture
async def client(server: TaskManagerServer) -> AsyncIterator[OperatorClient]:
    async with OperatorClient(server.address) as operator:
        yield operator


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
