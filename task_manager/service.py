"""The gRPC servicer: decode a request, call the lifecycle, encode the reply.

Also the ONE place where domain errors become gRPC status codes, and where the handlers
are registered under both service names with deserializers that never fail opaquely.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
import uuid
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Sequence,
)
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message import DecodeError, Message

from storage.base import (
    ConcurrentModification,
    HistoryCompacted,
    Store,
    StoreClosed,
    StoreError,
    WriteTransaction,
    assignee_entity_id,
    with_definition,
)
from storage.base import Credential as StoredCredential
from storage.blobs import BlobStore, StorageFull
from task_manager import (
    auth,
    lifecycle,
    logs,
    payloads,
    scopes,
    sessions,
    statuses,
    task_types,
    tracing,
    validation,
    wire,
)
from task_manager.auth import ANONYMOUS, Caller, Credentials, OpenStreams, RateLimiter, Role
from task_manager.clock import Clock, sleep_until, timestamp
from task_manager.cluster import Cluster
from task_manager.dispatch import Dispatcher
from task_manager.errors import (
    CredentialNotFound,
    DefinitionConflict,
    FailedPrecondition,
    InvalidArgument,
    OutOfRange,
    PayloadNotFound,
    PermissionDenied,
    QuotaExceeded,
    ServerShuttingDown,
    SessionIdTaken,
    SessionNotFound,
    StreamFellBehind,
    TaskIdTaken,
    TaskManagerError,
    TaskNotFound,
    TaskTypeNotFound,
    TaskTypeTaken,
    TerminalTask,
    TooManyRequests,
    Unauthenticated,
    Unsupported,
    VersionConflict,
)
from task_manager.metrics import Metrics
from task_manager.presence import Presence
from task_manager.v1 import lattice_compat_pb2, task_manager_pb2
from task_manager.v1.task_manager_pb2 import (
    AddCredentialRequest,
    AddCredentialResponse,
    AttachInputRequest,
    AttachInputResponse,
    AttachOutputRequest,
    AttachOutputResponse,
    CancelSessionRequest,
    CancelSessionResponse,
    CancelTaskRequest,
    CompleteTaskRequest,
    CreateTaskRequest,
    CreateTaskResponse,
    DownloadPayloadRequest,
    DownloadPayloadResponse,
    GetSessionRequest,
    GetSessionResponse,
    GetTaskHistoryRequest,
    GetTaskHistoryResponse,
    GetTaskRequest,
    GetTaskResponse,
    GetTaskTypeRequest,
    GetTaskTypeResponse,
    ListAgentsRequest,
    ListAgentsResponse,
    ListCredentialsRequest,
    ListCredentialsResponse,
    ListenAsAgentRequest,
    ListenAsAgentResponse,
    ListTaskTypesRequest,
    ListTaskTypesResponse,
    NamedPayload,
    PayloadRef,
    Principal,
    QueryTasksRequest,
    QueryTasksResponse,
    RegisterTaskTypeRequest,
    RegisterTaskTypeResponse,
    ReportError,
    RevokeCredentialRequest,
    RevokeCredentialResponse,
    StatPayloadRequest,
    StatPayloadResponse,
    StatusReport,
    StatusReportResult,
    StatusUpdate,
    SubmitSessionsRequest,
    SubmitSessionsResponse,
    Task,
    TaskPolicy,
    UpdateStatusRequest,
    UpdateTaskRequest,
    UploadPayloadRequest,
    UploadPayloadResponse,
    WatchTasksRequest,
    WatchTasksResponse,
)
from task_manager.watch import WatchHub, watch_stream

log = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[Any, Any]


class CallContext(Protocol):
    """What a method asks of the call it serves, beyond its request: a gRPC call's
    context, or the HTTP front's stand-in for one (task_manager/web)."""

    async def send_initial_metadata(
        self, initial_metadata: Sequence[tuple[str, str | bytes]]
    ) -> None:
        """Tells the client the call is under way (headers), before any answer."""

    def invocation_metadata(self) -> Sequence[tuple[str, str | bytes]] | None:
        """The call's metadata (HTTP: its headers), keys in lower case."""


OperatorChange = Callable[[WriteTransaction, str, Principal | None, str, int], Task]
"""lifecycle.cancel_task or lifecycle.complete_task."""
CURRENT_STATUS_VERSION_KEY = "x-current-status-version"
CURRENT_DEFINITION_VERSION_KEY = "x-current-definition-version"
COMPACT_REVISION_KEY = "x-compact-revision"
RETRY_AFTER_MS_KEY = "x-retry-after-ms"
SERVICE_DESCRIPTORS: tuple[ServiceDescriptor, ...] = (
    task_manager_pb2.DESCRIPTOR.services_by_name["TaskManager"],
    lattice_compat_pb2.DESCRIPTOR.services_by_name["TaskManagerAPI"],
)
SERVICE_NAMES = tuple(service.full_name for service in SERVICE_DESCRIPTORS)


