"""The lifecycle rules: versions, compare-and-set, terminal states, release, cancel and
complete, attempts and what a due deadline does, definition updates, pool hand-overs.

Each operation runs inside one store write transaction (a unit of work), so every check
and the write it guards are atomic. Pure Python: no gRPC, no SQL.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from storage.base import (
    PayloadMissing,
    StoredTask,
    TaskExists,
    WriteTransaction,
    assignee_entity_id,
    definition_only,
    with_definition,
)
from task_manager import liveness, scopes, statuses
from task_manager.auth import Caller, Role
from task_manager.clock import timestamp
from task_manager.errors import (
    DefinitionConflict,
    FailedPrecondition,
    InvalidArgument,
    PayloadNotFound,
    PermissionDenied,
    TaskIdTaken,
    TaskNotFound,
    TerminalTask,
    VersionConflict,
)

# Enum values are read as pb.STATUS_*: module attributes, far cheaper per write than
# Status.STATUS_* (a Python-level lookup on the enum wrapper).
from task_manager.v1 import task_manager_pb2 as pb
from task_manager.v1.task_manager_pb2 import (
    AttachInputRequest,
    AttachOutputRequest,
    CreateTaskRequest,
    NamedPayload,
    PayloadRef,
    Principal,
    Status,
    StatusUpdate,
    System,
    Task,
    TaskError,
    TaskPolicy,
    TaskStatus,
    TaskVersion,
    TaskView,
    TraceContext,
    UpdateTaskRequest,
)

MANAGER = Principal(system=System(service_name="task-manager"))
"""The author of the changes the task manager makes by itself (release to SENT)."""


@dataclass(frozen=True, slots=True)
class Created:
    """What a CreateTask came to: the task as it stands, and whether it was there
    already (the same request, retried)."""

    task: Task
    existed: bool = False


CREATE_FIELDS = (
    ("display_name", "display_name"),
    ("specification", "specification"),
    ("author", "created_by"),
    ("relations", "relations"),
    ("description", "description"),
    ("is_executed_elsewhere", "is_executed_elsewhere"),
    ("session", "session_id"),  # a session's task is not a plain CreateTask's
    ("task_type", "task_type"),
)
"""The fields a CreateTaskRequest sets that a task keeps as they were created (its first
definition), in the request's order. Compared apart: the policy (stored with the
server's defaults filled in) and the inputs (attached since, perhaps). Not compared:
scheduled_time, which a status update or a retry's backoff moves on."""


def new_id() -> str:
    """A task (or session) id for one created without: a random UUID."""
    return str(uuid.uuid4())


def create_task(
    tx: WriteTransaction,
    request: CreateTaskRequest,
    task_id: str,
    defaults: TaskPolicy,
    now_ns: int,
    session_id: str = "",
    trace_context: TraceContext | None = None,
) -> Created:
    """Stores the task at CREATED (versions 1/1), then releases it to its agent if it has
    one: SENT at status_version 2, or SCHEDULED_IN_MANAGER until a future scheduled_time.
    Returns the task as it stands after both. trace_context: the creating call's
    (task_manager/tracing.py), not part of what a retry must repeat.

    A create whose task_id is taken is a retry if it asks for what the task was created
    with (its first definition): it writes nothing and answers the task as it stands
    now, so a client whose answer was lost can repeat the call. One that asks for
    anything else is refused, naming the first field that differs."""
    now = timestamp(now_ns)
    task = Task(
        version=TaskVersion(task_id=task_id, definition_version=1, status_version=1),
        display_name=request.display_name,
        status=TaskStatus(status=pb.STATUS_CREATED),
        description=request.description,
        is_executed_elsewhere=request.is_executed_elsewhere,
        create_time=now,
        last_update_time=now,
        policy=liveness.effective_policy(request.policy, defaults),
        session_id=session_id,
        scope=scopes.scope_of(task_id),
    )
    if request.HasField("scheduled_time"):
        task.scheduled_time.CopyFrom(request.scheduled_time)
    if request.HasField("specification"):
        task.specification.CopyFrom(request.specification)
    if request.HasField("relations"):
        task.relations.CopyFrom(request.relations)
    if request.HasField("task_type"):
        task.task_type.CopyFrom(request.task_type)
    if request.HasField("author"):
        task.created_by.CopyFrom(request.author)
        task.last_updated_by.CopyFrom(request.author)
    if trace_context is not None:
        task.trace_context.CopyFrom(trace_context)
    task.inputs.extend(request.inputs)
    task.pending_inputs.extend(i.name for i in request.inputs if not i.HasField("payload"))
    created = StoredTask(task=task, agent_task=None, last_update=None)
    # A task released at once is stored at the state it is released to: one row
    # written, with a history entry for CREATED and one for the release.
    released = _released(task, now_ns)
    _reference(tx, request.inputs, "inputs")
    try:
        tx.insert(created, then=released)
    except TaskExists:
        return _created_before(tx, task, request)
    return Created(task if released is None else released.task)


