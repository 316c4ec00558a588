"""The operator clients reach every server feature, with typed arguments, against a real server.

Policy, scheduled_time, pool assignees, parent tasks, UpdateTask and ListAgents.
"""

from __future__ import annotations

import inspect
from datetime import UTC, datetime, timedelta

import anyio
import grpc
import pytest
from google.protobuf.wrappers_pb2 import StringValue

from agent_kit import DefinitionConflict, OperatorClient, SyncOperatorClient, TaskPolicy
from task_manager.v1 import task_manager_pb2 as pb
from tests.helpers import AsyncStub, ServerProcess

S = pb.Status
WAIT_S = 30.0
FULL_POLICY = TaskPolicy(
    receipt_timeout=1.5,
    heartbeat_timeout=3,
    execution_timeout=600,
    max_attempts=3,
    retry_backoff=0.25,
    max_retry_backoff=10,
)


@pytest.mark.anyio
async def test_create_task_sends_the_policy_and_the_task_carries_it(
    client: OperatorClient,
) -> None:
    task = await client.create_task(assignee_entity_id="drone-1", policy=FULL_POLICY)
    assert task.policy.heartbeat_timeout.ToTimedelta() == timedelta(seconds=3)
    assert task.policy.receipt_timeout.ToTimedelta() == timedelta(seconds=1.5)
    assert TaskPolicy.from_proto(task.policy) == FULL_POLICY
    stored = await client.get_task(task.version.task_id)
    assert TaskPolicy.from_proto(stored.policy) == FULL_POLICY


@pytest.mark.anyio
async def test_policy_fields_left_none_take_the_server_defaults(client: OperatorClient) -> None:
    default = await client.create_task(assignee_entity_id="drone-1")
    task = await client.create_task(assignee_entity_id="drone-1", policy=TaskPolicy(max_attempts=2))
    assert task.policy.max_attempts == 2
    assert task.policy.heartbeat_timeout == default.policy.heartbeat_timeout


@pytest.mark.anyio
@pytest.mark.parametrize(
    "policy",
    [
        TaskPolicy(heartbeat_timeout=-1),
        TaskPolicy(receipt_timeout=float("nan")),
        TaskPolicy(execution_timeout=float("inf")),
        TaskPolicy(max_attempts=-2),
    ],
)
async def test_a_policy_that_cannot_be_sent_is_refused_and_nothing_is_created(
    client: OperatorClient, policy: TaskPolicy
) -> None:
    with pytest.raises(ValueError, match="policy"):
        await client.create_task(assignee_entity_id="drone-1", policy=policy)
    assert [task async for task in client.query_tasks()] == []


@pytest.mark.anyio
async def test_a_future_scheduled_time_holds_the_task_until_then(client: OperatorClient) -> None:
    later = (datetime.now(UTC) + timedelta(hours=1)).replace(microsecond=0)
    task = await client.create_task(assignee_entity_id="drone-1", scheduled_time=later)
    assert task.status.status == S.STATUS_SCHEDULED_IN_MANAGER
    assert task.scheduled_time.ToDatetime(UTC) == later


@pytest.mark.anyio
async def test_a_naive_scheduled_time_is_refused_not_guessed(client: OperatorClient) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        await client.create_task(assignee_entity_id="drone-1", scheduled_time=datetime(2030, 1, 1))
    assert [task async for task in client.query_tasks()] == []


@pytest.mark.anyio
async def test_a_pool_task_goes_to_a_member_of_the_pool(
    client: OperatorClient, stub: AsyncStub
) -> None:
    member = stub.ListenAsAgent(
        pb.ListenAsAgentRequest(entity_ids=pb.EntityIds(entity_ids=["drone-2", "pool-a"]))
    )
    await member.initial_metadata()
    task = await client.create_task(assignee_pool="pool-a", display_name="any of you")
    assert task.relations.assignee.team.entity_id == "pool-a"
    with anyio.fail_after(WAIT_S):
        message = await member.read()
    assert isinstance(message, pb.ListenAsAgentResponse)
    assert message.execute_request.task.version.task_id == task.version.task_id
    member.cancel()