class TaskManagerService:
    """One method per RPC; the same methods serve both service names."""

    def __init__(
        self,
        store: Store,
        dispatcher: Dispatcher,
        watch_hub: WatchHub,
        gate: Gate,
        limits: validation.FieldLimits,
        default_policy: TaskPolicy,
        presence: Presence,
        cluster: Cluster,
        clock: Clock,
        blobs: BlobStore,
        quotas: payloads.PayloadQuotas,
        metrics: Metrics,
    ) -> None:
        self.metrics = metrics
        self._blobs = blobs
        self._quotas = quotas
        self._presence = presence
        self._cluster = cluster
        self._store = store
        self._task_types = task_types.TaskTypeRegistry(store)
        self._limits = limits
        self._default_policy = default_policy
        self._dispatcher = dispatcher
        self._watch_hub = watch_hub
        self._clock = clock
        self._report_readers: set[asyncio.Task[None]] = set()
        self.gate = gate
        self._shutting_down = False

    @property
    def clock(self) -> Clock:
        """The time the service stamps and waits by (the HTTP front's heartbeats too)."""
        return self._clock

    async def CreateTask(
        self,
        request: CreateTaskRequest,
        context: CallContext,
        caller: Caller,
    ) -> bytes:
        validation.check_create_task(request, self._limits, caller.default_scope)
        task_id = request.task_id or scopes.canonical(request.scope, lifecycle.new_id())
        _check_scopes(caller, task_id, request.relations.parent_task_id)
        if request.task_id and request.task_type.name and not request.task_type.version:
            # Perhaps a retry: "the latest" then means the version it was first checked
            # against, whatever was registered since.
            existing = await self._store.get(task_id)
            if existing is not None and existing.task.task_type.name == request.task_type.name:
                request.task_type.version = existing.task.task_type.version
        await self._task_types.check_create(request)
        await self._check_stored(_input_refs(request.inputs))
        author = caller.author(request.author if request.HasField("author") else None)
        if author is not None:
            request.author.CopyFrom(author)

        trace = tracing.carried(context.invocation_metadata())

        def create(tx: WriteTransaction) -> tuple[bytes, bool]:
            created = lifecycle.create_task(
                tx, request, task_id, self._default_policy, self._clock.now_ns(), "", trace
            )
            return tx.encoded(created.task), created.existed

        encoded_task, existed = await self._store.write(create)
        said = CreateTaskResponse(already_existed=True) if existed else None
        return wire.CREATE_TASK_RESPONSE.encode(encoded_task, said)

    async def GetTask(
        self, request: GetTaskRequest, context: CallContext, caller: Caller
    ) -> GetTaskResponse:
        task_id = _task_id(request, caller)
        view = validation.task_view(request.task_view, "task_view")
        stored = await self._store.get(task_id)
        if stored is None:
            raise TaskNotFound(task_id)
        caller.check_entity(assignee_entity_id(stored.task), "read task", task_id)
        task = lifecycle.task_view(stored, view)
        wanted = request.definition_version
        if wanted not in (0, task.version.definition_version):
            latest = stored.task.version.definition_version
            definition = stored.task if wanted == latest else None
            if definition is None and wanted < latest:
                definition = await self._store.definition(task_id, wanted)
            if definition is None:
                raise TaskNotFound(
                    task_id, f"task {task_id} has no definition_version {wanted} (latest {latest})"
                )
            task = with_definition(task, definition)
        return GetTaskResponse(task=task)

    async def UpdateTask(
        self, request: UpdateTaskRequest, context: CallContext, caller: Caller
    ) -> bytes:
        validation.check_update_task(request, self._limits, caller.default_scope)
        _check_scopes(caller, request.task_id)
        if request.HasField("specification"):
            # A typed task's new specification is checked as its first was (a task's type
            # and version never change, so reading them before the write is safe).
            stored = await self._store.get(request.task_id)
            if stored is not None and stored.task.HasField("task_type"):
                pinned = stored.task.task_type
                check = await self._task_types.resolve(pinned.name, pinned.version)
                check.check(request.specification)
        author = caller.author(request.author if request.HasField("author") else None)
        encoded_task = await self._store.write(
            lambda tx: tx.encoded(lifecycle.update_task(tx, request, author, self._clock.now_ns()))
        )
        return wire.UPDATE_TASK_RESPONSE.encode(encoded_task)

    async def QueryTasks(
        self,
        request: QueryTasksRequest,
        context: CallContext,
        caller: Caller,
    ) -> QueryTasksResponse:
        query = validation.task_query(request, caller.default_scope)
        _check_scopes(caller, query.parent_task_id or "", query.session_id or "")
        query = dataclasses.replace(query, scopes=caller.visible_scopes(query.scopes))
        found = list(await self._store.query(query))
        page_size = query.limit - 1
        response = QueryTasksResponse(tasks=[row.task for row in found[:page_size]])
        if len(found) > page_size:
            response.page_token = validation.encode_page_token(found[page_size - 1].cursor)
        return response

    async def UpdateStatus(
        self,
        request: UpdateStatusRequest,
        context: CallContext,
        caller: Caller,
    ) -> bytes:
        if not request.HasField("status_update"):
            raise InvalidArgument("status_update", "is required")
        encoded_task = await self._submit_status_update(request.status_update, caller)
        return wire.UPDATE_STATUS_RESPONSE.encode(encoded_task)

    def _submit_status_update(self, update: StatusUpdate, caller: Caller) -> asyncio.Future[bytes]:
        """Checks an update and queues it; the future holds the task after the commit,
        encoded."""
        validation.check_status_update(update, self._limits)
        return self._store.submit(
            lambda tx: tx.encoded(lifecycle.update_status(tx, update, caller, self._clock.now_ns()))
        )

    async def ReportStatus(
        self,
        reports: AsyncIterator[StatusReport | Undecodable],
        context: CallContext,
        caller: Caller,
    ) -> AsyncIterator[StatusReportResult | bytes]:
        # Reports are read and queued for the writer as they come (so they share group
        # commits); results go back in the same order as each commit completes.
        queued: asyncio.Queue[tuple[int, asyncio.Future[bytes]] | None] = asyncio.Queue()
        in_flight = asyncio.Semaphore(REPORTS_IN_FLIGHT)  # beyond it, the stream pushes back

        async def read_reports() -> None:
            async for report in reports:
                await in_flight.acquire()
                # Each report counts against the caller's request rate: over it, the
                # stream slows down rather than failing reports.
                wait_s = self.gate.limiter.reserve(caller.principal)
                if wait_s > 0:
                    await sleep_until(self._clock, self._clock.now_ns() + int(wait_s * 1e9))
                queued.put_nowait(self._queue_report(report, caller))

        reader = asyncio.create_task(read_reports())  # owned here; cancelled at shutdown
        self._report_readers.add(reader)
        reader.add_done_callback(lambda _: queued.put_nowait(None))
        try:
            while (item := await queued.get()) is not None:
                report_id, outcome = item
                yield await _report_result(report_id, outcome)
                in_flight.release()
            if self._shutting_down:
                raise ServerShuttingDown("the task manager is shutting down; reconnect")
            await reader  # surfaces a failure of the request stream itself
        finally:
            self._report_readers.discard(reader)
            reader.cancel()

    async def WatchTasks(
        self,
        request: WatchTasksRequest,
        context: CallContext,
        caller: Caller,
    ) -> AsyncGenerator[bytes | WatchTasksResponse, None]:
        spec = validation.watch_spec(request, self._limits, caller.default_scope)
        selector = spec.selector
        _check_scopes(caller, *selector.task_ids, selector.parent_task_id, selector.session_id)
        visible = caller.visible_scopes(selector.scopes or None) or frozenset()
        spec = dataclasses.replace(spec, selector=dataclasses.replace(selector, scopes=visible))

        async def subscribed() -> None:
            # Headers now tell the watcher it is subscribed, before any event arrives.
            await context.send_initial_metadata(())

        stream = watch_stream(spec, self._watch_hub, self._store, self._clock, subscribed)
        async for response in stream:
            yield response

    def shut_down(self) -> None:
        """Ends every agent, report and watch stream (UNAVAILABLE, after answering the
        reports already read) and refuses new ones."""
        self._shutting_down = True
        self._dispatcher.close()
        self._watch_hub.close()
        for reader in list(self._report_readers):
            reader.cancel()

    def _queue_report(
        self, report: StatusReport | Undecodable, caller: Caller
    ) -> tuple[int, asyncio.Future[bytes]]:
        if isinstance(report, Undecodable):
            return 0, _failed(InvalidArgument("report", f"is not a valid {report.type_name}"))
        try:
            if not report.HasField("status_update"):
                raise InvalidArgument("status_update", "is required")
            return report.report_id, self._submit_status_update(report.status_update, caller)
        except TaskManagerError as refused:
            return report.report_id, _failed(refused)

    async def ListenAsAgent(
        self,
        request: ListenAsAgentRequest,
        context: CallContext,
        caller: Caller,
    ) -> AsyncGenerator[ListenAsAgentResponse | bytes, None]:
        entity_ids = validation.agent_selector(request, self._limits)
        runs = validation.runnable_task_types(request, self._limits)
        for entity_id in sorted(entity_ids):
            caller.check_entity(entity_id, "listen as", repr(entity_id))
        # Subscribe first, then read the backlog, then skip what the backlog covered:
        # a change committed between the two is queued here, never lost.
        max_in_flight, include_held = request.max_in_flight, request.include_held_tasks
        with (
            self._dispatcher.open_stream(entity_ids, max_in_flight, include_held, runs) as stream,
            self._present(entity_ids, runs),
        ):
            backlog = await self._store.agent_backlog(entity_ids, statuses.WITH_AN_AGENT)
            self._dispatcher.start(stream, backlog.tasks, backlog.revision)
            # Headers now tell the agent it is subscribed, before any task arrives, and
            # with its backlog loaded: a pool counts it as a member for every task
            # created after they arrive (a stream still loading is given none).
            await context.send_initial_metadata(())
            async for agent_request in stream.requests():
                yield agent_request

    @contextmanager
    def _present(
        self, entity_ids: frozenset[str], runs: frozenset[task_types.TypeKey]
    ) -> Iterator[None]:
        """Counts an agent stream in the presence table while it is open, and records
        it (seen, and leased to this replica) in the store."""
        now_ns = self._clock.now_ns()
        self._presence.opened(entity_ids, now_ns, runs)
        self._cluster.streams_changed(entity_ids, now_ns)
        try:
            yield
        finally:
            now_ns = self._clock.now_ns()
            self._presence.closed(entity_ids, now_ns, runs)
            self._cluster.streams_changed(entity_ids, now_ns)

    async def ListAgents(
        self, request: ListAgentsRequest, context: CallContext, caller: Caller
    ) -> ListAgentsResponse:
        wanted = validation.entity_ids(request.entity_ids, "entity_ids", self._limits)
        known = self._presence.known(wanted)
        held = await self._store.in_flight_task_ids(known)
        if caller.scopes:  # of the tasks agents hold, only those in the caller's scopes
            held = {
                entity_id: [t for t in task_ids if scopes.scope_of(t) in caller.scopes]
                for entity_id, task_ids in held.items()
            }
        now_ns = self._clock.now_ns()
        return ListAgentsResponse(
            agents=[
                self._presence.describe(entity_id, held.get(entity_id, []), now_ns)
                for entity_id in known
            ]
        )

    async def SubmitSessions(
        self, request: SubmitSessionsRequest, context: CallContext, caller: Caller
    ) -> SubmitSessionsResponse:
        validation.check_submit_sessions(request, self._limits, caller.default_scope)
        author = caller.author(request.author if request.HasField("author") else None)
        # A retry is the request as the client sent it, before its tasks' types are
        # pinned to versions and their default policies filled in.
        digests = [sessions.fingerprint(submission, author) for submission in request.sessions]
        latest: dict[str, int] = {}
        for index, submission in enumerate(request.sessions):
            caller.check_scope(submission.scope, "a session")
            _check_scopes(caller, *(task.relations.parent_task_id for task in submission.tasks))
            typed = any(task.HasField("task_type") for task in submission.tasks)
            if (
                typed
                and submission.session_id
                and await self._store.get_session(submission.session_id) is not None
            ):
                continue  # a retry or a taken id: its fingerprint decides, not its types
            for position, task in enumerate(submission.tasks):
                where = f"sessions[{index}].tasks[{position}]."
                await self._task_types.check_create(task, where, latest)
        for index, submission in enumerate(request.sessions):
            for position, task in enumerate(submission.tasks):
                where = f"sessions[{index}].tasks[{position}]."
                await self._check_stored(_input_refs(task.inputs, where))
        trace = tracing.carried(context.invocation_metadata())
        submitted = await self._store.write(
            lambda tx: sessions.submit(
                tx,
                request.sessions,
                author,
                self._default_policy,
                self._clock.now_ns(),
                digests,
                trace,
            )
        )
        return SubmitSessionsResponse(sessions=submitted)

    async def GetSession(
        self, request: GetSessionRequest, context: CallContext, caller: Caller
    ) -> GetSessionResponse:
        session_id = validation.session_id(request, caller.default_scope)
        _check_scopes(caller, session_id)
        found = await self._store.get_session(session_id)
        if found is None:
            raise SessionNotFound(session_id)
        return GetSessionResponse(session=sessions.view(*found))

    async def CancelSession(
        self, request: CancelSessionRequest, context: CallContext, caller: Caller
    ) -> CancelSessionResponse:
        validation.check_cancel_session(request, self._limits, caller.default_scope)
        _check_scopes(caller, request.session_id)
        author = caller.author(request.author if request.HasField("author") else None)
        await self._store.write(
            lambda tx: sessions.cancel(
                tx, request.session_id, author, request.reason, self._clock.now_ns()
            )
        )
        found = await self._store.get_session(request.session_id)
        assert found is not None  # sessions are never deleted
        return CancelSessionResponse(session=sessions.view(*found))

    async def RegisterTaskType(
        self, request: RegisterTaskTypeRequest, context: CallContext, caller: Caller
    ) -> RegisterTaskTypeResponse:
        if caller.scopes:
            raise PermissionDenied(
                f"{caller.role} {caller.principal!r} may not register task types: they are"
                f" shared by every scope, and this credential is limited to {sorted(caller.scopes)}"
            )
        validation.check_task_type(request.task_type, self._limits)
        now_ns = self._clock.now_ns()
        registered, existed = await self._store.write(
            lambda tx: task_types.register(tx, request.task_type, now_ns)
        )
        return RegisterTaskTypeResponse(task_type=registered, already_existed=existed)

    async def GetTaskType(
        self, request: GetTaskTypeRequest, context: CallContext, caller: Caller
    ) -> GetTaskTypeResponse:
        task_types.check_name(request.name, "name")
        found = await self._store.task_type(request.name, request.version)
        if found is None:
            raise TaskTypeNotFound(request.name, request.version)
        return GetTaskTypeResponse(task_type=found)

    async def ListTaskTypes(
        self, request: ListTaskTypesRequest, context: CallContext, caller: Caller
    ) -> ListTaskTypesResponse:
        if request.name:
            task_types.check_name(request.name, "name")
        return ListTaskTypesResponse(task_types=await self._store.task_types(request.name))

    async def UploadPayload(
        self,
        parts: AsyncIterator[UploadPayloadRequest | memoryview | Undecodable],
        context: CallContext,
        caller: Caller,
    ) -> UploadPayloadResponse:
        async def decoded() -> AsyncIterator[UploadPayloadRequest | memoryview]:
            async for part in parts:
                yield _decoded(part)  # type: ignore[misc]

        stored, existed = await payloads.upload(
            decoded(), self._blobs, self._limits.payload_bytes, self._quotas, caller.principal
        )
        return UploadPayloadResponse(payload=payloads.ref_message(stored), already_stored=existed)

    async def DownloadPayload(
        self, request: DownloadPayloadRequest, context: CallContext, caller: Caller
    ) -> AsyncIterator[DownloadPayloadResponse]:
        await self._check_payload_reader(request, caller)
        async for chunk in payloads.download(self._blobs, request.sha256, request.offset):
            yield chunk

    async def StatPayload(
        self, request: StatPayloadRequest, context: CallContext, caller: Caller
    ) -> StatPayloadResponse:
        await self._check_payload_reader(request, caller)
        found = await payloads.stat(self._blobs, request.sha256)
        return StatPayloadResponse(payload=payloads.ref_message(found))

    async def _check_payload_reader(
        self, request: DownloadPayloadRequest | StatPayloadRequest, caller: Caller
    ) -> None:
        """An agent reads a payload as an input of one of its tasks, which it names."""
        if caller.role is not Role.AGENT:
            return
        if not request.task_id:
            raise InvalidArgument("task_id", "is required of an agent: the task whose input it is")
        payloads.digest(request.sha256)
        task_id = _task_id(request, caller)
        stored = await self._store.get(task_id)
        if stored is None:
            raise TaskNotFound(task_id)
        lifecycle.check_input_reader(caller, stored.task, request.sha256)

    async def AttachInput(
        self, request: AttachInputRequest, context: CallContext, caller: Caller
    ) -> AttachInputResponse:
        validation.check_attach(request, self._limits, caller.default_scope)
        _check_scopes(caller, request.task_id)
        await self._check_stored([(request.payload, "payload")])
        author = caller.author(request.author if request.HasField("author") else None)
        task = await self._store.write(
            lambda tx: lifecycle.attach_input(tx, request, author, self._clock.now_ns())
        )
        return AttachInputResponse(task=task)

    async def AttachOutput(
        self, request: AttachOutputRequest, context: CallContext, caller: Caller
    ) -> AttachOutputResponse:
        validation.check_attach(request, self._limits)
        # Its agent's, before anything about the payload: else an agent could learn of
        # any payload whether it is stored, and its size. The write checks again.
        stored = await self._store.get(request.task_id)
        if stored is None:
            raise TaskNotFound(request.task_id)
        lifecycle.check_reporter(caller, stored.task, "attach outputs to task")
        await self._check_stored([(request.payload, "payload")])
        limit = self._limits.named_payloads
        task = await self._store.write(
            lambda tx: lifecycle.attach_output(tx, request, caller, limit, self._clock.now_ns())
        )
        return AttachOutputResponse(task=task)

    async def _check_stored(self, refs: Iterable[tuple[PayloadRef, str]]) -> None:
        """Each payload referred to (with the field that names it) is stored, with the
        size given: a task refers only to bytes the blob store holds in full."""
        refs = list(refs)
        if not refs:
            return  # most tasks have no payloads: no look at the blob store
        stored = await self._blobs.stat_many({ref.sha256 for ref, _ in refs})
        for ref, field in refs:
            found = stored.get(ref.sha256)
            if found is None:
                raise PayloadNotFound(ref.sha256, field)
            if found.size != ref.size:
                raise InvalidArgument(
                    f"{field}.size",
                    f"is {ref.size}, but payload {found.digest} has {found.size} bytes",
                )

    async def AddCredential(
        self, request: AddCredentialRequest, context: CallContext, caller: Caller
    ) -> AddCredentialResponse:
        principal, role, entity_ids, limited_to = validation.credential_binding(
            request, self._limits
        )
        now_ns = self._clock.now_ns()
        token = ""
        if request.certificate:
            credential = auth.certificate_binding(principal, role, entity_ids, now_ns, limited_to)
        else:
            credential, token = auth.new_token(principal, role, entity_ids, now_ns, limited_to)
        await self._store.write(lambda tx: tx.add_credential(credential))
        self.gate.reload(await self._store.credentials())  # in force now, not in a second
        return AddCredentialResponse(credential=_credential_message(credential), token=token)

    async def ListCredentials(
        self, request: ListCredentialsRequest, context: CallContext, caller: Caller
    ) -> ListCredentialsResponse:
        stored = await self._store.credentials()
        return ListCredentialsResponse(credentials=[_credential_message(c) for c in stored])

    async def RevokeCredential(
        self, request: RevokeCredentialRequest, context: CallContext, caller: Caller
    ) -> RevokeCredentialResponse:
        credential_id = validation.credential_id(request.credential_id)
        now_ns = self._clock.now_ns()
        if not await self._store.write(lambda tx: tx.revoke_credential(credential_id, now_ns)):
            raise CredentialNotFound(credential_id)
        stored = await self._store.credentials()
        self.gate.reload(stored)  # its new calls fail and its streams end now
        (revoked,) = (c for c in stored if c.credential_id == credential_id)
        return RevokeCredentialResponse(credential=_credential_message(revoked))

    async def CancelTask(
        self,
        request: CancelTaskRequest,
        context: CallContext,
        caller: Caller,
    ) -> bytes:
        encoded_task = await self._operator_request(request, caller, lifecycle.cancel_task)
        return wire.CANCEL_TASK_RESPONSE.encode(encoded_task)

    async def CompleteTask(
        self,
        request: CompleteTaskRequest,
        context: CallContext,
        caller: Caller,
    ) -> bytes:
        encoded_task = await self._operator_request(request, caller, lifecycle.complete_task)
        return wire.COMPLETE_TASK_RESPONSE.encode(encoded_task)

    async def _operator_request(
        self,
        request: CancelTaskRequest | CompleteTaskRequest,
        caller: Caller,
        change: OperatorChange,
    ) -> bytes:
        validation.check_operator_request(request, self._limits, caller.default_scope)
        _check_scopes(caller, request.task_id)
        author = caller.author(request.author if request.HasField("author") else None)
        return await self._store.write(
            lambda tx: tx.encoded(
                change(tx, request.task_id, author, request.reason, self._clock.now_ns())
            )
        )

    async def GetTaskHistory(
        self,
        request: GetTaskHistoryRequest,
        context: CallContext,
        caller: Caller,
    ) -> GetTaskHistoryResponse:
        task_id = _task_id(request, caller)
        if caller.role is Role.AGENT:
            stored = await self._store.get(task_id)
            if stored is None:
                raise TaskNotFound(task_id)
            caller.check_entity(assignee_entity_id(stored.task), "read task", task_id)
        after = validation.decode_page_token(request.page_token)
        page_size = validation.page_size(
            request.page_size, validation.MAX_HISTORY_PAGE_SIZE, validation.MAX_HISTORY_PAGE_SIZE
        )
        entries = list(await self._store.history(task_id, after, page_size + 1))
        # Ask the task, not its history: compaction may have removed every entry of a
        # task that still exists.
        if not entries and after == 0 and await self._store.get(task_id) is None:
            raise TaskNotFound(task_id)
        response = GetTaskHistoryResponse(entries=entries[:page_size])
        if len(entries) > page_size:
            response.page_token = validation.encode_page_token(entries[page_size - 1].revision)
        return response