def _created_before(tx: WriteTransaction, wanted: Task, request: CreateTaskRequest) -> Created:
    """The stored task with wanted's id, if it was created as wanted; else TaskIdTaken."""
    task_id = wanted.version.task_id
    stored = tx.load(task_id)
    if stored is None:  # not expected: the insert found the id taken in this transaction
        raise TaskIdTaken(task_id)
    first = stored.task
    if first.version.definition_version != 1:
        definition = tx.load_definition(task_id, 1)
        if definition is None:  # not expected: UpdateTask saves each definition it replaces
            raise TaskIdTaken(task_id)
        first = with_definition(first, definition)
    for request_field, task_field in CREATE_FIELDS:
        if _field_value(first, task_field) != _field_value(wanted, task_field):
            raise TaskIdTaken(task_id, request_field)
    # The stored policy has the defaults of the server that created it filled in; the
    # same request is the same policy whatever this server's defaults.
    if liveness.effective_policy(request.policy, first.policy) != first.policy:
        raise TaskIdTaken(task_id, "policy")
    if not _declared_as(request.inputs, first.inputs):
        raise TaskIdTaken(task_id, "inputs")
    return Created(stored.task, existed=True)


def _reference(tx: WriteTransaction, named: Sequence[NamedPayload], field: str) -> None:
    """Records the payloads named as referred to by a task, so none is collected; a
    payload gone since the caller checked (collected meanwhile) is NOT_FOUND."""
    try:
        tx.reference_payloads([n.payload.sha256 for n in named if n.HasField("payload")])
    except PayloadMissing as missing:
        index = next(i for i, n in enumerate(named) if n.payload.sha256 == missing.digest)
        raise PayloadNotFound(missing.digest, f"{field}[{index}].payload") from None


def _declared_as(declared: Sequence[NamedPayload], inputs: Sequence[NamedPayload]) -> bool:
    """Whether inputs (a task's, some perhaps attached since) are what declared asked for:
    the same names in order, with the same payload where one was given."""
    return len(declared) == len(inputs) and all(
        asked.name == have.name and (not asked.HasField("payload") or asked.payload == have.payload)
        for asked, have in zip(declared, inputs, strict=True)
    )


def _field_value(task: Task, name: str) -> object:
    # A message field unset and one set to its empty value are the same request.
    value = getattr(task, name)
    return value.SerializeToString(deterministic=True) if hasattr(value, "ListFields") else value


def _released(task: Task, now_ns: int) -> StoredTask | None:
    """The task as its release leaves it (SENT, or SCHEDULED_IN_MANAGER until a future
    scheduled_time); None if it is not to be released (yet)."""
    if not is_releasable(task):
        return None
    if task.HasField("scheduled_time") and liveness.ns(task.scheduled_time) > now_ns:
        scheduled = TaskStatus(status=pb.STATUS_SCHEDULED_IN_MANAGER)
        return _stored(_with_status(task, scheduled, MANAGER, now_ns), None, None)
    return _sent(StoredTask(task=task, agent_task=None, last_update=None), now_ns)


def _sent(stored: StoredTask, now_ns: int, update: StatusUpdate | None = None) -> StoredTask:
    """The task as the next attempt starts: SENT, to be delivered to the agent. update is
    the agent's report that ended the previous attempt, if one did (kept for the retry
    check)."""
    sent = _with_status(stored.task, TaskStatus(status=pb.STATUS_SENT), MANAGER, now_ns)
    sent.attempt += 1
    # A pool task's holder is chosen by the dispatcher once a member has room.
    agent = "" if assignee_kind(sent) == "team" else assignee_entity_id(sent) or ""
    sent.attempts.add(number=sent.attempt, entity_id=agent, start_time=timestamp(now_ns))
    return _stored(sent, sent, update)


