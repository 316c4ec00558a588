"""Input checks: the shape and limits of every request, decoded into domain values.

Runs before anything touches the store, so bad input changes nothing. Each failure is an
InvalidArgument naming the field and what was wrong with it. Task and session ids come
out canonical (task_manager/scopes.py): a request's message is rewritten in place, so
what follows sees one form of each id. default_scope is the scope an id given without
one is read in when the request names none (the caller's only scope, if it has one).
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Sequence
from dataclasses import dataclass

from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from storage.base import MAX_REVISION, TaskQuery, TaskSelector
from task_manager import payloads, scopes, statuses, task_types
from task_manager.auth import SCOPED_ROLES, Role, check_binding
from task_manager.errors import InvalidArgument
from task_manager.liveness import MAX_DURATION_S
from task_manager.task_types import SpecificationCheck, TypeKey
from task_manager.v1.task_manager_pb2 import (
    AddCredentialRequest,
    AttachInputRequest,
    AttachOutputRequest,
    CancelSessionRequest,
    CancelTaskRequest,
    CompleteTaskRequest,
    CreateTaskRequest,
    GetSessionRequest,
    ListenAsAgentRequest,
    NamedPayload,
    PayloadRef,
    Principal,
    QueryTasksRequest,
    Status,
    StatusUpdate,
    SubmitSessionsRequest,
    TaskPolicy,
    TaskType,
    TaskView,
    UpdateTaskRequest,
    WatchTasksRequest,
)
from task_manager.watch import WatchSpec

TASK_ID_PATTERN = re.compile(r"[A-Za-z0-9_.-]{5,36}")
PAYLOAD_NAME_PATTERN = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,62}")
"""An input's or output's name, a file name where clients save them: so no "." or "..",
and no leading dot, which the clients keep for their partial downloads."""
DEFAULT_HEARTBEAT_MS = 30_000
MIN_HEARTBEAT_MS = 100
MIN_RATE_LIMIT_MS = 250
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1_000
MAX_HISTORY_PAGE_SIZE = 1_000


@dataclass(frozen=True)
class FieldLimits:
    """Sizes of request fields; each is a `task-manager serve --limit NAME=VALUE` setting."""

    display_name_chars: int = 256
    description_chars: int = 16_384
    reason_chars: int = 16_384
    """Cancel/complete reasons and task error messages."""
    specification_bytes: int = 1 << 20
    status_bytes: int = 1 << 20
    principal_bytes: int = 16_384
    """An author or assignee."""
    entity_id_chars: int = 256
    filter_ids: int = 1_000
    """Entity ids per agent stream; task ids and entity ids per watch filter."""
    max_attempts: int = 100
    """The most attempts a TaskPolicy may ask for."""
    session_tasks: int = 10_000
    """Tasks per SubmitSessions request, all its sessions together."""
    payload_bytes: int = 1 << 30
    """One payload's size (UploadPayload)."""
    session_bytes: int = 3 << 20
    """One session's size, serialised. Keep it under --max-request-bytes (4 MiB): a
    request over that is refused by gRPC itself (RESOURCE_EXHAUSTED) before any check."""
    named_payloads: int = 64
    """Inputs of a task; outputs of one attempt."""


_STATUSES = frozenset(Status.values())
_TASK_VIEWS = frozenset(TaskView.values())
_FILTER_TYPES = frozenset(QueryTasksRequest.FilterType.values())
# Times are stored as int64 nanoseconds since the epoch: years 1678 to 2262.
_MIN_SECONDS, _MAX_SECONDS = -(2**63) // 10**9 + 1, (2**63 - 1) // 10**9 - 1


def task_id(value: str, field: str = "task_id", scope: str = "", default_scope: str = "") -> str:
    """The canonical id (task_manager/scopes.py) of a task or session id as a request
    gives it: an unscoped id is read in scope (the request's own scope field, already
    checked) or else default_scope (the caller's only one); a canonical "<scope>/<id>" is
    taken as it is, and must agree with scope."""
    if not value:
        raise InvalidArgument(field, "is required")
    named, separator, local = value.partition(scopes.SEPARATOR)
    if not separator:
        local, named = value, ""
    elif not scopes.SCOPE_PATTERN.fullmatch(named):
        raise InvalidArgument(field, f"{_quote(value)} names {_quote(named)}, which {_NO_SCOPE}")
    elif scope and named != scope:
        raise InvalidArgument(field, f"{_quote(value)} is in scope {named!r}, not {scope!r}")
    if not TASK_ID_PATTERN.fullmatch(local):
        raise InvalidArgument(
            field,
            f"{_quote(value)} is not a task id: use 5 to 36 of A-Z a-z 0-9 _ . -,"
            " after a scope and / if scoped",
        )
    return value if separator else scopes.canonical(scope or default_scope, local)