REPORTS_IN_FLIGHT = 1_024
"""Reports of one ReportStatus stream in flight at most; beyond it the stream pushes back."""


def _input_refs(
    inputs: Sequence[NamedPayload], where: str = ""
) -> Iterator[tuple[PayloadRef, str]]:
    """The payloads of a task's inputs given with one, each with its field's name."""
    for index, named in enumerate(inputs):
        if named.HasField("payload"):
            yield named.payload, f"{where}inputs[{index}].payload"


def _task_id(
    request: GetTaskRequest | GetTaskHistoryRequest | DownloadPayloadRequest | StatPayloadRequest,
    caller: Caller,
) -> str:
    """The canonical id of the task a read names, which the caller may read."""
    explicit = validation.scope(request.scope)
    task_id = validation.task_id(request.task_id, "task_id", explicit, caller.default_scope)
    _check_scopes(caller, task_id)
    return task_id


def _check_scopes(caller: Caller, *canonical_ids: str) -> None:
    """A caller limited to scopes names only tasks and sessions in them (empty ids: none
    named)."""
    for canonical_id in canonical_ids:
        if canonical_id:
            caller.check_scope(scopes.scope_of(canonical_id), repr(canonical_id))


def _credential_message(stored: StoredCredential) -> task_manager_pb2.Credential:
    """A credential as the API shows it: never its secret or hash."""
    shown = task_manager_pb2.Credential(
        credential_id=stored.credential_id,
        kind=stored.kind,
        principal=stored.principal,
        role=stored.role,
        entity_ids=stored.entity_ids,
        create_time=timestamp(stored.created_ns),
        scopes=stored.scopes,
    )
    if stored.revoked_ns is not None:
        shown.revoke_time.CopyFrom(timestamp(stored.revoked_ns))
    return shown


