"""The agent runtime: listen, de-duplicate, run handlers, report, reconnect.

The user writes one async handler per task (or per specification type). The runtime
reports MACHINE_RECEIPT, ACK, WILCO, EXECUTING and the outcome, keeps status_version,
resyncs after ABORTED, and reconnects forever until stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import logging
import math
import os
import signal
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, TypeVarTuple

import anyio
import anyio.abc
import anyio.lowlevel
import grpc
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from google.protobuf import any_pb2
from google.protobuf.message import Message

from agent_kit._any import packed
from agent_kit._backoff import Backoff
from agent_kit._grpc import RETRYABLE_CODES, AsyncStub, ClientAuth, open_channel, open_stub
from agent_kit._payloads import InputCache, PayloadSource, upload
from agent_kit._supervisor import Supervisor, being_cancelled
from agent_kit._tracing import execution
from task_manager.statuses import TERMINAL
from task_manager.v1 import task_manager_pb2 as pb

log = logging.getLogger(__name__)
S = pb.Status

REPORT_TIMEOUT_S = 30.0

STEPS_BEFORE_HANDLER = (
    S.STATUS_MACHINE_RECEIPT,
    S.STATUS_ACK,
    S.STATUS_WILCO,
    S.STATUS_EXECUTING,
)
# The stream cannot work with these; retrying would only hide the problem.
PERMANENT_STREAM_CODES = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
    }
)


@dataclass(frozen=True)
class TaskContext:
    """What a handler gets: the task, and its specification unpacked."""

    task: pb.Task
    specification: Message | None
    """An instance of the type the handler was registered for, or the raw Any for the
    default handler; None if the task has no specification."""
    resumed: bool = False
    """True if this agent's process restarted while it ran the task, and the handler
    (registered with resumable=True) is called again: task.status is the status last
    reported, with its progress (see last_progress)."""
    _reporter: _Reporter | None = field(default=None, repr=False, compare=False)
    _running: _RunningTask | None = field(default=None, repr=False, compare=False)
    _updates: MemoryObjectReceiveStream[pb.Task] | None = field(
        default=None, repr=False, compare=False
    )
    _inputs: InputCache | None = field(default=None, repr=False, compare=False)

    @property
    def task_id(self) -> str:
        return self.task.version.task_id

    @property
    def last_progress(self) -> any_pb2.Any | None:
        """For a resumed task, the progress last reported before the restart, if any."""
        if self.resumed and self.task.status.HasField("progress"):
            return self.task.status.progress
        return None

    async def updates(self) -> AsyncIterator[pb.Task]:
        """The task's new definitions (UpdateTask) as they come, for a handler registered
        with accepts_updates=True; the task manager already knows the agent runs each."""
        if self._updates is None:
            raise RuntimeError("register the handler with accepts_updates=True for updates")
        async for task in self._updates:
            yield task

    async def input(self, name: str) -> Path:
        """The local file holding the task's input `name`: fetched from the task manager
        the first time, then shared by every task with the same payload."""
        named = next((i for i in self.task.inputs if i.name == name), None)
        if named is None or not named.HasField("payload"):
            declared = ", ".join(repr(i.name) for i in self.task.inputs) or "none"
            raise KeyError(f"task {self.task_id} has no input {name!r} (its inputs: {declared})")
        if self._reporter is None or self._inputs is None:
            raise RuntimeError("inputs can only be read from a running handler")
        return await self._inputs.path(self._reporter.stub, self.task_id, named.payload)

    async def save_output(self, name: str, source: PayloadSource) -> pb.PayloadRef:
        """Uploads bytes, or a file's content, and attaches it to this attempt as the
        output `name`; the task's results are the outputs of its successful attempt."""
        if self._reporter is None:
            raise RuntimeError("outputs can only be saved from a running handler")
        payload = await upload(self._reporter.stub, source)
        await self._reporter.attach_output(self.task.attempt, name, payload)
        return payload

    async def progress(self, progress: Message | str | Mapping[str, Any]) -> None:
        """Reports progress: EXECUTING with this progress (a message; a string is sent as
        a google.protobuf.StringValue, a dict as a google.protobuf.Struct). Never waits
        for the server: the latest progress is sent as soon as the link allows, replacing
        any not sent yet, and heartbeats repeat it."""
        if self._reporter is None or self._running is None:
            raise RuntimeError("progress can only be reported from a running handler")
        status = pb.TaskStatus(status=S.STATUS_EXECUTING)
        status.progress.CopyFrom(packed(progress))
        self._reporter.post(status)
        await anyio.lowlevel.checkpoint()  # a stop takes effect here


