"""Task types (after LittleHorse's TaskDef): a named, versioned kind of task whose
specification is a declared protobuf message, checked field by field.

A type carries the descriptors of its message, so the server decodes specifications it
was never compiled with. A registered (name, version) never changes, so what is built
from it (a `SpecificationCheck`) may be kept in memory by any replica for good; only
"the latest version" has to be asked of the store each time. Pure Python: no gRPC, no
SQL.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import re2
from google.protobuf import descriptor_pool, message_factory
from google.protobuf.any_pb2 import Any
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.descriptor_pb2 import FileDescriptorProto
from google.protobuf.message import DecodeError, Message
from google.protobuf.message import Error as ProtobufError

import task_manager.well_known_types  # noqa: F401  (the files a type may import, not give)
from storage.base import Store, WriteTransaction
from task_manager import liveness
from task_manager.clock import timestamp
from task_manager.errors import InvalidArgument, TaskTypeNotFound, TaskTypeTaken
from task_manager.v1.task_manager_pb2 import CreateTaskRequest, FieldConstraint, Task, TaskType

NAME_PATTERN = re.compile(r"[A-Za-z0-9_.-]{1,63}")
TypeKey = tuple[str, int]
"""A task type version as (name, version); version 0 in a declaration: every version."""


def check_name(value: str, field: str) -> str:
    """A task type's name, as a request gives it."""
    if not NAME_PATTERN.fullmatch(value):
        raise InvalidArgument(
            field, f"{value!r:.80} is not a task type name: use 1 to 63 of A-Z a-z 0-9 _ . -"
        )
    return value


def can_run(declared: frozenset[TypeKey], task: Task) -> bool:
    """Whether an agent declaring these types runs this task: one declaring none runs
    everything (a Lattice agent), and every agent runs untyped tasks."""
    if not declared or not task.HasField("task_type"):
        return True
    name = task.task_type.name
    return (name, 0) in declared or (name, task.task_type.version) in declared


MAX_CONSTRAINTS = 100
MAX_DESCRIPTION_CHARS = 16_384
MAX_DESCRIPTOR_FILES = 256
MAX_PATTERN_CHARS = 1_024
_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False  # a bad pattern is the client's error, answered as such
_MESSAGE_ATTRIBUTES = frozenset(name for name in dir(Message) if not name.startswith("_"))
"""A field named like one of these would hide the method on the generated class."""
_NUMBERS = frozenset(
    {
        FieldDescriptor.TYPE_DOUBLE,
        FieldDescriptor.TYPE_FLOAT,
        FieldDescriptor.TYPE_INT64,
        FieldDescriptor.TYPE_UINT64,
        FieldDescriptor.TYPE_INT32,
        FieldDescriptor.TYPE_FIXED64,
        FieldDescriptor.TYPE_FIXED32,
        FieldDescriptor.TYPE_UINT32,
        FieldDescriptor.TYPE_SFIXED32,
        FieldDescriptor.TYPE_SFIXED64,
        FieldDescriptor.TYPE_SINT32,
        FieldDescriptor.TYPE_SINT64,
    }
)


def label(name: str, version: int) -> str:
    return f"task type {name} v{version}"


@dataclass(frozen=True)
class _FieldCheck:
    path: tuple[FieldDescriptor, ...]
    dotted: str
    checks: tuple[Callable[[object], str | None], ...]
    """Each says what is wrong with one value of the field, or None."""
    required: bool


