"""Every RPC x every role x (own / someone else's task): the expected status code.

Only admins manage credentials, so those RPCs appear in no other role's rights below.

The expected rights below are written from the security issue's roles table, not read
from the server's own table, so a mistake in either shows up here.
"""

from __future__ import annotations

import hashlib
import itertools
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool

from agent_kit._grpc import ClientAuth, open_stub
from storage import add_credential
from task_manager.auth import Role, new_token
from task_manager.server import TaskManagerServer
from task_manager.v1 import task_manager_pb2 as pb
from tests.helpers import AsyncStub, Databases, create_request, server_settings

pytestmark = pytest.mark.anyio
S = pb.Status
OWN_ENTITY, OTHER_ENTITY = "drone-1", "rover-1"

EXPECTED_RIGHTS: dict[str, set[str]] = {
    "operator": {
        "CreateTask",
        "UpdateTask",
        "CancelTask",
        "CompleteTask",
        "QueryTasks",
        "GetTask",
        "GetTaskHistory",
        "WatchTasks",
        "SubmitSessions",
        "GetSession",
        "CancelSession",
        "RegisterTaskType",
        "GetTaskType",
        "ListTaskTypes",
        "UploadPayload",
        "DownloadPayload",
        "StatPayload",
        "AttachInput",
    },
    "agent": {
        "ListenAsAgent",
        "UpdateStatus",
        "ReportStatus",
        "GetTask",
        "GetTaskHistory",
        "GetTaskType",
        "ListTaskTypes",
        "UploadPayload",
        "DownloadPayload",
        "StatPayload",
        "AttachOutput",
    },
    "viewer": {
        "GetTask",
        "QueryTasks",
        "GetTaskHistory",
        "WatchTasks",
        "ListAgents",
        "GetSession",
        "GetTaskType",
        "ListTaskTypes",
        "DownloadPayload",
        "StatPayload",
    },
}
AGENT_ONLY_OWN = {
    "ListenAsAgent",
    "UpdateStatus",
    "ReportStatus",
    "GetTask",
    "GetTaskHistory",
    "DownloadPayload",
    "StatPayload",
    "AttachOutput",
}
"""For these, an agent may act only on its own entity's tasks (or as its own entity)."""
IDENTITIES = ("operator", "agent", "viewer", "admin", "no credentials", "bad token")
RPCS = tuple(pb.DESCRIPTOR.services_by_name["TaskManager"].methods_by_name)


def expected_code(rpc: str, identity: str, own: bool) -> grpc.StatusCode:
    if identity in ("no credentials", "bad token"):
        return grpc.StatusCode.UNAUTHENTICATED
    if identity == "admin":
        return grpc.StatusCode.OK
    if rpc not in EXPECTED_RIGHTS[identity]:
        return grpc.StatusCode.PERMISSION_DENIED
    if identity == "agent" and rpc in AGENT_ONLY_OWN and not own:
        return grpc.StatusCode.PERMISSION_DENIED
    return grpc.StatusCode.OK


@dataclass
class World:
    server: TaskManagerServer
    admin: AsyncStub
    tokens: dict[str, str]
    task_type_versions: int = 0
    """The last version of the matrix's task type registered."""


@pytest.fixture(scope="module")
async def world(backend: str, databases: Databases) -> AsyncIterator[World]:
    db = databases.new(backend)
    tokens = {}
    for identity, role, entities in (
        ("operator", Role.OPERATOR, ()),
        ("agent", Role.AGENT, (OWN_ENTITY,)),
        ("viewer", Role.VIEWER, ()),
        ("admin", Role.ADMIN, ()),
    ):
        credential, tokens[identity] = new_token(identity, role, entities, time.time_ns())
        add_credential(db, credential)
    tokens["bad token"] = tokens["admin"][:-4] + "AAAA"
    server = await TaskManagerServer.start(server_settings(db))
    async with grpc.aio.insecure_channel(server.address) as channel:
        yield World(server, authorized(channel, tokens["admin"]), tokens)
    await server.stop()


def authorized(channel: grpc.aio.Channel, token: str | None) -> AsyncStub:
    return open_stub(channel, ClientAuth(token=token))


Call = Callable[[AsyncStub, World, str], Awaitable[None]]


