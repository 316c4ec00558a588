"""Scoped ids: task and session ids unique within a source application's scope, one
canonical "<scope>/<id>" everywhere, and credentials limited to scopes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from task_manager.auth import Role
from task_manager.server import TaskManagerServer
from task_manager.v1 import task_manager_pb2 as pb
from tests.helpers import AsyncStub, create_request, server_settings, stub_for, token_for
from tests.test_protocol_surface import lattice

pytestmark = pytest.mark.anyio
S = pb.Status
LOCAL_ID = "job-00001"


async def code_and_message(call: object) -> tuple[grpc.StatusCode, str]:
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as error:
        return error.code(), error.details() or ""
    return grpc.StatusCode.OK, ""


async def create(
    stub: AsyncStub, scope: str = "", task_id: str = LOCAL_ID, **fields: Any
) -> pb.Task:
    request = create_request(task_id=task_id, scope=scope, **fields)
    return (await stub.CreateTask(request)).task


async def test_the_same_id_in_two_scopes_is_two_tasks(stub: AsyncStub) -> None:
    alpha = await create(stub, "alpha", display_name="alpha's")
    beta = await create(stub, "beta", display_name="beta's")
    assert (alpha.version.task_id, alpha.scope) == (f"alpha/{LOCAL_ID}", "alpha")
    assert (beta.version.task_id, beta.scope) == (f"beta/{LOCAL_ID}", "beta")
    unscoped = await create(stub, display_name="nobody's")
    assert (unscoped.version.task_id, unscoped.scope) == (LOCAL_ID, "")
    for scope, expected in (("alpha", alpha), ("beta", beta), ("", unscoped)):
        by_pair = await stub.GetTask(pb.GetTaskRequest(task_id=LOCAL_ID, scope=scope))
        by_canonical = await stub.GetTask(pb.GetTaskRequest(task_id=expected.version.task_id))
        assert by_pair.task.display_name == by_canonical.task.display_name
        assert by_pair.task.version == expected.version
    # A retry in its scope is idempotent; the same id in another scope is not a retry.
    again = await stub.CreateTask(
        create_request(task_id=LOCAL_ID, scope="alpha", display_name="alpha's")
    )
    assert again.already_existed and again.task.version.task_id == f"alpha/{LOCAL_ID}"
    # Each scope's tasks, and only theirs.
    queried = await stub.QueryTasks(pb.QueryTasksRequest(scope="beta"))
    assert [task.version.task_id for task in queried.tasks] == [f"beta/{LOCAL_ID}"]
    everything = await stub.QueryTasks(pb.QueryTasksRequest())
    assert len(everything.tasks) == 3


async def test_every_rpc_that_takes_a_task_id_takes_the_scope(stub: AsyncStub) -> None:
    parent = await create(stub, "alpha", task_id="parent-1")
    child = await create(
        stub, "alpha", relations=pb.Relations(parent_task_id="parent-1"), task_id="child-1"
    )
    child = (await stub.GetTask(pb.GetTaskRequest(task_id="child-1", scope="alpha"))).task
    assert child.relations.parent_task_id == parent.version.task_id == "alpha/parent-1"
    # UpdateStatus: the agent may echo the canonical id or give the pair.
    update = pb.UpdateStatusRequest(
        status_update=pb.StatusUpdate(
            version=pb.TaskVersion(
                task_id="child-1", scope="alpha", status_version=child.version.status_version
            ),
            status=pb.TaskStatus(status=S.STATUS_MACHINE_RECEIPT),
        )
    )
    updated = (await stub.UpdateStatus(update)).task
    assert updated.version.task_id == "alpha/child-1" and not updated.version.scope
    assert updated.status.status == S.STATUS_MACHINE_RECEIPT
    history = await stub.GetTaskHistory(pb.GetTaskHistoryRequest(task_id="child-1", scope="alpha"))
    assert {entry.task_id for entry in history.entries} == {"alpha/child-1"}
    renamed = await stub.UpdateTask(
        pb.UpdateTaskRequest(
            task_id="child-1", scope="alpha", definition_version=1, display_name="renamed"
        )
    )
    assert renamed.task.display_name == "renamed"
    children = await stub.QueryTasks(pb.QueryTasksRequest(parent_task_id="parent-1", scope="alpha"))
    assert [task.version.task_id for task in children.tasks] == ["alpha/child-1"]
    watch = stub.WatchTasks(
        pb.WatchTasksRequest(
            filter=pb.WatchFilter(task_ids=["child-1"], scope="alpha"), include_preexisting=True
        )
    )
    first = await watch.read()
    assert isinstance(first, pb.WatchTasksResponse)
    assert first.event.task.version.task_id == "alpha/child-1"
    watch.cancel()
    cancelled = await stub.CancelTask(pb.CancelTaskRequest(task_id="child-1", scope="alpha"))
    assert cancelled.task.status.status == S.STATUS_CANCEL_REQUESTED
    completed = await stub.CompleteTask(pb.CompleteTaskRequest(task_id="parent-1", scope="alpha"))
    assert completed.task.version.task_id == "alpha/parent-1"


@pytest.mark.parametrize(
    ("fields", "field", "says"),
    [
        ({"task_id": "beta/job-00001", "scope": "alpha"}, "task_id", "is in scope 'beta'"),
        ({"task_id": LOCAL_ID, "scope": "al pha"}, "scope", "is not a scope"),
        ({"task_id": LOCAL_ID, "scope": "a" * 64}, "scope", "is not a scope"),
        ({"task_id": "/job-00001"}, "task_id", "is not a scope"),
        ({"task_id": "alpha/beta/job-00001"}, "task_id", "is not a task id"),
        ({"task_id": "alpha/x"}, "task_id", "is not a task id"),
        (
            {"task_id": LOCAL_ID, "scope": "alpha", "relations": {"parent_task_id": "beta/x"}},
            "relations.parent_task_id",
            "is not a task id",
        ),
    ],
    ids=[
        "disagreeing",
        "bad scope",
        "long scope",
        "empty scope",
        "two slashes",
        "short id",
        "parent",
    ],
)
async def test_a_bad_scoped_id_is_invalid_argument_and_stores_nothing(
    stub: AsyncStub, fields: dict[str, Any], field: str, says: str
) -> None:
    request = create_request(**fields)
    code, message = await code_and_message(stub.CreateTask(request))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert message.startswith(f"{field}: ") and says in message, message
    assert not (await stub.QueryTasks(pb.QueryTasksRequest())).tasks
    code, message = await code_and_message(
        stub.GetTask(pb.GetTaskRequest(task_id="beta/job-00001", scope="alpha"))
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "is in scope 'beta'" in message


async def test_a_session_in_a_scope_scopes_its_id_and_its_tasks(stub: AsyncStub) -> None:
    tasks = [
        create_request(task_id="part-00001"),
        create_request(task_id="part-00002", scope="alpha"),
    ]
    submission = pb.SessionSubmission(session_id="batch-1", scope="alpha", tasks=tasks)
    request = pb.SubmitSessionsRequest(sessions=[submission])
    (submitted,) = (await stub.SubmitSessions(request)).sessions
    assert submitted.session_id == "alpha/batch-1"
    assert list(submitted.task_ids) == ["alpha/part-00001", "alpha/part-00002"]
    (again,) = (await stub.SubmitSessions(request)).sessions
    assert again.already_existed and again.task_ids == submitted.task_ids
    session = await stub.GetSession(pb.GetSessionRequest(session_id="batch-1", scope="alpha"))
    assert session.session.session_id == "alpha/batch-1" and session.session.task_count == 2
    in_session = await stub.QueryTasks(pb.QueryTasksRequest(session_id="batch-1", scope="alpha"))
    assert {task.scope for task in in_session.tasks} == {"alpha"}
    # Generated ids are in the scope too.
    generated = pb.SessionSubmission(scope="beta", tasks=[create_request()])
    (made,) = (await stub.SubmitSessions(pb.SubmitSessionsRequest(sessions=[generated]))).sessions
    assert made.session_id.startswith("beta/") and made.task_ids[0].startswith("beta/")
    # A task of another scope in the session: nothing stored.
    mixed = pb.SessionSubmission(
        session_id="batch-2",
        scope="alpha",
        tasks=[create_request(task_id="part-00003"), create_request(task_id="beta/part-00004")],
    )
    code, message = await code_and_message(
        stub.SubmitSessions(pb.SubmitSessionsRequest(sessions=[mixed]))
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert message.startswith("sessions[0].tasks[1].task_id: "), message
    code, _ = await code_and_message(
        stub.GetTask(pb.GetTaskRequest(task_id="part-00003", scope="alpha"))
    )
    assert code == grpc.StatusCode.NOT_FOUND


@pytest.fixture
async def scoped_server(database: str) -> AsyncIterator[tuple[TaskManagerServer, dict[str, str]]]:
    """A server with authentication on: an operator of each scope, an operator of both,
    an admin, and an agent per scope's assignee."""
    tokens = {
        "admin": token_for(database, "root", Role.ADMIN)[1],
        "alpha": token_for(database, "alpha-app", Role.OPERATOR, scopes=["alpha"])[1],
        "beta": token_for(database, "beta-app", Role.OPERATOR, scopes=["beta"])[1],
        "both": token_for(database, "both-apps", Role.VIEWER, scopes=["alpha", "beta"])[1],
        "agent-a": token_for(database, "drone-a", Role.AGENT, "agent-a")[1],
        "agent-b": token_for(database, "drone-b", Role.AGENT, "agent-b")[1],
    }
    server = await TaskManagerServer.start(server_settings(database))
    yield server, tokens
    await server.stop()