class SpecificationCheck:
    """A registered type's message class and constraints, ready to check requests."""

    def __init__(self, task_type: TaskType) -> None:
        """Raises InvalidArgument (fields under task_type.) for a type that cannot be
        used: its message not among its descriptors, a constraint on a missing field or
        of the wrong kind for it."""
        self.task_type = task_type
        self.label = label(task_type.name, task_type.version)
        descriptor = _message_descriptor(task_type)
        _check_field_names(descriptor)
        self._message_class = message_factory.GetMessageClass(descriptor)
        self._fields = [
            _field_check(descriptor, constraint, f"task_type.constraints[{index}]")
            for index, constraint in enumerate(task_type.constraints)
        ]

    def check(self, specification: Any, field: str = "specification") -> None:
        """Raises InvalidArgument naming the failing field path (specification.<path>)
        unless the specification is the type's message and meets every constraint."""
        wanted = self.task_type.message_type
        if not specification.type_url:
            raise InvalidArgument(field, f"is required: {self.label} takes a {wanted}")
        given = specification.type_url.rpartition("/")[2]
        if given != wanted:
            raise InvalidArgument(field, f"is a {given}, but {self.label} takes a {wanted}")
        message = self._message_class()
        try:
            message.ParseFromString(specification.value)
        except DecodeError:
            raise InvalidArgument(field, f"does not decode as a {wanted}") from None
        for check in self._fields:
            _check_field(message, check, field, self.label)


def register(tx: WriteTransaction, task_type: TaskType, now_ns: int) -> tuple[TaskType, bool]:
    """Stores a checked type version; the answer says whether it was there already (the
    same content registered again: nothing written). Other content is refused."""
    registered = TaskType()
    registered.CopyFrom(task_type)
    registered.create_time.CopyFrom(timestamp(now_ns))
    if tx.insert_task_type(registered):
        return registered, False
    existing = tx.load_task_type(task_type.name, task_type.version)
    if existing is None:  # not expected: the (name, version) was taken, so its row is there
        raise TaskTypeTaken(task_type.name, task_type.version)
    compared = TaskType()
    compared.CopyFrom(existing)
    compared.ClearField("create_time")
    if compared != task_type:
        raise TaskTypeTaken(task_type.name, task_type.version)
    return existing, True