_NO_SCOPE = "is not a scope: use 1 to 63 of A-Z a-z 0-9 _ . -"


def scope(value: str, field: str = "scope") -> str:
    """A request's scope field: empty (none given) or a valid scope."""
    if value and not scopes.SCOPE_PATTERN.fullmatch(value):
        raise InvalidArgument(field, f"{_quote(value)} {_NO_SCOPE}")
    return value


def check_create_task(
    request: CreateTaskRequest, limits: FieldLimits, default_scope: str = ""
) -> None:
    """Also leaves request.scope at the scope the task is created in."""
    explicit = scope(request.scope)
    if request.task_id:
        request.task_id = task_id(request.task_id, "task_id", explicit, default_scope)
        request.scope = scopes.scope_of(request.task_id)
    else:
        request.scope = explicit or default_scope
    _max_chars(request.display_name, limits.display_name_chars, "display_name")
    _max_chars(request.description, limits.description_chars, "description")
    if request.HasField("specification"):
        _max_bytes(request.specification, limits.specification_bytes, "specification")
    if request.HasField("author"):
        _max_bytes(request.author, limits.principal_bytes, "author")
    relations = request.relations
    if relations.parent_task_id:
        # An unscoped parent id is read in the task's scope; a canonical one names its own
        # (the caller must be allowed it), however the task's scope was given.
        relations.parent_task_id = task_id(
            relations.parent_task_id, "relations.parent_task_id", default_scope=request.scope
        )
    if relations.HasField("assignee"):
        _check_assignee(relations.assignee, limits)
    if request.HasField("policy"):
        _check_policy(request.policy, limits)
    if request.HasField("scheduled_time"):
        _timestamp(request.scheduled_time, "scheduled_time")
    _check_inputs(request.inputs, limits)


def _check_inputs(inputs: Sequence[NamedPayload], limits: FieldLimits) -> None:
    if len(inputs) > limits.named_payloads:
        raise InvalidArgument(
            "inputs", f"are {len(inputs)}; a task takes at most {limits.named_payloads}"
        )
    seen: dict[str, int] = {}
    for index, named in enumerate(inputs):
        where = f"inputs[{index}]"
        payload_name(named.name, f"{where}.name")
        if named.name in seen:
            raise InvalidArgument(
                f"{where}.name", f"{named.name!r} is inputs[{seen[named.name]}]'s name too"
            )
        seen[named.name] = index
        if named.HasField("payload"):
            payload_ref(named.payload, f"{where}.payload", limits)


def payload_name(value: str, field: str) -> str:
    """The name of a task's input or of an attempt's output."""
    if not PAYLOAD_NAME_PATTERN.fullmatch(value):
        raise InvalidArgument(
            field,
            f"{_quote(value)} is not a name: use 1 to 63 of A-Z a-z 0-9 _ . -,"
            " not starting with a dot",
        )
    return value


def payload_ref(ref: PayloadRef, field: str, limits: FieldLimits) -> None:
    payloads.digest(ref.sha256, f"{field}.sha256")
    if ref.size > limits.payload_bytes:
        raise InvalidArgument(
            f"{field}.size",
            f"{ref.size} is more than the {limits.payload_bytes} bytes a payload may have",
        )


def check_attach(
    request: AttachInputRequest | AttachOutputRequest, limits: FieldLimits, default_scope: str = ""
) -> None:
    """An AttachInput or AttachOutput request; leaves its task_id canonical."""
    request.task_id = task_id(request.task_id, "task_id", scope(request.scope), default_scope)
    payload_name(request.name, "name")
    if not request.HasField("payload"):
        raise InvalidArgument("payload", "is required: the sha256 and size of stored bytes")
    payload_ref(request.payload, "payload", limits)
    if request.HasField("author"):
        _max_bytes(request.author, limits.principal_bytes, "author")
    if isinstance(request, AttachOutputRequest) and request.attempt == 0:
        raise InvalidArgument("attempt", "is required: the number of the running attempt")


