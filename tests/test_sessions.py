"""Sessions: many tasks submitted at once, stored all or none, followed as one."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration

from task_manager.clock import ManualClock
from task_manager.v1 import task_manager_pb2 as pb
from tests.helpers import AsyncStub, create_request, status_update
from tests.test_liveness import Harness

pytestmark = pytest.mark.anyio
S = pb.Status
State = pb.SessionState


def session(
    *tasks: pb.CreateTaskRequest, session_id: str = "", timeout_s: int | None = None
) -> pb.SessionSubmission:
    submission = pb.SessionSubmission(session_id=session_id, tasks=tasks, display_name="survey")
    if timeout_s is not None:
        submission.timeout.CopyFrom(Duration(seconds=timeout_s))
    return submission


def tasks(count: int, prefix: str = "", entity_id: str = "agent-1") -> list[pb.CreateTaskRequest]:
    return [
        create_request(entity_id, task_id=f"{prefix}{n:05d}" if prefix else "")
        for n in range(count)
    ]


async def submit(stub: AsyncStub, *sessions: pb.SessionSubmission) -> list[pb.SubmittedSession]:
    response = await stub.SubmitSessions(pb.SubmitSessionsRequest(sessions=sessions))
    return list(response.sessions)


async def get_session(stub: AsyncStub, session_id: str) -> pb.Session:
    return (await stub.GetSession(pb.GetSessionRequest(session_id=session_id))).session


async def session_tasks(stub: AsyncStub, session_id: str) -> list[pb.Task]:
    response = await stub.QueryTasks(pb.QueryTasksRequest(session_id=session_id))
    return list(response.tasks)


def counts(session: pb.Session) -> dict[int, int]:
    return {count.status: count.count for count in session.counts}


async def walk(stub: AsyncStub, task: pb.Task, *walked: pb.Status.ValueType) -> pb.Task:
    for status in walked:
        task = (await stub.UpdateStatus(status_update(task, status))).task
    return task


async def test_a_session_is_stored_with_its_tasks_and_followed_to_completed(
    stub: AsyncStub,
) -> None:
    (submitted,) = await submit(stub, session(*tasks(3)))
    assert len(submitted.task_ids) == 3 and not submitted.already_existed
    stored = await session_tasks(stub, submitted.session_id)
    assert [task.version.task_id for task in stored] == list(submitted.task_ids)
    assert {task.session_id for task in stored} == {submitted.session_id}
    assert {task.status.status for task in stored} == {S.STATUS_SENT}

    pending = await get_session(stub, submitted.session_id)
    assert pending.state == State.SESSION_STATE_PENDING
    assert (pending.task_count, counts(pending)) == (3, {S.STATUS_SENT: 3})
    assert pending.display_name == "survey" and not pending.HasField("end_time")

    first = await walk(stub, stored[0], S.STATUS_EXECUTING)
    running = await get_session(stub, submitted.session_id)
    assert running.state == State.SESSION_STATE_RUNNING
    assert counts(running) == {S.STATUS_SENT: 2, S.STATUS_EXECUTING: 1}

    finished = [await walk(stub, first, S.STATUS_DONE_OK)]
    for task in stored[1:]:
        finished.append(await walk(stub, task, S.STATUS_EXECUTING, S.STATUS_DONE_OK))
    completed = await get_session(stub, submitted.session_id)
    assert completed.state == State.SESSION_STATE_COMPLETED
    assert counts(completed) == {S.STATUS_DONE_OK: 3}
    newest = max(task.last_update_time.ToNanoseconds() for task in finished)
    assert completed.end_time.ToNanoseconds() == newest


async def test_a_session_with_a_task_that_failed_is_failed_once_all_finished(
    stub: AsyncStub,
) -> None:
    (submitted,) = await submit(stub, session(*tasks(2)))
    first, second = await session_tasks(stub, submitted.session_id)
    await walk(stub, first, S.STATUS_EXECUTING, S.STATUS_DONE_NOT_OK)
    still = await get_session(stub, submitted.session_id)
    assert still.state == State.SESSION_STATE_RUNNING  # the other task still runs
    await walk(stub, second, S.STATUS_EXECUTING, S.STATUS_DONE_OK)
    failed = await get_session(stub, submitted.session_id)
    assert failed.state == State.SESSION_STATE_FAILED
    assert counts(failed) == {S.STATUS_DONE_OK: 1, S.STATUS_DONE_NOT_OK: 1}


async def test_cancelling_a_session_cancels_its_unfinished_tasks(stub: AsyncStub) -> None:
    unassigned = create_request(None, is_executed_elsewhere=False)
    (submitted,) = await submit(stub, session(*tasks(3), unassigned))
    done, executing, sent, never_sent = await session_tasks(stub, submitted.session_id)
    await walk(stub, done, S.STATUS_EXECUTING, S.STATUS_DONE_OK)
    await walk(stub, executing, S.STATUS_EXECUTING)

    response = await stub.CancelSession(
        pb.CancelSessionRequest(session_id=submitted.session_id, reason="field flooded")
    )
    assert response.session.state == State.SESSION_STATE_CANCELLED
    assert response.session.HasField("end_time")
    after = {task.version.task_id: task for task in await session_tasks(stub, submitted.session_id)}
    assert after[done.version.task_id].status.status == S.STATUS_DONE_OK
    # With an agent: asked to cancel. Never sent: ended at once.
    assert after[executing.version.task_id].status.status == S.STATUS_CANCEL_REQUESTED
    assert after[sent.version.task_id].status.status == S.STATUS_CANCEL_REQUESTED
    ended = after[never_sent.version.task_id]
    assert ended.status.status == S.STATUS_DONE_NOT_OK
    assert ended.status.task_error.message == "field flooded"
    # Cancelling again changes nothing.
    again = await stub.CancelSession(pb.CancelSessionRequest(session_id=submitted.session_id))
    assert again.session == await get_session(stub, submitted.session_id)


async def test_several_sessions_in_one_request_each_get_their_id(stub: AsyncStub) -> None:
    submitted = await submit(
        stub, session(*tasks(2)), session(*tasks(1), session_id="named-session")
    )
    assert [len(s.task_ids) for s in submitted] == [2, 1]
    assert submitted[1].session_id == "named-session"
    for one in submitted:
        assert (await get_session(stub, one.session_id)).task_count == len(one.task_ids)


async def test_a_session_retried_with_its_id_answers_the_same_tasks_and_writes_nothing(
    stub: AsyncStub,
) -> None:
    submission = session(*tasks(3), session_id="retried-1")
    (first,) = await submit(stub, submission)
    before = await session_tasks(stub, "retried-1")
    (retried,) = await submit(stub, submission)
    assert retried.already_existed
    assert list(retried.task_ids) == list(first.task_ids)
    assert await session_tasks(stub, "retried-1") == before
    changed = session(*tasks(2), session_id="retried-1")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await submit(stub, changed)
    assert refused.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "session_id retried-1 is already taken" in (refused.value.details() or "")


async def test_a_session_id_retried_by_another_author_is_already_exists(stub: AsyncStub) -> None:
    def by(user: str) -> pb.SubmitSessionsRequest:
        return pb.SubmitSessionsRequest(
            sessions=[session(*tasks(1, prefix="mine-"), session_id="authored-1")],
            author=pb.Principal(user=pb.User(user_id=user)),
        )

    await stub.SubmitSessions(by("op-1"))
    assert (await stub.SubmitSessions(by("op-1"))).sessions[0].already_existed
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.SubmitSessions(by("op-2"))
    assert refused.value.code() == grpc.StatusCode.ALREADY_EXISTS


async def test_a_session_whose_received_task_waits_for_a_retry_is_still_running(
    stub: AsyncStub,
) -> None:
    retried = create_request(
        policy=pb.TaskPolicy(max_attempts=2, retry_backoff=Duration(seconds=600))
    )
    (submitted,) = await submit(stub, session(retried))
    (task,) = await session_tasks(stub, submitted.session_id)
    failed = pb.TaskError(code=pb.ERROR_CODE_FAILED, message="try later")
    executing = await walk(stub, task, S.STATUS_EXECUTING)
    await stub.UpdateStatus(status_update(executing, S.STATUS_DONE_NOT_OK, task_error=failed))
    waiting = await get_session(stub, submitted.session_id)
    assert counts(waiting) == {S.STATUS_SCHEDULED_IN_MANAGER: 1}
    assert waiting.state == State.SESSION_STATE_RUNNING  # received once: never PENDING again


async def test_a_session_with_a_taken_task_id_stores_nothing(stub: AsyncStub) -> None:
    await stub.CreateTask(create_request(task_id="taken-00002", display_name="elsewhere"))
    before = (await stub.QueryTasks(pb.QueryTasksRequest())).tasks
    submission = session(*tasks(4, prefix="taken-"), session_id="all-or-none")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await submit(stub, session(*tasks(1, prefix="first-")), submission)
    assert refused.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert refused.value.details() == (
        "sessions[1].tasks[2].task_id: task_id taken-00002 is already taken by another task"
        " created with another display_name"
    )
    # Nothing of either session was stored: not the tasks before the taken one, not the
    # session, not the first session.
    assert (await stub.QueryTasks(pb.QueryTasksRequest())).tasks == before
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await get_session(stub, "all-or-none")
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND


async def test_watching_a_session_sees_only_its_tasks(stub: AsyncStub) -> None:
    await stub.CreateTask(create_request())
    (submitted,) = await submit(stub, session(*tasks(2)))
    watch = stub.WatchTasks(
        pb.WatchTasksRequest(
            filter=pb.WatchFilter(session_id=submitted.session_id), include_preexisting=True
        )
    )
    seen = []
    async for response in watch:
        if response.WhichOneof("message") == "heartbeat":
            break
        seen.append(response.event.task.version.task_id)
    watch.cancel()
    assert sorted(seen) == sorted(submitted.task_ids)


@pytest.fixture
async def harness(database: str) -> AsyncIterator[Harness]:
    running = await Harness(database, ManualClock()).start()
    yield running
    await running.stop()


async def test_a_session_whose_timeout_passes_is_failed_and_its_tasks_cancelled(
    harness: Harness,
) -> None:
    stub = harness.stub
    unassigned = create_request(None)
    (submitted,) = await submit(stub, session(*tasks(3), unassigned, timeout_s=60))
    done, executing, sent, never_sent = await session_tasks(stub, submitted.session_id)
    await walk(stub, done, S.STATUS_EXECUTING, S.STATUS_DONE_OK)
    await walk(stub, executing, S.STATUS_EXECUTING)
    pending = await get_session(stub, submitted.session_id)
    assert pending.deadline.ToNanoseconds() == pending.create_time.ToNanoseconds() + 60 * 10**9
    harness.clock.advance(59)
    await harness.settled()
    assert (await get_session(stub, submitted.session_id)).state == State.SESSION_STATE_RUNNING
    harness.clock.advance(1)
    await harness.settled()

    failed = await get_session(stub, submitted.session_id)
    assert failed.state == State.SESSION_STATE_FAILED and failed.timed_out
    assert failed.end_time.ToNanoseconds() == harness.clock.now_ns()
    assert not failed.HasField("deadline")
    after = {task.version.task_id: task for task in await session_tasks(stub, submitted.session_id)}
    assert after[done.version.task_id].status.status == S.STATUS_DONE_OK
    assert after[executing.version.task_id].status.status == S.STATUS_CANCEL_REQUESTED
    assert after[sent.version.task_id].status.status == S.STATUS_CANCEL_REQUESTED
    ended = after[never_sent.version.task_id].status
    assert ended.status == S.STATUS_DONE_NOT_OK
    assert ended.task_error.message == "the session's timeout (60 s) passed"
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.CancelSession(pb.CancelSessionRequest(session_id=submitted.session_id))
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_a_session_finished_before_its_timeout_stays_completed(harness: Harness) -> None:
    stub = harness.stub
    (submitted,) = await submit(stub, session(*tasks(1), timeout_s=60))
    (task,) = await session_tasks(stub, submitted.session_id)
    await walk(stub, task, S.STATUS_EXECUTING, S.STATUS_DONE_OK)
    harness.clock.advance(61)
    await harness.settled()
    completed = await get_session(stub, submitted.session_id)
    assert completed.state == State.SESSION_STATE_COMPLETED and not completed.timed_out
    # The timekeeper acted on the deadline (dropped it) without timing the session out.
    assert harness.server is not None
    found = await harness.server.store.get_session(submitted.session_id)
    assert found is not None and found[0].deadline_ns is None


LIMIT = 10_000


BIG_SESSION = session(*[create_request(description="d" * 16_000)] * 200)
"""Over the 3 MiB a session may take (--limit session_bytes), under the 4 MiB of a request."""


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (pb.SubmitSessionsRequest(), "sessions: is empty"),
        (pb.SubmitSessionsRequest(sessions=[session()]), "sessions[0].tasks: is empty"),
        (
            pb.SubmitSessionsRequest(
                sessions=[
                    session(create_request(task_id="twice-1"), create_request(task_id="twice-1"))
                ]
            ),
            "sessions[0].tasks[1].task_id: twice-1 is also sessions[0].tasks[0]'s",
        ),
        (
            pb.SubmitSessionsRequest(
                sessions=[
                    session(create_request(), session_id="same-session"),
                    session(create_request(), session_id="same-session"),
                ]
            ),
            "sessions[1].session_id: same-session is also sessions[0]'s",
        ),
        (
            pb.SubmitSessionsRequest(
                sessions=[session(create_request(), create_request(display_name="x" * 257))]
            ),
            "sessions[0].tasks[1].display_name: ",
        ),
        (
            pb.SubmitSessionsRequest(sessions=[session(create_request(), session_id="bad id")]),
            "sessions[0].session_id: ",
        ),
        (
            pb.SubmitSessionsRequest(sessions=[session(create_request(), timeout_s=0)]),
            "sessions[0].timeout: must be more than 0",
        ),
        (
            pb.SubmitSessionsRequest(
                sessions=[session(*[pb.CreateTaskRequest()] * (LIMIT // 2 + 1))] * 2
            ),
            f"sessions: hold {2 * (LIMIT // 2 + 1)} tasks in all; at most {LIMIT} a request",
        ),
        (
            pb.SubmitSessionsRequest(sessions=[session(create_request()), BIG_SESSION]),
            f"sessions[1]: is {BIG_SESSION.ByteSize()} bytes, more than {3 << 20}",
        ),
    ],
    ids=[
        "no session",
        "no task",
        "duplicate task id",
        "duplicate session id",
        "bad task field",
        "bad session id",
        "zero timeout",
        "too many tasks",
        "too many bytes",
    ],
)
async def test_a_bad_submission_is_invalid_argument_naming_the_field_and_stores_nothing(
    stub: AsyncStub, request_: pb.SubmitSessionsRequest, field: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.SubmitSessions(request_)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (refused.value.details() or "").startswith(field)
    assert not (await stub.QueryTasks(pb.QueryTasksRequest())).tasks


async def test_an_unknown_session_is_not_found_and_a_finished_one_cannot_be_cancelled(
    stub: AsyncStub,
) -> None:
    for call in (
        stub.GetSession(pb.GetSessionRequest(session_id="nobody-1")),
        stub.CancelSession(pb.CancelSessionRequest(session_id="nobody-1")),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await call
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        assert missing.value.details() == "session nobody-1 does not exist"
    (submitted,) = await submit(stub, session(*tasks(1)))
    (task,) = await session_tasks(stub, submitted.session_id)
    await walk(stub, task, S.STATUS_EXECUTING, S.STATUS_DONE_OK)
    with pytest.raises(grpc.aio.AioRpcError) as finished:
        await stub.CancelSession(pb.CancelSessionRequest(session_id=submitted.session_id))
    assert finished.value.code() == grpc.StatusCode.FAILED_PRECONDITION