@pytest.mark.anyio
async def test_an_agent_and_a_pool_at_once_is_refused(client: OperatorClient) -> None:
    with pytest.raises(ValueError, match="one assignee"):
        await client.create_task(assignee_entity_id="drone-1", assignee_pool="pool-a")


@pytest.mark.anyio
async def test_a_child_task_is_found_by_its_parent(client: OperatorClient) -> None:
    parent = await client.create_task(assignee_entity_id="drone-1", display_name="mission")
    child = await client.create_task(
        assignee_entity_id="drone-1", parent_task_id=parent.version.task_id
    )
    assert child.relations.parent_task_id == parent.version.task_id
    children = [t async for t in client.query_tasks(parent_task_id=parent.version.task_id)]
    assert children == [child]


@pytest.mark.anyio
async def test_update_task_gives_a_new_definition_guarded_by_its_version(
    client: OperatorClient,
) -> None:
    task = await client.create_task(assignee_entity_id="drone-1", display_name="survey")
    task_id = task.version.task_id
    updated = await client.update_task(
        task_id,
        definition_version=1,
        display_name="survey the north field",
        specification=StringValue(value="north"),
    )
    assert updated.version.definition_version == 2
    assert updated.display_name == "survey the north field"
    assert updated.description == task.description  # left None: kept
    spec = StringValue()
    assert updated.specification.Unpack(spec)
    assert spec.value == "north"
    first = await client.get_task(task_id, definition_version=1)
    assert first.display_name == "survey"


@pytest.mark.anyio
async def test_a_stale_definition_version_is_a_definition_conflict_and_changes_nothing(
    client: OperatorClient,
) -> None:
    task = await client.create_task(assignee_entity_id="drone-1", display_name="survey")
    task_id = task.version.task_id
    await client.update_task(task_id, definition_version=1, description="first")
    with pytest.raises(DefinitionConflict) as conflict:
        await client.update_task(task_id, definition_version=1, description="second")
    assert conflict.value.code() == grpc.StatusCode.ABORTED
    assert isinstance(conflict.value, grpc.aio.AioRpcError)  # callers catching that still do
    assert conflict.value.current_definition_version == 2
    assert conflict.value.seen_definition_version == 1
    current = await client.get_task(task_id)
    assert (current.version.definition_version, current.description) == (2, "first")


@pytest.mark.anyio
async def test_list_agents_shows_a_listening_agent(client: OperatorClient, stub: AsyncStub) -> None:
    stream = stub.ListenAsAgent(
        pb.ListenAsAgentRequest(entity_ids=pb.EntityIds(entity_ids=["drone-7"]))
    )
    await stream.initial_metadata()
    await client.create_task(assignee_entity_id="drone-7")
    with anyio.fail_after(WAIT_S):
        await stream.read()
    (drone,) = await client.list_agents(["drone-7"])
    assert drone.entity_id == "drone-7"
    assert drone.state == pb.AGENT_STATE_CONNECTED
    assert drone.streams_open == 1
    assert drone.tasks_in_flight == 1
    assert [a.entity_id for a in await client.list_agents()] == ["drone-7"]
    stream.cancel()


@pytest.mark.parametrize(
    "method",
    [
        "create_task",
        "get_task",
        "query_tasks",
        "update_task",
        "list_agents",
        "watch",
        "wait",
        "submit_session",
        "get_session",
        "cancel_session",
        "wait_session",
        "session_results",
    ],
)
def test_the_sync_client_takes_exactly_the_async_clients_arguments(method: str) -> None:
    def parameters(cls: type[object]) -> list[tuple[str, object, object, object]]:
        signature = inspect.signature(getattr(cls, method))
        return [(p.name, p.kind, p.default, p.annotation) for p in signature.parameters.values()]

    assert parameters(SyncOperatorClient) == parameters(OperatorClient)