def check_submit_sessions(
    request: SubmitSessionsRequest, limits: FieldLimits, default_scope: str = ""
) -> None:
    """A SubmitSessionsRequest as a whole: every field named by its path, so nothing is
    stored for a request with one bad task (sessions[1].tasks[7].display_name: ...).
    Leaves each session's scope, and each of its tasks', at the session's scope."""
    if not request.sessions:
        raise InvalidArgument("sessions", "is empty: submit at least one session")
    if request.HasField("author"):
        _max_bytes(request.author, limits.principal_bytes, "author")
    total = sum(len(session.tasks) for session in request.sessions)
    if total > limits.session_tasks:
        raise InvalidArgument(
            "sessions", f"hold {total} tasks in all; at most {limits.session_tasks} a request"
        )
    session_ids: dict[str, int] = {}
    task_ids: dict[str, str] = {}
    for index, session in enumerate(request.sessions):
        where = f"sessions[{index}]"
        _max_bytes(session, limits.session_bytes, where)
        explicit = scope(session.scope, f"{where}.scope")
        if session.session_id:
            session.session_id = task_id(
                session.session_id, f"{where}.session_id", explicit, default_scope
            )
            session.scope = scopes.scope_of(session.session_id)
            if session.session_id in session_ids:
                raise InvalidArgument(
                    f"{where}.session_id",
                    f"{session.session_id} is also sessions[{session_ids[session.session_id]}]'s",
                )
            session_ids[session.session_id] = index
        else:
            session.scope = explicit or default_scope
        _max_chars(session.display_name, limits.display_name_chars, f"{where}.display_name")
        if session.HasField("timeout"):
            _duration(session.timeout, f"{where}.timeout")
            if session.timeout.ToNanoseconds() == 0:
                raise InvalidArgument(f"{where}.timeout", "must be more than 0 (or unset)")
        if not session.tasks:
            raise InvalidArgument(f"{where}.tasks", "is empty: a session has at least one task")
        for position, task in enumerate(session.tasks):
            here = f"{where}.tasks[{position}]"
            if task.scope and task.scope != session.scope:
                raise InvalidArgument(
                    f"{here}.scope", f"is {task.scope!r}, but its session's is {session.scope!r}"
                )
            try:
                check_create_task(task, limits, session.scope)
            except InvalidArgument as bad:
                raise InvalidArgument(f"{here}.{bad.field}", bad.why) from None
            if task.scope != session.scope:
                raise InvalidArgument(
                    f"{here}.task_id",
                    f"is in scope {task.scope!r}, but its session is in {session.scope!r}",
                )
            if task.task_id:
                if task.task_id in task_ids:
                    raise InvalidArgument(
                        f"{here}.task_id", f"{task.task_id} is also {task_ids[task.task_id]}'s"
                    )
                task_ids[task.task_id] = here


def check_cancel_session(
    request: CancelSessionRequest, limits: FieldLimits, default_scope: str = ""
) -> None:
    request.session_id = session_id(request, default_scope)
    _max_chars(request.reason, limits.reason_chars, "reason")
    if request.HasField("author"):
        _max_bytes(request.author, limits.principal_bytes, "author")


def session_id(request: CancelSessionRequest | GetSessionRequest, default_scope: str = "") -> str:
    explicit = scope(request.scope)
    return task_id(request.session_id, "session_id", explicit, default_scope)


def check_status_update(update: StatusUpdate, limits: FieldLimits) -> None:
    """Checks an UpdateStatusRequest.status_update (the caller checks it is present).
    Agents are bound by entity ids, not scopes: no default scope."""
    version = update.version
    explicit = scope(version.scope, "status_update.version.scope")
    version.task_id = task_id(version.task_id, "status_update.version.task_id", explicit)
    version.ClearField("scope")  # the canonical id says it; the stored version has none
    if update.version.status_version == 0:
        raise InvalidArgument(
            "status_update.version.status_version",
            "is missing: send the status_version of the task you last saw",
        )
    status = update.status.status
    if status == Status.STATUS_INVALID:
        raise InvalidArgument("status_update.status.status", "is missing (STATUS_INVALID)")
    _enum(_STATUSES, status, "status_update.status.status")
    if status in statuses.SET_BY_MANAGER:
        raise InvalidArgument(
            "status_update.status.status",
            f"{Status.Name(status)} is set by the task manager, not reported",
        )
    _max_bytes(update.status, limits.status_bytes, "status_update.status")
    message = update.status.task_error.message
    _max_chars(message, limits.reason_chars, "status_update.status.task_error.message")
    if update.HasField("author"):
        _max_bytes(update.author, limits.principal_bytes, "status_update.author")
    if update.HasField("scheduled_time"):
        _timestamp(update.scheduled_time, "status_update.scheduled_time")


