"""Hypothesis stateful test: the server against a simple model of the lifecycle rules.

Random creates (with up to three attempts), updates with right and wrong versions,
failed attempts, retries, cancels, completes, definition updates and agent reconnects;
after every step GetTask must agree with the model for every task.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

from task_manager.v1 import task_manager_pb2 as pb
from task_manager.v1.task_manager_pb2_grpc import TaskManagerStub
from tests.helpers import Databases, ServerProcess, agent

S = pb.Status
TERMINAL = {S.STATUS_DONE_OK, S.STATUS_DONE_NOT_OK}
UNRELEASED = {S.STATUS_CREATED}
OPERATOR_REQUESTS = {S.STATUS_CANCEL_REQUESTED, S.STATUS_COMPLETE_REQUESTED}
DELIVERABLE = {S.STATUS_SENT, *OPERATOR_REQUESTS}
REPORTABLE = [
    S.STATUS_MACHINE_RECEIPT,
    S.STATUS_ACK,
    S.STATUS_WILCO,
    S.STATUS_EXECUTING,
    S.STATUS_WAITING_FOR_UPDATE,
    S.STATUS_DONE_OK,
    S.STATUS_DONE_NOT_OK,
    S.STATUS_CANCEL_REQUESTED,
    S.STATUS_COMPLETE_REQUESTED,
]
CALL_TIMEOUT = 30.0


@dataclass
class ModelTask:
    task_id: str
    entity: str | None
    status: int
    version: int
    created_order: int
    max_attempts: int = 1
    attempt: int = 0
    definition: int = 1
    last_request: pb.UpdateStatusRequest | None = field(default=None)


@pytest.fixture(scope="module")
def stub(backend: str, databases: Databases) -> Iterator[TaskManagerStub]:
    server = ServerProcess(databases.new(backend)).start()
    channel = grpc.insecure_channel(server.address)
    yield TaskManagerStub(channel)
    channel.close()
    assert server.terminate() == 0


class LifecycleMachine(RuleBasedStateMachine):
    stub: TaskManagerStub
    tasks = Bundle("tasks")

    def __init__(self) -> None:
        super().__init__()
        self.model: dict[str, ModelTask] = {}
        prefix = uuid.uuid4().hex[:8]  # the server outlives examples: keep agents apart
        self.entities = [f"{prefix}-a", f"{prefix}-b"]
        self.created = 0

    @initialize()
    def start(self) -> None:
        self.created = 0

    def _create(self, entity: str | None, elsewhere: bool, attempts: int = 1) -> ModelTask:
        request = pb.CreateTaskRequest(
            display_name="model",
            is_executed_elsewhere=elsewhere,
            policy=pb.TaskPolicy(max_attempts=attempts),
        )
        if entity is not None:
            request.relations.assignee.CopyFrom(agent(entity))
        task = self.stub.CreateTask(request, timeout=CALL_TIMEOUT).task
        released = entity is not None and not elsewhere
        expected = (S.STATUS_SENT, 2) if released else (S.STATUS_CREATED, 1)
        assert (task.status.status, task.version.status_version) == expected
        self.created += 1
        model = ModelTask(
            task.version.task_id,
            entity,
            *expected,
            created_order=self.created,
            max_attempts=attempts,
            attempt=1 if released else 0,
        )
        self.model[model.task_id] = model
        return model

    @rule(
        target=tasks,
        entity=st.sampled_from([0, 1, None]),
        elsewhere=st.booleans(),
        attempts=st.sampled_from([1, 1, 2, 3]),
    )
    def create(self, entity: int | None, elsewhere: bool, attempts: int) -> str:
        entity_id = None if entity is None else self.entities[entity]
        return self._create(entity_id, elsewhere, attempts).task_id

    @rule(
        task_id=tasks,
        status=st.sampled_from(REPORTABLE),
        skew=st.sampled_from([0, 0, 0, 1, 3, -2]),
        failed=st.booleans(),
    )
    def update(self, task_id: str, status: int, skew: int, failed: bool) -> None:
        model = self.model[task_id]
        version = model.version + skew
        if version <= 0:
            return
        reported = pb.TaskStatus(status=status)  # type: ignore[arg-type]
        if status == S.STATUS_DONE_NOT_OK and failed:
            reported.task_error.code = pb.ERROR_CODE_FAILED
        request = pb.UpdateStatusRequest(
            status_update=pb.StatusUpdate(
                version=pb.TaskVersion(task_id=task_id, status_version=version),
                status=reported,
                author=agent("model"),
            )
        )
        is_retry = model.last_request == request
        try:
            task = self.stub.UpdateStatus(request, timeout=CALL_TIMEOUT).task
        except grpc.RpcError as error:
            code = error.code()
            assert not is_retry
            if model.status in TERMINAL:
                assert code == grpc.StatusCode.FAILED_PRECONDITION
            elif skew != 0:
                assert code == grpc.StatusCode.ABORTED
            else:
                assert status == S.STATUS_COMPLETE_REQUESTED and model.status in UNRELEASED
                assert code == grpc.StatusCode.FAILED_PRECONDITION
            return
        if is_retry:
            assert task.version.status_version == model.version
            return
        assert skew == 0 and model.status not in TERMINAL
        if status == S.STATUS_CANCEL_REQUESTED and model.status in UNRELEASED:
            assert task.status.task_error.code == pb.ERROR_CODE_CANCELLED
            status = S.STATUS_DONE_NOT_OK
        retried = (
            status == S.STATUS_DONE_NOT_OK
            and failed
            and model.attempt >= 1
            and model.attempt < model.max_attempts
            and model.status not in OPERATOR_REQUESTS
        )
        if retried:  # the failed attempt ends; the next one starts at SENT
            status, model.attempt = S.STATUS_SENT, model.attempt + 1
        model.status, model.version, model.last_request = status, model.version + 1, request

    @rule(task_id=tasks)
    def retry_last_update(self, task_id: str) -> None:
        model = self.model[task_id]
        if model.last_request is None:
            return
        task = self.stub.UpdateStatus(model.last_request, timeout=CALL_TIMEOUT).task
        assert (task.status.status, task.version.status_version) == (model.status, model.version)

    @rule(task_id=tasks)
    def cancel(self, task_id: str) -> None:
        model = self.model[task_id]
        try:
            task = self.stub.CancelTask(
                pb.CancelTaskRequest(task_id=task_id), timeout=CALL_TIMEOUT
            ).task
        except grpc.RpcError as error:
            assert model.status in TERMINAL
            assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
            return
        assert model.status not in TERMINAL
        if model.status == S.STATUS_CANCEL_REQUESTED:
            assert task.version.status_version == model.version
            return
        model.status = (
            S.STATUS_DONE_NOT_OK if model.status in UNRELEASED else S.STATUS_CANCEL_REQUESTED
        )
        model.version += 1
        model.last_request = None

    @rule(task_id=tasks)
    def complete(self, task_id: str) -> None:
        model = self.model[task_id]
        request = pb.CompleteTaskRequest(task_id=task_id)
        try:
            task = self.stub.CompleteTask(request, timeout=CALL_TIMEOUT).task
        except grpc.RpcError as error:
            assert model.status in TERMINAL | UNRELEASED | {S.STATUS_CANCEL_REQUESTED}
            assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
            return
        if model.status == S.STATUS_COMPLETE_REQUESTED:
            assert task.version.status_version == model.version
            return
        model.status, model.version, model.last_request = (
            S.STATUS_COMPLETE_REQUESTED,
            model.version + 1,
            None,
        )

    @rule(task_id=tasks, stale=st.booleans())
    def update_definition(self, task_id: str, stale: bool) -> None:
        model = self.model[task_id]
        seen = model.definition - 1 if stale else model.definition
        if seen == 0:
            return
        request = pb.UpdateTaskRequest(
            task_id=task_id, definition_version=seen, display_name=f"model v{seen + 1}"
        )
        try:
            task = self.stub.UpdateTask(request, timeout=CALL_TIMEOUT).task
        except grpc.RpcError as error:
            if model.status in TERMINAL:
                assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
            elif stale:
                assert error.code() == grpc.StatusCode.ABORTED
            else:
                assert model.status in OPERATOR_REQUESTS
                assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
            return
        assert not stale and model.status not in TERMINAL | OPERATOR_REQUESTS
        assert task.display_name == f"model v{seen + 1}"
        model.definition += 1
        model.version += 1
        model.last_request = None
        if model.status not in UNRELEASED:
            model.status = S.STATUS_SENT  # its agent gets the new definition

    @rule(entity=st.sampled_from([0, 1]))
    def reconnect(self, entity: int) -> None:
        entity_id = self.entities[entity]
        expected = [
            (m.task_id, m.status)
            for m in sorted(self.model.values(), key=lambda m: m.created_order)
            if m.entity == entity_id and m.status in DELIVERABLE
        ]
        request = pb.ListenAsAgentRequest(entity_ids=pb.EntityIds(entity_ids=[entity_id]))
        call = self.stub.ListenAsAgent(request, timeout=CALL_TIMEOUT)
        messages: Iterator[pb.ListenAsAgentResponse] = iter(call)
        try:
            received = [_describe(next(messages)) for _ in expected]
            assert received == expected
            marker = self._create(entity_id, elsewhere=False)  # nothing else may come first
            assert _describe(next(messages)) == (marker.task_id, S.STATUS_SENT)
        finally:
            call.cancel()  # type: ignore[no-untyped-call]

    @invariant()
    def server_agrees_with_model(self) -> None:
        for model in self.model.values():
            task = self.stub.GetTask(
                pb.GetTaskRequest(task_id=model.task_id), timeout=CALL_TIMEOUT
            ).task
            assert (task.status.status, task.version.status_version) == (
                model.status,
                model.version,
            )
            assert task.version.definition_version == model.definition
            assert task.attempt == model.attempt


def _describe(message: pb.ListenAsAgentResponse) -> tuple[str, int]:
    kind = message.WhichOneof("request")
    if kind == "execute_request":
        return message.execute_request.task.version.task_id, S.STATUS_SENT
    if kind == "cancel_request":
        return message.cancel_request.task_id, S.STATUS_CANCEL_REQUESTED
    assert kind == "complete_request", message
    return message.complete_request.task_id, S.STATUS_COMPLETE_REQUESTED


def test_server_follows_the_lifecycle_model(stub: TaskManagerStub) -> None:
    LifecycleMachine.stub = stub
    run_state_machine_as_test(
        LifecycleMachine,
        settings=settings(max_examples=25, stateful_step_count=30, deadline=None),
    )
