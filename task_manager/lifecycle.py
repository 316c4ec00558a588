"""The lifecycle rules: versions, compare-and-set, terminal states, release, cancel/complete.

Each operation runs inside one store write transaction (a unit of work), so every check
and the write it guards are atomic. Pure Python: no gRPC, no SQL.
"""

from __future__ import annotations

from storage.base import StoredTask, WriteTransaction, assignee_entity_id
from task_manager.auth import Caller
from task_manager.clock import timestamp
from task_manager.errors import (
    FailedPrecondition,
    TaskIdTaken,
    TaskNotFound,
    TerminalTask,
    VersionConflict,
)
from task_manager.v1.task_manager_pb2 import (
    CreateTaskRequest,
    ErrorCode,
    Principal,
    Status,
    StatusUpdate,
    System,
    Task,
    TaskError,
    TaskStatus,
    TaskVersion,
    TaskView,
)

TERMINAL_STATUSES = frozenset({Status.STATUS_DONE_OK, Status.STATUS_DONE_NOT_OK})
UNRELEASED_STATUSES = frozenset({Status.STATUS_CREATED, Status.STATUS_SCHEDULED_IN_MANAGER})
OPERATOR_REQUEST_STATUSES = frozenset(
    {Status.STATUS_CANCEL_REQUESTED, Status.STATUS_COMPLETE_REQUESTED}
)
# A task at one of these has a request waiting on its agent's stream (re-sent on reconnect).
DELIVERABLE_STATUSES = frozenset({Status.STATUS_SENT, *OPERATOR_REQUEST_STATUSES})

MANAGER = Principal(system=System(service_name="task-manager"))
"""The author of the changes the task manager makes by itself (release to SENT)."""


def create_task(
    tx: WriteTransaction, request: CreateTaskRequest, task_id: str, now_ns: int
) -> Task:
    """Stores the task at CREATED (versions 1/1), then releases it to its agent if it has
    one: SENT at status_version 2. Returns the task as it stands after both."""
    if tx.load(task_id) is not None:
        raise TaskIdTaken(task_id)
    now = timestamp(now_ns)
    task = Task(
        version=TaskVersion(task_id=task_id, definition_version=1, status_version=1),
        display_name=request.display_name,
        status=TaskStatus(status=Status.STATUS_CREATED),
        description=request.description,
        is_executed_elsewhere=request.is_executed_elsewhere,
        create_time=now,
        last_update_time=now,
    )
    if request.HasField("specification"):
        task.specification.CopyFrom(request.specification)
    if request.HasField("relations"):
        task.relations.CopyFrom(request.relations)
    if request.HasField("author"):
        task.created_by.CopyFrom(request.author)
        task.last_updated_by.CopyFrom(request.author)
    tx.insert(StoredTask(task=task, agent_task=None, last_update=None))
    if not is_releasable(task):
        return task
    sent = _with_status(task, TaskStatus(status=Status.STATUS_SENT), MANAGER, now_ns)
    tx.replace(StoredTask(task=sent, agent_task=sent, last_update=None), 1)
    return sent


def is_releasable(task: Task) -> bool:
    """A task goes to an agent when it names one and is not executed elsewhere."""
    assignee = task.relations.assignee
    has_agent = assignee.WhichOneof("agent") == "system" and bool(assignee.system.entity_id)
    return has_agent and not task.is_executed_elsewhere


def update_status(tx: WriteTransaction, update: StatusUpdate, caller: Caller, now_ns: int) -> Task:
    """Applies an agent's (or admin's) status update with compare-and-set. The caller
    must act for the task's assignee; the recorded author is the caller."""
    stored = _load(tx, update.version.task_id)
    current = stored.task
    assignee = assignee_entity_id(current)
    caller.check_entity(assignee, f"update task {current.version.task_id}")
    claimed = update.author if update.HasField("author") else None
    author = caller.author(claimed, assignee)
    if author is not None and author != claimed:
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
    if requested in OPERATOR_REQUEST_STATUSES and current.status.status in UNRELEASED_STATUSES:
        if requested == Status.STATUS_COMPLETE_REQUESTED:
            raise _not_released(current, "complete")
        status = _cancelled_before_release(update.status.task_error.message)
    task = _with_status(current, status, author, now_ns)
    if update.HasField("scheduled_time"):
        task.scheduled_time.CopyFrom(update.scheduled_time)
    # The agent view follows what agents report; operator requests leave it as it was.
    agent_task = stored.agent_task if requested in OPERATOR_REQUEST_STATUSES else task
    tx.replace(StoredTask(task=task, agent_task=agent_task, last_update=update), have)
    return task