async def _fresh_task(world: World, entity: str) -> pb.Task:
    return (await world.admin.CreateTask(create_request(entity))).task


async def _create(stub: AsyncStub, world: World, entity: str) -> None:
    await stub.CreateTask(create_request(entity))


async def _get(stub: AsyncStub, world: World, entity: str) -> None:
    task = await _fresh_task(world, entity)
    await stub.GetTask(pb.GetTaskRequest(task_id=task.version.task_id))


async def _history(stub: AsyncStub, world: World, entity: str) -> None:
    task = await _fresh_task(world, entity)
    await stub.GetTaskHistory(pb.GetTaskHistoryRequest(task_id=task.version.task_id))


async def _query(stub: AsyncStub, world: World, entity: str) -> None:
    await stub.QueryTasks(pb.QueryTasksRequest())


def _receipt(task: pb.Task) -> pb.StatusUpdate:
    return pb.StatusUpdate(
        version=pb.TaskVersion(
            task_id=task.version.task_id, status_version=task.version.status_version
        ),
        status=pb.TaskStatus(status=S.STATUS_MACHINE_RECEIPT),
    )


async def _update(stub: AsyncStub, world: World, entity: str) -> None:
    task = await _fresh_task(world, entity)
    await stub.UpdateStatus(pb.UpdateStatusRequest(status_update=_receipt(task)))


async def _report(stub: AsyncStub, world: World, entity: str) -> None:
    task = await _fresh_task(world, entity)
    call = stub.ReportStatus(None)
    await call.write(pb.StatusReport(report_id=1, status_update=_receipt(task)))
    await call.done_writing()
    async for result in call:
        if result.WhichOneof("outcome") == "error":
            raise Refused(grpc.StatusCode(_code(result.error.code)), result.error.message)


async def _cancel(stub: AsyncStub, world: World, entity: str) -> None:
    task = await _fresh_task(world, entity)
    await stub.CancelTask(pb.CancelTaskRequest(task_id=task.version.task_id))


async def _complete(stub: AsyncStub, world: World, entity: str) -> None:
    task = await _fresh_task(world, entity)
    await stub.CompleteTask(pb.CompleteTaskRequest(task_id=task.version.task_id))


async def _opened(call: grpc.aio.UnaryStreamCall[object, object]) -> None:
    """A stream the server accepted sends its headers; a refused one ends with a status."""
    await call.initial_metadata()
    code = await call.code() if call.done() else grpc.StatusCode.OK
    call.cancel()
    if code != grpc.StatusCode.OK:
        raise Refused(code, await call.details())


async def _listen(stub: AsyncStub, world: World, entity: str) -> None:
    request = pb.ListenAsAgentRequest(entity_ids=pb.EntityIds(entity_ids=[entity]))
    await _opened(stub.ListenAsAgent(request))  # type: ignore[arg-type]


async def _watch(stub: AsyncStub, world: World, entity: str) -> None:
    request = pb.WatchTasksRequest(filter=pb.WatchFilter(assignee_entity_ids=[entity]))
    await _opened(stub.WatchTasks(request))  # type: ignore[arg-type]


async def _list_agents(stub: AsyncStub, world: World, entity: str) -> None:
    await stub.ListAgents(pb.ListAgentsRequest(entity_ids=[entity]))


async def _update_task(stub: AsyncStub, world: World, entity: str) -> None:
    task = await _fresh_task(world, entity)
    update = pb.UpdateTaskRequest(
        task_id=task.version.task_id, definition_version=1, display_name="renamed"
    )
    await stub.UpdateTask(update)


async def _add_credential(stub: AsyncStub, world: World, entity: str) -> None:
    await stub.AddCredential(pb.AddCredentialRequest(principal="someone", role="viewer"))


async def _list_credentials(stub: AsyncStub, world: World, entity: str) -> None:
    await stub.ListCredentials(pb.ListCredentialsRequest())


async def _revoke_credential(stub: AsyncStub, world: World, entity: str) -> None:
    added = await world.admin.AddCredential(
        pb.AddCredentialRequest(principal="short-lived", role="viewer")
    )
    credential_id = added.credential.credential_id
    await stub.RevokeCredential(pb.RevokeCredentialRequest(credential_id=credential_id))


