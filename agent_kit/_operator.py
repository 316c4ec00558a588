"""The operator client: create, get, query, update, cancel, complete, history, agents.

Async first (`OperatorClient`); `SyncOperatorClient` runs the same client in a
background event loop for scripts.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import math
import os
import signal
import threading
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Generator,
    Iterable,
    Iterator,
    Mapping,
)
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, fields
from datetime import datetime
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Any, ParamSpec, TypeVar

import anyio
import anyio.from_thread
import grpc
from anyio.from_thread import BlockingPortal
from google.protobuf.any_pb2 import Any as AnyMessage
from google.protobuf.descriptor import FileDescriptor
from google.protobuf.descriptor_pb2 import FileDescriptorProto, FileDescriptorSet
from google.protobuf.message import Message

from agent_kit import _payloads
from agent_kit._any import packed
from agent_kit._backoff import Backoff
from agent_kit._grpc import RETRYABLE_CODES, ClientAuth, open_channel, open_stub
from agent_kit._payloads import PayloadSource, Progress, task_outputs
from agent_kit._tracing import outgoing
from task_manager.statuses import TERMINAL
from task_manager.v1 import task_manager_pb2 as pb

SESSION_GOING = frozenset({pb.SESSION_STATE_PENDING, pb.SESSION_STATE_RUNNING})
SESSION_ENDING = TERMINAL | {pb.STATUS_CANCEL_REQUESTED}
"""A task's statuses after which its session may have ended (wait_session reads it)."""

P = ParamSpec("P")
T = TypeVar("T")
Q = pb.QueryTasksRequest


def assignee(entity_id: str) -> pb.Principal:
    """The principal of the agent with this entity id."""
    return pb.Principal(system=pb.System(entity_id=entity_id))


@dataclass(frozen=True)
class TaskPolicy:
    """How long the task manager waits on the agent, and how often it tries again.

    Times are in seconds. A field left None takes the server's default
    (`task-manager serve --receipt-timeout ...`); a timeout of 0 is no timeout.
    """

    receipt_timeout: float | None = None
    """From SENT until the agent's first status update."""
    heartbeat_timeout: float | None = None
    """The longest gap between the agent's updates once it has the task."""
    execution_timeout: float | None = None
    """The longest one attempt may take."""
    max_attempts: int | None = None
    """Attempts in all."""
    retry_backoff: float | None = None
    """Wait before attempt n + 1: retry_backoff * 2^(n - 1) ..."""
    max_retry_backoff: float | None = None
    """... at most this long."""

    def to_proto(self) -> pb.TaskPolicy:
        """The wire message. Raises ValueError for a negative or non-finite value."""
        policy = pb.TaskPolicy()
        for field in fields(self):
            value = getattr(self, field.name)
            if value is None:
                continue
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"policy {field.name} must be a number >= 0, not {value!r}")
            if field.name == "max_attempts":
                policy.max_attempts = value
            else:
                getattr(policy, field.name).FromNanoseconds(round(value * 1e9))
        return policy

    @classmethod
    def from_proto(cls, policy: pb.TaskPolicy) -> TaskPolicy:
        """The policy a task carries (Task.policy), in seconds."""
        seconds = {
            field.name: value.ToNanoseconds() / 1e9
            for field, value in policy.ListFields()
            if field.name != "max_attempts"
        }
        return cls(max_attempts=policy.max_attempts or None, **seconds)


CURRENT_DEFINITION_VERSION_KEY = "x-current-definition-version"
"""The trailer in which UpdateTask's ABORTED names the current definition_version."""


class DefinitionConflict(grpc.aio.AioRpcError):
    """UpdateTask answered ABORTED: the task's definition moved on since the version the
    caller saw. Read the task again (current_definition_version) and decide anew."""

    def __init__(self, error: grpc.aio.AioRpcError, task_id: str, seen: int) -> None:
        # grpc-stubs types trailing metadata as tuples; at run time it is the
        # grpc.aio.Metadata this constructor takes.
        super().__init__(
            error.code(),
            error.initial_metadata(),
            error.trailing_metadata(),  # type: ignore[arg-type]
            error.details(),
            error.debug_error_string(),
        )
        self.task_id = task_id
        self.seen_definition_version = seen
        pairs: Iterable[tuple[str, str]] = error.trailing_metadata() or ()  # type: ignore[assignment]
        current = dict(pairs).get(CURRENT_DEFINITION_VERSION_KEY)
        self.current_definition_version: int | None = (
            int(current) if current and current.isdigit() else None
        )
        """The task's definition_version now, from the server's trailer."""