async def test_a_credential_limited_to_a_scope_sees_only_its_tasks(
    scoped_server: tuple[TaskManagerServer, dict[str, str]],
) -> None:
    server, tokens = scoped_server
    async with grpc.aio.insecure_channel(server.address) as channel:
        alpha, beta = stub_for(channel, tokens["alpha"]), stub_for(channel, tokens["beta"])
        admin, both = stub_for(channel, tokens["admin"]), stub_for(channel, tokens["both"])
        # Each operator's unscoped id is read in its only scope.
        mine = await create(alpha, entity_id="agent-a", display_name="alpha's")
        theirs = await create(beta, entity_id="agent-b", display_name="beta's")
        assert mine.version.task_id == f"alpha/{LOCAL_ID}"
        assert theirs.version.task_id == f"beta/{LOCAL_ID}"
        unscoped = await create(admin, entity_id="agent-a", task_id="global-01")
        fetched = await alpha.GetTask(pb.GetTaskRequest(task_id=LOCAL_ID))
        assert fetched.task.display_name == "alpha's"
        for call in (
            alpha.GetTask(pb.GetTaskRequest(task_id=f"beta/{LOCAL_ID}")),
            alpha.GetTask(pb.GetTaskRequest(task_id=LOCAL_ID, scope="beta")),
            alpha.CancelTask(pb.CancelTaskRequest(task_id=LOCAL_ID, scope="beta")),
            alpha.GetTaskHistory(pb.GetTaskHistoryRequest(task_id=f"beta/{LOCAL_ID}")),
            alpha.QueryTasks(pb.QueryTasksRequest(scope="beta")),
            alpha.CreateTask(create_request(task_id="other-01", scope="beta")),
            alpha.SubmitSessions(
                pb.SubmitSessionsRequest(
                    sessions=[pb.SessionSubmission(scope="beta", tasks=[create_request()])]
                )
            ),
        ):
            code, message = await code_and_message(call)
            assert code == grpc.StatusCode.PERMISSION_DENIED, message
            assert "limited to ['alpha']" in message, message
        # An id without a scope is read in the credential's only scope: it cannot even
        # name an unscoped task. One of two scopes can name it, and is refused.
        code, message = await code_and_message(
            alpha.GetTask(pb.GetTaskRequest(task_id=unscoped.version.task_id))
        )
        assert code == grpc.StatusCode.NOT_FOUND and "alpha/global-01" in message, message
        code, message = await code_and_message(
            both.GetTask(pb.GetTaskRequest(task_id=unscoped.version.task_id))
        )
        assert code == grpc.StatusCode.PERMISSION_DENIED and "no scope" in message, message
        queried = await alpha.QueryTasks(pb.QueryTasksRequest())
        assert [task.version.task_id for task in queried.tasks] == [f"alpha/{LOCAL_ID}"]
        # A credential of two scopes reads both, and nothing unscoped.
        seen = await both.QueryTasks(pb.QueryTasksRequest())
        assert {task.version.task_id for task in seen.tasks} == {
            f"alpha/{LOCAL_ID}",
            f"beta/{LOCAL_ID}",
        }
        watch = alpha.WatchTasks(pb.WatchTasksRequest(include_preexisting=True))
        first = await watch.read()
        assert isinstance(first, pb.WatchTasksResponse)
        assert first.event.task.version.task_id == f"alpha/{LOCAL_ID}"
        marker = await watch.read()  # the snapshot ends: nothing of beta's came first
        assert isinstance(marker, pb.WatchTasksResponse) and marker.HasField("heartbeat")
        watch.cancel()
        # The agent of one scope's task cannot read or update the other's.
        agent_a = stub_for(channel, tokens["agent-a"])
        code, _ = await code_and_message(
            agent_a.GetTask(pb.GetTaskRequest(task_id=f"beta/{LOCAL_ID}"))
        )
        assert code == grpc.StatusCode.PERMISSION_DENIED
        foreign = pb.StatusUpdate(
            version=pb.TaskVersion(task_id=LOCAL_ID, scope="beta", status_version=2),
            status=pb.TaskStatus(status=S.STATUS_MACHINE_RECEIPT),
        )
        code, _ = await code_and_message(
            agent_a.UpdateStatus(pb.UpdateStatusRequest(status_update=foreign))
        )
        assert code == grpc.StatusCode.PERMISSION_DENIED
        listen = agent_a.ListenAsAgent(
            pb.ListenAsAgentRequest(entity_ids=pb.EntityIds(entity_ids=["agent-a"]))
        )
        received: set[str] = set()
        for _ in range(2):
            pushed = await listen.read()
            assert isinstance(pushed, pb.ListenAsAgentResponse)
            received.add(pushed.execute_request.task.version.task_id)
        assert received == {f"alpha/{LOCAL_ID}", "global-01"}
        listen.cancel()
        # What an agent holds is listed only within the caller's scopes.
        request = pb.ListAgentsRequest(entity_ids=["agent-a"])
        (everything,) = (await admin.ListAgents(request)).agents
        assert sorted(everything.held_task_ids) == [f"alpha/{LOCAL_ID}", "global-01"]
        (scoped,) = (await both.ListAgents(request)).agents
        assert list(scoped.held_task_ids) == [f"alpha/{LOCAL_ID}"]
        assert scoped.tasks_in_flight == 1
        # Task types are shared by every scope: a scoped operator cannot register one.
        code, message = await code_and_message(
            alpha.RegisterTaskType(pb.RegisterTaskTypeRequest(task_type=pb.TaskType(name="t")))
        )
        assert code == grpc.StatusCode.PERMISSION_DENIED and "shared by every scope" in message
        # Nothing of beta's changed.
        untouched = await beta.GetTask(pb.GetTaskRequest(task_id=LOCAL_ID))
        assert untouched.task.status.status == S.STATUS_SENT
        assert untouched.task.version.status_version == theirs.version.status_version