def check_update_task(
    request: UpdateTaskRequest, limits: FieldLimits, default_scope: str = ""
) -> None:
    request.task_id = task_id(request.task_id, "task_id", scope(request.scope), default_scope)
    if request.definition_version == 0:
        raise InvalidArgument(
            "definition_version", "is missing: send the definition_version you last saw"
        )
    changes = (
        request.HasField("display_name"),
        request.HasField("description"),
        request.HasField("specification"),
    )
    if not any(changes):
        raise InvalidArgument(
            "request", "set at least one of display_name, description, specification"
        )
    _max_chars(request.display_name, limits.display_name_chars, "display_name")
    _max_chars(request.description, limits.description_chars, "description")
    if request.HasField("specification"):
        _max_bytes(request.specification, limits.specification_bytes, "specification")
    if request.HasField("author"):
        _max_bytes(request.author, limits.principal_bytes, "author")


def check_operator_request(
    request: CancelTaskRequest | CompleteTaskRequest, limits: FieldLimits, default_scope: str = ""
) -> None:
    request.task_id = task_id(request.task_id, "task_id", scope(request.scope), default_scope)
    _max_chars(request.reason, limits.reason_chars, "reason")
    if request.HasField("author"):
        _max_bytes(request.author, limits.principal_bytes, "author")


def task_view(value: int, field: str) -> int:
    """The view asked for; TASK_VIEW_INVALID (unset) means the manager view."""
    _enum(_TASK_VIEWS, value, field)
    return TaskView.TASK_VIEW_MANAGER if value == TaskView.TASK_VIEW_INVALID else value


def task_query(request: QueryTasksRequest, default_scope: str = "") -> TaskQuery:
    """The store query for one page; its limit is one more than the page size, so the
    caller can tell whether another page follows. Its scopes are the request's scope
    (None: any); the caller narrows them to what it may see."""
    view = task_view(request.view, "view")
    status_filter = request.status_filter
    statuses = frozenset(status_filter.status)
    for status in statuses:
        _enum(_STATUSES, status, "status_filter.status")
    _enum(_FILTER_TYPES, status_filter.filter_type, "status_filter.filter_type")
    time_range = request.update_time_range
    updated_from = updated_to = None
    if time_range.HasField("update_start_time"):
        updated_from = _timestamp(time_range.update_start_time, "update_time_range.start")
    if time_range.HasField("update_end_time"):
        updated_to = _timestamp(time_range.update_end_time, "update_time_range.end")
    if updated_from is not None and updated_to is not None and updated_from > updated_to:
        raise InvalidArgument("update_time_range", "update_start_time is after update_end_time")
    explicit = scope(request.scope)
    parent = None
    if request.parent_task_id:
        parent = task_id(request.parent_task_id, "parent_task_id", explicit, default_scope)
    session = None
    if request.session_id:
        session = task_id(request.session_id, "session_id", explicit, default_scope)
    return TaskQuery(
        after_cursor=decode_page_token(request.page_token),
        limit=page_size(request.page_size, DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE) + 1,
        parent_task_id=parent,
        statuses=statuses,
        exclude_statuses=status_filter.filter_type == QueryTasksRequest.FILTER_TYPE_EXCLUSIVE,
        updated_from_ns=updated_from,
        updated_to_ns=updated_to,
        agent_view=view == TaskView.TASK_VIEW_AGENT,
        session_id=session,
        scopes=frozenset({explicit}) if explicit else None,
    )


def agent_selector(request: ListenAsAgentRequest, limits: FieldLimits) -> frozenset[str]:
    entity_ids = request.entity_ids.entity_ids
    if not entity_ids:
        raise InvalidArgument("entity_ids", "name at least one agent entity id to listen for")
    if len(entity_ids) > limits.filter_ids:
        raise InvalidArgument("entity_ids", f"at most {limits.filter_ids} entity ids per stream")
    for entity_id in entity_ids:
        _entity_id(entity_id, "entity_ids", limits)
    return frozenset(entity_ids)


