"""Who may read and attach which payloads, and what agents are sent once: an agent reads
only the inputs of a task it runs, attaches outputs only to its own, learns nothing of
other payloads; names that would escape a directory are refused."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import grpc
import pytest

from agent_kit import Agent, OperatorClient, TaskContext
from agent_kit._grpc import ClientAuth, open_stub
from agent_kit._payloads import InputCache
from storage import add_credential
from task_manager.auth import Role, new_token
from task_manager.server import TaskManagerServer
from task_manager.v1 import task_manager_pb2 as pb
from tests.helpers import AsyncStub, create_request, running, server_settings, status_update
from tests.test_dispatch import listen, next_request
from tests.test_payloads import download, ref_of, refusal, upload
from tests.test_pools import member, next_execute, pool_task, report

pytestmark = pytest.mark.anyio
S = pb.Status
MESH, SECRET = b"a mesh of the north field", b"the payroll of the farm"


@asynccontextmanager
async def as_principals(database: str) -> AsyncIterator[dict[str, AsyncStub]]:
    """A server with auth on, and a stub for each of: ops (an operator), drone-1 and
    drone-2 (agents, both members of pool-a)."""
    tokens = {}
    for name, role, entities in (
        ("ops", Role.OPERATOR, ()),
        ("drone-1", Role.AGENT, ("drone-1", "pool-a")),
        ("drone-2", Role.AGENT, ("drone-2", "pool-a")),
    ):
        credential, tokens[name] = new_token(name, role, entities, time.time_ns())
        add_credential(database, credential)
    server = await TaskManagerServer.start(server_settings(database))
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            yield {name: open_stub(channel, ClientAuth(token=t)) for name, t in tokens.items()}
    finally:
        await server.stop()


def stat(sha256: str, task_id: str = "") -> pb.StatPayloadRequest:
    return pb.StatPayloadRequest(sha256=sha256, task_id=task_id)


async def test_an_agent_reads_only_the_inputs_of_a_task_it_runs(database: str) -> None:
    async with as_principals(database) as stubs:
        ops, one, two = stubs["ops"], stubs["drone-1"], stubs["drone-2"]
        mesh, secret = (await upload(ops, MESH)).payload, (await upload(ops, SECRET)).payload
        request = create_request("drone-1")
        request.inputs.add(name="mesh", payload=mesh)
        task_id = (await ops.CreateTask(request)).task.version.task_id

        got, details = await refusal(one.StatPayload(stat(mesh.sha256)))
        assert (got, details.split(":")[0]) == (grpc.StatusCode.INVALID_ARGUMENT, "task_id")
        assert "required of an agent" in details
        got, details = await refusal(one.StatPayload(stat(secret.sha256, task_id)))
        assert got == grpc.StatusCode.PERMISSION_DENIED
        assert "not an input of task" in details
        got, details = await refusal(two.StatPayload(stat(mesh.sha256, task_id)))
        assert got == grpc.StatusCode.PERMISSION_DENIED  # not drone-2's task
        got, _ = await refusal(download(two, mesh.sha256))
        assert got == grpc.StatusCode.INVALID_ARGUMENT  # no task named: nothing streamed

        assert (await one.StatPayload(stat(mesh.sha256, task_id))).payload == mesh
        received = b""
        async for part in one.DownloadPayload(
            pb.DownloadPayloadRequest(sha256=mesh.sha256, task_id=task_id)
        ):
            received += part.chunk
        assert received == MESH
        assert await download(ops, secret.sha256) == SECRET  # an operator reads any


async def test_a_pool_tasks_inputs_are_read_only_by_the_member_that_holds_it(
    database: str,
) -> None:
    async with as_principals(database) as stubs:
        ops, one, two = stubs["ops"], stubs["drone-1"], stubs["drone-2"]
        mesh = (await upload(ops, MESH)).payload
        request = pool_task()
        request.inputs.add(name="mesh", payload=mesh)
        task_id = (await ops.CreateTask(request)).task.version.task_id

        # No member listens, so none holds it: any member could name it, none reads it.
        for stub in (one, two):
            got, details = await refusal(stub.StatPayload(stat(mesh.sha256, task_id)))
            assert got == grpc.StatusCode.PERMISSION_DENIED
            assert "no member of pool pool-a holds task" in details
        call = await member(one, "drone-1")
        try:
            sent = await next_execute(call)
            assert sent.version.task_id == task_id
            got, details = await refusal(two.StatPayload(stat(mesh.sha256, task_id)))
            assert got == grpc.StatusCode.PERMISSION_DENIED
            assert "drone-1" in details
            assert (await one.StatPayload(stat(mesh.sha256, task_id))).payload == mesh
        finally:
            call.cancel()


async def test_attaching_to_another_agents_task_tells_nothing_of_the_payload(
    database: str,
) -> None:
    async with as_principals(database) as stubs:
        ops, one, two = stubs["ops"], stubs["drone-1"], stubs["drone-2"]
        task = (await ops.CreateTask(create_request("drone-1"))).task
        task = (await one.UpdateStatus(status_update(task, S.STATUS_MACHINE_RECEIPT))).task
        unknown, stored = ref_of(b"never uploaded"), (await upload(ops, SECRET)).payload
        for payload in (unknown, stored):
            attach = pb.AttachOutputRequest(
                task_id=task.version.task_id, attempt=1, name="log", payload=payload
            )
            # The same answer whether or not the bytes are stored: no probing by attach.
            got, details = await refusal(two.AttachOutput(attach))
            assert got == grpc.StatusCode.PERMISSION_DENIED, details
        attach.payload.CopyFrom(unknown)
        got, _ = await refusal(one.AttachOutput(attach))
        assert got == grpc.StatusCode.NOT_FOUND  # its own task: the payload is missing
        after = (await ops.GetTask(pb.GetTaskRequest(task_id=task.version.task_id))).task
        assert after == task  # nothing attached by any of it


@pytest.mark.parametrize("name", [".", "..", ".hidden", "a/b", ""])
async def test_a_name_no_client_could_save_under_is_refused(stub: AsyncStub, name: str) -> None:
    mesh = (await upload(stub, MESH)).payload
    request = create_request("agent-1")
    request.inputs.add(name=name, payload=mesh)
    got, details = await refusal(stub.CreateTask(request))
    assert got == grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith("inputs[0].name")
    task = (await stub.CreateTask(create_request("agent-1"))).task
    task = (await stub.UpdateStatus(status_update(task, S.STATUS_MACHINE_RECEIPT))).task
    attach = pb.AttachOutputRequest(
        task_id=task.version.task_id, attempt=1, name=name, payload=mesh
    )
    got, details = await refusal(stub.AttachOutput(attach))
    assert (got, details.split(":")[0]) == (grpc.StatusCode.INVALID_ARGUMENT, "name")


async def test_outputs_named_like_a_partial_download_are_saved_side_by_side(
    stub: AsyncStub, client: OperatorClient, tmp_path: Path
) -> None:
    task = (await stub.CreateTask(create_request("agent-1"))).task
    task = (await stub.UpdateStatus(status_update(task, S.STATUS_MACHINE_RECEIPT))).task
    outputs = {"x": b"the whole field", "x.partial": b"half of the field"}
    for name, data in outputs.items():
        attach = pb.AttachOutputRequest(
            task_id=task.version.task_id,
            attempt=1,
            name=name,
            payload=(await upload(stub, data)).payload,
        )
        task = (await stub.AttachOutput(attach)).task
    await stub.UpdateStatus(status_update(task, S.STATUS_DONE_OK))
    written = await client.download_outputs(task.version.task_id, tmp_path / "results")
    assert {name: path.read_bytes() for name, path in written.items()} == outputs
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == sorted(outputs)


async def test_an_agent_still_running_an_edited_task_attaches_its_outputs(
    stub: AsyncStub,
) -> None:
    log = (await upload(stub, b"log of the run")).payload
    task = (await stub.CreateTask(create_request("agent-1"))).task
    task = (await stub.UpdateStatus(status_update(task, S.STATUS_MACHINE_RECEIPT))).task
    edit = pb.UpdateTaskRequest(
        task_id=task.version.task_id,
        definition_version=task.version.definition_version,
        description="survey the south field too",
    )
    edited = (await stub.UpdateTask(edit)).task
    assert edited.status.status == S.STATUS_SENT  # the edit goes out to the agent again
    attach = pb.AttachOutputRequest(
        task_id=task.version.task_id, attempt=1, name="log", payload=log
    )
    attached = (await stub.AttachOutput(attach)).task
    assert [(o.name, o.payload) for o in attached.attempts[0].outputs] == [("log", log)]


async def test_a_cancel_request_is_sent_once_though_outputs_are_attached_after_it(
    stub: AsyncStub,
) -> None:
    log = (await upload(stub, b"log until the cancel")).payload
    call = listen(stub, "agent-1")
    try:
        task = (await stub.CreateTask(create_request("agent-1"))).task
        assert (await next_request(call)).WhichOneof("request") == "execute_request"
        task = (await stub.UpdateStatus(status_update(task, S.STATUS_MACHINE_RECEIPT))).task
        await stub.CancelTask(pb.CancelTaskRequest(task_id=task.version.task_id))
        cancel = await next_request(call)
        assert cancel.cancel_request.task_id == task.version.task_id
        attach = pb.AttachOutputRequest(
            task_id=task.version.task_id, attempt=1, name="log", payload=log
        )
        attached = (await stub.AttachOutput(attach)).task
        assert attached.status.status == S.STATUS_CANCEL_REQUESTED
        # The next request on the stream is the next task's: no second cancel between.
        following = (await stub.CreateTask(create_request("agent-1"))).task
        then = await next_request(call)
        assert then.WhichOneof("request") == "execute_request"
        assert then.execute_request.task.version.task_id == following.version.task_id
    finally:
        call.cancel()


async def test_two_caches_on_one_directory_download_an_input_once_each_whole(
    stub: AsyncStub, client: OperatorClient, tmp_path: Path
) -> None:
    data = MESH * 20_000  # several chunks
    ref = await client.upload_payload(data)
    request = create_request("agent-1")
    request.inputs.add(name="mesh", payload=ref)
    task = (await stub.CreateTask(request)).task
    caches = [InputCache(tmp_path / "cache") for _ in range(2)]
    paths: list[Path] = []

    async def fetch(cache: InputCache) -> None:
        paths.append(await cache.path(stub, task.version.task_id, ref))

    async with anyio.create_task_group() as group:
        for cache in caches:
            group.start_soon(fetch, cache)
    assert paths[0] == paths[1]
    assert paths[0].read_bytes() == data
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.endswith(".partial")]


async def test_an_agent_without_a_cache_directory_removes_its_inputs_when_it_stops(
    server: TaskManagerServer, client: OperatorClient
) -> None:
    seen: list[Path] = []

    async def read(task: TaskContext) -> None:
        seen.append(await task.input("mesh"))

    async with running(Agent(server.address, "agent-1", read)):
        task = await client.create_task(assignee_entity_id="agent-1", inputs={"mesh": MESH})
        done = await client.wait(task.version.task_id)
        assert done.status.status == S.STATUS_DONE_OK
        assert seen[0].read_bytes() == MESH
    assert not seen[0].parent.exists()


async def test_a_held_pool_task_is_not_readable_until_released_and_held(database: str) -> None:
    async with as_principals(database) as stubs:
        ops, one = stubs["ops"], stubs["drone-1"]
        mesh = (await upload(ops, MESH)).payload
        request = pool_task()
        request.inputs.add(name="mesh")
        task = (await ops.CreateTask(request)).task
        assert list(task.pending_inputs) == ["mesh"]
        call = await member(one, "drone-1")
        try:
            attach = pb.AttachInputRequest(task_id=task.version.task_id, name="mesh", payload=mesh)
            await ops.AttachInput(attach)
            sent = await next_execute(call)
            assert (await one.StatPayload(stat(mesh.sha256, sent.version.task_id))).payload == mesh
            await report(one, sent, S.STATUS_DONE_OK)
        finally:
            call.cancel()