async def test_scopes_limit_only_operators_and_viewers(
    scoped_server: tuple[TaskManagerServer, dict[str, str]],
) -> None:
    server, tokens = scoped_server
    async with grpc.aio.insecure_channel(server.address) as channel:
        admin = stub_for(channel, tokens["admin"])
        for request, field in (
            (
                pb.AddCredentialRequest(
                    principal="d", role="agent", entity_ids=["d"], scopes=["alpha"]
                ),
                "scopes",
            ),
            (pb.AddCredentialRequest(principal="r", role="admin", scopes=["alpha"]), "scopes"),
            (pb.AddCredentialRequest(principal="o", role="operator", scopes=["al pha"]), "scopes"),
            (pb.AddCredentialRequest(principal="o", role="operator", scopes=[""]), "scopes"),
        ):
            code, message = await code_and_message(admin.AddCredential(request))
            assert code == grpc.StatusCode.INVALID_ARGUMENT and message.startswith(f"{field}: ")
        added = await admin.AddCredential(
            pb.AddCredentialRequest(
                principal="gamma-app", role="operator", scopes=["gamma", "gamma"]
            )
        )
        assert list(added.credential.scopes) == ["gamma"]
        listed = await admin.ListCredentials(pb.ListCredentialsRequest())
        by_principal = {c.principal: list(c.scopes) for c in listed.credentials}
        assert by_principal["alpha-app"] == ["alpha"] and by_principal["root"] == []
        gamma = stub_for(channel, added.token)
        made = await create(gamma)
        assert made.version.task_id == f"gamma/{LOCAL_ID}"