def _failed(error: Exception) -> asyncio.Future[bytes]:
    future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
    future.set_exception(error)
    return future


async def _report_result(
    report_id: int, outcome: asyncio.Future[bytes]
) -> StatusReportResult | bytes:
    try:
        return wire.STATUS_REPORT_RESULT.encode(
            await outcome, StatusReportResult(report_id=report_id)
        )
    except Exception as error:
        status = status_for(error)
        current = error.current if isinstance(error, VersionConflict) else 0
        refused = ReportError(
            code=status.code.value[0], message=status.details, current_status_version=current
        )
        return StatusReportResult(report_id=report_id, error=refused)


# -- admission: who is calling, and may they -------------------------------------------


class Gate:
    """Admits every call: finds the caller (bearer token or client certificate), checks
    its role allows the method, and applies its request-rate and open-stream limits."""

    def __init__(self, credentials: Credentials, limiter: RateLimiter, streams: OpenStreams):
        self.credentials = credentials
        self.limiter = limiter
        self.streams = streams
        self.arrivals = 0
        """Calls that reached a handler, admitted or not: the server's drain watches it."""
        self._closing: ServerShuttingDown | None = None

    def close(self) -> None:
        """Refuses every later call with UNAVAILABLE before it does anything, so that a
        client may safely retry it elsewhere or after the restart."""
        self._closing = ServerShuttingDown(
            "the task manager is shutting down; the call was not applied: retry it"
        )

    def reload(self, stored: Sequence[StoredCredential]) -> set[str]:
        """Takes the stored credentials as the ones in force, and ends the open streams of
        any that no longer are; returns their ids."""
        revoked = self.credentials.replace(stored)
        if revoked:
            ended = self.streams.revoke(revoked)
            log.info("credentials %s revoked; ended %d open streams", sorted(revoked), ended)
        return revoked

    def admit(self, method: str, context: Context) -> Caller:
        """A gRPC call: its bearer token or its client certificate names the caller."""
        return self._admit(method, lambda: self._identify(context))

    def admit_http(self, method: str, authorization: str | None) -> Caller:
        """An HTTP request to the route that calls method: its Authorization header
        names the caller."""
        return self._admit(method, lambda: self.http_caller(authorization))

    def http_caller(self, authorization: str | None) -> Caller:
        """Who an HTTP request's Authorization header names (ANONYMOUS without
        authentication), with no method's role check and no rate limit: for a route that
        calls no method (/metrics)."""
        if not self.credentials.required:
            return ANONYMOUS
        if authorization is None:
            raise Unauthenticated(
                "this task manager requires credentials: send 'Authorization: Bearer <token>'"
            )
        return self._bearer(authorization, "the Authorization header")

    @contextmanager
    def stream_of(self, caller: Caller) -> Iterator[None]:
        """Runs a stream of caller's (the current task serves it) as one of its open
        streams. If its credential is revoked meanwhile, the task is cancelled and the
        stream fails with why (UNAUTHENTICATED)."""
        ended: list[Exception] = []
        serving = asyncio.current_task()
        assert serving is not None

        def end(reason: Exception) -> None:
            ended.append(reason)
            serving.cancel()

        with self.streams.open(caller, end):
            try:
                yield
            except asyncio.CancelledError:
                if not ended:
                    raise
                serving.uncancel()
                raise ended[0] from None

    def _admit(self, method: str, identify: Callable[[], Caller]) -> Caller:
        self.arrivals += 1
        if self._closing is not None:
            raise self._closing
        caller = identify() if self.credentials.required else ANONYMOUS
        caller.check_method(method)
        self.limiter.admit(caller.principal)
        return caller

    def _bearer(self, authorization: str, where: str) -> Caller:
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated(f"{where} must be 'Bearer <token>'")
        return self.credentials.by_token(token.strip())

    def _identify(self, context: Context) -> Caller:
        metadata: dict[str, str | bytes] = dict(context.invocation_metadata() or ())
        authorization = metadata.get("authorization")
        if authorization is not None:
            return self._bearer(str(authorization), "the authorization metadata")
        names = _certificate_names(context)
        if names:
            return self.credentials.by_certificate(names)
        raise Unauthenticated(
            "this task manager requires credentials: send 'authorization: Bearer <token>'"
            " metadata, or connect with a client certificate"
        )


