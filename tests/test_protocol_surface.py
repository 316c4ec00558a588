"""The contract's surface: generated code, the Lattice service name, health, reflection."""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import grpc
import pytest
from google.protobuf import any_pb2, descriptor_pb2, descriptor_pool, message_factory, wrappers_pb2
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from task_manager.v1 import task_manager_pb2 as pb
from tests.helpers import REPO_ROOT, ServerProcess, create_request, status_update

LATTICE = "anduril.taskmanager.v1.TaskManagerAPI"
M = TypeVar("M", bound=Message)


def test_generated_code_is_not_stale(tmp_path: Path) -> None:
    import sys

    sys.path.insert(0, str(REPO_ROOT / "protos"))
    try:
        from generate import generate  # type: ignore[import-not-found]
    finally:
        sys.path.pop(0)
    generate(tmp_path)
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.py*"))
    assert generated, "nothing was generated"
    for relative in generated:
        committed = REPO_ROOT / relative
        assert committed.exists(), f"{relative} is generated but not committed: run make protos"
        assert committed.read_bytes() == (tmp_path / relative).read_bytes(), (
            f"{relative} is stale: run make protos"
        )


@pytest.mark.parametrize(
    ("message", "field", "number"),
    [
        ("Task", "created_by", 16),
        ("Task", "create_time", 13),
        ("Task", "is_executed_elsewhere", 11),
        ("TaskStatus", "allocation", 8),
        ("Principal", "team", 4),
        ("Principal", "on_behalf_of", 3),
        ("CreateTaskRequest", "task_id", 8),
        ("QueryTasksRequest", "view", 6),
        ("QueryTasksRequest", "page_size", 100),
        ("ListenAsAgentResponse", "complete_request", 3),
    ],
)
def test_wire_numbers_match_the_lattice_api(message: str, field: str, number: int) -> None:
    assert pb.DESCRIPTOR.message_types_by_name[message].fields_by_name[field].number == number


def test_unused_task_field_numbers_stay_unused() -> None:
    numbers = {f.number for f in pb.Task.DESCRIPTOR.fields}
    assert numbers.isdisjoint({7, 12, 14, 15})
    assert pb.Status.Value("STATUS_VERSION_REJECTED") == 14
    assert pb.ErrorCode.Value("ERROR_CODE_FAILED") == 4


pytestmark_async = pytest.mark.anyio


def lattice(
    channel: grpc.aio.Channel, method: str, response: type[M]
) -> grpc.aio.UnaryUnaryMultiCallable[Message, M]:
    """A call under the Lattice service name, as a Lattice-generated client makes it."""
    return channel.unary_unary(
        f"/{LATTICE}/{method}",
        request_serializer=_serialize,
        response_deserializer=response.FromString,
    )


def _serialize(message: Message) -> bytes:
    return message.SerializeToString()


@pytestmark_async
async def test_lattice_service_name_serves_the_same_tasks(channel: grpc.aio.Channel) -> None:
    created = await lattice(channel, "CreateTask", pb.CreateTaskResponse)(create_request())
    task = created.task
    updated = await lattice(channel, "UpdateStatus", pb.UpdateStatusResponse)(
        status_update(task, pb.STATUS_MACHINE_RECEIPT)
    )
    fetched = await lattice(channel, "GetTask", pb.GetTaskResponse)(
        pb.GetTaskRequest(task_id=task.version.task_id)
    )
    assert fetched.task == updated.task
    queried = await lattice(channel, "QueryTasks", pb.QueryTasksResponse)(pb.QueryTasksRequest())
    assert list(queried.tasks) == [updated.task]
    stream = channel.unary_stream(
        f"/{LATTICE}/ListenAsAgent",
        request_serializer=pb.ListenAsAgentRequest.SerializeToString,
        response_deserializer=pb.ListenAsAgentResponse.FromString,
    )(pb.ListenAsAgentRequest(entity_ids=pb.EntityIds(entity_ids=["agent-1"])))
    second = await lattice(channel, "CreateTask", pb.CreateTaskResponse)(create_request())
    message = await stream.read()
    assert isinstance(message, pb.ListenAsAgentResponse)
    assert message.execute_request.task == second.task
    stream.cancel()


@pytestmark_async
async def test_health_service_reports_serving(channel: grpc.aio.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "task_manager.v1.TaskManager", LATTICE):
        response = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert response.status == health_pb2.HealthCheckResponse.SERVING


@pytestmark_async
async def test_reflection_lists_and_describes_the_services(channel: grpc.aio.Channel) -> None:
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    requests = [
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol=LATTICE),
    ]
    responses = [r async for r in reflection.ServerReflectionInfo(iter(requests))]
    names = {s.name for s in responses[0].list_services_response.service}
    assert {"task_manager.v1.TaskManager", LATTICE, "grpc.health.v1.Health"} <= names
    files = responses[1].file_descriptor_response.file_descriptor_proto
    described = [descriptor_pb2.FileDescriptorProto.FromString(f) for f in files]
    methods = {
        m.name for f in described for s in f.service if s.name == "TaskManagerAPI" for m in s.method
    }
    assert methods == {"CreateTask", "GetTask", "QueryTasks", "UpdateStatus", "ListenAsAgent"}


WELL_KNOWN_TYPES = [
    "google.protobuf.Any",
    "google.protobuf.Api",
    "google.protobuf.Duration",
    "google.protobuf.Empty",
    "google.protobuf.FieldMask",
    "google.protobuf.SourceContext",
    "google.protobuf.Struct",
    "google.protobuf.Timestamp",
    "google.protobuf.Type",
    "google.protobuf.StringValue",
]


def test_reflection_serves_the_well_known_types(database: str) -> None:
    # A server process of its own: in this one, the test's imports fill the pool.
    server = ServerProcess(database).start()
    try:
        with grpc.insecure_channel(server.address) as channel:
            # As a generic tool (grpcurl, Postman) resolves types: through reflection only.
            pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
            for name in WELL_KNOWN_TYPES:
                assert pool.FindMessageTypeByName(name).full_name == name
            packed = any_pb2.Any()
            packed.Pack(wrappers_pb2.StringValue(value="done"))
            type_name = packed.type_url.removeprefix("type.googleapis.com/")
            decoded = message_factory.GetMessageClass(pool.FindMessageTypeByName(type_name))()
            decoded.ParseFromString(packed.value)
            assert decoded.value == "done"  # type: ignore[attr-defined]
    finally:
        assert server.terminate() == 0
