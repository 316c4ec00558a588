"""Hostile input: arbitrary well-typed messages and raw bytes on every method path.

Every answer must be a proper status (never UNKNOWN or INTERNAL), the server must stay up,
the database must stay consistent (assert_store_consistent), and tasks nobody was allowed to touch
must be exactly as they were. `make fuzz` runs the same with FUZZ_EXAMPLES=10000.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from storage import add_credential
from task_manager.auth import Role, new_token
from task_manager.v1 import lattice_compat_pb2
from task_manager.v1 import task_manager_pb2 as pb
from task_manager.v1.task_manager_pb2_grpc import TaskManagerStub
from tests.fuzzing import byte_strings, messages, mutants
from tests.helpers import Databases, ServerProcess, assert_store_consistent

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "400"))
"""Well-typed messages per run; mutated valid requests and raw byte strings are half as
many each (800 cases by default)."""
REFUSED_ANSWERS = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
METHODS: list[MethodDescriptor] = [
    method
    for file in (pb.DESCRIPTOR, lattice_compat_pb2.DESCRIPTOR)
    for service in file.services_by_name.values()
    for method in service.methods
]
SEED_IDS = [f"seed-task-{n}" for n in range(1, 6)]
TARGET_IDS = [f"fuzz-task-{n}" for n in range(1, 6)]
IDS = st.one_of(
    st.sampled_from([*TARGET_IDS, "fuzz-agent-1", "seed-agent", "no-such-task"]),
    st.from_regex(r"[A-Za-z0-9_.-]{5,36}", fullmatch=True),
)
FUZZ_SETTINGS = settings(
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@dataclass
class FuzzWorld:
    server: ServerProcess
    channel: grpc.Channel
    tokens: dict[str, str | None]
    seeds_before: list[bytes]

    def call(self, method: MethodDescriptor, identity: str, payload: bytes | list[bytes]) -> None:
        """Sends payload on method's path and checks the answer is a proper status."""
        path = f"/{method.containing_service.full_name}/{method.name}"
        token = self.tokens[identity]
        metadata = (("authorization", f"Bearer {token}"),) if token else ()
        identity_bytes = _identity
        try:
            if method.client_streaming:
                items = payload if isinstance(payload, list) else [payload]
                bidi = self.channel.stream_stream(path, identity_bytes, identity_bytes)
                for _ in bidi(iter(items), timeout=30, metadata=metadata):
                    pass
            elif method.server_streaming:
                assert isinstance(payload, bytes)
                stream = self.channel.unary_stream(path, identity_bytes, identity_bytes)
                call = stream(payload, timeout=30, metadata=metadata)
                # Headers come once the server subscribed the stream, or with its refusal.
                call.initial_metadata()
                call.cancel()  # type: ignore[no-untyped-call]
            else:
                assert isinstance(payload, bytes)
                unary = self.channel.unary_unary(path, identity_bytes, identity_bytes)
                unary(payload, timeout=30, metadata=metadata)
        except grpc.RpcError as error:
            code = error.code()
            details = error.details() or ""
            if code == grpc.StatusCode.CANCELLED and method.server_streaming:
                return  # we cancelled an accepted stream
            assert code not in REFUSED_ANSWERS, f"{path} as {identity}: {code.name}: {details}"
            assert details, f"{path}: {code.name} without a message"

    def seeds(self) -> list[bytes]:
        """The seeded tasks, both views and their whole histories, as bytes."""
        get = self.channel.unary_unary(
            "/task_manager.v1.TaskManager/GetTask",
            pb.GetTaskRequest.SerializeToString,
            pb.GetTaskResponse.FromString,
        )
        history = self.channel.unary_unary(
            "/task_manager.v1.TaskManager/GetTaskHistory",
            pb.GetTaskHistoryRequest.SerializeToString,
            pb.GetTaskHistoryResponse.FromString,
        )
        admin = (("authorization", f"Bearer {self.tokens['admin']}"),)
        snapshot = []
        for task_id in SEED_IDS:
            for view in (pb.TaskView.TASK_VIEW_MANAGER, pb.TaskView.TASK_VIEW_AGENT):
                request = pb.GetTaskRequest(task_id=task_id, task_view=view)
                snapshot.append(get(request, metadata=admin).SerializeToString())
            entries = history(pb.GetTaskHistoryRequest(task_id=task_id), metadata=admin)
            snapshot.append(entries.SerializeToString())
        return snapshot

    def check_unharmed(self) -> None:
        assert self.server.process is not None and self.server.process.poll() is None
        assert self.seeds() == self.seeds_before
        assert_store_consistent(self.server.db)


def _identity(data: bytes) -> bytes:
    return data