class TaskTypeRegistry:
    """The checks of the types tasks name, built once per (name, version): a version
    never changes once registered."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._checks: dict[tuple[str, int], SpecificationCheck] = {}

    async def resolve(self, name: str, version: int) -> SpecificationCheck:
        """Version 0: the latest registered now."""
        cached = self._checks.get((name, version)) if version else None
        if cached is not None:
            return cached
        stored = await self._store.task_type(name, version)
        if stored is None:
            raise TaskTypeNotFound(name, version)
        key = (stored.name, stored.version)
        check = self._checks.get(key)
        if check is None:
            check = self._checks[key] = SpecificationCheck(stored)
        return check

    async def check_create(
        self, request: CreateTaskRequest, field: str = "", latest: dict[str, int] | None = None
    ) -> None:
        """A typed create (field: where the request sits, as "sessions[0].tasks[2]."):
        its specification checked against its type, its type's version pinned, the
        type's default policy under its own. latest: the versions "the latest" already
        meant in this request, by name (so a session asks the store once per type)."""
        if not request.HasField("task_type"):
            return
        name = request.task_type.name
        check_name(name, f"{field}task_type.name")
        version = request.task_type.version
        asked_latest = not version
        if asked_latest and latest is not None:
            version = latest.get(name, 0)
        check = await self.resolve(name, version)
        if asked_latest and latest is not None:
            latest.setdefault(name, check.task_type.version)
        check.check(request.specification, f"{field}specification")
        request.task_type.version = check.task_type.version
        if check.task_type.HasField("default_policy"):
            request.policy.CopyFrom(
                liveness.layered(request.policy, check.task_type.default_policy)
            )


def check_registration(task_type: TaskType) -> SpecificationCheck:
    """A type as registered: its own fields, then what it defines (see
    SpecificationCheck). The version must be given; the policy is checked by the caller."""
    check_name(task_type.name, "task_type.name")
    if task_type.version == 0:
        raise InvalidArgument("task_type.version", "is required (from 1)")
    if len(task_type.description) > MAX_DESCRIPTION_CHARS:
        raise InvalidArgument(
            "task_type.description", f"is over {MAX_DESCRIPTION_CHARS} characters"
        )
    if len(task_type.constraints) > MAX_CONSTRAINTS:
        raise InvalidArgument("task_type.constraints", f"at most {MAX_CONSTRAINTS}")
    if task_type.HasField("create_time"):
        raise InvalidArgument("task_type.create_time", "is set by the task manager")
    if len(task_type.descriptors.file) > MAX_DESCRIPTOR_FILES:
        raise InvalidArgument("task_type.descriptors", f"at most {MAX_DESCRIPTOR_FILES} files")
    if not task_type.IsInitialized():  # the server decodes without checking proto2's required
        raise InvalidArgument(
            "task_type.descriptors", "holds a descriptor missing its required fields"
        )
    return SpecificationCheck(task_type)


def _message_descriptor(task_type: TaskType) -> Descriptor:
    if not task_type.message_type:
        raise InvalidArgument("task_type.message_type", "is required")
    pool = descriptor_pool.DescriptorPool()
    files = {file.name: file for file in task_type.descriptors.file}
    for file in _in_import_order(files):
        try:
            pool.Add(file)
        except (TypeError, ValueError, ProtobufError) as bad:
            raise InvalidArgument(
                "task_type.descriptors", f"file {file.name!r:.200}: {bad!s:.200}"
            ) from None
    try:
        return pool.FindMessageTypeByName(task_type.message_type)
    except KeyError:
        raise InvalidArgument(
            "task_type.message_type",
            f"{task_type.message_type!r:.200} is not a message of the descriptors given",
        ) from None


def _in_import_order(files: dict[str, FileDescriptorProto]) -> Iterator[FileDescriptorProto]:
    """The files with each after the files it imports; a well-known type imported but
    not given comes from this process's own descriptors."""
    done: set[str] = set()
    visiting: set[str] = set()

    def visit(name: str, importer: str) -> Iterator[FileDescriptorProto]:
        if name in done:
            return
        if name in visiting:
            raise InvalidArgument("task_type.descriptors", f"{name} imports itself (a cycle)")
        file = files.get(name)
        if file is None:
            file = _well_known(name)
            if file is None:
                raise InvalidArgument(
                    "task_type.descriptors", f"{importer} imports {name}, which is not given"
                )
        visiting.add(name)
        for dependency in file.dependency:
            yield from visit(dependency, name)
        visiting.discard(name)
        done.add(name)
        yield file

    for name in sorted(files):
        yield from visit(name, name)


def _well_known(name: str) -> FileDescriptorProto | None:
    if not name.startswith("google/protobuf/"):
        return None
    try:
        found = descriptor_pool.Default().FindFileByName(name)
    except KeyError:
        return None
    file = FileDescriptorProto()
    found.CopyToProto(file)
    return file


def _check_field_names(descriptor: Descriptor) -> None:
    """Refuses a message (or one it holds) with a field named like a message method
    (ParseFromString, HasField, ...): its class could not be used."""
    seen: set[str] = set()
    pending = [descriptor]
    while pending:
        message = pending.pop()
        if message.full_name in seen:
            continue
        seen.add(message.full_name)
        for field in message.fields:
            if field.name in _MESSAGE_ATTRIBUTES:
                raise InvalidArgument(
                    "task_type.descriptors",
                    f"{message.full_name}.{field.name} is named like a protobuf message method",
                )
            if field.message_type is not None:
                pending.append(field.message_type)