Handler = Callable[[TaskContext], Awaitable[Message | None]]
"""Returns the result (packed into the task's result), or None."""
H = TypeVar("H", bound=Handler)
Ts = TypeVarTuple("Ts")


class AgentError(Exception):
    """The agent cannot go on (for example the server refused its selector)."""


class _Stop(enum.Enum):
    CANCEL = "cancel"
    COMPLETE = "complete"
    GONE = "gone"
    """The attempt ended without us (a timeout, a retry elsewhere): report nothing more."""


_CODES = {code.value[0]: code for code in grpc.StatusCode}


class _Refused(Exception):
    """The server did not accept a status report; code is what UpdateStatus would say."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


ReportCall = grpc.aio.StreamStreamCall[pb.StatusReport, pb.StatusReportResult]


@dataclass
class _ReportLink:
    """One ReportStatus call: the reports queued for it and the answers awaited on it."""

    call: ReportCall
    outbox: MemoryObjectSendStream[pb.StatusReport]
    queued: MemoryObjectReceiveStream[pb.StatusReport]
    waiting: dict[int, asyncio.Future[pb.StatusReportResult]] = field(default_factory=dict)
    ended_because: str = "the report stream ended"


class _ReportStream:
    """All of an agent's status reports over one ReportStatus stream, opened on demand.

    A stream message costs a fraction of a unary call. The call has one writer task and
    one reader task, owned by the agent's task group; a reporter hands its report over
    and waits for the answer. grpc.aio cancels the whole call when a coroutine inside
    call.write() or read() is cancelled, so a reporter's task (a handler being cancelled,
    a heartbeat being stopped) must never be inside one: cancelling a reporter only stops
    its wait. When the stream breaks, every report waiting on it fails as UNAVAILABLE
    and its reporter retries it (a retried report is idempotent on the server).
    """

    def __init__(self, stub: AsyncStub, supervisor: Supervisor) -> None:
        self._stub = stub
        self._supervisor = supervisor
        self._link: _ReportLink | None = None
        self._report_ids = itertools.count(1)

    async def send(self, update: pb.StatusUpdate) -> pb.Task:
        """The task after the update; raises _Refused."""
        link = self._open()
        report_id = next(self._report_ids)
        result_future: asyncio.Future[pb.StatusReportResult]
        result_future = asyncio.get_running_loop().create_future()
        link.waiting[report_id] = result_future
        try:
            link.outbox.send_nowait(pb.StatusReport(report_id=report_id, status_update=update))
            result = await result_future
        except anyio.ClosedResourceError as closed:
            # The link ended between opening and queueing: a new one takes the retry.
            raise _Refused(grpc.StatusCode.UNAVAILABLE, link.ended_because) from closed
        finally:
            link.waiting.pop(report_id, None)
            if not result_future.done():
                result_future.cancel()
        if result.WhichOneof("outcome") == "task":
            return result.task
        code = _CODES.get(result.error.code, grpc.StatusCode.UNKNOWN)
        raise _Refused(code, result.error.message)

    def _open(self) -> _ReportLink:
        if self._link is None:
            outbox, queued = anyio.create_memory_object_stream[pb.StatusReport](math.inf)
            self._link = _ReportLink(self._stub.ReportStatus(None), outbox, queued)
            self._supervisor.spawn(self._serve, self._link, name="report stream")
        return self._link

    async def _serve(self, link: _ReportLink) -> None:
        try:
            async with anyio.create_task_group() as both:
                both.start_soon(self._write_queued, link, both.cancel_scope)
                await self._read_results(link)
                both.cancel_scope.cancel()
        finally:
            # In one step (no await): reports sent after this go to a new stream.
            if self._link is link:
                self._link = None
            link.outbox.close()
            link.queued.close()
            link.call.cancel()
            stopping = being_cancelled()
            for waiting in link.waiting.values():
                if waiting.done():
                    continue
                if stopping:
                    waiting.cancel()
                else:
                    error = _Refused(grpc.StatusCode.UNAVAILABLE, link.ended_because)
                    waiting.set_exception(error)

    async def _write_queued(self, link: _ReportLink, both: anyio.CancelScope) -> None:
        try:
            async for report in link.queued:
                await self._write(link.call, report)
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as error:
            # InvalidStateError: the call ended before this write. The reader says why.
            link.ended_because = f"the report stream broke: {error}"
            both.cancel()
        except asyncio.CancelledError:
            if being_cancelled():
                raise
            link.ended_because = "the report stream was cancelled"
            both.cancel()

    async def _write(self, call: ReportCall, report: pb.StatusReport) -> None:
        await call.write(report)

    async def _read_results(self, link: _ReportLink) -> None:
        try:
            async for result in link.call:
                waiting = link.waiting.get(result.report_id)
                if waiting is not None and not waiting.done():
                    waiting.set_result(result)
        except grpc.aio.AioRpcError as error:
            link.ended_because = f"the report stream failed: {error.code().name}: {error.details()}"
        except asyncio.CancelledError:
            if being_cancelled():
                raise
            link.ended_because = "the report stream was cancelled"


class _TaskGone(Exception):
    """The task was finished or removed elsewhere: nothing left to report."""


class _StopRequested(Exception):
    def __init__(self, reason: _Stop) -> None:
        super().__init__(reason.value)
        self.reason = reason


@dataclass
class _RunningTask:
    task: pb.Task
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    stop: _Stop | None = None
    reporter: _Reporter | None = None
    updates: MemoryObjectSendStream[pb.Task] | None = None
    """Where new definitions go, if the handler accepts them; otherwise they are rejected."""
    successor: pb.Task | None = None
    """A later attempt of the task, delivered while this one was still running: it runs
    once this one has ended."""

    def request_stop(self, reason: _Stop) -> None:
        if self.stop is None:
            self.stop = reason
            self.scope.cancel()


ENDED_FOR_GOOD = 2**32
"""Remembered as the finished attempt of a task this agent ended on request: none follows."""


class _Reporter:
    """Sends one task's status reports in order, keeping its status_version."""

    def __init__(
        self,
        stub: AsyncStub,
        reports: _ReportStream,
        task_id: str,
        status_version: int,
        author: pb.Principal,
        task: pb.Task | None = None,
    ) -> None:
        self._stub = stub
        self._reports = reports
        self._task_id = task_id
        self.status_version = status_version
        self._author = author
        self._attempt = None if task is None else task.attempt
        # Reports name the definition this agent runs, so a newer one it did not take
        # does not show as what it runs.
        self.definition_version = 0 if task is None else task.version.definition_version
        self._lock = anyio.Lock()  # heartbeats and the handler's progress take turns
        self.last_running: pb.TaskStatus | None = None
        """The latest non-final status, reported or posted: what a heartbeat repeats."""
        self.posted = anyio.Event()
        """Set when the handler posts progress that is not sent yet."""

    async def report(
        self, status: pb.TaskStatus, *, final: bool, repeat_in_heartbeats: bool = True
    ) -> None:
        """Retries until the server accepts the report. Raises _TaskGone if the task is
        finished elsewhere (or moved on to another attempt), and, for a non-final report,
        _StopRequested if an operator asked for cancel/complete (never overwrite that
        request with a progress step)."""
        async with self._lock:
            await self._report(lambda: status, final)
        if not final and repeat_in_heartbeats:
            self.last_running = status

    def post(self, status: pb.TaskStatus) -> None:
        """Makes status the latest, to be sent by the next heartbeat, which comes at once."""
        self.last_running = status
        self.posted.set()

    @property
    def stub(self) -> AsyncStub:
        return self._stub

    async def attach_output(self, attempt: int, name: str, payload: pb.PayloadRef) -> None:
        """Attaches an output to the attempt, retried while the server cannot be reached
        (a retried attach is idempotent). It moves the task's status_version on, so it
        takes its turn with the reports."""
        request = pb.AttachOutputRequest(
            task_id=self._task_id, attempt=attempt, name=name, payload=payload, author=self._author
        )
        backoff = Backoff(initial=0.05, maximum=5.0)
        async with self._lock:
            while True:
                try:
                    response = await self._stub.AttachOutput(request, timeout=REPORT_TIMEOUT_S)
                except grpc.aio.AioRpcError as error:
                    if error.code() not in RETRYABLE_CODES:
                        raise
                    await backoff.wait()
                    continue
                # Only the attach moved the version on: anything else since (an operator's
                # cancel) is for the next report to find, refused as stale, and resync on.
                if response.task.version.status_version == self.status_version + 1:
                    self.status_version = response.task.version.status_version
                return

    async def heartbeat(self) -> None:
        """Sends the latest status, so the task manager knows the agent is alive and sees
        its progress. While the server cannot be reached, each retry sends the status
        latest at the time: progress posted meanwhile replaces what was not sent."""
        self.posted = anyio.Event()
        if self.last_running is None:
            return
        async with self._lock:
            await self._report(lambda: self.last_running or pb.TaskStatus(), final=False)

    async def _report(self, latest: Callable[[], pb.TaskStatus], final: bool) -> None:
        backoff = Backoff(initial=0.05, maximum=5.0)
        while True:
            status = latest()
            update = pb.StatusUpdate(
                version=pb.TaskVersion(
                    task_id=self._task_id,
                    status_version=self.status_version,
                    definition_version=self.definition_version,
                ),
                status=status,
                author=self._author,
            )
            try:
                task = await self._reports.send(update)
            except _Refused as refused:
                if refused.code == grpc.StatusCode.ABORTED:
                    await self._resync(final)
                elif refused.code in (
                    grpc.StatusCode.FAILED_PRECONDITION,
                    grpc.StatusCode.NOT_FOUND,
                ):
                    raise _TaskGone(refused.details) from refused
                elif refused.code in RETRYABLE_CODES:
                    await backoff.wait()
                else:
                    raise
                continue
            self.status_version = task.version.status_version
            return

    async def _resync(self, final: bool) -> None:
        current = await self.read_task()
        status = current.status.status
        if status in TERMINAL:
            raise _TaskGone(f"task {self._task_id} is already {S.Name(status)}")
        if self._attempt is not None and current.attempt != self._attempt:
            raise _TaskGone(f"task {self._task_id} is on attempt {current.attempt} now")
        if not final and status == S.STATUS_CANCEL_REQUESTED:
            raise _StopRequested(_Stop.CANCEL)
        if not final and status == S.STATUS_COMPLETE_REQUESTED:
            raise _StopRequested(_Stop.COMPLETE)
        self.status_version = current.version.status_version

    async def read_task(self) -> pb.Task:
        backoff = Backoff(initial=0.05, maximum=5.0)
        while True:
            try:
                request = pb.GetTaskRequest(task_id=self._task_id)
                response = await self._stub.GetTask(request, timeout=REPORT_TIMEOUT_S)
                return response.task
            except grpc.aio.AioRpcError as error:
                if error.code() == grpc.StatusCode.NOT_FOUND:
                    raise _TaskGone(error.details() or "") from error
                if error.code() not in RETRYABLE_CODES:
                    raise
                await backoff.wait()