def _send(
    tx: WriteTransaction,
    stored: StoredTask,
    now_ns: int,
    reason: str,
    update: StatusUpdate | None = None,
) -> Task:
    """Starts the next attempt of a stored task (see _sent)."""
    sent = _sent(stored, now_ns, update)
    tx.replace(sent, stored.task.version.status_version, reason)
    return sent.task


def _stored(task: Task, agent_task: Task | None, last_update: StatusUpdate | None) -> StoredTask:
    """The task as stored, with the deadline its new state sets."""
    deadline = liveness.next_deadline(task, agent_task)
    return StoredTask(
        task=task,
        agent_task=agent_task,
        last_update=last_update,
        deadline_ns=None if deadline is None else deadline.at_ns,
    )


@dataclass(frozen=True)
class Expiry:
    """What expire did: the task after it acted, or the time to try again."""

    task: Task | None = None
    not_before_ns: int | None = None


def expire(
    tx: WriteTransaction,
    task_id: str,
    now_ns: int,
    up_since_ns: int,
    restart_grace_ns: int | None,
) -> Expiry:
    """Acts on a task whose deadline has come: a scheduled release, or a timeout that ends
    the attempt (retried if attempts remain). A timeout does not fire within the restart
    grace (restart_grace_ns, or the task's heartbeat_timeout, after up_since_ns: when the
    gateway came up, which a replica joining running ones does not change), so agents can
    reconnect and report after a restart of the task manager. A task another replica is
    changing right now is left to it."""
    stored = tx.claim(task_id)
    if stored is None:
        return Expiry()
    deadline = liveness.next_deadline(stored.task, stored.agent_task)
    if deadline is None or deadline.at_ns > now_ns:
        return Expiry(not_before_ns=None if deadline is None else deadline.at_ns)
    task = stored.task
    if deadline.kind is liveness.DeadlineKind.RELEASE:
        return Expiry(task=_send(tx, stored, now_ns, "scheduled_time reached"))
    grace_ns = restart_grace_ns
    if grace_ns is None:
        grace_ns = task.policy.heartbeat_timeout.ToNanoseconds()
    if now_ns < up_since_ns + grace_ns:
        return Expiry(not_before_ns=up_since_ns + grace_ns)
    agent = task.attempts[-1].entity_id
    message = liveness.timeout_message(deadline.kind, task, agent)
    error = TaskError(code=pb.ERROR_CODE_TIMEOUT, message=message)
    # An agent asked to cancel or complete that goes silent is not asked again.
    retry = task.status.status not in statuses.OPERATOR_REQUESTS
    return Expiry(task=_end_attempt(tx, stored, error, retry, MANAGER, None, now_ns))


def end_lost_attempt(
    tx: WriteTransaction, task_id: str, agent: str, lost_since_ns: int, now_ns: int
) -> Task | None:
    """Ends the task's attempt if its agent has been LOST (since lost_since_ns) for the
    task's lost_agent_timeout; None if the task is not due (or moved on meanwhile)."""
    stored = tx.load(task_id)
    if stored is None:
        return None
    task = stored.task
    timeout_ns = liveness.duration_ns(task.policy.lost_agent_timeout)
    if (
        not timeout_ns
        or task.status.status in statuses.NOT_WITH_AN_AGENT
        or not task.attempts
        or task.attempts[-1].entity_id != agent
        or now_ns < lost_since_ns + timeout_ns
    ):
        return None
    message = (
        f"lost_agent_timeout ({liveness.seconds(task.policy.lost_agent_timeout)}) passed:"
        f" agent {agent} has had no stream since it was lost (attempt {task.attempt})"
    )
    error = TaskError(code=pb.ERROR_CODE_TIMEOUT, message=message)
    retry = task.status.status not in statuses.OPERATOR_REQUESTS
    return _end_attempt(tx, stored, error, retry, MANAGER, None, now_ns)


