"""PROTOCOL.md section 3, one test per rule, against a real server over gRPC."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from google.protobuf.any_pb2 import Any
from google.protobuf.duration_pb2 import Duration
from google.protobuf.wrappers_pb2 import StringValue

from task_manager.v1 import task_manager_pb2 as pb
from tests.helpers import AsyncStub, agent, create_request, status_update, trailer

pytestmark = pytest.mark.anyio
S = pb.Status


async def create(stub: AsyncStub, **kwargs: object) -> pb.Task:
    response = await stub.CreateTask(create_request(**kwargs))  # type: ignore[arg-type]
    return response.task


async def get(stub: AsyncStub, task_id: str) -> pb.Task:
    return (await stub.GetTask(pb.GetTaskRequest(task_id=task_id))).task


async def history(stub: AsyncStub, task_id: str) -> list[pb.TaskHistoryEntry]:
    response = await stub.GetTaskHistory(pb.GetTaskHistoryRequest(task_id=task_id))
    return list(response.entries)


async def rpc_error(call: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call  # type: ignore[misc]
    return caught.value


def _any(text: str) -> Any:
    packed = Any()
    packed.Pack(StringValue(value=text))
    return packed


# -- versions ---------------------------------------------------------------------------


async def test_new_task_starts_at_definition_version_1_and_status_version_1(
    stub: AsyncStub,
) -> None:
    task = await create(stub, entity_id=None)
    assert task.status.status == S.STATUS_CREATED
    assert (task.version.definition_version, task.version.status_version) == (1, 1)
    assert await get(stub, task.version.task_id) == task


async def test_each_accepted_update_increments_status_version_by_exactly_one(
    stub: AsyncStub,
) -> None:
    task = await create(stub)
    for status in (S.STATUS_MACHINE_RECEIPT, S.STATUS_ACK, S.STATUS_EXECUTING):
        before = task.version.status_version
        task = (await stub.UpdateStatus(status_update(task, status))).task
        assert task.version.status_version == before + 1
        assert task.version.definition_version == 1
    assert await get(stub, task.version.task_id) == task


# -- optimistic check ---------------------------------------------------------------------


async def test_update_with_the_stored_version_returns_the_new_task(
    stub: AsyncStub,
) -> None:
    task = await create(stub)
    response = await stub.UpdateStatus(status_update(task, S.STATUS_MACHINE_RECEIPT))
    assert response.task.status.status == S.STATUS_MACHINE_RECEIPT
    assert response.task.version.status_version == task.version.status_version + 1
    assert response.task.last_updated_by == agent("agent-1")


@pytest.mark.parametrize("offset", [-1, +1, +5])
async def test_stale_status_version_is_rejected_with_aborted(stub: AsyncStub, offset: int) -> None:
    task = await create(stub)
    task = (await stub.UpdateStatus(status_update(task, S.STATUS_MACHINE_RECEIPT))).task
    current = task.version.status_version
    error = await rpc_error(
        stub.UpdateStatus(status_update(task, S.STATUS_ACK, version=current + offset))
    )
    assert error.code() == grpc.StatusCode.ABORTED
    assert f"status_version {current}" in (error.details() or "")
    assert f"status_version {current + offset}" in (error.details() or "")
    assert trailer(error, "x-current-status-version") == str(current)
    assert await get(stub, task.version.task_id) == task


async def test_worked_example_sent_machine_receipt_ack_wilco_executing_done_ok(
    stub: AsyncStub,
) -> None:
    # "the agent receives a task at STATUS_SENT with status_version N; it reports
    # STATUS_MACHINE_RECEIPT with version N; then STATUS_ACK with N+1; STATUS_WILCO with
    # N+2; STATUS_EXECUTING with N+3; STATUS_DONE_OK with N+4."
    task = await create(stub)
    assert task.status.status == S.STATUS_SENT
    n = task.version.status_version
    steps = [
        (S.STATUS_MACHINE_RECEIPT, n),
        (S.STATUS_ACK, n + 1),
        (S.STATUS_WILCO, n + 2),
        (S.STATUS_EXECUTING, n + 3),
        (S.STATUS_DONE_OK, n + 4),
    ]
    for status, version in steps:
        task = (await stub.UpdateStatus(status_update(task, status, version=version))).task
        assert task.status.status == status
        assert task.version.status_version == version + 1
    assert (await get(stub, task.version.task_id)).status.status == S.STATUS_DONE_OK


async def test_retried_update_whose_answer_was_lost_returns_ok_with_the_current_task(
    stub: AsyncStub,
) -> None:
    task = await create(stub)
    update = status_update(task, S.STATUS_MACHINE_RECEIPT)
    first = (await stub.UpdateStatus(update)).task
    retried = (await stub.UpdateStatus(update)).task
    assert retried == first
    assert len(await history(stub, task.version.task_id)) == 3  # CREATED, SENT, RECEIPT


async def test_retry_with_other_content_at_the_old_version_is_still_aborted(
    stub: AsyncStub,
) -> None:
    task = await create(stub)
    await stub.UpdateStatus(status_update(task, S.STATUS_MACHINE_RECEIPT))
    error = await rpc_error(stub.UpdateStatus(status_update(task, S.STATUS_ACK)))
    assert error.code() == grpc.StatusCode.ABORTED


async def test_32_concurrent_updates_with_the_same_version_exactly_one_wins(
    stub: AsyncStub,
) -> None:
    task = await create(stub)
    updates = [
        status_update(task, S.STATUS_EXECUTING, progress=_any(f"writer {i}")) for i in range(32)
    ]
    results = await asyncio.gather(
        *(stub.UpdateStatus(update) for update in updates), return_exceptions=True
    )
    winners = [r for r in results if isinstance(r, pb.UpdateStatusResponse)]
    losers = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(winners) == 1
    assert len(losers) == 31
    assert {e.code() for e in losers} == {grpc.StatusCode.ABORTED}
    stored = await get(stub, task.version.task_id)
    assert stored == winners[0].task
    assert stored.version.status_version == task.version.status_version + 1


async def test_32_concurrent_identical_updates_all_succeed_and_apply_once(
    stub: AsyncStub,
) -> None:
    task = await create(stub)
    update = status_update(task, S.STATUS_EXECUTING)
    results = await asyncio.gather(*(stub.UpdateStatus(update) for _ in range(32)))
    assert {r.task.version.status_version for r in results} == {task.version.status_version + 1}
    assert len(await history(stub, task.version.task_id)) == 3


# -- terminal states ----------------------------------------------------------------------


@pytest.mark.parametrize("terminal", [S.STATUS_DONE_OK, S.STATUS_DONE_NOT_OK])
@pytest.mark.parametrize("later", [S.STATUS_EXECUTING, S.STATUS_DONE_OK, S.STATUS_CANCEL_REQUESTED])
async def test_update_after_a_terminal_status_is_rejected_and_changes_nothing(
    stub: AsyncStub, terminal: pb.Status.ValueType, later: pb.Status.ValueType
) -> None:
    task = await create(stub)
    done = (await stub.UpdateStatus(status_update(task, terminal))).task
    error = await rpc_error(stub.UpdateStatus(status_update(done, later)))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "finished" in (error.details() or "")
    assert await get(stub, task.version.task_id) == done


async def test_cancel_and_complete_of_a_finished_task_are_rejected(
    stub: AsyncStub,
) -> None:
    task = await create(stub)
    done = (await stub.UpdateStatus(status_update(task, S.STATUS_DONE_OK))).task
    task_id = task.version.task_id
    for call in (
        stub.CancelTask(pb.CancelTaskRequest(task_id=task_id)),
        stub.CompleteTask(pb.CompleteTaskRequest(task_id=task_id)),
    ):
        assert (await rpc_error(call)).code() == grpc.StatusCode.FAILED_PRECONDITION
    assert await get(stub, task_id) == done


# -- errors are recorded ------------------------------------------------------------------


async def test_task_error_is_stored_and_returned_exactly_as_sent(
    stub: AsyncStub,
) -> None:
    task = await create(stub)
    error = pb.TaskError(
        code=pb.ErrorCode.ERROR_CODE_FAILED,
        message="rotor 3 overheated",
        error_details=_any("temperature 131C"),
    )
    done = (
        await stub.UpdateStatus(status_update(task, S.STATUS_DONE_NOT_OK, task_error=error))
    ).task
    assert done.status.task_error == error
    assert (await get(stub, task.version.task_id)).status.task_error == error
    queried = await stub.QueryTasks(pb.QueryTasksRequest())
    assert [t.status.task_error for t in queried.tasks] == [error]
    assert (await history(stub, task.version.task_id))[-1].status.task_error == error


# -- flexible status model ----------------------------------------------------------------


async def test_agent_may_skip_steps_sent_straight_to_executing(stub: AsyncStub) -> None:
    task = await create(stub)
    task = (await stub.UpdateStatus(status_update(task, S.STATUS_EXECUTING))).task
    task = (await stub.UpdateStatus(status_update(task, S.STATUS_WAITING_FOR_UPDATE))).task
    task = (await stub.UpdateStatus(status_update(task, S.STATUS_EXECUTING))).task
    assert task.version.status_version == 5


async def test_repeating_the_current_status_with_new_progress_is_a_new_version(
    stub: AsyncStub,
) -> None:
    task = await create(stub)
    task = (await stub.UpdateStatus(status_update(task, S.STATUS_EXECUTING))).task
    task = (
        await stub.UpdateStatus(status_update(task, S.STATUS_EXECUTING, progress=_any("50%")))
    ).task
    assert task.version.status_version == 4
    assert task.status.progress == _any("50%")


# -- creation and release -----------------------------------------------------------------


async def test_task_with_an_agent_assignee_is_released_to_sent_at_status_version_2(
    stub: AsyncStub,
) -> None:
    task = await create(stub, entity_id="drone-7")
    assert task.status.status == S.STATUS_SENT
    assert task.version.status_version == 2
    entries = await history(stub, task.version.task_id)
    assert [(e.status.status, e.status_version) for e in entries] == [
        (S.STATUS_CREATED, 1),
        (S.STATUS_SENT, 2),
    ]


async def test_task_executed_elsewhere_stays_created(stub: AsyncStub) -> None:
    task = await create(stub, is_executed_elsewhere=True)
    assert (task.status.status, task.version.status_version) == (S.STATUS_CREATED, 1)


async def test_task_assigned_to_a_user_stays_created(stub: AsyncStub) -> None:
    request = create_request(entity_id=None)
    request.relations.assignee.user.user_id = "alice"
    task = (await stub.CreateTask(request)).task
    assert task.status.status == S.STATUS_CREATED


async def test_created_task_keeps_every_field_it_was_given(stub: AsyncStub) -> None:
    parent = await create(stub, entity_id=None)
    request = create_request(
        task_id="my-task.01",
        description="survey the north field",
        specification=_any("waypoints"),
        author=pb.Principal(user=pb.User(user_id="op-1")),
    )
    request.relations.parent_task_id = parent.version.task_id
    task = (await stub.CreateTask(request)).task
    assert task.version.task_id == "my-task.01"
    assert task.description == "survey the north field"
    assert task.specification == _any("waypoints")
    assert task.created_by == pb.Principal(user=pb.User(user_id="op-1"))
    assert task.relations.parent_task_id == parent.version.task_id
    assert task.create_time.seconds > 0
    assert task.last_update_time.ToNanoseconds() >= task.create_time.ToNanoseconds()


async def test_a_create_retried_with_the_same_request_answers_the_task_and_writes_nothing(
    stub: AsyncStub,
) -> None:
    request = create_request(task_id="task-00001", specification=_any("plan"))
    first = await stub.CreateTask(request)
    assert not first.already_existed
    entries = await history(stub, "task-00001")
    retried = await stub.CreateTask(request)
    assert retried.already_existed
    assert retried.task == first.task == await get(stub, "task-00001")
    assert await history(stub, "task-00001") == entries
    created = await create(stub, task_id="task-00002")  # the revisions have no gap
    assert (await history(stub, "task-00002"))[0].revision == entries[-1].revision + 1
    assert created.version.task_id == "task-00002"


async def test_a_create_retried_after_the_task_moved_on_answers_it_as_it_stands(
    stub: AsyncStub,
) -> None:
    request = create_request(task_id="task-00001", description="v1 plan")
    sent = (await stub.CreateTask(request)).task
    await stub.UpdateStatus(status_update(sent, S.STATUS_EXECUTING))
    moved = (
        await stub.UpdateTask(
            pb.UpdateTaskRequest(task_id="task-00001", definition_version=1, description="v2")
        )
    ).task
    assert moved.version.definition_version == 2
    # The retry asks for what the task was created with (definition 1): the same task.
    retried = await stub.CreateTask(request)
    assert retried.already_existed
    assert retried.task == moved == await get(stub, "task-00001")


async def test_a_create_retried_after_a_retry_was_scheduled_answers_the_task(
    stub: AsyncStub,
) -> None:
    # A failed attempt with a backoff moves the task's scheduled_time: still the same task.
    policy = pb.TaskPolicy(max_attempts=2, retry_backoff=Duration(seconds=600))
    request = create_request(task_id="task-00001", policy=policy)
    sent = (await stub.CreateTask(request)).task
    await stub.UpdateStatus(status_update(sent, S.STATUS_EXECUTING))
    executing = await get(stub, "task-00001")
    failed = pb.TaskError(code=pb.ERROR_CODE_FAILED, message="try later")
    await stub.UpdateStatus(status_update(executing, S.STATUS_DONE_NOT_OK, task_error=failed))
    waiting = await get(stub, "task-00001")
    assert waiting.status.status == S.STATUS_SCHEDULED_IN_MANAGER
    assert waiting.HasField("scheduled_time")
    retried = await stub.CreateTask(request)
    assert retried.already_existed and retried.task == waiting


@pytest.mark.parametrize(
    ("differing", "field"),
    [
        ({"display_name": "another name"}, "display_name"),
        ({"specification": _any("another plan")}, "specification"),
        ({"description": "another description"}, "description"),
        ({"entity_id": "agent-2"}, "relations"),
        ({"policy": pb.TaskPolicy(max_attempts=3)}, "policy"),
        ({"author": pb.Principal(user=pb.User(user_id="op-2"))}, "author"),
    ],
)
async def test_a_taken_task_id_with_another_request_is_already_exists_naming_the_field(
    stub: AsyncStub, differing: dict[str, object], field: str
) -> None:
    first = await create(stub, task_id="task-00001", specification=_any("plan"))
    entries = await history(stub, "task-00001")
    fields: dict[str, object] = {"specification": _any("plan"), **differing}
    error = await rpc_error(stub.CreateTask(create_request(task_id="task-00001", **fields)))  # type: ignore[arg-type]
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS
    assert error.details() == (
        f"task_id task-00001 is already taken by another task created with another {field}"
    )
    # Nothing was written: the task, its history and the revision sequence are as before.
    assert await get(stub, "task-00001") == first
    assert await history(stub, "task-00001") == entries
    await create(stub, task_id="task-00002")


# -- operator requests --------------------------------------------------------------------


async def test_cancel_of_a_sent_task_requests_cancel_from_the_agent(
    stub: AsyncStub,
) -> None:
    task = await create(stub)
    cancelled = (await stub.CancelTask(pb.CancelTaskRequest(task_id=task.version.task_id))).task
    assert cancelled.status.status == S.STATUS_CANCEL_REQUESTED
    assert cancelled.version.status_version == task.version.status_version + 1
    again = (await stub.CancelTask(pb.CancelTaskRequest(task_id=task.version.task_id))).task
    assert again == cancelled  # idempotent while the request is pending
    done = (
        await stub.UpdateStatus(
            status_update(
                cancelled,
                S.STATUS_DONE_NOT_OK,
                task_error=pb.TaskError(code=pb.ErrorCode.ERROR_CODE_CANCELLED),
            )
        )
    ).task
    assert done.status.task_error.code == pb.ErrorCode.ERROR_CODE_CANCELLED


async def test_cancel_before_release_ends_the_task_cancelled(stub: AsyncStub) -> None:
    task = await create(stub, entity_id=None)
    done = (
        await stub.CancelTask(
            pb.CancelTaskRequest(task_id=task.version.task_id, reason="no longer needed")
        )
    ).task
    assert done.status.status == S.STATUS_DONE_NOT_OK
    assert done.status.task_error.code == pb.ErrorCode.ERROR_CODE_CANCELLED
    assert done.status.task_error.message == "no longer needed"
    assert (await history(stub, task.version.task_id))[-1].reason == "no longer needed"


async def test_update_to_cancel_requested_before_release_ends_the_task_cancelled(
    stub: AsyncStub,
) -> None:
    task = await create(stub, entity_id=None)
    done = (await stub.UpdateStatus(status_update(task, S.STATUS_CANCEL_REQUESTED))).task
    assert done.status.status == S.STATUS_DONE_NOT_OK
    assert done.status.task_error.code == pb.ErrorCode.ERROR_CODE_CANCELLED


async def test_complete_requests_completion_and_the_agent_ends_the_task(
    stub: AsyncStub,
) -> None:
    task = await create(stub)
    task = (await stub.UpdateStatus(status_update(task, S.STATUS_EXECUTING))).task
    requested = (await stub.CompleteTask(pb.CompleteTaskRequest(task_id=task.version.task_id))).task
    assert requested.status.status == S.STATUS_COMPLETE_REQUESTED
    done = (await stub.UpdateStatus(status_update(requested, S.STATUS_DONE_OK))).task
    assert done.status.status == S.STATUS_DONE_OK


async def test_complete_of_a_task_never_sent_is_failed_precondition(
    stub: AsyncStub,
) -> None:
    task = await create(stub, entity_id=None)
    error = await rpc_error(stub.CompleteTask(pb.CompleteTaskRequest(task_id=task.version.task_id)))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert await get(stub, task.version.task_id) == task


async def test_cancel_of_an_unknown_task_is_not_found(stub: AsyncStub) -> None:
    error = await rpc_error(stub.CancelTask(pb.CancelTaskRequest(task_id="no-such-task")))
    assert error.code() == grpc.StatusCode.NOT_FOUND


# -- history ------------------------------------------------------------------------------


async def test_every_accepted_change_is_in_history_with_strictly_increasing_revisions(
    stub: AsyncStub,
) -> None:
    first = await create(stub)
    second = await create(stub)
    task = first
    for status in (S.STATUS_MACHINE_RECEIPT, S.STATUS_EXECUTING):
        task = (await stub.UpdateStatus(status_update(task, status))).task
        second = (await stub.UpdateStatus(status_update(second, status))).task
    before = await history(stub, first.version.task_id)
    await stub.UpdateStatus(status_update(task, S.STATUS_DONE_OK))
    after = await history(stub, first.version.task_id)
    assert after[: len(before)] == before  # nothing rewritten
    assert [e.status_version for e in after] == [1, 2, 3, 4, 5]
    assert [e.status.status for e in after] == [
        S.STATUS_CREATED,
        S.STATUS_SENT,
        S.STATUS_MACHINE_RECEIPT,
        S.STATUS_EXECUTING,
        S.STATUS_DONE_OK,
    ]
    revisions = [e.revision for e in after] + [
        e.revision for e in await history(stub, second.version.task_id)
    ]
    assert len(set(revisions)) == len(revisions)  # store-wide: no two changes share one
    assert [e.revision for e in after] == sorted(e.revision for e in after)
    assert after[2].author == agent("agent-1")
    assert all(e.time.seconds > 0 for e in after)


async def test_history_pages_cover_every_entry_once(stub: AsyncStub) -> None:
    task = await create(stub)
    for _ in range(7):
        task = (await stub.UpdateStatus(status_update(task, S.STATUS_EXECUTING))).task
    seen: list[int] = []
    token = ""
    while True:
        page = await stub.GetTaskHistory(
            pb.GetTaskHistoryRequest(task_id=task.version.task_id, page_size=3, page_token=token)
        )
        seen.extend(e.status_version for e in page.entries)
        token = page.page_token
        if not token:
            break
    assert seen == list(range(1, 10))
