"""Hypothesis stateful test: the server against a simple model of the lifecycle rules.

Random creates (with up to three attempts, in one of three scopes, ids reused so that a
create may be a retry or a taken id), sessions of tasks, updates with right and wrong
versions, failed attempts, retries, cancels, completes, definition updates and agent
reconnects; after every step GetTask (by canonical id or by scope and id), QueryTasks by
scope and GetSession must agree with the model.
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
    MultipleResults,
    RuleBasedStateMachine,
    initialize,
    invariant,
    multiple,
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
SCOPES = ["", "alpha", "beta"]


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
    created_with: tuple[object, ...] = ()
    """What a create of the same id must ask for to be a retry (None for a session's)."""
    session_id: str = ""

    @property
    def scope(self) -> str:
        scope, separator, _ = self.task_id.partition("/")
        return scope if separator else ""

    @property
    def local_id(self) -> str:
        return self.task_id.rpartition("/")[2]


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
        self.prefix = uuid.uuid4().hex[:8]  # the server outlives examples: keep them apart
        self.entities = [f"{self.prefix}-a", f"{self.prefix}-b"]
        self.sessions: dict[str, list[str]] = {}
        self.created = 0

    @initialize()
    def start(self) -> None:
        self.created = 0

    def _create(
        self,
        entity: str | None,
        elsewhere: bool,
        attempts: int = 1,
        scope: str = "",
        local_id: str = "",
    ) -> ModelTask:
        request = _create_request(entity, elsewhere, attempts)
        request.task_id, request.scope = local_id, scope
        canonical = f"{scope}/{local_id}" if scope else local_id
        existing = self.model.get(canonical) if local_id else None
        asked = (entity, elsewhere, attempts)
        if existing is not None:
            try:
                response = self.stub.CreateTask(request, timeout=CALL_TIMEOUT)
            except grpc.RpcError as error:
                assert existing.created_with != asked
                assert error.code() == grpc.StatusCode.ALREADY_EXISTS
                return existing
            assert existing.created_with == asked and response.already_existed
            task = response.task
            assert (task.status.status, task.version.status_version) == (
                existing.status,
                existing.version,
            )
            return existing
        response = self.stub.CreateTask(request, timeout=CALL_TIMEOUT)
        assert not response.already_existed
        task = response.task
        if local_id:
            assert task.version.task_id == canonical
        assert task.scope == scope
        released = entity is not None and not elsewhere
        expected = (S.STATUS_SENT, 2) if released else (S.STATUS_CREATED, 1)
        assert (task.status.status, task.version.status_version) == expected
        return self._add(task.version.task_id, entity, expected, attempts, asked)

    def _add(
        self,
        task_id: str,
        entity: str | None,
        expected: tuple[int, int],
        attempts: int = 1,
        created_with: tuple[object, ...] = (),
        session_id: str = "",
    ) -> ModelTask:
        self.created += 1
        model = ModelTask(
            task_id,
            entity,
            *expected,
            created_order=self.created,
            max_attempts=attempts,
            attempt=1 if expected[0] == S.STATUS_SENT else 0,
            created_with=created_with,
            session_id=session_id,
        )
        self.model[model.task_id] = model
        return model

    @rule(
        target=tasks,
        entity=st.sampled_from([0, 1, None]),
        elsewhere=st.booleans(),
        attempts=st.sampled_from([1, 1, 2, 3]),
        scope=st.sampled_from(SCOPES),
        local=st.sampled_from([None, 0, 1, 2]),
    )
    def create(
        self, entity: int | None, elsewhere: bool, attempts: int, scope: str, local: int | None
    ) -> str:
        """A few ids shared by every scope: the same id in another scope is another task,
        in the same scope a retry (the same request) or taken (another)."""
        entity_id = None if entity is None else self.entities[entity]
        local_id = "" if local is None else f"{self.prefix}-{local}"
        return self._create(entity_id, elsewhere, attempts, scope, local_id).task_id

    @rule(
        target=tasks,
        entity=st.sampled_from([0, 1]),
        size=st.integers(min_value=1, max_value=3),
        scope=st.sampled_from(SCOPES),
    )
    def submit_session(self, entity: int, size: int, scope: str) -> MultipleResults[str]:
        entity_id = self.entities[entity]
        submission = pb.SessionSubmission(
            scope=scope, tasks=[_create_request(entity_id) for _ in range(size)]
        )
        request = pb.SubmitSessionsRequest(sessions=[submission])
        (submitted,) = self.stub.SubmitSessions(request, timeout=CALL_TIMEOUT).sessions
        assert len(submitted.task_ids) == size
        for task_id in (submitted.session_id, *submitted.task_ids):
            assert task_id.startswith(f"{scope}/") if scope else "/" not in task_id
        for task_id in submitted.task_ids:
            expected = (S.STATUS_SENT, 2)
            self._add(task_id, entity_id, expected, session_id=submitted.session_id)
        self.sessions[submitted.session_id] = list(submitted.task_ids)
        return multiple(*submitted.task_ids)

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

    @rule(task_id=tasks, by_scope=st.booleans())
    def cancel(self, task_id: str, by_scope: bool) -> None:
        model = self.model[task_id]
        request = pb.CancelTaskRequest(task_id=task_id)
        if by_scope:
            request.task_id, request.scope = model.local_id, model.scope
        try:
            task = self.stub.CancelTask(request, timeout=CALL_TIMEOUT).task
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

    @rule(task_id=tasks, by_scope=st.booleans())
    def complete(self, task_id: str, by_scope: bool) -> None:
        model = self.model[task_id]
        request = pb.CompleteTaskRequest(task_id=task_id)
        if by_scope:
            request.task_id, request.scope = model.local_id, model.scope
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
            by_id = pb.GetTaskRequest(task_id=model.task_id)
            by_scope = pb.GetTaskRequest(task_id=model.local_id, scope=model.scope)
            for request in (by_id, by_scope) if model.scope else (by_id,):
                task = self.stub.GetTask(request, timeout=CALL_TIMEOUT).task
                assert task.version.task_id == model.task_id and task.scope == model.scope
                assert (task.status.status, task.version.status_version) == (
                    model.status,
                    model.version,
                )
                assert task.version.definition_version == model.definition
                assert task.attempt == model.attempt
                assert task.session_id == model.session_id

    @invariant()
    def each_scope_queries_its_own_tasks(self) -> None:
        for scope in SCOPES[1:]:
            queried: list[pb.Task] = []
            request = pb.QueryTasksRequest(scope=scope, page_size=1000)
            while True:
                page = self.stub.QueryTasks(request, timeout=CALL_TIMEOUT)
                queried.extend(page.tasks)
                if not page.page_token:
                    break
                request.page_token = page.page_token
            mine = sorted(
                (m for m in self.model.values() if m.scope == scope),
                key=lambda m: m.created_order,
            )
            # The server outlives examples: earlier examples' tasks come first.
            seen = [task.version.task_id for task in queried if task.version.task_id in self.model]
            assert seen == [m.task_id for m in mine]

    @invariant()
    def sessions_count_their_tasks(self) -> None:
        for session_id, task_ids in self.sessions.items():
            request = pb.GetSessionRequest(session_id=session_id)
            session = self.stub.GetSession(request, timeout=CALL_TIMEOUT).session
            expected: dict[int, int] = {}
            for task_id in task_ids:
                status = self.model[task_id].status
                expected[status] = expected.get(status, 0) + 1
            assert {c.status: c.count for c in session.counts} == expected
            if all(self.model[task_id].status in TERMINAL for task_id in task_ids):
                ok = all(self.model[task_id].status == S.STATUS_DONE_OK for task_id in task_ids)
                state = pb.SESSION_STATE_COMPLETED if ok else pb.SESSION_STATE_FAILED
                assert session.state == state


def _create_request(
    entity: str | None, elsewhere: bool = False, attempts: int = 1
) -> pb.CreateTaskRequest:
    request = pb.CreateTaskRequest(
        display_name="model",
        is_executed_elsewhere=elsewhere,
        policy=pb.TaskPolicy(max_attempts=attempts),
    )
    if entity is not None:
        request.relations.assignee.CopyFrom(agent(entity))
    return request


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