class OperatorClient:
    """Async client for operators. Use as `async with OperatorClient(target) as client`.

    Failed calls raise grpc.aio.AioRpcError with the server's code and message
    (NOT_FOUND, INVALID_ARGUMENT, FAILED_PRECONDITION, ...).
    """

    def __init__(
        self, target: str, *, author: pb.Principal | None = None, auth: ClientAuth | None = None
    ) -> None:
        self.target = target
        self.author = author
        auth = auth or ClientAuth()
        self._channel = open_channel(target, auth)
        self._stub = open_stub(self._channel, auth)

    async def __aenter__(self) -> OperatorClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close(None)

    def task_request(
        self,
        *,
        assignee_entity_id: str | None = None,
        assignee_pool: str | None = None,
        specification: Message | None = None,
        display_name: str = "",
        description: str = "",
        task_id: str = "",
        parent_task_id: str = "",
        is_executed_elsewhere: bool = False,
        policy: TaskPolicy | None = None,
        scheduled_time: datetime | None = None,
        scope: str = "",
        task_type: str = "",
        task_type_version: int = 0,
        inputs: Mapping[str, pb.PayloadRef | None] | None = None,
    ) -> pb.CreateTaskRequest:
        """The CreateTaskRequest create_task sends (for submit_session): a task sent at
        once to its assignee: the agent assignee_entity_id, or one member at a time of
        the pool assignee_pool. A task with neither is never sent
        (unless is_executed_elsewhere, it just records work). A scheduled_time (timezone-
        aware) in the future holds it at SCHEDULED_IN_MANAGER until then. A scope (the
        source application's) makes task_id, and parent_task_id, ids within it: the task
        answered carries its canonical id "<scope>/<task_id>", which every other method
        takes. A task_type (registered; version 0: the latest) has the server check the
        specification against it. inputs name the task's input payloads, each stored
        already or None: to be attached (attach_input), the task held until then. Raises
        ValueError for arguments that cannot be sent; the server's refusals as
        grpc.aio.AioRpcError."""
        request = pb.CreateTaskRequest(
            display_name=display_name,
            description=description,
            task_id=task_id,
            scope=scope,
            is_executed_elsewhere=is_executed_elsewhere,
            relations=pb.Relations(parent_task_id=parent_task_id),
        )
        if assignee_entity_id is not None and assignee_pool is not None:
            raise ValueError("a task has one assignee: an agent or a pool, not both")
        if assignee_entity_id is not None:
            request.relations.assignee.CopyFrom(assignee(assignee_entity_id))
        if assignee_pool is not None:
            request.relations.assignee.team.entity_id = assignee_pool
        if specification is not None:
            request.specification.CopyFrom(packed(specification))
        if policy is not None:
            request.policy.CopyFrom(policy.to_proto())
        if scheduled_time is not None:
            request.scheduled_time.FromDatetime(_aware(scheduled_time, "scheduled_time"))
        if task_type:
            request.task_type.CopyFrom(pb.TaskTypeRef(name=task_type, version=task_type_version))
        for name, payload in (inputs or {}).items():
            request.inputs.add(name=name, payload=payload)
        if self.author is not None:
            request.author.CopyFrom(self.author)
        return request

    async def create_task(
        self,
        *,
        assignee_entity_id: str | None = None,
        assignee_pool: str | None = None,
        specification: Message | None = None,
        display_name: str = "",
        description: str = "",
        task_id: str = "",
        parent_task_id: str = "",
        is_executed_elsewhere: bool = False,
        policy: TaskPolicy | None = None,
        scheduled_time: datetime | None = None,
        scope: str = "",
        task_type: str = "",
        task_type_version: int = 0,
        inputs: Mapping[str, PayloadSource | pb.PayloadRef | None] | None = None,
    ) -> pb.Task:
        """Creates a task (the arguments as task_request's). An input given as bytes or
        a file's path is uploaded first, so the task is released with it. A task_id
        given makes the call safe to repeat: the same request again answers the task,
        already there."""
        refs: dict[str, pb.PayloadRef | None] = {}
        for name, source in (inputs or {}).items():
            if source is None or isinstance(source, pb.PayloadRef):
                refs[name] = source
            else:
                refs[name] = await self.upload_payload(source)
        request = self.task_request(
            assignee_entity_id=assignee_entity_id,
            assignee_pool=assignee_pool,
            specification=specification,
            display_name=display_name,
            description=description,
            task_id=task_id,
            parent_task_id=parent_task_id,
            is_executed_elsewhere=is_executed_elsewhere,
            policy=policy,
            scheduled_time=scheduled_time,
            scope=scope,
            task_type=task_type,
            task_type_version=task_type_version,
            inputs=refs,
        )
        return (await self._stub.CreateTask(request, metadata=outgoing())).task

    async def update_task(
        self,
        task_id: str,
        *,
        definition_version: int,
        display_name: str | None = None,
        description: str | None = None,
        specification: Message | None = None,
    ) -> pb.Task:
        """A new definition of a task that has not ended; the fields left None keep their
        value. definition_version is the one the caller saw (Task.version): if the task
        moved on, raises DefinitionConflict (ABORTED) and changes nothing. A task already
        with its agent is sent to it again with the new definition."""
        request = pb.UpdateTaskRequest(task_id=task_id, definition_version=definition_version)
        if display_name is not None:
            request.display_name = display_name
        if description is not None:
            request.description = description
        if specification is not None:
            request.specification.CopyFrom(packed(specification))
        if self.author is not None:
            request.author.CopyFrom(self.author)
        try:
            return (await self._stub.UpdateTask(request)).task
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.ABORTED:
                raise DefinitionConflict(error, task_id, definition_version) from None
            raise

    async def submit_session(
        self,
        tasks: Iterable[pb.CreateTaskRequest],
        *,
        session_id: str = "",
        display_name: str = "",
        timeout: float | None = None,  # noqa: ASYNC109  (the session's, kept by the server)
        scope: str = "",
    ) -> pb.SubmittedSession:
        """Stores the tasks (made with task_request) as one session, all or none. With a
        timeout (seconds), the tasks still unfinished then are cancelled and the session
        FAILED. A session_id given makes the call safe to repeat. A scope holds the
        session and all its tasks (as task_request's scope)."""
        submission = pb.SessionSubmission(
            session_id=session_id, tasks=list(tasks), display_name=display_name, scope=scope
        )
        if timeout is not None:
            submission.timeout.FromNanoseconds(round(timeout * 1e9))
        request = pb.SubmitSessionsRequest(sessions=[submission], author=self.author)
        return (await self._stub.SubmitSessions(request, metadata=outgoing())).sessions[0]

    async def get_session(self, session_id: str) -> pb.Session:
        return (await self._stub.GetSession(pb.GetSessionRequest(session_id=session_id))).session

    async def cancel_session(self, session_id: str, reason: str = "") -> pb.Session:
        request = pb.CancelSessionRequest(session_id=session_id, reason=reason, author=self.author)
        return (await self._stub.CancelSession(request)).session

    async def wait_session(self, session_id: str, timeout: float | None = None) -> pb.Session:  # noqa: ASYNC109
        """Returns the session once it is over (COMPLETED, FAILED or CANCELLED), woken
        by its tasks' changes, not by polling. Raises WaitTimeout after timeout seconds;
        the session goes on regardless."""
        try:
            with anyio.fail_after(timeout):
                return await self._wait_session(session_id)
        except TimeoutError as error:
            raise WaitTimeout(f"session {session_id} did not end within {timeout} s") from error

    async def _wait_session(self, session_id: str) -> pb.Session:
        session = await self.get_session(session_id)
        if session.state not in SESSION_GOING:
            return session
        # A session ends with a change of one of its tasks (it finished, or was asked to
        # cancel by CancelSession or the timeout), read then; or before the snapshot's
        # end, read at its heartbeat. A cancel that finds every unfinished task already
        # asked to cancel changes no task: the heartbeats (each second) catch that too.
        request = pb.WatchTasksRequest(
            filter=pb.WatchFilter(session_id=session_id),
            include_preexisting=True,
            heartbeat_interval_ms=1_000,
        )
        async for response in self._watch_responses(request):
            status = response.event.task.status.status
            if response.HasField("event") and status not in SESSION_ENDING:
                continue
            session = await self.get_session(session_id)
            if session.state not in SESSION_GOING:
                return session
        raise AssertionError("unreachable: the watch never ends")  # pragma: no cover

    async def session_results(self, session_id: str) -> dict[str, AnyMessage | None]:
        """Each task of the session by id: the result its successful attempt reported
        (DONE_OK), or None for a task that did not succeed (or reported no result)."""
        results: dict[str, AnyMessage | None] = {}
        async for task in self.query_tasks(session_id=session_id):
            succeeded = task.status.status == pb.STATUS_DONE_OK and task.status.HasField("result")
            results[task.version.task_id] = task.status.result if succeeded else None
        return results

    async def register_task_type(
        self,
        specification_type: type[Message],
        name: str,
        version: int,
        *,
        description: str = "",
        constraints: Iterable[pb.FieldConstraint] = (),
        default_policy: TaskPolicy | None = None,
    ) -> pb.TaskType:
        """Registers a task type whose specification is specification_type (its files'
        descriptors are sent along, so the server can decode it). The same registration
        again answers the type as registered; other content under a taken (name,
        version) is ALREADY_EXISTS: register a new version."""
        task_type = pb.TaskType(
            name=name,
            version=version,
            description=description,
            message_type=specification_type.DESCRIPTOR.full_name,
            descriptors=_descriptor_set(specification_type.DESCRIPTOR.file),
            constraints=list(constraints),
        )
        if default_policy is not None:
            task_type.default_policy.CopyFrom(default_policy.to_proto())
        request = pb.RegisterTaskTypeRequest(task_type=task_type)
        return (await self._stub.RegisterTaskType(request)).task_type

    async def upload_payload(
        self, source: PayloadSource, progress: Progress | None = None
    ) -> pb.PayloadRef:
        """Stores bytes, or a file's content, as a payload; answers its reference. A
        file is read twice (hashed, then sent), in chunks, never whole in memory.
        progress, if given, is called with (bytes sent, size) as they go."""
        return await _payloads.upload(self._stub, source, progress)

    async def download_payload(
        self,
        sha256: str,
        destination: str | os.PathLike[str],
        progress: Progress | None = None,
    ) -> pb.PayloadRef:
        """Writes a payload to a file, checked against its digest as it comes. The bytes
        go to `.<name>.partial` beside it first, and an interrupted download resumes from
        it; the file appears under its name only whole. progress as for uploads."""
        return await _payloads.download(self._stub, sha256, destination, progress=progress)

    async def attach_input(
        self, task_id: str, name: str, source: PayloadSource | pb.PayloadRef
    ) -> pb.Task:
        """Gives the task's declared input `name` its payload (uploaded first unless it
        is a reference); with its last input the task is released to its agent."""
        payload = source if isinstance(source, pb.PayloadRef) else await self.upload_payload(source)
        request = pb.AttachInputRequest(task_id=task_id, name=name, payload=payload)
        if self.author is not None:
            request.author.CopyFrom(self.author)
        return (await self._stub.AttachInput(request)).task

    async def download_outputs(
        self,
        task_id: str,
        directory: str | os.PathLike[str],
        progress: Progress | None = None,
    ) -> dict[str, Path]:
        """Writes the task's results (the outputs of the attempt that ended it DONE_OK)
        into directory, one file per output name; answers the paths by name. Raises
        ValueError if the task has not succeeded. progress is called with (bytes so
        far, bytes in all) over all the outputs."""
        task = await self.get_task(task_id)
        outputs = task_outputs(task)
        if not outputs and not any(a.outcome == pb.STATUS_DONE_OK for a in task.attempts):
            raise ValueError(
                f"task {task_id} is {pb.Status.Name(task.status.status)}: it has no"
                " successful attempt, so no results"
            )
        target = Path(directory)
        await anyio.Path(target).mkdir(parents=True, exist_ok=True)
        total = sum(payload.size for payload in outputs.values())
        before = 0
        written = {}
        for name, payload in outputs.items():
            written[name] = target / name
            each = None if progress is None else partial(_overall, progress, before, total)
            await self.download_payload(payload.sha256, written[name], each)
            before += payload.size
        return written

    async def list_agents(self, entity_ids: Iterable[str] = ()) -> list[pb.AgentPresence]:
        """Every agent that ever listened (or only these), by entity id: whether it is
        connected, its open streams, when it was last seen, its tasks in flight."""
        request = pb.ListAgentsRequest(entity_ids=list(entity_ids))
        return list((await self._stub.ListAgents(request)).agents)

    async def get_task(
        self, task_id: str, *, agent_view: bool = False, definition_version: int = 0
    ) -> pb.Task:
        view = pb.TASK_VIEW_AGENT if agent_view else pb.TASK_VIEW_MANAGER
        request = pb.GetTaskRequest(
            task_id=task_id, task_view=view, definition_version=definition_version
        )
        return (await self._stub.GetTask(request)).task

    async def query_tasks(
        self,
        *,
        parent_task_id: str = "",
        statuses: Iterable[pb.Status.ValueType] = (),
        exclude_statuses: bool = False,
        updated_after: datetime | None = None,
        updated_before: datetime | None = None,
        agent_view: bool = False,
        page_size: int = 100,
        session_id: str = "",
    ) -> AsyncIterator[pb.Task]:
        """Every matching task, oldest first, fetching pages as it goes."""
        request = Q(
            parent_task_id=parent_task_id,
            session_id=session_id,
            view=pb.TASK_VIEW_AGENT if agent_view else pb.TASK_VIEW_MANAGER,
            page_size=page_size,
            status_filter=Q.StatusFilter(
                status=list(statuses),
                filter_type=Q.FILTER_TYPE_EXCLUSIVE
                if exclude_statuses
                else Q.FILTER_TYPE_INCLUSIVE,
            ),
        )
        if updated_after is not None:
            request.update_time_range.update_start_time.FromDatetime(updated_after)
        if updated_before is not None:
            request.update_time_range.update_end_time.FromDatetime(updated_before)
        while True:
            page = await self._stub.QueryTasks(request)
            for task in page.tasks:
                yield task
            if not page.page_token:
                return
            request.page_token = page.page_token

    async def cancel_task(self, task_id: str, reason: str = "") -> pb.Task:
        request = pb.CancelTaskRequest(task_id=task_id, reason=reason, author=self.author)
        return (await self._stub.CancelTask(request)).task

    async def complete_task(self, task_id: str, reason: str = "") -> pb.Task:
        request = pb.CompleteTaskRequest(task_id=task_id, reason=reason, author=self.author)
        return (await self._stub.CompleteTask(request)).task

    async def history(self, task_id: str) -> list[pb.TaskHistoryEntry]:
        """Every accepted change of the task, oldest first."""
        entries: list[pb.TaskHistoryEntry] = []
        request = pb.GetTaskHistoryRequest(task_id=task_id)
        while True:
            page = await self._stub.GetTaskHistory(request)
            entries.extend(page.entries)
            if not page.page_token:
                return entries
            request.page_token = page.page_token

    async def watch(
        self,
        *,
        task_ids: Iterable[str] = (),
        assignee_entity_ids: Iterable[str] = (),
        statuses: Iterable[pb.Status.ValueType] = (),
        parent_task_id: str = "",
        start_revision: int = 0,
        include_preexisting: bool = False,
        heartbeat_interval_ms: int = 0,
        rate_limit_ms: int = 0,
    ) -> AsyncGenerator[pb.WatchTasksResponse, None]:
        """Every matching change as a WatchTasksResponse holding an event, in revision
        order, forever. Resumes by itself after disconnects and server restarts (from the
        last revision seen or bookmarked); if that history was compacted, it re-lists:
        the current tasks arrive again as EVENT_TYPE_PREEXISTING, then live changes."""
        request = pb.WatchTasksRequest(
            filter=pb.WatchFilter(
                task_ids=list(task_ids),
                assignee_entity_ids=list(assignee_entity_ids),
                statuses=list(statuses),
                parent_task_id=parent_task_id,
            ),
            start_revision=start_revision,
            include_preexisting=include_preexisting,
            heartbeat_interval_ms=heartbeat_interval_ms,
            rate_limit=pb.RateLimit(update_per_task_limit_ms=rate_limit_ms),
        )
        async for response in self._watch_responses(request):
            if response.HasField("event"):
                yield response

    async def _watch_responses(
        self, request: pb.WatchTasksRequest
    ) -> AsyncIterator[pb.WatchTasksResponse]:
        """Events and heartbeats, resuming across disconnects as watch() describes."""
        backoff = Backoff(initial=0.05, maximum=5.0)
        while True:
            try:
                async for response in self._stub.WatchTasks(request):
                    backoff.reset()
                    yield response
                    is_snapshot = response.event.event_type == pb.EVENT_TYPE_PREEXISTING
                    if not is_snapshot:  # a snapshot cut short is listed again, whole
                        request.include_preexisting = False
                        request.start_revision = response.revision + 1
            except grpc.aio.AioRpcError as error:
                if error.code() == grpc.StatusCode.OUT_OF_RANGE:
                    request.start_revision = 0  # that history is gone: list what is now
                    request.include_preexisting = True
                    continue
                if error.code() not in RETRYABLE_CODES:
                    raise
            await backoff.wait()

    # The timeout argument is the API operators asked for (the wait() of other task
    # systems); it is applied with anyio.fail_after inside.
    async def wait(self, task_id: str, timeout: float | None = None) -> pb.Task:  # noqa: ASYNC109
        """Returns the task once it is finished (DONE_OK or DONE_NOT_OK). Raises
        WaitTimeout after timeout seconds; the task goes on regardless."""
        try:
            with anyio.fail_after(timeout):
                return await self._wait(task_id)
        except TimeoutError as error:
            raise WaitTimeout(f"task {task_id} did not finish within {timeout} s") from error

    async def _wait(self, task_id: str) -> pb.Task:
        task = await self.get_task(task_id)
        if task.status.status in TERMINAL:
            return task
        request = pb.WatchTasksRequest(
            filter=pb.WatchFilter(task_ids=[task_id]), include_preexisting=True
        )
        async for response in self._watch_responses(request):
            if response.HasField("event"):
                if response.event.task.status.status in TERMINAL:
                    return response.event.task
                continue
            # A heartbeat, the first one ending the snapshot: a task that finished just
            # before the snapshot is not in it, so read it again.
            task = await self.get_task(task_id)
            if task.status.status in TERMINAL:
                return task
        raise AssertionError("unreachable: the watch never ends")  # pragma: no cover

    @asynccontextmanager
    async def cancel_on_exit(self, task_id: str) -> AsyncIterator[None]:
        """Cancels the task if the block is left by an exception (Ctrl+C and
        cancellation included). Tasks are asynchronous: otherwise they outlive the
        client."""
        try:
            yield
        except BaseException as error:
            with anyio.CancelScope(shield=True):
                reason = f"the operator's client stopped: {type(error).__name__}"
                with contextlib.suppress(grpc.aio.AioRpcError):
                    await self.cancel_task(task_id, reason=reason)
            raise


