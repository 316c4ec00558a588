"""Domain errors: what went wrong, in the protocol's words.

Raised by validation, lifecycle and dispatch; service.py maps each to one gRPC status in
one table. Every message says what was wrong, for the client to read.
"""

from __future__ import annotations


class TaskManagerError(Exception):
    """A request the rules refuse. The message is meant for the client."""


class InvalidArgument(TaskManagerError):
    def __init__(self, field: str, why: str) -> None:
        super().__init__(f"{field}: {why}")
        self.field = field
        self.why = why


class TaskNotFound(TaskManagerError):
    def __init__(self, task_id: str, detail: str = "") -> None:
        super().__init__(detail or f"task {task_id} does not exist")
        self.task_id = task_id


class CredentialNotFound(TaskManagerError):
    def __init__(self, credential_id: str) -> None:
        super().__init__(f"there is no credential {credential_id} in force")
        self.credential_id = credential_id


class TaskIdTaken(TaskManagerError):
    """The task_id names a task created with another request: differing names the first
    field of the request that differs."""

    def __init__(self, task_id: str, differing: str = "", field: str = "") -> None:
        detail = f" created with another {differing}" if differing else ""
        where = f"{field}: " if field else ""
        super().__init__(f"{where}task_id {task_id} is already taken by another task{detail}")
        self.task_id = task_id
        self.differing = differing


class SessionIdTaken(TaskManagerError):
    def __init__(self, session_id: str) -> None:
        super().__init__(
            f"session_id {session_id} is already taken by a session submitted with other content"
        )
        self.session_id = session_id


class SessionNotFound(TaskManagerError):
    def __init__(self, session_id: str) -> None:
        super().__init__(f"session {session_id} does not exist")
        self.session_id = session_id


class VersionConflict(TaskManagerError):
    """The update was based on another status_version than the stored one."""

    def __init__(self, task_id: str, sent: int, current: int) -> None:
        super().__init__(
            f"task {task_id} is at status_version {current}, the update was based on "
            f"status_version {sent}: read the task again and retry"
        )
        self.task_id = task_id
        self.current = current


class DefinitionConflict(TaskManagerError):
    """An UpdateTask based on another definition_version than the stored one."""

    def __init__(self, task_id: str, sent: int, current: int) -> None:
        super().__init__(
            f"task {task_id} is at definition_version {current}, the update was based on"
            f" definition_version {sent}: read the task again and retry"
        )
        self.task_id = task_id
        self.current = current


class TerminalTask(TaskManagerError):
    def __init__(self, task_id: str, status_name: str) -> None:
        super().__init__(f"task {task_id} is finished ({status_name}) and takes no more changes")
        self.task_id = task_id


class FailedPrecondition(TaskManagerError):
    """The task is not in a state where this request makes sense."""


class Unsupported(TaskManagerError):
    """A well-formed request for something this server does not do (yet)."""


class StreamEnded(TaskManagerError):
    """An agent stream was ended by the server; the agent should reconnect."""


class StreamFellBehind(StreamEnded):
    pass


class ServerShuttingDown(StreamEnded):
    pass


class Unauthenticated(TaskManagerError):
    """No credentials, or credentials the server does not accept."""


class PermissionDenied(TaskManagerError):
    """A known caller asked for something its role or entity ids do not allow."""


class TooManyRequests(TaskManagerError):
    """A caller went over its request rate or stream limit; retry_after_s says when to retry."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class CredentialRevoked(Unauthenticated):
    """The credentials an open stream was opened with were revoked."""


class TaskTypeNotFound(TaskManagerError):
    def __init__(self, name: str, version: int = 0) -> None:
        which = f"task type {name} v{version}" if version else f"task type {name}"
        super().__init__(f"{which} is not registered (ListTaskTypes shows those that are)")
        self.name = name
        self.version = version


class TaskTypeTaken(TaskManagerError):
    def __init__(self, name: str, version: int) -> None:
        super().__init__(
            f"task type {name} v{version} is already registered with other content:"
            " register a new version"
        )
        self.name = name
        self.version = version


class PayloadNotFound(TaskManagerError):
    def __init__(self, sha256: str, field: str = "") -> None:
        where = f"{field}: " if field else ""
        super().__init__(f"{where}no payload with sha256 {sha256} is stored: upload it first")
        self.sha256 = sha256


class QuotaExceeded(TaskManagerError):
    def __init__(self, principal: str, stored: int, size: int, quota: int) -> None:
        super().__init__(
            f"{principal!r} has {stored} bytes of payloads stored: {size} more would pass"
            f" its quota of {quota} bytes (a payload counts until it is collected, once no"
            " task refers to it)"
        )
        self.principal = principal


class OutOfRange(TaskManagerError):
    """A position past the end of what it points into."""
