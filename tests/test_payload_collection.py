"""The payload collector: unreferenced payloads go once idle for the grace period, and
a create or attach racing a collection either keeps its payload or is refused; never a
task that refers to bytes no longer stored."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator

import anyio
import grpc
import pytest

from task_manager.payload_collector import PayloadCollector
from task_manager.server import TaskManagerServer
from task_manager.v1 import task_manager_pb2 as pb
from tests.helpers import AsyncStub, create_request, server_settings, status_update
from tests.test_payloads import download, refusal, upload

pytestmark = pytest.mark.anyio
S = pb.Status


@pytest.fixture
async def eager(database: str) -> AsyncIterator[TaskManagerServer]:
    """A server that collects every unreferenced payload at once, when the test asks."""
    settings = dataclasses.replace(
        server_settings(database), payload_grace_s=0.0, payload_sweep_s=3_600.0
    )
    running = await TaskManagerServer.start(settings)
    yield running
    await running.stop()


@pytest.fixture
async def eager_stub(eager: TaskManagerServer) -> AsyncIterator[AsyncStub]:
    async with grpc.aio.insecure_channel(eager.address) as channel:
        yield AsyncStub(channel)


def collector(server: TaskManagerServer) -> PayloadCollector:
    assert server.payload_collector is not None
    return server.payload_collector


async def stored(stub: AsyncStub, payload: pb.PayloadRef) -> bool:
    try:
        await stub.StatPayload(pb.StatPayloadRequest(sha256=payload.sha256))
    except grpc.aio.AioRpcError as error:
        assert error.code() == grpc.StatusCode.NOT_FOUND
        return False
    return True


async def test_unreferenced_payloads_are_collected_and_referenced_ones_kept(
    eager: TaskManagerServer, eager_stub: AsyncStub
) -> None:
    stub = eager_stub
    unused, given, attached, output = [
        (await upload(stub, name.encode() * 100)).payload
        for name in ("unused", "given", "attached", "output")
    ]
    await stub.CreateTask(create_request(inputs=[pb.NamedPayload(name="in", payload=given)]))
    held = create_request(inputs=[pb.NamedPayload(name="in")])
    task = (await stub.CreateTask(held)).task
    task = (
        await stub.AttachInput(
            pb.AttachInputRequest(task_id=task.version.task_id, name="in", payload=attached)
        )
    ).task
    task = (await stub.UpdateStatus(status_update(task, S.STATUS_MACHINE_RECEIPT))).task
    await stub.AttachOutput(
        pb.AttachOutputRequest(task_id=task.version.task_id, attempt=1, name="out", payload=output)
    )
    assert await collector(eager).collect() == 1
    assert [await stored(stub, p) for p in (unused, given, attached, output)] == [
        False,
        True,
        True,
        True,
    ]
    assert await download(stub, given.sha256) == b"given" * 100
    assert await collector(eager).collect() == 0
    again = await upload(stub, b"unused" * 100)
    assert not again.already_stored  # stored anew, whole
    assert await download(stub, unused.sha256) == b"unused" * 100


async def test_payloads_within_their_grace_are_kept(
    server: TaskManagerServer, stub: AsyncStub
) -> None:
    payload = (await upload(stub, b"just uploaded")).payload
    assert await collector(server).collect() == 0
    assert await stored(stub, payload)


async def refer(
    stub: AsyncStub,
    payload: pb.PayloadRef,
    held: pb.Task | None,
    answer: list[pb.Task | grpc.StatusCode],
) -> None:
    """Attaches payload to held's input, or (no task held) creates a task with it."""
    try:
        if held is not None:
            request = pb.AttachInputRequest(
                task_id=held.version.task_id, name="in", payload=payload
            )
            answer.append((await stub.AttachInput(request)).task)
        else:
            named = pb.NamedPayload(name="in", payload=payload)
            answer.append((await stub.CreateTask(create_request(inputs=[named]))).task)
    except grpc.aio.AioRpcError as error:
        answer.append(error.code())


async def test_a_create_or_attach_racing_a_collection_keeps_its_payload_or_is_refused(
    eager: TaskManagerServer, eager_stub: AsyncStub
) -> None:
    stub = eager_stub
    for round_number in range(24):
        data = f"raced {round_number}".encode() * 50
        payload = (await upload(stub, data)).payload
        via_attach = round_number % 2 == 1
        held = (
            (await stub.CreateTask(create_request(inputs=[pb.NamedPayload(name="in")]))).task
            if via_attach
            else None
        )
        answer: list[pb.Task | grpc.StatusCode] = []
        async with anyio.create_task_group() as group:
            group.start_soon(refer, stub, payload, held, answer)
            group.start_soon(collector(eager).collect)
        (outcome,) = answer
        if isinstance(outcome, pb.Task):
            # The task refers to it: it is stored, whole, and no later pass collects it.
            assert await collector(eager).collect() == 0
            assert await download(stub, payload.sha256) == data
            assert outcome.inputs[0].payload == payload
        else:
            assert outcome == grpc.StatusCode.NOT_FOUND
            assert not await stored(stub, payload)
            if held is not None:  # the task still waits for it, unchanged
                current = (await stub.GetTask(pb.GetTaskRequest(task_id=held.version.task_id))).task
                assert current == held


async def test_a_reference_to_a_collected_payload_is_not_found_naming_the_field(
    eager: TaskManagerServer, eager_stub: AsyncStub
) -> None:
    stub = eager_stub
    payload = (await upload(stub, b"collected first")).payload
    assert await collector(eager).collect() == 1
    named = pb.NamedPayload(name="in", payload=payload)
    got, details = await refusal(stub.CreateTask(create_request(inputs=[named])))
    assert got == grpc.StatusCode.NOT_FOUND
    assert details.startswith("inputs[0].payload")