async def test_a_lattice_client_works_in_its_credentials_scope(
    scoped_server: tuple[TaskManagerServer, dict[str, str]],
) -> None:
    """A Lattice client knows task_id only: given a one-scope token it creates, reads
    and follows tasks by its own ids, and its agents report on the canonical ids they
    receive."""
    server, tokens = scoped_server
    async with (
        grpc.aio.insecure_channel(server.address) as operator_channel,
        grpc.aio.insecure_channel(server.address) as agent_channel,
    ):
        operator_metadata = (("authorization", f"Bearer {tokens['alpha']}"),)
        agent_metadata = (("authorization", f"Bearer {tokens['agent-a']}"),)
        listen = agent_channel.unary_stream(
            "/anduril.taskmanager.v1.TaskManagerAPI/ListenAsAgent",
            request_serializer=pb.ListenAsAgentRequest.SerializeToString,
            response_deserializer=pb.ListenAsAgentResponse.FromString,
        )(
            pb.ListenAsAgentRequest(entity_ids=pb.EntityIds(entity_ids=["agent-a"])),
            metadata=agent_metadata,
        )
        await listen.initial_metadata()
        created = await lattice(operator_channel, "CreateTask", pb.CreateTaskResponse)(
            create_request("agent-a", task_id=LOCAL_ID), metadata=operator_metadata
        )
        assert created.task.version.task_id == f"alpha/{LOCAL_ID}"
        message = await listen.read()
        assert isinstance(message, pb.ListenAsAgentResponse)
        received = message.execute_request.task
        assert received.version.task_id == f"alpha/{LOCAL_ID}"
        update = pb.UpdateStatusRequest(
            status_update=pb.StatusUpdate(
                version=received.version, status=pb.TaskStatus(status=S.STATUS_WILCO)
            )
        )
        await lattice(agent_channel, "UpdateStatus", pb.UpdateStatusResponse)(
            update, metadata=agent_metadata
        )
        fetched = await lattice(operator_channel, "GetTask", pb.GetTaskResponse)(
            pb.GetTaskRequest(task_id=LOCAL_ID), metadata=operator_metadata
        )
        assert fetched.task.status.status == S.STATUS_WILCO
        by_canonical = await lattice(operator_channel, "GetTask", pb.GetTaskResponse)(
            pb.GetTaskRequest(task_id=f"alpha/{LOCAL_ID}"), metadata=operator_metadata
        )
        assert by_canonical.task == fetched.task
        queried = await lattice(operator_channel, "QueryTasks", pb.QueryTasksResponse)(
            pb.QueryTasksRequest(), metadata=operator_metadata
        )
        assert [task.version.task_id for task in queried.tasks] == [f"alpha/{LOCAL_ID}"]
        listen.cancel()