def runnable_task_types(request: ListenAsAgentRequest, limits: FieldLimits) -> frozenset[TypeKey]:
    """The task types an agent stream declares it runs, as (name, version); version 0:
    every version."""
    if len(request.task_types) > limits.filter_ids:
        raise InvalidArgument("task_types", f"at most {limits.filter_ids}")
    for index, ref in enumerate(request.task_types):
        task_types.check_name(ref.name, f"task_types[{index}].name")
    return frozenset((ref.name, ref.version) for ref in request.task_types)


def entity_ids(values: Sequence[str], field: str, limits: FieldLimits) -> frozenset[str]:
    if len(values) > limits.filter_ids:
        raise InvalidArgument(field, f"at most {limits.filter_ids} entity ids")
    for value in values:
        _entity_id(value, field, limits)
    return frozenset(values)


CREDENTIAL_ID_PATTERN = re.compile(r"[0-9a-f]{12}")


def credential_binding(
    request: AddCredentialRequest, limits: FieldLimits
) -> tuple[str, Role, tuple[str, ...], tuple[str, ...]]:
    """The principal, role, entity ids and scopes of a new credential."""
    if not request.principal:
        raise InvalidArgument("principal", "is required")
    _max_chars(request.principal, limits.entity_id_chars, "principal")
    try:
        role = Role(request.role)
    except ValueError:
        known = ", ".join(role.value for role in Role)
        raise InvalidArgument("role", f"{request.role!r} is not one of {known}") from None
    ids = tuple(sorted(entity_ids(request.entity_ids, "entity_ids", limits)))
    if len(request.scopes) > limits.filter_ids:
        raise InvalidArgument("scopes", f"at most {limits.filter_ids}")
    for value in request.scopes:
        if not value:
            raise InvalidArgument("scopes", "holds an empty scope")
        scope(value, "scopes")
    limited_to = tuple(sorted(set(request.scopes)))
    try:
        check_binding(role, ids, limited_to)
    except ValueError as exc:
        field = "scopes" if limited_to and role not in SCOPED_ROLES else "entity_ids"
        raise InvalidArgument(field, str(exc)) from None
    return request.principal, role, ids, limited_to


def credential_id(value: str) -> str:
    if not CREDENTIAL_ID_PATTERN.fullmatch(value):
        raise InvalidArgument("credential_id", f"{_quote(value)} is not a credential id")
    return value


def watch_spec(
    request: WatchTasksRequest, limits: FieldLimits, default_scope: str = ""
) -> WatchSpec:
    """Its selector's scopes are the filter's scope (empty: any); the caller narrows them
    to what it may see."""
    selector = request.filter
    most = limits.filter_ids
    if len(selector.task_ids) > most or len(selector.assignee_entity_ids) > most:
        raise InvalidArgument("filter", f"at most {most} task ids and {most} entity ids")
    explicit = scope(selector.scope, "filter.scope")

    def canonical(value: str, field: str) -> str:
        return task_id(value, field, explicit, default_scope)

    task_ids = frozenset(canonical(value, "filter.task_ids") for value in selector.task_ids)
    for value in selector.assignee_entity_ids:
        _entity_id(value, "filter.assignee_entity_ids", limits)
    for status in selector.statuses:
        _enum(_STATUSES, status, "filter.statuses")
    parent_task_id = session = ""
    if selector.parent_task_id:
        parent_task_id = canonical(selector.parent_task_id, "filter.parent_task_id")
    if selector.session_id:
        session = canonical(selector.session_id, "filter.session_id")
    if request.start_revision > MAX_REVISION:
        # A legal uint64 no store can reach: waiting for it would wait forever.
        raise InvalidArgument(
            "start_revision",
            f"{request.start_revision} is beyond the largest revision a store can hold"
            f" ({MAX_REVISION}, 2^63-1)",
        )
    if request.include_preexisting and request.start_revision:
        raise InvalidArgument(
            "start_revision", "cannot be combined with include_preexisting (it starts now)"
        )
    heartbeat_ms = request.heartbeat_interval_ms or DEFAULT_HEARTBEAT_MS
    if heartbeat_ms < MIN_HEARTBEAT_MS:
        raise InvalidArgument("heartbeat_interval_ms", f"must be at least {MIN_HEARTBEAT_MS}")
    rate_ms = request.rate_limit.update_per_task_limit_ms
    if 0 < rate_ms < MIN_RATE_LIMIT_MS:
        raise InvalidArgument(
            "rate_limit.update_per_task_limit_ms",
            f"must be 0 (off) or at least {MIN_RATE_LIMIT_MS}",
        )
    return WatchSpec(
        selector=TaskSelector(
            task_ids=task_ids,
            assignee_entity_ids=frozenset(selector.assignee_entity_ids),
            statuses=frozenset(selector.statuses),
            parent_task_id=parent_task_id,
            session_id=session,
            scopes=frozenset({explicit}) if explicit else frozenset(),
        ),
        start_revision=request.start_revision,
        include_preexisting=request.include_preexisting,
        heartbeat_interval_ns=heartbeat_ms * 1_000_000,
        rate_limit_ns=rate_ms * 1_000_000,
    )