def _end_attempt(
    tx: WriteTransaction,
    stored: StoredTask,
    error: TaskError,
    retry: bool,
    author: Principal | None,
    update: StatusUpdate | None,
    now_ns: int,
) -> Task:
    """Ends the current attempt as failed: the next attempt starts (at once, or after the
    retry backoff at SCHEDULED_IN_MANAGER) if retry is allowed and attempts remain;
    otherwise the task ends DONE_NOT_OK with error."""
    current = stored.task
    policy = current.policy
    if not retry or current.attempt >= policy.max_attempts:
        failed = TaskStatus(status=pb.STATUS_DONE_NOT_OK, task_error=error)
        task = _with_status(current, failed, author, now_ns)
        _close_attempt(task, pb.STATUS_DONE_NOT_OK, error, now_ns)
        agent_task = task if update is not None else stored.agent_task
        tx.replace(_stored(task, agent_task, update), current.version.status_version)
        return task
    ended = Task()
    ended.CopyFrom(current)
    _close_attempt(ended, pb.STATUS_DONE_NOT_OK, error, now_ns)
    reason = f"attempt {current.attempt} of {policy.max_attempts} failed: {error.message}"
    backoff_ns = liveness.retry_backoff_ns(policy, current.attempt)
    if backoff_ns == 0:
        ending = StoredTask(task=ended, agent_task=stored.agent_task, last_update=None)
        return _send(tx, ending, now_ns, reason, update)
    waiting = _with_status(ended, TaskStatus(status=pb.STATUS_SCHEDULED_IN_MANAGER), author, now_ns)
    waiting.scheduled_time.CopyFrom(timestamp(now_ns + backoff_ns))
    tx.replace(_stored(waiting, stored.agent_task, update), current.version.status_version, reason)
    return waiting


def _close_attempt(
    task: Task, outcome: Status.ValueType, error: TaskError | None, now_ns: int
) -> None:
    if not task.attempts or task.attempts[-1].HasField("end_time"):
        return  # a task from before attempts were recorded, or already closed
    attempt = task.attempts[-1]
    attempt.end_time.CopyFrom(timestamp(now_ns))
    attempt.outcome = outcome
    if error is not None and error.code != pb.ERROR_CODE_INVALID:
        attempt.error.CopyFrom(error)


def is_releasable(task: Task) -> bool:
    """A task goes to an agent (or a pool of agents) when it names one, is not executed
    elsewhere, and has all its inputs."""
    has_agent = assignee_kind(task) in ("system", "team") and bool(assignee_entity_id(task))
    return has_agent and not task.is_executed_elsewhere and not task.pending_inputs


def assignee_kind(task: Task) -> str | None:
    return task.relations.assignee.WhichOneof("agent")


def hand_over(
    tx: WriteTransaction, seen: Task, old_holder: str, new_holder: str, now_ns: int
) -> Task | None:
    """Records a new holder of a pool task's attempt (empty: back to the pool), if the
    task is still at SENT, at the version seen, held by old_holder; else None."""
    stored = tx.load(seen.version.task_id)
    if stored is None:
        return None
    current = stored.task
    if (
        current.status.status != pb.STATUS_SENT
        or current.version.status_version != seen.version.status_version
        or not current.attempts
        or current.attempts[-1].entity_id != old_holder
    ):
        return None
    task = _with_status(current, current.status, MANAGER, now_ns)
    task.attempts[-1].entity_id = new_holder
    reason = (
        f"sent to pool member {new_holder}"
        if new_holder
        else (f"pool member {old_holder} left before receiving it")
    )
    tx.replace(_stored(task, task, None), current.version.status_version, reason)
    return task


def check_reporter(caller: Caller, task: Task, action: str) -> None:
    """An agent reports on (and reads the inputs of) only the tasks of its entity ids
    and, in a pool, only the attempt its member holds."""
    assignee = assignee_entity_id(task)
    task_id = task.version.task_id
    caller.check_entity(assignee, action, task_id)
    holder = task.attempts[-1].entity_id if task.attempts else ""
    if assignee_kind(task) == "team" and holder:
        caller.check_entity(holder, action, f"{task_id} of pool {assignee}")


def check_input_reader(caller: Caller, task: Task, sha256: str) -> None:
    """An agent reads a payload only as an input of a task it runs: a pool task's only
    once its member holds it, so the other members of the pool read none of it."""
    check_reporter(caller, task, "read the inputs of task")
    if caller.role is not Role.AGENT:
        return
    if assignee_kind(task) == "team" and not (task.attempts and task.attempts[-1].entity_id):
        raise PermissionDenied(
            f"no member of pool {assignee_entity_id(task)} holds task {task.version.task_id}:"
            " its inputs are read by the member that runs it"
        )
    if all(i.payload.sha256 != sha256 for i in task.inputs):
        raise PermissionDenied(
            f"payload {sha256} is not an input of task {task.version.task_id}: an agent"
            " reads only the inputs of its tasks"
        )


