"""ReportStatus: the same checks as UpdateStatus, over one stream, answered in order."""

from __future__ import annotations

import anyio
import grpc
import pytest

from task_manager.server import TaskManagerServer
from task_manager.v1 import task_manager_pb2 as pb
from tests.helpers import AsyncStub, create_request, server_settings, status_update

pytestmark = pytest.mark.anyio
S = pb.Status
Code = grpc.StatusCode

ReportCall = grpc.aio.StreamStreamCall[pb.StatusReport, pb.StatusReportResult]


async def report(
    call: ReportCall, report_id: int, update: pb.UpdateStatusRequest
) -> pb.StatusReportResult:
    await call.write(pb.StatusReport(report_id=report_id, status_update=update.status_update))
    result = await call.read()
    assert isinstance(result, pb.StatusReportResult), result
    assert result.report_id == report_id
    return result


async def test_reports_walk_a_task_like_update_status(stub: AsyncStub) -> None:
    task = (await stub.CreateTask(create_request())).task
    call = stub.ReportStatus(None)
    for n, status in enumerate((S.STATUS_MACHINE_RECEIPT, S.STATUS_EXECUTING, S.STATUS_DONE_OK), 1):
        result = await report(call, n, status_update(task, status))
        assert result.WhichOneof("outcome") == "task"
        task = result.task
        assert (task.status.status, task.version.status_version) == (status, 2 + n)
    await call.done_writing()
    stored = (await stub.GetTask(pb.GetTaskRequest(task_id=task.version.task_id))).task
    assert stored == task


async def test_refused_reports_carry_the_update_status_code_and_do_not_end_the_stream(
    stub: AsyncStub,
) -> None:
    task = (await stub.CreateTask(create_request())).task
    call = stub.ReportStatus(None)
    stale = await report(call, 1, status_update(task, S.STATUS_ACK, version=1))
    assert stale.error.code == Code.ABORTED.value[0]
    assert stale.error.current_status_version == 2
    assert "status_version 2" in stale.error.message
    invalid = await report(call, 2, status_update(task, S.STATUS_INVALID))
    assert invalid.error.code == Code.INVALID_ARGUMENT.value[0]
    accepted = await report(call, 3, status_update(task, S.STATUS_ACK))
    unknown_task = pb.StatusUpdate(
        version=pb.TaskVersion(task_id="no-such-task", status_version=1),
        status=pb.TaskStatus(status=S.STATUS_ACK),
    )
    await call.write(pb.StatusReport(report_id=4, status_update=unknown_task))
    not_found = await call.read()
    assert isinstance(not_found, pb.StatusReportResult)
    assert not_found.error.code == Code.NOT_FOUND.value[0]
    done = await report(call, 5, status_update(accepted.task, S.STATUS_DONE_OK))
    assert done.task.status.status == S.STATUS_DONE_OK
    after_end = await report(call, 6, status_update(done.task, S.STATUS_EXECUTING))
    assert after_end.error.code == Code.FAILED_PRECONDITION.value[0]
    await call.done_writing()
    assert await call.code() == Code.OK


async def test_pipelined_reports_are_answered_in_order(stub: AsyncStub) -> None:
    tasks = [(await stub.CreateTask(create_request())).task for _ in range(20)]
    call = stub.ReportStatus(None)
    for n, task in enumerate(tasks):
        await call.write(
            pb.StatusReport(
                report_id=100 + n,
                status_update=status_update(task, S.STATUS_EXECUTING).status_update,
            )
        )
    await call.done_writing()
    results = [r async for r in call]
    assert [r.report_id for r in results] == [100 + n for n in range(20)]
    assert all(r.task.status.status == S.STATUS_EXECUTING for r in results)


async def test_undecodable_report_is_refused_and_the_stream_goes_on(
    channel: grpc.aio.Channel, stub: AsyncStub
) -> None:
    task = (await stub.CreateTask(create_request())).task
    good = pb.StatusReport(
        report_id=7, status_update=status_update(task, S.STATUS_ACK).status_update
    )
    call = channel.stream_stream(
        "/task_manager.v1.TaskManager/ReportStatus",
        request_serializer=lambda data: data,
        response_deserializer=pb.StatusReportResult.FromString,
    )(None)
    await call.write(b"\x0a\xff\xff\xff\xff\x0f")
    await call.write(good.SerializeToString())
    await call.done_writing()
    results = [r async for r in call]
    assert results[0].error.code == Code.INVALID_ARGUMENT.value[0]
    assert results[1].report_id == 7
    assert results[1].task.status.status == S.STATUS_ACK


async def test_server_stop_ends_report_streams_with_unavailable_without_waiting(
    database: str,
) -> None:
    # A grace period far longer than the deadline: stop must not wait for the stream.
    settings = server_settings(database, shutdown_grace_s=600)
    server = await TaskManagerServer.start(settings)
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = AsyncStub(channel)
        task = (await stub.CreateTask(create_request())).task
        call = stub.ReportStatus(None)
        answered = await report(call, 1, status_update(task, S.STATUS_EXECUTING))
        assert answered.task.status.status == S.STATUS_EXECUTING
        with anyio.fail_after(30):
            await server.stop()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call.read()
        assert caught.value.code() == Code.UNAVAILABLE
