"""Task inputs and outputs: a task held until its last input is attached, outputs that
belong to the attempt that made them, and agents that fetch and save them (agent_kit)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import anyio
import grpc
import pytest

from agent_kit import Agent, OperatorClient, SyncOperatorClient, TaskContext, task_outputs
from task_manager.clock import ManualClock
from task_manager.server import TaskManagerServer
from task_manager.v1 import task_manager_pb2 as pb
from tests.helpers import AsyncStub, ServerProcess, create_request, running, status_update
from tests.test_dispatch import listen, next_request
from tests.test_payloads import ref_of, refusal, upload

pytestmark = pytest.mark.anyio
S = pb.Status
MESH, MAP = b"a mesh of the north field", b"a map of the north field"


def held(*pending: str, **attached: pb.PayloadRef) -> pb.CreateTaskRequest:
    """A task for agent-1 with inputs still to be attached, and inputs given."""
    request = create_request("agent-1")
    for name in pending:
        request.inputs.add(name=name)
    for name, payload in attached.items():
        request.inputs.add(name=name, payload=payload)
    return request


def attach(task: pb.Task, name: str, payload: pb.PayloadRef) -> pb.AttachInputRequest:
    return pb.AttachInputRequest(task_id=task.version.task_id, name=name, payload=payload)


async def get(stub: AsyncStub, task_id: str) -> pb.Task:
    return (await stub.GetTask(pb.GetTaskRequest(task_id=task_id))).task


async def statuses_in_history(stub: AsyncStub, task_id: str) -> list[int]:
    request = pb.GetTaskHistoryRequest(task_id=task_id)
    return [e.status.status for e in (await stub.GetTaskHistory(request)).entries]


async def test_a_task_is_held_until_its_last_input_and_its_agent_gets_only_references(
    stub: AsyncStub,
) -> None:
    mesh, map_ = (await upload(stub, MESH)).payload, (await upload(stub, MAP)).payload
    call = listen(stub, "agent-1")
    try:
        task = (await stub.CreateTask(held("mesh", map=map_))).task
        assert task.status.status == S.STATUS_CREATED
        assert list(task.pending_inputs) == ["mesh"]
        assert [(i.name, i.HasField("payload")) for i in task.inputs] == [
            ("mesh", False),
            ("map", True),
        ]
        released = (await stub.AttachInput(attach(task, "mesh", mesh))).task
        assert released.status.status == S.STATUS_SENT
        assert not released.pending_inputs
        # The first request the agent gets is the release: nothing came while it was held.
        first = await next_request(call)
        sent = first.execute_request.task
        assert sent.version == released.version
        assert {i.name: i.payload for i in sent.inputs} == {"mesh": mesh, "map": map_}
    finally:
        call.cancel()
    history = await statuses_in_history(stub, task.version.task_id)
    assert history == [S.STATUS_CREATED, S.STATUS_SENT]  # the last attach is the release


async def test_concurrent_attaches_of_the_last_inputs_release_the_task_once(
    stub: AsyncStub,
) -> None:
    names = [f"part-{n}" for n in range(4)]
    refs = [(await upload(stub, name.encode() * 10)).payload for name in names]
    tasks = [(await stub.CreateTask(held(*names))).task for _ in range(5)]
    answers: list[pb.Task] = []

    async def attach_one(task: pb.Task, name: str, payload: pb.PayloadRef) -> None:
        answers.append((await stub.AttachInput(attach(task, name, payload))).task)

    async with anyio.create_task_group() as group:
        for task in tasks:
            for name, payload in zip(names, refs, strict=True):
                group.start_soon(attach_one, task, name, payload)
    assert sum(answer.status.status == S.STATUS_SENT for answer in answers) == len(tasks)
    for task in tasks:
        final = await get(stub, task.version.task_id)
        assert final.status.status == S.STATUS_SENT
        assert final.attempt == 1
        assert {i.name: i.payload for i in final.inputs} == dict(zip(names, refs, strict=True))
        history = await statuses_in_history(stub, task.version.task_id)
        assert history.count(S.STATUS_SENT) == 1
        assert len(history) == 1 + len(names)


async def test_bad_attaches_and_creates_are_refused_and_change_nothing(stub: AsyncStub) -> None:
    mesh, map_ = (await upload(stub, MESH)).payload, (await upload(stub, MAP)).payload
    task = (await stub.CreateTask(held("mesh", "map"))).task
    task_id = task.version.task_id
    unknown = ref_of(b"never uploaded")
    cases = [
        (attach(task, "mesh", unknown), grpc.StatusCode.NOT_FOUND, "payload"),
        (attach(task, "wheels", mesh), grpc.StatusCode.INVALID_ARGUMENT, "no input 'wheels'"),
        (
            attach(task, "mesh", pb.PayloadRef(sha256=mesh.sha256, size=mesh.size + 1)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "payload.size",
        ),
        (attach(task, "bad name!", mesh), grpc.StatusCode.INVALID_ARGUMENT, "name"),
        (
            pb.AttachInputRequest(task_id=task_id, name="mesh"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "payload",
        ),
    ]
    for request, code, said in cases:
        got, details = await refusal(stub.AttachInput(request))
        assert (got, said in details) == (code, True), (request, details)
    assert await get(stub, task_id) == task

    attached = (await stub.AttachInput(attach(task, "mesh", mesh))).task
    again = (await stub.AttachInput(attach(task, "mesh", mesh))).task
    assert again == attached  # a retry: nothing changes
    got, details = await refusal(stub.AttachInput(attach(task, "mesh", map_)))
    assert got == grpc.StatusCode.FAILED_PRECONDITION
    assert "attached once" in details
    await stub.CancelTask(pb.CancelTaskRequest(task_id=task_id))
    got, _ = await refusal(stub.AttachInput(attach(task, "map", map_)))
    assert got == grpc.StatusCode.FAILED_PRECONDITION

    before = (await stub.QueryTasks(pb.QueryTasksRequest())).tasks
    bad_creates = [
        (held("mesh", "mesh"), "inputs[1].name"),
        (held(map=unknown), "inputs[0].payload"),
        (held(map=pb.PayloadRef(sha256="ab", size=1)), "inputs[0].payload.sha256"),
        (held(*[f"in{n}" for n in range(65)]), "inputs"),
    ]
    for create, field in bad_creates:
        got, details = await refusal(stub.CreateTask(create))
        assert got in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND)
        assert details.startswith(field), details
    assert (await stub.QueryTasks(pb.QueryTasksRequest())).tasks == before


async def test_a_retried_create_with_its_inputs_attached_since_is_the_same_task(
    stub: AsyncStub,
) -> None:
    mesh, map_ = (await upload(stub, MESH)).payload, (await upload(stub, MAP)).payload
    request = held("mesh", map=map_)
    request.task_id = "held-task-1"
    first = (await stub.CreateTask(request)).task
    await stub.AttachInput(attach(first, "mesh", mesh))
    retried = await stub.CreateTask(request)
    assert retried.already_existed
    assert retried.task.status.status == S.STATUS_SENT
    other = held("mesh", map=mesh)
    other.task_id = "held-task-1"
    got, details = await refusal(stub.CreateTask(other))
    assert got == grpc.StatusCode.ALREADY_EXISTS
    assert "inputs" in details


async def test_the_last_input_of_a_scheduled_task_schedules_it(
    clocked: tuple[TaskManagerServer, ManualClock],
) -> None:
    server, clock = clocked
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = AsyncStub(channel)
        mesh = (await upload(stub, MESH)).payload
        request = held("mesh")
        request.scheduled_time.FromNanoseconds(clock.now_ns() + 3_600 * 10**9)
        task = (await stub.CreateTask(request)).task
        assert task.status.status == S.STATUS_CREATED
        scheduled = (await stub.AttachInput(attach(task, "mesh", mesh))).task
        assert scheduled.status.status == S.STATUS_SCHEDULED_IN_MANAGER


async def test_outputs_belong_to_their_attempt_and_the_results_are_the_successful_ones(
    stub: AsyncStub,
) -> None:
    first_log, second_log = (await upload(stub, b"log 1")).payload, (await upload(stub, b"log 2"))
    second_log_ref = second_log.payload
    request = create_request("agent-1")
    request.policy.max_attempts = 2
    task = (await stub.CreateTask(request)).task
    task_id = task.version.task_id

    def output(attempt: int, name: str, payload: pb.PayloadRef) -> pb.AttachOutputRequest:
        return pb.AttachOutputRequest(task_id=task_id, attempt=attempt, name=name, payload=payload)

    got, details = await refusal(stub.AttachOutput(output(1, "log", first_log)))
    assert got == grpc.StatusCode.FAILED_PRECONDITION
    assert "MACHINE_RECEIPT" in details  # still SENT
    task = (await stub.UpdateStatus(status_update(task, S.STATUS_MACHINE_RECEIPT))).task
    task = (await stub.AttachOutput(output(1, "log", first_log))).task
    assert [(o.name, o.payload) for o in task.attempts[0].outputs] == [("log", first_log)]
    assert (await stub.AttachOutput(output(1, "log", first_log))).task == task  # a retry
    got, _ = await refusal(stub.AttachOutput(output(1, "log", second_log_ref)))
    assert got == grpc.StatusCode.FAILED_PRECONDITION
    assert task_outputs(task) == {}  # no attempt has succeeded

    failed = pb.TaskError(code=pb.ERROR_CODE_FAILED, message="the rotor stalled")
    task = (
        await stub.UpdateStatus(status_update(task, S.STATUS_DONE_NOT_OK, task_error=failed))
    ).task
    assert (task.attempt, task.status.status) == (2, S.STATUS_SENT)
    got, details = await refusal(stub.AttachOutput(output(1, "late", first_log)))
    assert got == grpc.StatusCode.FAILED_PRECONDITION
    assert "attempt 1" in details
    task = (await stub.UpdateStatus(status_update(task, S.STATUS_MACHINE_RECEIPT))).task
    task = (await stub.AttachOutput(output(2, "log", second_log_ref))).task
    task = (await stub.UpdateStatus(status_update(task, S.STATUS_DONE_OK))).task
    assert [o.payload for o in task.attempts[0].outputs] == [first_log]
    assert task_outputs(task) == {"log": second_log_ref}
    got, _ = await refusal(stub.AttachOutput(output(2, "more", first_log)))
    assert got == grpc.StatusCode.FAILED_PRECONDITION  # the task has ended


async def test_a_session_shares_an_input_among_its_tasks(stub: AsyncStub) -> None:
    mesh = (await upload(stub, MESH)).payload
    tasks = [held(mesh=mesh) for _ in range(3)] + [held("late")]
    submitted = await stub.SubmitSessions(
        pb.SubmitSessionsRequest(sessions=[pb.SessionSubmission(tasks=tasks)])
    )
    (session,) = submitted.sessions
    found = [await get(stub, task_id) for task_id in session.task_ids]
    assert [t.status.status for t in found] == [S.STATUS_SENT] * 3 + [S.STATUS_CREATED]
    assert all(t.inputs[0].payload == mesh for t in found[:3])
    unknown = held(mesh=ref_of(b"not stored"))
    got, details = await refusal(
        stub.SubmitSessions(
            pb.SubmitSessionsRequest(sessions=[pb.SessionSubmission(tasks=[unknown])])
        )
    )
    assert got == grpc.StatusCode.NOT_FOUND
    assert details.startswith("sessions[0].tasks[0].inputs[0].payload")


async def test_an_agent_fetches_its_inputs_and_saves_outputs_the_operator_downloads(
    server: TaskManagerServer, client: OperatorClient, tmp_path: Path
) -> None:
    mesh_file = tmp_path / "mesh.bin"
    mesh_file.write_bytes(MESH * 1000)
    seen: list[bytes] = []

    async def survey(task: TaskContext) -> None:
        mesh = await task.input("mesh")
        again = await task.input("mesh")  # cached: the same file
        assert again == mesh
        seen.append(mesh.read_bytes())
        with pytest.raises(KeyError, match="no input 'wheels'"):
            await task.input("wheels")
        await task.save_output("log", b"surveyed " + str(len(seen[-1])).encode())
        await task.save_output("map", mesh)  # a path: its content
        await task.progress("saved")

    agent = Agent(server.address, "agent-1", survey, input_cache=tmp_path / "cache")
    async with running(agent):
        task = await client.create_task(
            assignee_entity_id="agent-1", inputs={"mesh": mesh_file, "notes": b"windy"}
        )
        done = await client.wait(task.version.task_id)
    assert done.status.status == S.STATUS_DONE_OK
    assert seen == [MESH * 1000]
    written = await client.download_outputs(task.version.task_id, tmp_path / "results")
    assert {name: path.read_bytes() for name, path in written.items()} == {
        "log": f"surveyed {len(MESH) * 1000}".encode(),
        "map": MESH * 1000,
    }


async def test_an_operator_attaches_the_input_that_releases_a_held_task(
    server: TaskManagerServer, client: OperatorClient, tmp_path: Path
) -> None:
    got: list[bytes] = []

    async def read(task: TaskContext) -> None:
        got.append((await task.input("mesh")).read_bytes())

    async with running(Agent(server.address, "agent-1", read, input_cache=tmp_path)):
        task = await client.create_task(assignee_entity_id="agent-1", inputs={"mesh": None})
        assert list(task.pending_inputs) == ["mesh"]
        await client.attach_input(task.version.task_id, "mesh", MESH)
        done = await client.wait(task.version.task_id)
    assert (done.status.status, got) == (S.STATUS_DONE_OK, [MESH])
    unfinished = await client.create_task(assignee_entity_id="nobody")
    with pytest.raises(ValueError, match="no successful attempt"):
        await client.download_outputs(unfinished.version.task_id, tmp_path / "none")


def test_the_sync_sdk_creates_with_inputs_and_downloads_outputs(
    database: str, tmp_path: Path
) -> None:
    server = ServerProcess(database).start()
    try:
        with SyncOperatorClient(server.address) as client:
            task = client.create_task(assignee_entity_id="agent-1", inputs={"mesh": None})
            task = client.attach_input(task.version.task_id, "mesh", MESH)
            assert task.status.status == S.STATUS_SENT
            with pytest.raises(ValueError, match="no successful attempt"):
                client.download_outputs(task.version.task_id, tmp_path)
    finally:
        assert server.terminate() == 0


async def test_a_deadline_in_the_past_is_no_reason_to_hold(stub: AsyncStub) -> None:
    # A scheduled_time already passed releases at once, like a create without inputs.
    mesh = (await upload(stub, MESH)).payload
    request = held("mesh")
    request.scheduled_time.FromDatetime(datetime.now(UTC) - timedelta(hours=1))
    task = (await stub.CreateTask(request)).task
    assert (await stub.AttachInput(attach(task, "mesh", mesh))).task.status.status == S.STATUS_SENT