def update_status(tx: WriteTransaction, update: StatusUpdate, caller: Caller, now_ns: int) -> Task:
    """Applies an agent's (or admin's) status update with compare-and-set. The caller
    must act for the task's assignee; the recorded author is the caller."""
    stored = _load(tx, update.version.task_id)
    current = stored.task
    assignee = assignee_entity_id(current)
    check_reporter(caller, current, "update task")
    claimed = update.author if update.HasField("author") else None
    author = caller.author(claimed, assignee)
    if author is not None and author is not claimed:
        # Stored as if sent with the author filled in, so a retry still matches it.
        filled = StatusUpdate()
        filled.CopyFrom(update)
        filled.author.CopyFrom(author)
        update = filled
    sent, have = update.version.status_version, current.version.status_version
    if sent + 1 == have and stored.last_update == update:
        return current  # a retry of the update that made this version: its answer was lost
    _require_not_terminal(current)
    if sent != have:
        raise VersionConflict(current.version.task_id, sent, have)

    requested = update.status.status
    status = update.status
    if requested in statuses.OPERATOR_REQUESTS and not _with_an_agent(current):
        if requested == pb.STATUS_COMPLETE_REQUESTED:
            raise _not_released(current, "complete")
        status = _cancelled_before_release(update.status.task_error.message)
    failed = update.status.task_error.code == pb.ERROR_CODE_FAILED
    if requested == pb.STATUS_DONE_NOT_OK and failed and current.attempts:
        # The agent failed this attempt: the next one starts if attempts remain, unless
        # an operator asked to cancel or complete it meanwhile.
        retry = current.status.status not in statuses.OPERATOR_REQUESTS
        return _end_attempt(tx, stored, update.status.task_error, retry, author, update, now_ns)
    task = _with_status(current, status, author, now_ns)
    if update.HasField("scheduled_time"):
        task.scheduled_time.CopyFrom(update.scheduled_time)
    if task.status.status in statuses.TERMINAL:
        _close_attempt(task, task.status.status, task.status.task_error, now_ns)
    # The agent view follows what agents report; operator requests leave it as it was.
    if requested in statuses.OPERATOR_REQUESTS:
        agent_task = stored.agent_task
    else:
        agent_task = _agent_view(tx, stored, task, update)
    tx.replace(_stored(task, agent_task, update), have)
    return task


def attach_input(
    tx: WriteTransaction, request: AttachInputRequest, author: Principal | None, now_ns: int
) -> Task:
    """Gives a declared input its payload (stored already: the caller checked). With its
    last input the task is released in the same write, so it is released once however
    many attaches race. The payload an input has already is a retry: nothing changes."""
    stored = _load(tx, request.task_id)
    current = stored.task
    task_id = current.version.task_id
    declared = next((i for i in current.inputs if i.name == request.name), None)
    if declared is None:
        names = ", ".join(repr(i.name) for i in current.inputs) or "none"
        raise InvalidArgument(
            "name", f"task {task_id} declares no input {request.name!r} (its inputs: {names})"
        )
    if declared.HasField("payload"):
        if declared.payload == request.payload:
            return current
        raise FailedPrecondition(
            f"input {request.name!r} of task {task_id} has payload {declared.payload.sha256}"
            " already: an input is attached once"
        )
    _require_not_terminal(current)
    _reference_one(tx, request.payload)
    attached = Task()
    attached.CopyFrom(current)
    next(i for i in attached.inputs if i.name == request.name).payload.CopyFrom(request.payload)
    attached.pending_inputs.remove(request.name)
    reason = f"input {request.name!r} attached"
    released = _released(attached, now_ns) if current.status.status == pb.STATUS_CREATED else None
    if released is None:
        attached = _with_status(attached, attached.status, author, now_ns)
        changed = _stored(attached, stored.agent_task, None)
    else:
        changed, reason = released, f"{reason}, the last: released"
    tx.replace(changed, current.version.status_version, reason)
    return changed.task


def _reference_one(tx: WriteTransaction, payload: PayloadRef) -> None:
    try:
        tx.reference_payloads([payload.sha256])
    except PayloadMissing as missing:
        raise PayloadNotFound(missing.digest, "payload") from None