class Agent:
    """Runs handlers for the tasks the Task Manager sends to one agent entity.

    Example::

        agent = Agent("127.0.0.1:50051", entity_id="drone-1")

        @agent.handler()
        async def fly(task: TaskContext) -> None:
            ...

        await agent.run()
    """

    def __init__(
        self,
        target: str,
        entity_id: str,
        handler: Handler | None = None,
        *,
        reconnect_backoff: Backoff | None = None,
        remember_finished: int = 10_000,
        auth: ClientAuth | None = None,
        pools: Sequence[str] = (),
        max_in_flight: int = 0,
        input_cache: str | os.PathLike[str] | None = None,
    ) -> None:
        self.target = target
        # Task inputs fetched (ctx.input), one file per digest: in input_cache, or a new
        # temporary directory, removed when run() returns.
        self._inputs = InputCache(input_cache)
        self._auth = auth or ClientAuth()
        self.entity_id = entity_id
        self.pools = tuple(pools)
        """Pools (Team entity ids) this agent is a member of: it takes their tasks too."""
        self.max_in_flight = max_in_flight
        """The server sends at most this many unfinished tasks at a time (0: no limit)."""
        self._author = pb.Principal(system=pb.System(entity_id=entity_id))
        self._handlers: dict[str, tuple[type[Message], Handler]] = {}
        self._type_handlers: dict[tuple[str, int], tuple[type[Message] | None, Handler]] = {}
        """By task type (name, version; 0: every version): the types this agent declares."""
        self._accepting_updates: set[Handler] = set()
        self._resumable: set[Handler] = set()
        self._default_handler = handler
        self._backoff = reconnect_backoff or Backoff(initial=0.1, maximum=10.0)
        self._remember_finished = remember_finished
        self._running: dict[str, _RunningTask] = {}
        # Finished tasks, with the attempt that finished: a later attempt runs again.
        self._finished: OrderedDict[str, int] = OrderedDict()
        self._connected = anyio.Event()
        self._task_group: anyio.abc.TaskGroup | None = None
        self._supervisor: Supervisor | None = None
        self._stop_requested = False
        self._stub: AsyncStub | None = None
        self._reports: _ReportStream | None = None

    def handler(
        self,
        specification_type: type[Message] | None = None,
        *,
        task_type: str | None = None,
        task_type_version: int = 0,
        accepts_updates: bool = False,
        resumable: bool = False,
    ) -> Callable[[H], H]:
        """Registers a handler for tasks whose specification is of this message type,
        or the default handler (no type).

        With task_type, the handler runs the tasks of that registered task type (one
        version, or 0: every version), its specification unpacked as specification_type
        if given (else the Any itself); the agent then declares the types it has
        handlers for when it listens, so a pool sends it only those (and untyped tasks),
        and it refuses a typed task of any other type assigned to it (DONE_NOT_OK,
        ERROR_CODE_REJECTED, naming the type). A new definition of a running task is rejected
        (STATUS_VERSION_REJECTED), unless accepts_updates: then the task manager is told
        the agent runs it, and the handler reads it from `ctx.updates()`.

        A task this agent's process was running when it restarted is reported
        DONE_NOT_OK / ERROR_CODE_FAILED ("restarted and lost the task"), so the task's
        retry policy takes over; unless resumable: then the handler is called again, with
        `ctx.resumed` set and `ctx.last_progress` the progress last reported."""

        def register(function: H) -> H:
            if accepts_updates:
                self._accepting_updates.add(function)
            if resumable:
                self._resumable.add(function)
            if task_type is not None:
                self._type_handlers[(task_type, task_type_version)] = (specification_type, function)
            elif specification_type is None:
                self._default_handler = function
            else:
                full_name = specification_type.DESCRIPTOR.full_name
                self._handlers[full_name] = (specification_type, function)
            return function

        return register

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def wait_connected(self) -> None:
        """Returns once the agent's stream is subscribed on the server."""
        await self._connected.wait()

    async def run(self) -> None:
        """Listens and runs handlers until stop() or cancellation. Every other end of a
        stream is logged and followed by a reconnect. Raises AgentError if the server
        refuses the agent for good (for example an invalid entity id)."""
        self._stop_requested = False
        try:
            channel = open_channel(self.target, self._auth)
            async with channel, anyio.create_task_group() as group:
                self._stub = open_stub(channel, self._auth)
                self._task_group = group
                self._supervisor = Supervisor(group, f"agent {self.entity_id}")
                self._reports = _ReportStream(self._stub, self._supervisor)
                await self._listen_forever(self._stub)
        except ExceptionGroup as group:
            # Users expect the one reason the agent stopped, not the task group's wrapper.
            refused = _first_leaf(group.subgroup(AgentError))
            if refused is None:
                raise
            raise refused from None
        finally:
            self._inputs.close()
        if not self._stop_requested:
            # The listen loop never returns, and children cannot end the group: this is a
            # bug in the runtime, and must not look like a clean stop.
            raise AgentError(f"agent {self.entity_id}: the runtime ended without stop()")

    def run_until_signal(self) -> None:
        """Runs the agent from a script until Ctrl+C (SIGINT) or SIGTERM, then stops it
        cleanly, with no traceback. Raises AgentError as run() does."""
        anyio.run(self._run_until_signal)

    async def _run_until_signal(self) -> None:
        refused: AgentError | None = None
        async with anyio.create_task_group() as group:
            group.start_soon(self._stop_on_signal)
            try:
                await self.run()
            except AgentError as error:
                refused = error
            group.cancel_scope.cancel()
        if refused is not None:
            raise refused

    async def _stop_on_signal(self) -> None:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for received in signals:
                log.info("agent %s: %s; stopping", self.entity_id, signal.strsignal(received))
                self.stop()
                return

    def stop(self) -> None:
        """Stops listening and cancels running handlers (their tasks are left as they
        are: no further report is sent)."""
        self._stop_requested = True
        if self._task_group is not None:
            self._task_group.cancel_scope.cancel()

    def _spawn(self, function: Callable[[*Ts], Awaitable[None]], *args: *Ts, name: str) -> None:
        assert self._supervisor is not None
        self._supervisor.spawn(function, *args, name=name)

    async def _listen_forever(self, stub: AsyncStub) -> None:
        selector = pb.ListenAsAgentRequest(
            entity_ids=pb.EntityIds(entity_ids=[self.entity_id, *self.pools]),
            max_in_flight=self.max_in_flight,
            include_held_tasks=True,
            task_types=[
                pb.TaskTypeRef(name=name, version=version)
                for name, version in sorted(self._type_handlers)
            ],
        )
        while True:
            call = stub.ListenAsAgent(selector)
            try:
                await call.initial_metadata()
                if not call.done():
                    self._connected.set()
                    self._backoff.reset()
                async for message in call:
                    self._on_request(message)
                log.info("agent %s: stream ended; reconnecting", self.entity_id)
            except grpc.aio.AioRpcError as error:
                if error.code() in PERMANENT_STREAM_CODES:
                    raise AgentError(
                        f"the task manager refused agent {self.entity_id}: "
                        f"{error.code().name}: {error.details()}"
                    ) from error
                log.info(
                    "agent %s: stream failed (%s: %s); reconnecting",
                    self.entity_id,
                    error.code().name,
                    error.details(),
                )
            except asyncio.CancelledError:
                if being_cancelled():
                    raise
                log.warning("agent %s: stream cancelled inside gRPC; reconnecting", self.entity_id)
            except Exception:
                log.exception("agent %s: stream failed unexpectedly; reconnecting", self.entity_id)
            finally:
                call.cancel()
                if self._connected.is_set():
                    self._connected = anyio.Event()
            await self._backoff.wait()

    def _on_request(self, message: pb.ListenAsAgentResponse) -> None:
        kind = message.WhichOneof("request")
        if kind == "execute_request":
            self._on_execute(message.execute_request.task)
        elif kind == "cancel_request":
            self._on_stop(message.cancel_request.task_id, _Stop.CANCEL)
        elif kind == "complete_request":
            self._on_stop(message.complete_request.task_id, _Stop.COMPLETE)

    def _on_execute(self, task: pb.Task) -> None:
        task_id = task.version.task_id
        current = self._running.get(task_id)
        if current is not None and _is_new_definition(task, current.task):
            self._spawn(self._answer_definition, current, task, name=f"definition of {task_id}")
            return
        if current is not None and task.attempt > current.task.attempt:
            # The earlier attempt ended on the server while its handler still runs here:
            # stop that one, and run this one once it has wound down.
            current.successor = task
            current.request_stop(_Stop.GONE)
            return
        if current is not None or self._finished.get(task_id, -1) >= task.attempt:
            return  # delivery is at least once: a repeat is a no-op
        running = _RunningTask(task)
        self._running[task_id] = running
        self._spawn(self._execute, task, running, name=f"task {task_id}")

    async def _answer_definition(self, running: _RunningTask, update: pb.Task) -> None:
        """A new definition of a running task: taken, if its handler accepts updates (the
        latest status is reported again on it), else STATUS_VERSION_REJECTED and the
        handler keeps the definition it has."""
        version = update.version.definition_version
        running.task = update  # a repeat of this ExecuteRequest is not answered twice
        reporter = running.reporter
        if reporter is None:
            return
        updates = running.updates
        try:
            if updates is not None:
                reporter.definition_version = version
                taken = reporter.last_running or pb.TaskStatus(status=S.STATUS_EXECUTING)
                await reporter.report(taken, final=False)
                with contextlib.suppress(anyio.ClosedResourceError, anyio.BrokenResourceError):
                    updates.send_nowait(update)  # unless the handler finished meanwhile
            else:
                rejected = pb.TaskStatus(status=S.STATUS_VERSION_REJECTED)
                await reporter.report(rejected, final=False, repeat_in_heartbeats=False)
            log.info(
                "agent %s: task %s definition %d %s",
                self.entity_id,
                update.version.task_id,
                version,
                "taken" if updates is not None else "rejected",
            )
        except _StopRequested as requested:
            running.request_stop(requested.reason)
        except _TaskGone:
            running.request_stop(_Stop.GONE)
        except (_Refused, grpc.aio.AioRpcError) as error:
            log.warning("agent %s: could not answer a new definition: %s", self.entity_id, error)

    def _on_stop(self, task_id: str, reason: _Stop) -> None:
        running = self._running.get(task_id)
        if running is not None:
            running.request_stop(reason)
        elif self._finished.get(task_id) != ENDED_FOR_GOOD:
            # Not running here: this process restarted, or ran an earlier attempt and the
            # request is for a later one it never received. End it as asked (the server's
            # state decides: a task that already ended is left alone).
            self._remember(task_id, ENDED_FOR_GOOD)
            self._spawn(self._end_unknown_task, task_id, reason, name=f"ending {task_id}")

    async def _execute(self, task: pb.Task, running: _RunningTask) -> None:
        task_id = task.version.task_id
        reporter = self._reporter(task_id, task.version.status_version, task)
        running.reporter = reporter
        try:
            final = await self._steps_and_handler(task, running, reporter)
            if running.stop is _Stop.GONE:
                raise _TaskGone(f"attempt {task.attempt} ended on the task manager")
            await self._report_final(reporter, final)
        except _TaskGone as gone:
            log.info("agent %s: task %s ended elsewhere: %s", self.entity_id, task_id, gone)
            if running.stop in (_Stop.CANCEL, _Stop.COMPLETE) and running.successor is None:
                # The request was for the task, which is on a later attempt now (its
                # ExecuteRequest went by while this process was reconnecting): end that.
                self._spawn(self._end_unknown_task, task_id, running.stop, name=f"ending {task_id}")
        except (_Refused, grpc.aio.AioRpcError) as error:
            log.error("agent %s: giving up on task %s: %s", self.entity_id, task_id, error)
        except Exception:
            # A bug must not take the whole agent down with it: say so loudly instead.
            log.exception("agent %s: task %s failed unexpectedly", self.entity_id, task_id)
        finally:
            del self._running[task_id]
            self._remember(task_id, task.attempt)
            if running.successor is not None:
                self._on_execute(running.successor)

    async def _steps_and_handler(
        self, task: pb.Task, running: _RunningTask, reporter: _Reporter
    ) -> pb.TaskStatus:
        if task.status.status != S.STATUS_SENT:
            # Held past SENT, and unknown to this process: it restarted while running it.
            return await self._run_handler(task, running, reporter)
        try:
            for step in STEPS_BEFORE_HANDLER:
                if running.stop is not None:
                    return _status_for_stop(running.stop)
                await reporter.report(pb.TaskStatus(status=step), final=False)
        except _StopRequested as requested:
            return _status_for_stop(requested.reason)
        return await self._run_handler(task, running, reporter)

    async def _run_handler(
        self, task: pb.Task, running: _RunningTask, reporter: _Reporter
    ) -> pb.TaskStatus:
        found = self._handler_for(task)
        if found is None:
            if self._type_handlers and task.HasField("task_type"):
                ref = task.task_type
                return _done_not_ok(
                    pb.ERROR_CODE_REJECTED,
                    f"agent {self.entity_id} runs no handler for task type {ref.name}"
                    f" v{ref.version}",
                )
            type_name = task.specification.TypeName() or "(none)"
            return _done_not_ok(
                pb.ERROR_CODE_REJECTED, f"agent has no handler for specification {type_name}"
            )
        handler, specification = found
        resumed = task.status.status != S.STATUS_SENT
        if resumed and handler not in self._resumable:
            return _done_not_ok(
                pb.ERROR_CODE_FAILED,
                f"agent {self.entity_id} restarted and lost the task (it was"
                f" {S.Name(task.status.status)} on attempt {task.attempt})",
            )
        if resumed and task.status.HasField("progress"):
            reporter.last_running = pb.TaskStatus(
                status=S.STATUS_EXECUTING, progress=task.status.progress
            )
        result: Message | None = None
        heartbeats = anyio.CancelScope()
        interval_s = task.policy.heartbeat_timeout.ToNanoseconds() / 3e9 or math.inf
        self._spawn(
            self._heartbeat,
            reporter,
            running,
            interval_s,
            heartbeats,
            name=f"heartbeats of {task.version.task_id}",
        )
        send: MemoryObjectSendStream[pb.Task] | None = None
        receive: MemoryObjectReceiveStream[pb.Task] | None = None
        if handler in self._accepting_updates:
            send, receive = anyio.create_memory_object_stream[pb.Task](math.inf)
            running.updates = send
        context = TaskContext(
            task,
            specification,
            resumed=resumed,
            _reporter=reporter,
            _running=running,
            _updates=receive,
            _inputs=self._inputs,
        )
        try:
            with running.scope, execution(task, self.entity_id):
                result = await handler(context)
        except Exception as exc:
            if running.stop is not None:
                return _status_for_stop(running.stop)
            log.info("agent %s: task %s failed: %r", self.entity_id, task.version.task_id, exc)
            return _done_not_ok(pb.ERROR_CODE_FAILED, f"{type(exc).__name__}: {exc}")
        finally:
            heartbeats.cancel()
            running.updates = None
            for stream in (send, receive):
                if stream is not None:
                    stream.close()
        if running.stop is not None:
            return _status_for_stop(running.stop)
        if reporter.posted.is_set():
            # Progress posted just before the handler returned is still shown: it goes out
            # before the outcome (the outcome waits for the server all the same).
            try:
                await reporter.heartbeat()
            except _StopRequested as requested:
                return _status_for_stop(requested.reason)
        return _done_ok(result)

    async def _heartbeat(
        self,
        reporter: _Reporter,
        running: _RunningTask,
        interval_s: float,
        scope: anyio.CancelScope,
    ) -> None:
        """While the handler runs: sends its progress as it is posted and repeats its
        latest status every interval_s (a third of the task's heartbeat_timeout), and stops
        the handler if the task moved on."""
        with scope:
            while True:
                with anyio.move_on_after(interval_s):
                    await reporter.posted.wait()
                try:
                    await reporter.heartbeat()
                except _StopRequested as requested:
                    running.request_stop(requested.reason)
                    return
                except _TaskGone as gone:
                    log.info("agent %s: %s; stopping its handler", self.entity_id, gone)
                    running.request_stop(_Stop.GONE)
                    return
                except (_Refused, grpc.aio.AioRpcError) as error:
                    log.warning("agent %s: heartbeat refused: %s", self.entity_id, error)

    def _handler_for(self, task: pb.Task) -> tuple[Handler, Message | None] | None:
        if self._type_handlers and task.HasField("task_type"):
            ref = task.task_type
            by_type = self._type_handlers.get((ref.name, ref.version)) or self._type_handlers.get(
                (ref.name, 0)
            )
            if by_type is None:
                return None
            declared_type, handler = by_type
            if declared_type is None:
                return handler, task.specification
            unpacked = declared_type()
            if not task.specification.Unpack(unpacked):
                return None
            return handler, unpacked
        if not task.HasField("specification"):
            return None if self._default_handler is None else (self._default_handler, None)
        registered = self._handlers.get(task.specification.TypeName())
        if registered is not None:
            message_type, handler = registered
            specification = message_type()
            task.specification.Unpack(specification)
            return handler, specification
        if self._default_handler is None:
            return None
        return self._default_handler, task.specification

    async def _report_final(self, reporter: _Reporter, final: pb.TaskStatus) -> None:
        try:
            await reporter.report(final, final=True)
        except _Refused as refused:
            if refused.code != grpc.StatusCode.INVALID_ARGUMENT:
                raise
            # The server refused the outcome itself (e.g. a result over the size
            # limit): the task must still end, so say why it could not.
            why = f"the task manager refused the outcome: {refused.details}"
            await reporter.report(_done_not_ok(pb.ERROR_CODE_FAILED, why), final=True)

    def _reporter(
        self, task_id: str, status_version: int, task: pb.Task | None = None
    ) -> _Reporter:
        """Reports on task_id; given the task, on its attempt and definition only."""
        assert self._stub is not None
        assert self._reports is not None
        return _Reporter(self._stub, self._reports, task_id, status_version, self._author, task)

    async def _end_unknown_task(self, task_id: str, reason: _Stop) -> None:
        """Ends, as asked, a task this process does not run, if it still waits for that."""
        reporter = self._reporter(task_id, 0)
        asked = (
            S.STATUS_COMPLETE_REQUESTED if reason is _Stop.COMPLETE else S.STATUS_CANCEL_REQUESTED
        )
        try:
            current = await reporter.read_task()
            if current.status.status != asked:
                return
            reporter.status_version = current.version.status_version
            await reporter.report(_status_for_stop(reason), final=True)
        except _TaskGone:
            pass
        except (_Refused, grpc.aio.AioRpcError) as error:
            log.error("agent %s: could not end task %s: %s", self.entity_id, task_id, error)

    def _remember(self, task_id: str, attempt: int) -> None:
        self._finished[task_id] = attempt
        self._finished.move_to_end(task_id)
        while len(self._finished) > self._remember_finished:
            self._finished.popitem(last=False)


def _first_leaf(group: BaseExceptionGroup[AgentError] | None) -> AgentError | None:
    while group is not None:
        first = group.exceptions[0]
        if not isinstance(first, BaseExceptionGroup):
            return first
        group = first
    return None


def _is_new_definition(delivered: pb.Task, running: pb.Task) -> bool:
    return (
        delivered.attempt == running.attempt
        and delivered.version.definition_version > running.version.definition_version
    )


def _status_for_stop(reason: _Stop) -> pb.TaskStatus:
    if reason is _Stop.COMPLETE:
        return pb.TaskStatus(status=S.STATUS_DONE_OK)
    return _done_not_ok(pb.ERROR_CODE_CANCELLED, "cancelled at the operator's request")


def _done_ok(result: Message | None) -> pb.TaskStatus:
    status = pb.TaskStatus(status=S.STATUS_DONE_OK)
    if isinstance(result, any_pb2.Any):
        status.result.CopyFrom(result)
    elif result is not None:
        status.result.Pack(result)
    return status


def _done_not_ok(code: pb.ErrorCode.ValueType, message: str) -> pb.TaskStatus:
    return pb.TaskStatus(
        status=S.STATUS_DONE_NOT_OK, task_error=pb.TaskError(code=code, message=message)
    )