@pytest.fixture(scope="module")
def world(backend: str, databases: Databases) -> Iterator[FuzzWorld]:
    db = databases.new(backend)
    tokens: dict[str, str | None] = {"no credentials": None}
    for identity, role, entities in (
        ("operator", Role.OPERATOR, ()),
        ("agent", Role.AGENT, ("fuzz-agent-1",)),
        ("viewer", Role.VIEWER, ()),
        ("admin", Role.ADMIN, ()),
    ):
        credential, tokens[identity] = new_token(identity, role, entities, time.time_ns())
        add_credential(db, credential)
    server = ServerProcess(db).start()
    channel = grpc.insecure_channel(server.address)
    try:
        _seed(channel, tokens)
        world = FuzzWorld(server, channel, tokens, [])
        world.seeds_before = world.seeds()
        yield world
    finally:
        channel.close()
        assert server.terminate() == 0, server.log_text()


def _seed(channel: grpc.Channel, tokens: dict[str, str | None]) -> None:
    """Seed tasks (assigned to an agent the fuzzer never holds) at several statuses, and
    target tasks the fuzzing agent may legitimately change."""
    stub = TaskManagerStub(channel)
    admin = (("authorization", f"Bearer {tokens['admin']}"),)
    for number, task_id in enumerate(SEED_IDS):
        request = pb.CreateTaskRequest(task_id=task_id, display_name="seed")
        request.relations.assignee.system.entity_id = "seed-agent"
        task = stub.CreateTask(request, metadata=admin).task
        for status in (pb.Status.STATUS_MACHINE_RECEIPT, pb.Status.STATUS_EXECUTING)[:number]:
            update = pb.StatusUpdate(version=task.version, status=pb.TaskStatus(status=status))
            task = stub.UpdateStatus(
                pb.UpdateStatusRequest(status_update=update), metadata=admin
            ).task
    for task_id in TARGET_IDS:
        request = pb.CreateTaskRequest(task_id=task_id, display_name="target")
        request.relations.assignee.system.entity_id = "fuzz-agent-1"
        stub.CreateTask(request, metadata=admin)


IDENTITY_CHOICES = st.sampled_from(["operator", "agent", "agent", "viewer", "no credentials"])


def _request_messages(method: MethodDescriptor) -> st.SearchStrategy[Message]:
    return messages(method.input_type, IDS)


def _untouchable(encoded: bytes) -> bool:
    return any(seed.encode() in encoded for seed in SEED_IDS)


def test_well_typed_messages_get_proper_answers(world: FuzzWorld) -> None:
    @settings(FUZZ_SETTINGS, max_examples=EXAMPLES)
    @given(method=st.sampled_from(METHODS), identity=IDENTITY_CHOICES, data=st.data())
    def fuzz(method: MethodDescriptor, identity: str, data: st.DataObject) -> None:
        if method.client_streaming:
            count = data.draw(st.integers(0, 3))
            items = [data.draw(_request_messages(method)).SerializeToString() for _ in range(count)]
            assume(not any(_untouchable(item) for item in items))
            world.call(method, identity, items)
        else:
            payload = data.draw(_request_messages(method)).SerializeToString()
            assume(not _untouchable(payload))
            world.call(method, identity, payload)

    fuzz()
    world.check_unharmed()