def attach_output(
    tx: WriteTransaction,
    request: AttachOutputRequest,
    caller: Caller,
    max_outputs: int,
    now_ns: int,
) -> Task:
    """Adds a named output to the task's running attempt, by the agent running it.
    Attaching the same payload under the same name again is a retry: nothing changes."""
    stored = _load(tx, request.task_id)
    current = stored.task
    task_id = current.version.task_id
    check_reporter(caller, current, "attach outputs to task")
    _require_not_terminal(current)
    running = current.attempts[-1] if current.attempts else None
    if running is None or running.number != request.attempt or running.HasField("end_time"):
        raise FailedPrecondition(
            f"attempt {request.attempt} of task {task_id} is not running"
            f" (the task is on attempt {current.attempt}, {Status.Name(current.status.status)})"
        )
    # Whether the agent has the task comes from what it reported (the agent view): an
    # operator's edit puts the task back at SENT, but its agent runs the attempt still.
    reported = stored.agent_task.status.status if stored.agent_task else pb.STATUS_SENT
    if current.status.status in statuses.UNRELEASED or reported == pb.STATUS_SENT:
        raise FailedPrecondition(
            f"task {task_id} is {Status.Name(current.status.status)}: its agent reports"
            " MACHINE_RECEIPT before it attaches outputs"
        )
    same_name = next((o for o in running.outputs if o.name == request.name), None)
    if same_name is not None:
        if same_name.payload == request.payload:
            return current
        raise FailedPrecondition(
            f"attempt {request.attempt} of task {task_id} has an output {request.name!r}"
            f" already (payload {same_name.payload.sha256})"
        )
    if len(running.outputs) >= max_outputs:
        raise InvalidArgument(
            "name",
            f"attempt {request.attempt} of task {task_id} has {max_outputs} outputs:"
            " the most an attempt may have",
        )
    _reference_one(tx, request.payload)
    claimed = request.author if request.HasField("author") else None
    task = _with_status(
        current, current.status, caller.author(claimed, assignee_entity_id(current)), now_ns
    )
    task.attempts[-1].outputs.add(name=request.name, payload=request.payload)
    reason = f"output {request.name!r} of attempt {request.attempt} attached"
    tx.replace(_stored(task, stored.agent_task, None), current.version.status_version, reason)
    return task


def cancel_task(
    tx: WriteTransaction, task_id: str, author: Principal | None, reason: str, now_ns: int
) -> Task:
    """Asks the agent to cancel (CANCEL_REQUESTED); a task never sent ends at once,
    DONE_NOT_OK / ERROR_CODE_CANCELLED. Idempotent while the request is pending."""
    stored = _load(tx, task_id)
    current = stored.task
    if current.status.status == pb.STATUS_CANCEL_REQUESTED:
        return current
    _require_not_terminal(current)
    if not _with_an_agent(current):
        status = _cancelled_before_release(reason)
    else:
        status = _operator_request(current, pb.STATUS_CANCEL_REQUESTED)
    return _record_operator_change(tx, stored, status, author, reason, now_ns)


def complete_task(
    tx: WriteTransaction, task_id: str, author: Principal | None, reason: str, now_ns: int
) -> Task:
    """Asks the agent to complete the task (COMPLETE_REQUESTED). Idempotent while the
    request is pending; refused for a task never sent or already being cancelled."""
    stored = _load(tx, task_id)
    current = stored.task
    if current.status.status == pb.STATUS_COMPLETE_REQUESTED:
        return current
    _require_not_terminal(current)
    if not _with_an_agent(current):
        raise _not_released(current, "complete")
    if current.status.status == pb.STATUS_CANCEL_REQUESTED:
        raise FailedPrecondition(f"task {task_id} is being cancelled; it cannot be completed")
    status = _operator_request(current, pb.STATUS_COMPLETE_REQUESTED)
    return _record_operator_change(tx, stored, status, author, reason, now_ns)


def task_view(stored: StoredTask, view: int) -> Task:
    """The task as GetTask shows it: the manager view, or the agent view (the definition
    the agent runs, with the status it last reported)."""
    if view != TaskView.TASK_VIEW_AGENT:
        return stored.task
    if stored.agent_task is None:
        task_id = stored.task.version.task_id
        raise FailedPrecondition(
            f"task {task_id} has not been sent to an agent, so it has no agent view"
        )
    return stored.agent_task