def _certificate_names(context: Context) -> list[str]:
    """The names a verified client certificate gives its holder: subject CN, then SANs."""
    auth = context.auth_context()
    if auth.get("transport_security_type") != [b"ssl"]:
        return []
    names = [*auth.get("x509_common_name", ()), *auth.get("x509_subject_alternative_name", ())]
    return [name.decode() for name in names]


# -- errors: the one table ------------------------------------------------------------


@dataclass(frozen=True)
class _Status:
    code: grpc.StatusCode
    details: str
    trailers: tuple[tuple[str, str], ...] = ()


_CODES: tuple[tuple[type[Exception], grpc.StatusCode], ...] = (
    (InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (TooManyRequests, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (TaskNotFound, grpc.StatusCode.NOT_FOUND),
    (CredentialNotFound, grpc.StatusCode.NOT_FOUND),
    (TaskIdTaken, grpc.StatusCode.ALREADY_EXISTS),
    (SessionIdTaken, grpc.StatusCode.ALREADY_EXISTS),
    (SessionNotFound, grpc.StatusCode.NOT_FOUND),
    (TaskTypeNotFound, grpc.StatusCode.NOT_FOUND),
    (PayloadNotFound, grpc.StatusCode.NOT_FOUND),
    (OutOfRange, grpc.StatusCode.OUT_OF_RANGE),
    (QuotaExceeded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (StorageFull, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (TaskTypeTaken, grpc.StatusCode.ALREADY_EXISTS),
    (VersionConflict, grpc.StatusCode.ABORTED),
    # Another replica's write to the same task committed first: a conflict, not a fault.
    (ConcurrentModification, grpc.StatusCode.ABORTED),
    (DefinitionConflict, grpc.StatusCode.ABORTED),
    (TerminalTask, grpc.StatusCode.FAILED_PRECONDITION),
    (FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (Unsupported, grpc.StatusCode.UNIMPLEMENTED),
    (StreamFellBehind, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (ServerShuttingDown, grpc.StatusCode.UNAVAILABLE),
    (HistoryCompacted, grpc.StatusCode.OUT_OF_RANGE),
    (StoreClosed, grpc.StatusCode.UNAVAILABLE),
    (StoreError, grpc.StatusCode.UNAVAILABLE),
)


def code_for(error: Exception) -> grpc.StatusCode:
    """The gRPC code a failed call answers with (INTERNAL: a bug)."""
    for kind, code in _CODES:
        if isinstance(error, kind):
            return code
    return grpc.StatusCode.INTERNAL


def status_for(error: Exception) -> _Status:
    """The gRPC status a failed call answers with."""
    code = code_for(error)
    if code is grpc.StatusCode.INTERNAL:
        error_id = uuid.uuid4().hex[:12]
        log.error("internal error %s", error_id, exc_info=error)
        return _Status(code, f"internal error (id {error_id})")
    trailers: tuple[tuple[str, str], ...] = ()
    if isinstance(error, VersionConflict):
        trailers = ((CURRENT_STATUS_VERSION_KEY, str(error.current)),)
    elif isinstance(error, ConcurrentModification):
        trailers = ((CURRENT_STATUS_VERSION_KEY, str(error.stored_status_version)),)
    elif isinstance(error, DefinitionConflict):
        trailers = ((CURRENT_DEFINITION_VERSION_KEY, str(error.current)),)
    elif isinstance(error, HistoryCompacted):
        trailers = ((COMPACT_REVISION_KEY, str(error.compacted)),)
    elif isinstance(error, TooManyRequests):
        trailers = ((RETRY_AFTER_MS_KEY, str(math.ceil(error.retry_after_s * 1000))),)
    return _Status(code, str(error), trailers)


async def _abort(context: Context, error: Exception) -> None:
    status = status_for(error)
    await context.abort(status.code, status.details, trailing_metadata=status.trailers)


# -- registration ---------------------------------------------------------------------


@dataclass(frozen=True)
class Undecodable:
    """Stands for request bytes that are not a valid message of the method's type."""

    type_name: str
    error: str


PARSERS: dict[str, Callable[[bytes], Message | memoryview]] = {
    "UploadPayload": wire.upload_part,
}
"""Methods whose requests are not all parsed into messages, and how they are read."""


def _safe_deserializer(
    message_type: type[Message], parse: Callable[[bytes], Message | memoryview]
) -> Callable[[bytes], Message | memoryview | Undecodable]:
    def deserialize(data: bytes) -> Message | memoryview | Undecodable:
        try:
            return parse(data)
        except (DecodeError, ValueError, RuntimeError) as exc:
            return Undecodable(message_type.DESCRIPTOR.full_name, str(exc) or "bad bytes")

    return deserialize


Request = TypeVar("Request")


def _decoded(request: Request | Undecodable) -> Request:
    if isinstance(request, Undecodable):
        raise InvalidArgument("request", f"is not a valid {request.type_name}: {request.error}")
    return request


UnaryMethod = Callable[[Any, Context, Caller], Awaitable[Message | bytes]]
StreamMethod = Callable[[Any, Context, Caller], AsyncIterator[Message | bytes]]
"""A method answers with a message, or with a message already encoded (see wire.py)."""
Handler = Callable[[Any, Context], Any]
"""What grpc calls: a coroutine function (unary) or an async generator function."""


async def _refuse(context: Context, method: str, error: Exception) -> None:
    if isinstance(error, Unauthenticated | PermissionDenied):
        log.warning("denied %s to %s: %s", method, context.peer(), error)
    await _abort(context, error)


REFUSED_STREAM_DRAIN_S = 2.0
"""How long a refused client stream is read, waiting for its client to finish sending."""


async def _drain(requests: AsyncIterator[Any], error: Exception) -> None:
    """Reads what the client of a failed client-streaming call still sends, to its end.

    grpcio's asyncio client reports INTERNAL ("Internal error from Core") instead of the
    server's status when one of its writes reaches a stream the server has already ended
    (grpc/grpc#36066). Ending the call only once the client has half-closed lets it see
    the real refusal. A client that keeps sending gets the status after
    REFUSED_STREAM_DRAIN_S anyway; at shutdown nothing waits.
    """
    if isinstance(error, ServerShuttingDown):
        return

    async def read_to_end() -> None:
        async for _ in requests:
            pass

    # Whatever became of the request stream (ended, broken, too slow), the refusal is sent.
    with suppress(Exception):
        await asyncio.wait_for(read_to_end(), REFUSED_STREAM_DRAIN_S)


def _serving(context: Context) -> None:
    """Log lines from here on name the call's request id (the client's, or a new one)."""
    given = next(
        (v for k, v in context.invocation_metadata() or () if k == logs.REQUEST_ID_KEY), None
    )
    logs.serving(str(given) if given is not None else None)


def _unary_handler(gate: Gate, name: str, method: UnaryMethod, metrics: Metrics) -> Handler:
    async def handle(request: Message | Undecodable, context: Context) -> Message | bytes:
        started = time.perf_counter()
        _serving(context)
        try:
            caller = gate.admit(name, context)
            response = await method(_decoded(request), context, caller)
        except Exception as error:
            metrics.rpc_ended(name, code_for(error).name, time.perf_counter() - started)
            await _refuse(context, name, error)
            raise  # not reached: abort raises
        metrics.rpc_ended(name, "OK", time.perf_counter() - started)
        return response

    return handle


def _upload_handler(gate: Gate, name: str, method: UnaryMethod, metrics: Metrics) -> Handler:
    """A client-streaming handler: the request stream reaches the method as it comes
    (items that fail to decode as Undecodable, one by one)."""

    async def handle(requests: AsyncIterator[Any], context: Context) -> Message | bytes:
        started = time.perf_counter()
        _serving(context)
        try:
            caller = gate.admit(name, context)
            response = await method(requests, context, caller)
        except Exception as error:
            metrics.rpc_ended(name, code_for(error).name, time.perf_counter() - started)
            await _drain(requests, error)
            await _refuse(context, name, error)
            raise  # not reached: abort raises
        metrics.rpc_ended(name, "OK", time.perf_counter() - started)
        return response

    return handle


def _stream_handler(
    gate: Gate, name: str, method: StreamMethod, client_streaming: bool, metrics: Metrics
) -> Handler:
    """A server-streaming (or, with client_streaming, bidirectional) handler. The stream
    counts against its caller's open streams, and ends if the caller's credential is
    revoked (UNAUTHENTICATED)."""

    async def handle(request: Any, context: Context) -> AsyncIterator[Message | bytes]:
        started = time.perf_counter()
        _serving(context)
        code = "CANCELLED"  # unless it ends otherwise: the client went away
        try:
            caller = gate.admit(name, context)
            with gate.stream_of(caller):
                first = request if client_streaming else _decoded(request)
                async for response in method(first, context, caller):
                    yield response
                code = "OK"
        except Exception as error:
            code = code_for(error).name
            if client_streaming:
                await _drain(request, error)
            await _refuse(context, name, error)
        finally:
            metrics.rpc_ended(name, code, time.perf_counter() - started)

    return handle


def _serialize(response: Message | bytes) -> bytes:
    # Answers that carry a changed task, agent requests and watch events come already
    # encoded around the task's stored bytes (wire.py): one serialisation per change.
    return response if isinstance(response, bytes) else response.SerializeToString()


def _method_handler(
    servicer: TaskManagerService, method: MethodDescriptor
) -> grpc.RpcMethodHandler[Any, Any]:
    request_type = message_factory.GetMessageClass(method.input_type)
    behaviour = getattr(servicer, method.name)
    gate, metrics = servicer.gate, servicer.metrics
    parse = PARSERS.get(method.name, request_type.FromString)
    deserializer = _safe_deserializer(request_type, parse)
    if method.client_streaming and not method.server_streaming:
        return grpc.stream_unary_rpc_method_handler(
            _upload_handler(gate, method.name, behaviour, metrics),
            request_deserializer=deserializer,
            response_serializer=_serialize,
        )
    if method.client_streaming:
        # Items that fail to decode reach the method as Undecodable, one by one.
        return grpc.stream_stream_rpc_method_handler(
            _stream_handler(gate, method.name, behaviour, True, metrics),
            request_deserializer=deserializer,
            response_serializer=_serialize,
        )
    if method.server_streaming:
        return grpc.unary_stream_rpc_method_handler(
            _stream_handler(gate, method.name, behaviour, False, metrics),
            request_deserializer=deserializer,
            response_serializer=_serialize,
        )
    return grpc.unary_unary_rpc_method_handler(
        _unary_handler(gate, method.name, behaviour, metrics),
        request_deserializer=deserializer,
        response_serializer=_serialize,
    )


def generic_handlers(servicer: TaskManagerService) -> list[grpc.GenericRpcHandler[Any, Any]]:
    """Handlers for every method of both service names, bound to the same servicer."""
    return [
        grpc.method_handlers_generic_handler(
            service.full_name,
            {method.name: _method_handler(servicer, method) for method in service.methods},
        )
        for service in SERVICE_DESCRIPTORS
    ]