def cancel_task(
    tx: WriteTransaction, task_id: str, author: Principal | None, reason: str, now_ns: int
) -> Task:
    """Asks the agent to cancel (CANCEL_REQUESTED); a task never sent ends at once,
    DONE_NOT_OK / ERROR_CODE_CANCELLED. Idempotent while the request is pending."""
    stored = _load(tx, task_id)
    current = stored.task
    if current.status.status == Status.STATUS_CANCEL_REQUESTED:
        return current
    _require_not_terminal(current)
    if current.status.status in UNRELEASED_STATUSES:
        status = _cancelled_before_release(reason)
    else:
        status = _operator_request(current, Status.STATUS_CANCEL_REQUESTED)
    return _record_operator_change(tx, stored, status, author, reason, now_ns)


def complete_task(
    tx: WriteTransaction, task_id: str, author: Principal | None, reason: str, now_ns: int
) -> Task:
    """Asks the agent to complete the task (COMPLETE_REQUESTED). Idempotent while the
    request is pending; refused for a task never sent or already being cancelled."""
    stored = _load(tx, task_id)
    current = stored.task
    if current.status.status == Status.STATUS_COMPLETE_REQUESTED:
        return current
    _require_not_terminal(current)
    if current.status.status in UNRELEASED_STATUSES:
        raise _not_released(current, "complete")
    if current.status.status == Status.STATUS_CANCEL_REQUESTED:
        raise FailedPrecondition(f"task {task_id} is being cancelled; it cannot be completed")
    status = _operator_request(current, Status.STATUS_COMPLETE_REQUESTED)
    return _record_operator_change(tx, stored, status, author, reason, now_ns)


def task_view(stored: StoredTask, view: int, definition_version: int) -> Task:
    """The task as GetTask shows it: manager or agent view, at a definition version
    (0 = latest). The status is always the view's current one."""
    task = stored.task
    latest = task.version.definition_version
    if definition_version not in (0, latest):
        raise TaskNotFound(
            task.version.task_id,
            f"task {task.version.task_id} has no definition_version {definition_version}"
            f" (the latest is {latest})",
        )
    if view != TaskView.TASK_VIEW_AGENT:
        return task
    if stored.agent_task is None:
        raise FailedPrecondition(
            f"task {task.version.task_id} has not been sent to an agent, so it has no agent view"
        )
    return stored.agent_task


def _load(tx: WriteTransaction, task_id: str) -> StoredTask:
    stored = tx.load(task_id)
    if stored is None:
        raise TaskNotFound(task_id)
    return stored


def _require_not_terminal(task: Task) -> None:
    if task.status.status in TERMINAL_STATUSES:
        raise TerminalTask(task.version.task_id, Status.Name(task.status.status))


def _not_released(task: Task, action: str) -> FailedPrecondition:
    return FailedPrecondition(
        f"task {task.version.task_id} has not been sent to an agent"
        f" ({Status.Name(task.status.status)}), so there is no one to {action} it:"
        " cancel it instead"
    )


def _cancelled_before_release(reason: str) -> TaskStatus:
    error = TaskError(
        code=ErrorCode.ERROR_CODE_CANCELLED,
        message=reason or "cancelled before it was sent to an agent",
    )
    return TaskStatus(status=Status.STATUS_DONE_NOT_OK, task_error=error)


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
    changed = StoredTask(task=task, agent_task=stored.agent_task, last_update=None)
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