def test_random_and_truncated_bytes_get_proper_answers(world: FuzzWorld) -> None:
    @settings(FUZZ_SETTINGS, max_examples=max(EXAMPLES // 2, 100))
    @given(method=st.sampled_from(METHODS), identity=IDENTITY_CHOICES, data=st.data())
    def fuzz(method: MethodDescriptor, identity: str, data: st.DataObject) -> None:
        whole = data.draw(_request_messages(method)).SerializeToString()
        cut = data.draw(st.integers(0, len(whole)))
        payload = data.draw(st.one_of(byte_strings(), st.just(whole[:cut])))
        assume(not _untouchable(payload))
        world.call(method, identity, [payload] if method.client_streaming else payload)

    fuzz()
    world.check_unharmed()


def _valid_requests() -> dict[str, Message]:
    """One valid request of every type, about the target tasks (which the fuzzing agent
    and operator may change), for mutation."""
    now = int(time.time())
    update = pb.StatusUpdate(
        version=pb.TaskVersion(task_id=TARGET_IDS[1], status_version=2, definition_version=1),
        status=pb.TaskStatus(status=pb.Status.STATUS_EXECUTING),
        scheduled_time=Timestamp(seconds=now + 60),
    )
    create = pb.CreateTaskRequest(
        display_name="fuzzed",
        description="a task",
        policy=pb.TaskPolicy(
            receipt_timeout=Duration(seconds=60), max_attempts=2, retry_backoff=Duration(seconds=1)
        ),
        scheduled_time=Timestamp(seconds=now + 3600),
    )
    create.relations.assignee.system.entity_id = "fuzz-agent-1"
    query = pb.QueryTasksRequest(page_size=10, view=pb.TaskView.TASK_VIEW_MANAGER)
    query.update_time_range.update_start_time.seconds = now - 3600
    query.status_filter.status.append(pb.Status.STATUS_SENT)
    empty = pb.PayloadRef(sha256=EMPTY_SHA256, size=0)
    requests: list[Message] = [
        create,
        pb.GetTaskRequest(task_id=TARGET_IDS[0], definition_version=1),
        query,
        pb.UpdateStatusRequest(status_update=update),
        pb.ListenAsAgentRequest(
            entity_ids=pb.EntityIds(entity_ids=["fuzz-agent-1"]), max_in_flight=2
        ),
        pb.CancelTaskRequest(task_id=TARGET_IDS[2], reason="fuzz"),
        pb.CompleteTaskRequest(task_id=TARGET_IDS[3], reason="fuzz"),
        pb.GetTaskHistoryRequest(task_id=TARGET_IDS[0], page_size=10),
        pb.StatusReport(report_id=1, status_update=update),
        pb.WatchTasksRequest(
            filter=pb.WatchFilter(assignee_entity_ids=["fuzz-agent-1"]),
            heartbeat_interval_ms=1_000,
            rate_limit=pb.RateLimit(update_per_task_limit_ms=500),
        ),
        pb.ListAgentsRequest(entity_ids=["fuzz-agent-1"]),
        pb.UpdateTaskRequest(task_id=TARGET_IDS[4], definition_version=1, display_name="y"),
        pb.AddCredentialRequest(principal="fuzzed", role="agent", entity_ids=["fuzz-agent-9"]),
        pb.ListCredentialsRequest(),
        pb.RevokeCredentialRequest(credential_id="0123456789ab"),
        pb.SubmitSessionsRequest(
            sessions=[pb.SessionSubmission(session_id="fuzz-session-1", tasks=[create, create])]
        ),
        pb.GetSessionRequest(session_id="fuzz-session-1"),
        pb.CancelSessionRequest(session_id="fuzz-session-1", reason="fuzz"),
        pb.RegisterTaskTypeRequest(
            task_type=pb.TaskType(
                name="fuzz-type",
                version=1,
                message_type="google.protobuf.Duration",
                descriptors=descriptor_pb2.FileDescriptorSet(file=[_duration_file()]),
                constraints=[pb.FieldConstraint(path="seconds", minimum=0, maximum=60)],
            )
        ),
        pb.GetTaskTypeRequest(name="fuzz-type", version=1),
        pb.ListTaskTypesRequest(name="fuzz-type"),
        pb.UploadPayloadRequest(header=pb.PayloadRef(sha256=EMPTY_SHA256, size=0)),
        pb.DownloadPayloadRequest(sha256=EMPTY_SHA256),
        pb.StatPayloadRequest(sha256=EMPTY_SHA256),
        pb.AttachInputRequest(task_id=TARGET_IDS[0], name="mesh", payload=empty),
        pb.AttachOutputRequest(task_id=TARGET_IDS[1], attempt=1, name="log", payload=empty),
    ]
    return {request.DESCRIPTOR.full_name: request for request in requests}


EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


def _duration_file() -> descriptor_pb2.FileDescriptorProto:
    file = descriptor_pb2.FileDescriptorProto()
    descriptor_pool.Default().FindFileByName("google/protobuf/duration.proto").CopyToProto(file)
    return file


VALID_REQUESTS = _valid_requests()


def test_mutated_valid_requests_get_proper_answers(world: FuzzWorld) -> None:
    @settings(FUZZ_SETTINGS, max_examples=max(EXAMPLES // 2, 100))
    @given(method=st.sampled_from(METHODS), identity=IDENTITY_CHOICES, data=st.data())
    def fuzz(method: MethodDescriptor, identity: str, data: st.DataObject) -> None:
        valid = VALID_REQUESTS[method.input_type.full_name]
        payload = data.draw(mutants(valid, IDS)).SerializeToString()
        assume(not _untouchable(payload))
        world.call(method, identity, [payload] if method.client_streaming else payload)

    fuzz()
    world.check_unharmed()


def test_every_method_is_fuzzed() -> None:
    assert {m.input_type.full_name for m in METHODS} == set(VALID_REQUESTS)
    request_types = {message_factory.GetMessageClass(m.input_type) for m in METHODS}
    assert len(METHODS) == 31 and len(request_types) == 26