def _field_check(descriptor: Descriptor, constraint: FieldConstraint, where: str) -> _FieldCheck:
    names = constraint.path.split(".") if constraint.path else []
    if not names:
        raise InvalidArgument(f"{where}.path", "is required")
    path: list[FieldDescriptor] = []
    message: Descriptor | None = descriptor
    for position, name in enumerate(names):
        field = message.fields_by_name.get(name) if message is not None else None
        if field is None:
            missing = ".".join(names[: position + 1])
            raise InvalidArgument(
                f"{where}.path", f"{descriptor.full_name} has no field {missing!r:.200}"
            )
        last = position == len(names) - 1
        if not last and (field.message_type is None or _repeated(field)):
            raise InvalidArgument(
                f"{where}.path", f"{constraint.path!r:.200}: {name} is not a singular message field"
            )
        path.append(field)
        message = field.message_type
    field = path[-1]
    checks: list[Callable[[object], str | None]] = []
    bounded = constraint.HasField("minimum") or constraint.HasField("maximum")
    if bounded:
        if field.type not in _NUMBERS:
            raise InvalidArgument(f"{where}.minimum", f"{constraint.path} is not a number field")
        low = constraint.minimum if constraint.HasField("minimum") else -math.inf
        high = constraint.maximum if constraint.HasField("maximum") else math.inf
        if math.isnan(low) or math.isnan(high):
            raise InvalidArgument(f"{where}.minimum", "NaN is no bound")
        if low > high:
            raise InvalidArgument(f"{where}.maximum", f"is below the minimum {low:g}")
        checks.append(_within(low, high))
    if constraint.pattern:
        if field.type != FieldDescriptor.TYPE_STRING:
            raise InvalidArgument(f"{where}.pattern", f"{constraint.path} is not a string field")
        if len(constraint.pattern) > MAX_PATTERN_CHARS:
            raise InvalidArgument(f"{where}.pattern", f"is over {MAX_PATTERN_CHARS} characters")
        try:
            # RE2: matching takes time linear in the value, whatever the pattern (Python's
            # re can backtrack for ever, and it would run on the event loop).
            pattern = re2.compile(constraint.pattern, _RE2_OPTIONS)
        except re2.error as bad:
            reason = bad.args[0] if bad.args else ""
            if isinstance(reason, bytes):
                reason = reason.decode(errors="replace")
            raise InvalidArgument(
                f"{where}.pattern", f"is not an RE2 regular expression: {reason:.200}"
            ) from None
        checks.append(_matching(pattern))
    if not (constraint.required or checks):
        raise InvalidArgument(where, "says nothing: set required, minimum, maximum or pattern")
    return _FieldCheck(tuple(path), constraint.path, tuple(checks), constraint.required)


def _repeated(field: FieldDescriptor) -> bool:
    return bool(field.is_repeated)


def _within(low: float, high: float) -> Callable[[object], str | None]:
    def check(value: object) -> str | None:
        if not isinstance(value, int | float):
            return f"{value!r:.80} is not a number"
        if math.isnan(value):
            return "NaN is not within the bounds"
        if value < low:
            return f"{value:g} is below the minimum {low:g}"
        if value > high:
            return f"{value:g} is above the maximum {high:g}"
        return None

    return check


def _matching(pattern: re2._Regexp) -> Callable[[object], str | None]:
    def check(value: object) -> str | None:
        if not isinstance(value, str):  # a proto2 string that is not UTF-8 comes as bytes
            return "is not valid UTF-8"
        if pattern.fullmatch(value):
            return None
        return f"{value!r:.80} does not match {pattern.pattern!r}"

    return check


def _check_field(message: Message, check: _FieldCheck, field: str, type_label: str) -> None:
    where = f"{field}.{check.dotted}"
    holder = message
    for step in check.path[:-1]:
        if not holder.HasField(step.name):
            if check.required:
                raise InvalidArgument(where, f"is required by {type_label}")
            return
        holder = getattr(holder, step.name)
    last = check.path[-1]
    value = getattr(holder, last.name)
    if _repeated(last):
        is_set = len(value) > 0
        values = list(value)
    elif last.has_presence:
        is_set = holder.HasField(last.name)
        values = [value] if is_set else []
    else:  # proto3 cannot tell a plain scalar at its zero value from one not set
        is_set = value != last.default_value
        values = [value] if is_set else []
    if check.required and not is_set:
        raise InvalidArgument(where, f"is required by {type_label}")
    for index, one in enumerate(values):
        for single in check.checks:
            wrong = single(one)
            if wrong is not None:
                at = f"{where}[{index}]" if _repeated(last) else where
                raise InvalidArgument(at, f"{wrong} ({type_label})")