def update_task(
    tx: WriteTransaction, request: UpdateTaskRequest, author: Principal | None, now_ns: int
) -> Task:
    """A new definition, guarded by the definition_version the caller saw. A task already
    released goes back to SENT, so its agent gets the new definition."""
    stored = _load(tx, request.task_id)
    current = stored.task
    _require_not_terminal(current)
    have = current.version.definition_version
    if request.definition_version != have:
        raise DefinitionConflict(request.task_id, request.definition_version, have)
    if current.status.status in statuses.OPERATOR_REQUESTS:
        raise FailedPrecondition(
            f"task {request.task_id} is {Status.Name(current.status.status)}: its definition"
            " can no longer change"
        )
    tx.save_definition(definition_only(current))
    updated = Task()
    updated.CopyFrom(current)
    updated.version.definition_version = have + 1
    if request.HasField("display_name"):
        updated.display_name = request.display_name
    if request.HasField("description"):
        updated.description = request.description
    if request.HasField("specification"):
        updated.specification.CopyFrom(request.specification)
    status = current.status
    if current.status.status not in statuses.UNRELEASED:
        status = TaskStatus(status=pb.STATUS_SENT)
    task = _with_status(updated, status, author, now_ns)
    reason = f"definition_version {have + 1}"
    tx.replace(_stored(task, stored.agent_task, None), current.version.status_version, reason)
    return task


def _agent_view(tx: WriteTransaction, stored: StoredTask, task: Task, update: StatusUpdate) -> Task:
    """The agent view after an agent's update: its new status on the definition it runs,
    which is the one its update names, or else the one it ran before."""
    latest = task.version.definition_version
    runs = update.version.definition_version
    if runs == 0 and stored.agent_task is not None:
        runs = stored.agent_task.version.definition_version
    if runs in (0, latest):
        return task
    if runs > latest:
        raise InvalidArgument(
            "status_update.version.definition_version",
            f"{runs} is newer than the task's latest definition_version ({latest})",
        )
    definition = tx.load_definition(task.version.task_id, runs)
    return task if definition is None else with_definition(task, definition)


def _load(tx: WriteTransaction, task_id: str) -> StoredTask:
    stored = tx.load(task_id)
    if stored is None:
        raise TaskNotFound(task_id)
    return stored


def _with_an_agent(task: Task) -> bool:
    """Whether an agent has (or is being sent) the task: not before its release, nor a
    pool task no member holds yet (a cancel then ends it at once)."""
    if task.status.status in statuses.UNRELEASED:
        return False
    return not (assignee_kind(task) == "team" and task.attempts and not task.attempts[-1].entity_id)


def _require_not_terminal(task: Task) -> None:
    if task.status.status in statuses.TERMINAL:
        raise TerminalTask(task.version.task_id, Status.Name(task.status.status))


def _not_released(task: Task, action: str) -> FailedPrecondition:
    return FailedPrecondition(
        f"task {task.version.task_id} has not been sent to an agent"
        f" ({Status.Name(task.status.status)}), so there is no one to {action} it:"
        " cancel it instead"
    )


def _cancelled_before_release(reason: str) -> TaskStatus:
    error = TaskError(
        code=pb.ERROR_CODE_CANCELLED,
        message=reason or "cancelled before it was sent to an agent",
    )
    return TaskStatus(status=pb.STATUS_DONE_NOT_OK, task_error=error)


def _operator_request(current: Task, status: Status.ValueType) -> TaskStatus:
    # Keep what the agent reported (progress, allocation, ...); only the status moves.
    requested = TaskStatus()
    requested.CopyFrom(current.status)
    requested.status = status
    requested.ClearField("task_error")
    return requested


def _record_operator_change(
    tx: WriteTransaction,
    stored: StoredTask,
    status: TaskStatus,
    author: Principal | None,
    reason: str,
    now_ns: int,
) -> Task:
    current = stored.task
    task = _with_status(current, status, author, now_ns)
    if task.status.status in statuses.TERMINAL:
        _close_attempt(task, task.status.status, task.status.task_error, now_ns)
    changed = _stored(task, stored.agent_task, None)
    tx.replace(changed, current.version.status_version, reason)
    return task


def _with_status(current: Task, status: TaskStatus, author: Principal | None, now_ns: int) -> Task:
    """The next status version of current: one more, with status, author and time."""
    task = Task()
    task.CopyFrom(current)
    task.version.status_version += 1
    task.status.CopyFrom(status)
    task.last_update_time.CopyFrom(timestamp(now_ns))
    if author is None:
        task.ClearField("last_updated_by")
    else:
        task.last_updated_by.CopyFrom(author)
    return task