def _session(entity: str) -> pb.SubmitSessionsRequest:
    return pb.SubmitSessionsRequest(sessions=[pb.SessionSubmission(tasks=[create_request(entity)])])


async def _fresh_session(world: World, entity: str) -> str:
    submitted = await world.admin.SubmitSessions(_session(entity))
    return submitted.sessions[0].session_id


async def _submit_sessions(stub: AsyncStub, world: World, entity: str) -> None:
    await stub.SubmitSessions(_session(entity))


async def _get_session(stub: AsyncStub, world: World, entity: str) -> None:
    session_id = await _fresh_session(world, entity)
    await stub.GetSession(pb.GetSessionRequest(session_id=session_id))


async def _cancel_session(stub: AsyncStub, world: World, entity: str) -> None:
    session_id = await _fresh_session(world, entity)
    await stub.CancelSession(pb.CancelSessionRequest(session_id=session_id))


def _task_type(version: int) -> pb.TaskType:
    return pb.TaskType(
        name="matrix-type",
        version=version,
        message_type="google.protobuf.Empty",
        descriptors=descriptor_pb2.FileDescriptorSet(file=[_empty_file()]),
    )


def _empty_file() -> descriptor_pb2.FileDescriptorProto:
    file = descriptor_pb2.FileDescriptorProto()
    descriptor_pool.Default().FindFileByName("google/protobuf/empty.proto").CopyToProto(file)
    return file


async def _register_task_type(stub: AsyncStub, world: World, entity: str) -> None:
    # A new version each time: a registration that succeeds writes.
    world.task_type_versions += 1
    request = pb.RegisterTaskTypeRequest(task_type=_task_type(world.task_type_versions))
    await stub.RegisterTaskType(request)


async def _get_task_type(stub: AsyncStub, world: World, entity: str) -> None:
    world.task_type_versions += 1
    version = world.task_type_versions
    await world.admin.RegisterTaskType(pb.RegisterTaskTypeRequest(task_type=_task_type(version)))
    await stub.GetTaskType(pb.GetTaskTypeRequest(name="matrix-type", version=version))


async def _list_task_types(stub: AsyncStub, world: World, entity: str) -> None:
    await stub.ListTaskTypes(pb.ListTaskTypesRequest(name="matrix-type"))


PAYLOAD = b"matrix payload"
PAYLOAD_REF = pb.PayloadRef(sha256=hashlib.sha256(PAYLOAD).hexdigest(), size=len(PAYLOAD))


async def _payload_parts() -> AsyncIterator[pb.UploadPayloadRequest]:
    yield pb.UploadPayloadRequest(header=PAYLOAD_REF)
    yield pb.UploadPayloadRequest(chunk=PAYLOAD)


async def _upload_payload(stub: AsyncStub, world: World, entity: str) -> None:
    await stub.UploadPayload(_payload_parts())


async def _task_with_the_payload(world: World, entity: str) -> str:
    """The id of a new task of entity's that has the payload as its input."""
    await world.admin.UploadPayload(_payload_parts())
    request = create_request(entity, inputs=[pb.NamedPayload(name="map", payload=PAYLOAD_REF)])
    return (await world.admin.CreateTask(request)).task.version.task_id


async def _download_payload(stub: AsyncStub, world: World, entity: str) -> None:
    task_id = await _task_with_the_payload(world, entity)
    request = pb.DownloadPayloadRequest(sha256=PAYLOAD_REF.sha256, task_id=task_id)
    assert b"".join([r.chunk async for r in stub.DownloadPayload(request)]) == PAYLOAD


async def _stat_payload(stub: AsyncStub, world: World, entity: str) -> None:
    task_id = await _task_with_the_payload(world, entity)
    await stub.StatPayload(pb.StatPayloadRequest(sha256=PAYLOAD_REF.sha256, task_id=task_id))


async def _attach_input(stub: AsyncStub, world: World, entity: str) -> None:
    await world.admin.UploadPayload(_payload_parts())
    held = create_request(entity, inputs=[pb.NamedPayload(name="map")])
    task = (await world.admin.CreateTask(held)).task
    request = pb.AttachInputRequest(task_id=task.version.task_id, name="map", payload=PAYLOAD_REF)
    assert (await stub.AttachInput(request)).task.status.status == S.STATUS_SENT


