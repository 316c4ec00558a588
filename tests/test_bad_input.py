"""Bad input gets the right code and a message saying what was wrong, and changes nothing."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.duration_pb2 import Duration
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from task_manager.service import SERVICE_DESCRIPTORS
from task_manager.v1 import task_manager_pb2 as pb
from tests.helpers import AsyncStub, create_request, status_update

pytestmark = pytest.mark.anyio
S = pb.Status
Code = grpc.StatusCode


async def snapshot(stub: AsyncStub) -> list[tuple[pb.Task, list[pb.TaskHistoryEntry]]]:
    """Every task with its whole history: what must not change."""
    tasks = (await stub.QueryTasks(pb.QueryTasksRequest(page_size=1000))).tasks
    result = []
    for task in tasks:
        entries = await stub.GetTaskHistory(pb.GetTaskHistoryRequest(task_id=task.version.task_id))
        result.append((task, list(entries.entries)))
    return result


@pytest.fixture
async def existing(stub: AsyncStub) -> pb.Task:
    task = (await stub.CreateTask(create_request(task_id="existing-1"))).task
    return (await stub.UpdateStatus(status_update(task, S.STATUS_EXECUTING))).task


def _update(
    task_id: str = "existing-1", version: int = 3, **status: object
) -> pb.UpdateStatusRequest:
    return pb.UpdateStatusRequest(
        status_update=pb.StatusUpdate(
            version=pb.TaskVersion(task_id=task_id, status_version=version),
            status=pb.TaskStatus(**status),  # type: ignore[arg-type]
        )
    )


Call = Callable[[AsyncStub], Awaitable[object]]
CASES: list[tuple[str, Call, grpc.StatusCode, str]] = [
    (
        "unknown task (get)",
        lambda s: s.GetTask(pb.GetTaskRequest(task_id="nope-nope")),
        Code.NOT_FOUND,
        "nope-nope",
    ),
    (
        "unknown task (update)",
        lambda s: s.UpdateStatus(_update("nope-nope", 1, status=S.STATUS_ACK)),
        Code.NOT_FOUND,
        "nope-nope",
    ),
    (
        "unknown task (history)",
        lambda s: s.GetTaskHistory(pb.GetTaskHistoryRequest(task_id="nope-nope")),
        Code.NOT_FOUND,
        "nope-nope",
    ),
    (
        "unknown task (complete)",
        lambda s: s.CompleteTask(pb.CompleteTaskRequest(task_id="nope-nope")),
        Code.NOT_FOUND,
        "nope-nope",
    ),
    (
        "stale version",
        lambda s: s.UpdateStatus(_update(version=2, status=S.STATUS_ACK)),
        Code.ABORTED,
        "status_version 3",
    ),
    (
        "task_id taken",
        lambda s: s.CreateTask(create_request(task_id="existing-1", display_name="another")),
        Code.ALREADY_EXISTS,
        "existing-1",
    ),
    (
        "STATUS_INVALID",
        lambda s: s.UpdateStatus(_update(status=S.STATUS_INVALID)),
        Code.INVALID_ARGUMENT,
        "status",
    ),
    (
        "unknown status number",
        lambda s: s.UpdateStatus(_update(status=99)),
        Code.INVALID_ARGUMENT,
        "99",
    ),
    (
        "manager-only status",
        lambda s: s.UpdateStatus(_update(status=S.STATUS_SENT)),
        Code.INVALID_ARGUMENT,
        "STATUS_SENT",
    ),
    (
        "missing version",
        lambda s: s.UpdateStatus(_update(version=0, status=S.STATUS_ACK)),
        Code.INVALID_ARGUMENT,
        "status_version",
    ),
    (
        "missing status_update",
        lambda s: s.UpdateStatus(pb.UpdateStatusRequest()),
        Code.INVALID_ARGUMENT,
        "status_update",
    ),
    (
        "missing task id in update",
        lambda s: s.UpdateStatus(_update("", status=S.STATUS_ACK)),
        Code.INVALID_ARGUMENT,
        "task_id",
    ),
    (
        "task_id too short",
        lambda s: s.CreateTask(create_request(task_id="abcd")),
        Code.INVALID_ARGUMENT,
        "task_id",
    ),
    (
        "task_id too long",
        lambda s: s.CreateTask(create_request(task_id="a" * 37)),
        Code.INVALID_ARGUMENT,
        "task_id",
    ),
    (
        "task_id bad characters",
        lambda s: s.CreateTask(create_request(task_id="has space")),
        Code.INVALID_ARGUMENT,
        "task_id",
    ),
    (
        "get with bad task_id",
        lambda s: s.GetTask(pb.GetTaskRequest(task_id="../../etc")),
        Code.INVALID_ARGUMENT,
        "task_id",
    ),
    (
        "get with no task_id",
        lambda s: s.GetTask(pb.GetTaskRequest()),
        Code.INVALID_ARGUMENT,
        "task_id",
    ),
    (
        "display_name over 256",
        lambda s: s.CreateTask(pb.CreateTaskRequest(display_name="n" * 257)),
        Code.INVALID_ARGUMENT,
        "display_name",
    ),
    (
        "description too long",
        lambda s: s.CreateTask(pb.CreateTaskRequest(description="d" * 16_385)),
        Code.INVALID_ARGUMENT,
        "description",
    ),
    (
        "specification over 1 MiB",
        lambda s: s.CreateTask(_big_spec()),
        Code.INVALID_ARGUMENT,
        "specification",
    ),
    (
        "bad parent task id",
        lambda s: s.CreateTask(_with_parent("x")),
        Code.INVALID_ARGUMENT,
        "parent_task_id",
    ),
    (
        "empty assignee entity id",
        lambda s: s.CreateTask(create_request(entity_id="")),
        Code.INVALID_ARGUMENT,
        "entity_id",
    ),
    (
        "team without an entity id",
        lambda s: s.CreateTask(_team_task()),
        Code.INVALID_ARGUMENT,
        "relations.assignee.team.entity_id",
    ),
    (
        "a timeout past int64 nanoseconds",
        lambda s: s.CreateTask(_with_policy(receipt_timeout=Duration(seconds=2**62))),
        Code.INVALID_ARGUMENT,
        "policy.receipt_timeout",
    ),
    (
        "a negative backoff",
        lambda s: s.CreateTask(_with_policy(retry_backoff=Duration(seconds=-5))),
        Code.INVALID_ARGUMENT,
        "policy.retry_backoff",
    ),
    (
        "max_attempts over the limit",
        lambda s: s.CreateTask(_with_policy(max_attempts=2**31)),
        Code.INVALID_ARGUMENT,
        "policy.max_attempts",
    ),
    (
        "scheduled_time past the year 2262",
        lambda s: s.CreateTask(_scheduled(200_000_000_000)),
        Code.INVALID_ARGUMENT,
        "scheduled_time",
    ),
    (
        "a time range past the year 2262",
        lambda s: s.QueryTasks(_updated_after(10**10)),
        Code.INVALID_ARGUMENT,
        "update_time_range.start",
    ),
    (
        "unknown task view",
        lambda s: s.GetTask(_unknown_view()),
        Code.INVALID_ARGUMENT,
        "task_view",
    ),
    (
        "unknown definition version",
        lambda s: s.GetTask(pb.GetTaskRequest(task_id="existing-1", definition_version=9)),
        Code.NOT_FOUND,
        "definition_version 9",
    ),
    (
        "page_size over 1000",
        lambda s: s.QueryTasks(pb.QueryTasksRequest(page_size=1001)),
        Code.INVALID_ARGUMENT,
        "page_size",
    ),
    (
        "forged page token",
        lambda s: s.QueryTasks(pb.QueryTasksRequest(page_token="garbage!")),
        Code.INVALID_ARGUMENT,
        "page_token",
    ),
    (
        "unknown filter status",
        lambda s: s.QueryTasks(_status_filter(42)),
        Code.INVALID_ARGUMENT,
        "status_filter",
    ),
    (
        "time range reversed",
        lambda s: s.QueryTasks(_reversed_range()),
        Code.INVALID_ARGUMENT,
        "update_time_range",
    ),
    (
        "reason too long",
        lambda s: s.CancelTask(pb.CancelTaskRequest(task_id="existing-1", reason="r" * 16_385)),
        Code.INVALID_ARGUMENT,
        "reason",
    ),
    (
        "oversized status",
        lambda s: s.UpdateStatus(_big_progress()),
        Code.INVALID_ARGUMENT,
        "status",
    ),
]


@pytest.mark.parametrize(("case", "call", "code", "mentions"), CASES, ids=[c[0] for c in CASES])
async def test_bad_request_gets_a_clear_error_and_changes_nothing(
    stub: AsyncStub,
    existing: pb.Task,
    case: str,
    call: Call,
    code: grpc.StatusCode,
    mentions: str,
) -> None:
    before = await snapshot(stub)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(stub)
    assert caught.value.code() == code, caught.value.details()
    assert mentions in (caught.value.details() or ""), caught.value.details()
    assert await snapshot(stub) == before


METHODS = [(s.full_name, m) for s in SERVICE_DESCRIPTORS for m in s.methods]


@pytest.mark.parametrize(("service", "method"), METHODS, ids=[f"{s}/{m.name}" for s, m in METHODS])
async def test_undecodable_request_bytes_are_invalid_argument(
    channel: grpc.aio.Channel,
    stub: AsyncStub,
    existing: pb.Task,
    service: str,
    method: MethodDescriptor,
) -> None:
    before = await snapshot(stub)
    garbage = b"\x0a\xff\xff\xff\xff\x0f"  # field 1, length-delimited, absurd length
    path = f"/{service}/{method.name}"
    if method.client_streaming and not method.server_streaming:
        # An upload with a bad part is refused whole.
        upload = channel.stream_unary(path, _raw, pb.UploadPayloadResponse.FromString)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await upload(iter([garbage]))
        assert caught.value.code() == Code.INVALID_ARGUMENT
        assert "not a valid" in (caught.value.details() or "")
    elif method.client_streaming:
        # One bad report is refused in-band; the stream itself goes on.
        bidi = channel.stream_stream(path, _raw, pb.StatusReportResult.FromString)(None)
        await bidi.write(garbage)
        await bidi.done_writing()
        result = await bidi.read()
        assert isinstance(result, pb.StatusReportResult)
        assert result.error.code == Code.INVALID_ARGUMENT.value[0]
        assert "not a valid" in result.error.message
        assert await bidi.code() == Code.OK
    else:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await _call_once(channel, path, method, garbage)
        assert caught.value.code() == Code.INVALID_ARGUMENT
        assert "not a valid" in (caught.value.details() or "")
    assert await snapshot(stub) == before


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(payload=st.binary(max_size=200))
async def test_random_bytes_never_get_unknown_or_internal(
    channel: grpc.aio.Channel, payload: bytes
) -> None:
    for method in ("CreateTask", "UpdateStatus", "GetTask", "QueryTasks", "CancelTask"):
        try:
            await channel.unary_unary(f"/task_manager.v1.TaskManager/{method}", _raw, _raw)(payload)
        except grpc.aio.AioRpcError as error:
            assert error.code() not in (Code.UNKNOWN, Code.INTERNAL), (method, error.details())


async def _call_once(
    channel: grpc.aio.Channel, path: str, method: MethodDescriptor, request: bytes
) -> object:
    if method.server_streaming:
        return await channel.unary_stream(path, _raw, _raw)(request).read()
    return await channel.unary_unary(path, _raw, _raw)(request)


def _raw(data: bytes) -> bytes:
    """Sends and receives bytes as they are, to put any bytes on the wire."""
    return data


def _unknown_view() -> pb.GetTaskRequest:
    request = pb.GetTaskRequest(task_id="existing-1")
    request.task_view = 7  # type: ignore[assignment]
    return request


def _big_spec() -> pb.CreateTaskRequest:
    request = pb.CreateTaskRequest()
    request.specification.value = b"s" * ((1 << 20) + 1)
    return request


def _big_progress() -> pb.UpdateStatusRequest:
    request = _update(status=S.STATUS_EXECUTING)
    request.status_update.status.progress.value = b"p" * ((1 << 20) + 1)
    return request


def _with_parent(parent: str) -> pb.CreateTaskRequest:
    request = create_request()
    request.relations.parent_task_id = parent
    return request


def _with_policy(**policy: Any) -> pb.CreateTaskRequest:
    request = create_request()
    request.policy.CopyFrom(pb.TaskPolicy(**policy))
    return request


def _scheduled(seconds: int) -> pb.CreateTaskRequest:
    request = create_request()
    request.scheduled_time.seconds = seconds
    return request


def _updated_after(seconds: int) -> pb.QueryTasksRequest:
    request = pb.QueryTasksRequest()
    request.update_time_range.update_start_time.seconds = seconds
    return request


def _team_task() -> pb.CreateTaskRequest:
    request = create_request(entity_id=None)
    request.relations.assignee.team.SetInParent()
    return request


def _status_filter(status: int) -> pb.QueryTasksRequest:
    request = pb.QueryTasksRequest()
    request.status_filter.status.append(status)  # type: ignore[arg-type]
    return request


def _reversed_range() -> pb.QueryTasksRequest:
    request = pb.QueryTasksRequest()
    request.update_time_range.update_start_time.seconds = 2_000
    request.update_time_range.update_end_time.seconds = 1_000
    return request