def test_the_sync_client_reaches_the_same_features(database: str) -> None:
    server = ServerProcess(database).start()
    try:
        with SyncOperatorClient(server.address) as client:
            parent = client.create_task(assignee_pool="pool-s", policy=FULL_POLICY)
            child = client.create_task(
                assignee_entity_id="drone-s",
                parent_task_id=parent.version.task_id,
                scheduled_time=datetime.now(UTC) + timedelta(hours=1),
            )
            assert TaskPolicy.from_proto(parent.policy) == FULL_POLICY
            assert child.status.status == S.STATUS_SCHEDULED_IN_MANAGER
            assert client.query_tasks(parent_task_id=parent.version.task_id) == [child]
            renamed = client.update_task(
                child.version.task_id, definition_version=1, display_name="renamed"
            )
            assert renamed.display_name == "renamed"
            with pytest.raises(DefinitionConflict):
                client.update_task(child.version.task_id, definition_version=1, description="x")
            assert client.list_agents() == []
    finally:
        assert server.terminate() == 0


# -- sessions -------------------------------------------------------------------------------


async def report(
    stub: AsyncStub, task: pb.Task, status: pb.Status.ValueType, **fields: object
) -> pb.Task:
    update = pb.StatusUpdate(
        version=pb.TaskVersion(
            task_id=task.version.task_id, status_version=task.version.status_version
        ),
        status=pb.TaskStatus(status=status, **fields),  # type: ignore[arg-type]
    )
    return (await stub.UpdateStatus(pb.UpdateStatusRequest(status_update=update))).task


@pytest.mark.anyio
async def test_a_submitted_session_is_waited_for_and_its_results_read(
    client: OperatorClient, stub: AsyncStub
) -> None:
    requests = [
        client.task_request(assignee_entity_id="drone-1", display_name=f"leg {n}") for n in range(3)
    ]
    submitted = await client.submit_session(requests, display_name="survey")
    tasks = [task async for task in client.query_tasks(session_id=submitted.session_id)]
    assert [task.version.task_id for task in tasks] == list(submitted.task_ids)

    async def walk_all() -> None:
        for n, task in enumerate(tasks):
            executing = await report(stub, task, S.STATUS_EXECUTING)
            result = pb.TaskStatus().result
            result.Pack(StringValue(value=f"leg {n} mapped"))
            await report(stub, executing, S.STATUS_DONE_OK, result=result)

    async with anyio.create_task_group() as group:
        waited: list[pb.Session] = []

        async def wait() -> None:
            waited.append(await client.wait_session(submitted.session_id, timeout=WAIT_S))

        group.start_soon(wait)
        await walk_all()
    (session,) = waited
    assert session.state == pb.SESSION_STATE_COMPLETED
    results = await client.session_results(submitted.session_id)
    assert list(results) == list(submitted.task_ids)
    unpacked = []
    for found in results.values():
        assert found is not None
        value = StringValue()
        found.Unpack(value)
        unpacked.append(value.value)
    assert unpacked == ["leg 0 mapped", "leg 1 mapped", "leg 2 mapped"]


def test_the_sync_client_waits_for_a_session_that_times_out(database: str) -> None:
    server = ServerProcess(database).start()
    try:
        with SyncOperatorClient(server.address) as client:
            unreceived = client.task_request(assignee_entity_id="nobody-listens")
            submitted = client.submit_session([unreceived, unreceived], timeout=0.5)
            session = client.wait_session(submitted.session_id, timeout=WAIT_S)
            assert session.state == pb.SESSION_STATE_FAILED and session.timed_out
            assert client.session_results(submitted.session_id) == {
                task_id: None for task_id in submitted.task_ids
            }
            assert client.get_session(submitted.session_id) == session
    finally:
        server.terminate()