async def _attach_output(stub: AsyncStub, world: World, entity: str) -> None:
    await world.admin.UploadPayload(_payload_parts())
    task = await _fresh_task(world, entity)
    await world.admin.UpdateStatus(pb.UpdateStatusRequest(status_update=_receipt(task)))
    request = pb.AttachOutputRequest(
        task_id=task.version.task_id, attempt=1, name="log", payload=PAYLOAD_REF
    )
    attached = (await stub.AttachOutput(request)).task
    assert [o.name for o in attached.attempts[-1].outputs] == ["log"]


CALLS: dict[str, Call] = {
    "UploadPayload": _upload_payload,
    "DownloadPayload": _download_payload,
    "StatPayload": _stat_payload,
    "AttachInput": _attach_input,
    "AttachOutput": _attach_output,
    "RegisterTaskType": _register_task_type,
    "GetTaskType": _get_task_type,
    "ListTaskTypes": _list_task_types,
    "SubmitSessions": _submit_sessions,
    "GetSession": _get_session,
    "CancelSession": _cancel_session,
    "AddCredential": _add_credential,
    "ListCredentials": _list_credentials,
    "RevokeCredential": _revoke_credential,
    "UpdateTask": _update_task,
    "ListAgents": _list_agents,
    "CreateTask": _create,
    "GetTask": _get,
    "QueryTasks": _query,
    "UpdateStatus": _update,
    "ListenAsAgent": _listen,
    "CancelTask": _cancel,
    "CompleteTask": _complete,
    "GetTaskHistory": _history,
    "ReportStatus": _report,
    "WatchTasks": _watch,
}


class Refused(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code


def _code(value: int) -> grpc.StatusCode:
    return next(code for code in grpc.StatusCode if code.value[0] == value)


def test_the_matrix_covers_every_rpc() -> None:
    assert set(CALLS) == set(RPCS)


@pytest.mark.parametrize(
    ("rpc", "identity", "own"),
    list(itertools.product(RPCS, IDENTITIES, (True, False))),
)
async def test_access(world: World, rpc: str, identity: str, own: bool) -> None:
    async with grpc.aio.insecure_channel(world.server.address) as channel:
        stub = authorized(channel, world.tokens.get(identity))
        try:
            await CALLS[rpc](stub, world, OWN_ENTITY if own else OTHER_ENTITY)
            got = grpc.StatusCode.OK
        except grpc.aio.AioRpcError as error:
            got = error.code()
            details = error.details() or ""
        except Refused as refused:
            got, details = refused.code, str(refused)
    expected = expected_code(rpc, identity, own)
    assert got == expected, f"{rpc} as {identity} ({'own' if own else 'other'})"
    if got != grpc.StatusCode.OK:
        assert details, "a denial says why"


def test_expected_codes_are_not_all_the_same() -> None:
    # The matrix must be able to fail: it expects every outcome somewhere.
    outcomes = {
        expected_code(rpc, identity, own)
        for rpc, identity, own in itertools.product(RPCS, IDENTITIES, (True, False))
    }
    assert outcomes == {
        grpc.StatusCode.OK,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
    }


async def test_a_refused_client_stream_still_sending_gets_the_refusal(world: World) -> None:
    # grpcio's asyncio client turns the status of a stream the server ended under its
    # writes into INTERNAL (grpc/grpc#36066); the server waits for the half-close instead.
    task = await _fresh_task(world, OWN_ENTITY)
    async with grpc.aio.insecure_channel(world.server.address) as channel:
        stub = authorized(channel, None)
        reports = stub.ReportStatus(None)
        for report_id in range(200):
            await reports.write(pb.StatusReport(report_id=report_id, status_update=_receipt(task)))
        await reports.done_writing()

        async def chunks() -> AsyncIterator[pb.UploadPayloadRequest]:
            yield pb.UploadPayloadRequest(header=PAYLOAD_REF)
            for _ in range(200):
                yield pb.UploadPayloadRequest(chunk=PAYLOAD)

        upload = stub.UploadPayload(chunks())
        assert await reports.code() == grpc.StatusCode.UNAUTHENTICATED, await reports.details()
        assert await upload.code() == grpc.StatusCode.UNAUTHENTICATED, await upload.details()