class WaitTimeout(TimeoutError):
    """OperatorClient.wait gave up; the task itself goes on."""


class SyncOperatorClient:
    """OperatorClient for synchronous scripts: the same calls, blocking.

    Use as `with SyncOperatorClient(target) as client:`.
    """

    def __init__(
        self, target: str, *, author: pb.Principal | None = None, auth: ClientAuth | None = None
    ) -> None:
        self._portal_context = anyio.from_thread.start_blocking_portal()
        self._portal = self._portal_context.__enter__()
        try:
            self._client: OperatorClient = _call_interruptibly(
                self._portal, partial(_make_client, target, author, auth)
            )
        except BaseException:  # a bad target or unreadable TLS files: no thread left behind
            self._portal_context.__exit__(None, None, None)
            raise

    def __enter__(self) -> SyncOperatorClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        _call_interruptibly(self._portal, self._client.close)
        self._portal_context.__exit__(None, None, None)

    def _call(self, method: Callable[P, Awaitable[T]], *args: P.args, **kwargs: P.kwargs) -> T:
        """Runs one OperatorClient method on the portal's loop, type-checked against it."""
        return _call_interruptibly(self._portal, partial(method, *args, **kwargs))

    def create_task(
        self,
        *,
        assignee_entity_id: str | None = None,
        assignee_pool: str | None = None,
        specification: Message | None = None,
        display_name: str = "",
        description: str = "",
        task_id: str = "",
        parent_task_id: str = "",
        is_executed_elsewhere: bool = False,
        policy: TaskPolicy | None = None,
        scheduled_time: datetime | None = None,
        scope: str = "",
        task_type: str = "",
        task_type_version: int = 0,
        inputs: Mapping[str, PayloadSource | pb.PayloadRef | None] | None = None,
    ) -> pb.Task:
        """As OperatorClient.create_task."""
        return self._call(
            self._client.create_task,
            assignee_entity_id=assignee_entity_id,
            assignee_pool=assignee_pool,
            specification=specification,
            display_name=display_name,
            description=description,
            task_id=task_id,
            parent_task_id=parent_task_id,
            is_executed_elsewhere=is_executed_elsewhere,
            policy=policy,
            scheduled_time=scheduled_time,
            scope=scope,
            task_type=task_type,
            task_type_version=task_type_version,
            inputs=inputs,
        )

    def get_task(
        self, task_id: str, *, agent_view: bool = False, definition_version: int = 0
    ) -> pb.Task:
        """As OperatorClient.get_task."""
        return self._call(
            self._client.get_task,
            task_id,
            agent_view=agent_view,
            definition_version=definition_version,
        )

    def query_tasks(
        self,
        *,
        parent_task_id: str = "",
        statuses: Iterable[pb.Status.ValueType] = (),
        exclude_statuses: bool = False,
        updated_after: datetime | None = None,
        updated_before: datetime | None = None,
        agent_view: bool = False,
        page_size: int = 100,
        session_id: str = "",
    ) -> list[pb.Task]:
        """Every matching task (all pages), oldest first; as OperatorClient.query_tasks."""

        async def collect() -> list[pb.Task]:
            tasks = self._client.query_tasks(
                parent_task_id=parent_task_id,
                statuses=statuses,
                exclude_statuses=exclude_statuses,
                updated_after=updated_after,
                updated_before=updated_before,
                agent_view=agent_view,
                page_size=page_size,
                session_id=session_id,
            )
            return [task async for task in tasks]

        return _call_interruptibly(self._portal, collect)

    def update_task(
        self,
        task_id: str,
        *,
        definition_version: int,
        display_name: str | None = None,
        description: str | None = None,
        specification: Message | None = None,
    ) -> pb.Task:
        """As OperatorClient.update_task (DefinitionConflict on ABORTED)."""
        return self._call(
            self._client.update_task,
            task_id,
            definition_version=definition_version,
            display_name=display_name,
            description=description,
            specification=specification,
        )

    def register_task_type(
        self,
        specification_type: type[Message],
        name: str,
        version: int,
        *,
        description: str = "",
        constraints: Iterable[pb.FieldConstraint] = (),
        default_policy: TaskPolicy | None = None,
    ) -> pb.TaskType:
        """As OperatorClient.register_task_type."""
        return self._call(
            self._client.register_task_type,
            specification_type,
            name,
            version,
            description=description,
            constraints=list(constraints),
            default_policy=default_policy,
        )

    def upload_payload(
        self, source: PayloadSource, progress: Progress | None = None
    ) -> pb.PayloadRef:
        """As OperatorClient.upload_payload (progress is called from another thread)."""
        return self._call(self._client.upload_payload, source, progress)

    def download_payload(
        self,
        sha256: str,
        destination: str | os.PathLike[str],
        progress: Progress | None = None,
    ) -> pb.PayloadRef:
        """As OperatorClient.download_payload (progress is called from another thread)."""
        return self._call(self._client.download_payload, sha256, destination, progress)

    def attach_input(
        self, task_id: str, name: str, source: PayloadSource | pb.PayloadRef
    ) -> pb.Task:
        """As OperatorClient.attach_input."""
        return self._call(self._client.attach_input, task_id, name, source)

    def download_outputs(
        self,
        task_id: str,
        directory: str | os.PathLike[str],
        progress: Progress | None = None,
    ) -> dict[str, Path]:
        """As OperatorClient.download_outputs (progress is called from another thread)."""
        return self._call(self._client.download_outputs, task_id, directory, progress)

    def list_agents(self, entity_ids: Iterable[str] = ()) -> list[pb.AgentPresence]:
        """As OperatorClient.list_agents."""
        return self._call(self._client.list_agents, entity_ids)

    def cancel_task(self, task_id: str, reason: str = "") -> pb.Task:
        return self._call(self._client.cancel_task, task_id, reason)

    def complete_task(self, task_id: str, reason: str = "") -> pb.Task:
        return self._call(self._client.complete_task, task_id, reason)

    def history(self, task_id: str) -> list[pb.TaskHistoryEntry]:
        return self._call(self._client.history, task_id)

    def wait(self, task_id: str, timeout: float | None = None) -> pb.Task:
        return self._call(self._client.wait, task_id, timeout)

    @property
    def task_request(self) -> Callable[..., pb.CreateTaskRequest]:
        """As OperatorClient.task_request (it sends nothing)."""
        return self._client.task_request

    def submit_session(
        self,
        tasks: Iterable[pb.CreateTaskRequest],
        *,
        session_id: str = "",
        display_name: str = "",
        timeout: float | None = None,
        scope: str = "",
    ) -> pb.SubmittedSession:
        """As OperatorClient.submit_session."""
        return self._call(
            self._client.submit_session,
            list(tasks),
            session_id=session_id,
            display_name=display_name,
            timeout=timeout,
            scope=scope,
        )

    def get_session(self, session_id: str) -> pb.Session:
        return self._call(self._client.get_session, session_id)

    def cancel_session(self, session_id: str, reason: str = "") -> pb.Session:
        return self._call(self._client.cancel_session, session_id, reason)

    def wait_session(self, session_id: str, timeout: float | None = None) -> pb.Session:
        return self._call(self._client.wait_session, session_id, timeout)

    def session_results(self, session_id: str) -> dict[str, AnyMessage | None]:
        return self._call(self._client.session_results, session_id)

    def watch(
        self,
        *,
        task_ids: Iterable[str] = (),
        assignee_entity_ids: Iterable[str] = (),
        statuses: Iterable[pb.Status.ValueType] = (),
        parent_task_id: str = "",
        start_revision: int = 0,
        include_preexisting: bool = False,
        heartbeat_interval_ms: int = 0,
        rate_limit_ms: int = 0,
    ) -> Generator[pb.WatchTasksResponse, None, None]:
        """As OperatorClient.watch; a blocking iterator. Close it (or leave the loop that
        exhausts it) before closing the client, e.g. with contextlib.closing."""
        events = self._client.watch(
            task_ids=task_ids,
            assignee_entity_ids=assignee_entity_ids,
            statuses=statuses,
            parent_task_id=parent_task_id,
            start_revision=start_revision,
            include_preexisting=include_preexisting,
            heartbeat_interval_ms=heartbeat_interval_ms,
            rate_limit_ms=rate_limit_ms,
        )
        pump = _WatchPump(events)
        try:
            while True:
                try:
                    response = _call_interruptibly(self._portal, pump.next)
                except StopAsyncIteration:
                    return
                yield response
        finally:  # also on Ctrl+C, wherever it lands: close() ends a pending read
            _call_interruptibly(self._portal, pump.close)

    @contextmanager
    def cancel_on_exit(self, task_id: str) -> Iterator[None]:
        """Cancels the task if the block is left by an exception, Ctrl+C included."""
        try:
            yield
        except BaseException as error:
            reason = f"the operator's client stopped: {type(error).__name__}"
            with contextlib.suppress(grpc.RpcError):
                self.cancel_task(task_id, reason=reason)
            raise