def page_size(value: int, default: int, maximum: int, field: str = "page_size") -> int:
    if value > maximum:
        raise InvalidArgument(field, f"{value} is more than the maximum of {maximum}")
    return value or default


def encode_page_token(position: int) -> str:
    return base64.urlsafe_b64encode(f"p1:{position}".encode()).decode()


def decode_page_token(token: str, field: str = "page_token") -> int:
    """The position after which the next page starts; 0 for no token."""
    if not token:
        return 0
    try:
        kind, _, position = base64.urlsafe_b64decode(token.encode()).decode().partition(":")
        if kind == "p1" and position.isdigit():
            return int(position)
    except (binascii.Error, UnicodeError, ValueError):
        pass
    raise InvalidArgument(field, "is not a page token from this server")


def _check_assignee(assignee: Principal, limits: FieldLimits) -> None:
    kind = assignee.WhichOneof("agent")
    if kind == "team":
        _entity_id(assignee.team.entity_id, "relations.assignee.team.entity_id", limits)
    if kind == "system":
        _entity_id(assignee.system.entity_id, "relations.assignee.system.entity_id", limits)
    _max_bytes(assignee, limits.principal_bytes, "relations.assignee")


def _entity_id(value: str, field: str, limits: FieldLimits) -> None:
    if not value:
        raise InvalidArgument(field, "an entity id is empty")
    if "\x00" in value:  # stored as text: a NUL would end it there (PostgreSQL)
        raise InvalidArgument(field, "an entity id holds a NUL character")
    _max_chars(value, limits.entity_id_chars, field)


def _max_chars(value: str, limit: int, field: str) -> None:
    if len(value) > limit:
        raise InvalidArgument(field, f"is {len(value)} characters long, more than {limit}")


def _max_bytes(message: Message, limit: int, field: str) -> None:
    size = message.ByteSize()
    if size > limit:
        raise InvalidArgument(field, f"is {size} bytes, more than {limit}")


def _enum(known: frozenset[int], value: int, field: str) -> None:
    if value not in known:
        raise InvalidArgument(field, f"{value} is not a known value")


def _timestamp(stamp: Timestamp, field: str) -> int:
    if not (0 <= stamp.nanos < 1_000_000_000 and _MIN_SECONDS <= stamp.seconds <= _MAX_SECONDS):
        raise InvalidArgument(field, "is not a valid timestamp (years 1678 to 2262)")
    return int(stamp.ToNanoseconds())


def _duration(value: Duration, field: str) -> None:
    if not (0 <= value.nanos < 1_000_000_000 and 0 <= value.seconds <= MAX_DURATION_S):
        raise InvalidArgument(field, "must be between 0 and 10 years")


def check_task_type(task_type: TaskType, limits: FieldLimits) -> SpecificationCheck:
    """A type to register: its fields, what it defines, and its default policy."""
    check = task_types.check_registration(task_type)
    try:
        _check_policy(task_type.default_policy, limits)
    except InvalidArgument as bad:
        raise InvalidArgument(f"task_type.default_{bad.field}", bad.why) from None
    return check


def _check_policy(policy: TaskPolicy, limits: FieldLimits) -> None:
    for name in (
        "receipt_timeout",
        "heartbeat_timeout",
        "execution_timeout",
        "retry_backoff",
        "max_retry_backoff",
        "lost_agent_timeout",
    ):
        _duration(getattr(policy, name), f"policy.{name}")
    if policy.max_attempts > limits.max_attempts:
        raise InvalidArgument(
            "policy.max_attempts", f"{policy.max_attempts} is more than {limits.max_attempts}"
        )


def _quote(value: str, limit: int = 40) -> str:
    return repr(value if len(value) <= limit else value[:limit] + "...")