def _call_interruptibly(portal: BlockingPortal, fn: Callable[[], Awaitable[T]]) -> T:
    """portal.call(fn), except that a Ctrl+C while it waits cancels the call and raises
    KeyboardInterrupt here, at a safe point.

    Left to itself, Python raises KeyboardInterrupt wherever the main thread is, and a
    with statement is not safe against it (bpo-29988): landing inside the wait for the
    portal's answer, it left a lock held that the portal's thread needed, and taskctl
    watch hung after Ctrl+C. So while waiting, SIGINT only sets a flag."""
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        return portal.call(fn)
    interrupted = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda signal_number, frame: interrupted.set())
    try:
        future = portal.start_task_soon(fn)
        # Not result(timeout=...): its TimeoutError is the builtin one, which the call
        # itself may raise (a wait that timed out).
        while not concurrent.futures.wait([future], timeout=INTERRUPT_CHECK_S).done:
            if interrupted.is_set():
                future.cancel()
                raise KeyboardInterrupt
        return future.result()
    finally:
        signal.signal(signal.SIGINT, previous)


INTERRUPT_CHECK_S = 0.05
"""How soon a Ctrl+C takes effect while a blocking client waits for an answer."""


class _WatchPump:
    """Owns a watch generator on the portal's loop, for SyncOperatorClient.watch.

    Closing cancels a read in progress first: Ctrl+C can land while a read is pending or
    just being started, and a running generator cannot be closed.
    """

    def __init__(self, events: AsyncGenerator[pb.WatchTasksResponse, None]) -> None:
        self._events = events
        # Made on the loop, where they are used: the scope of the read in progress, and
        # the event set when it has ended.
        self._reading: anyio.CancelScope | None = None
        self._idle: anyio.Event | None = None

    async def next(self) -> pb.WatchTasksResponse:
        self._idle = anyio.Event()
        try:
            with anyio.CancelScope() as self._reading:
                return await self._events.__anext__()
            raise StopAsyncIteration  # close() cancelled the read: the watch is over
        finally:
            self._idle.set()

    async def close(self) -> None:
        if self._reading is not None:
            self._reading.cancel()
        if self._idle is not None:
            await self._idle.wait()
        await self._events.aclose()


async def _make_client(
    target: str, author: pb.Principal | None, auth: ClientAuth | None
) -> OperatorClient:
    # The channel must be created on the portal's event loop, where it will be used.
    return OperatorClient(target, author=author, auth=auth)


def _aware(moment: datetime, name: str) -> datetime:
    # A naive datetime could be UTC or local time: refused rather than guessed.
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(f"{name} must be timezone-aware (say datetime.now(UTC) + ...)")
    return moment


def _overall(progress: Progress, before: int, total: int, done: int, size: int) -> None:
    """One transfer's progress as a part of several: total bytes, before of them done."""
    progress(before + done, total)


def _descriptor_set(file: FileDescriptor | Any) -> FileDescriptorSet:
    """A file's descriptor and those of every file it imports, each once. (A message
    class's DESCRIPTOR.file is typed as protobuf's or upb's FileDescriptor.)"""
    files: dict[str, FileDescriptorProto] = {}
    pending = [file]
    while pending:
        current = pending.pop()
        if current.name in files:
            continue
        proto = FileDescriptorProto()
        current.CopyToProto(proto)
        files[current.name] = proto
        pending.extend(current.dependencies)
    return FileDescriptorSet(file=list(files.values()))
