"""The server's log: text for a terminal, or one JSON object a line (--log-format json)
for a log pipeline, and the line logged for each committed change.

Lines about a task carry its task_id, agent and revision as fields (extra= on the
record); a line logged while a call is being served carries its request_id (the
client's x-request-id, or one made up), so a pipeline can join them. The changes are
logged at DEBUG (--log-level debug): one line per change is too many for a default.
"""

from __future__ import annotations

import contextvars
import json
import logging
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime

from storage.base import Change, assignee_entity_id
from task_manager.v1.task_manager_pb2 import Status

FORMATS = ("text", "json")
LEVELS = ("debug", "info", "warning", "error")
FIELDS = ("task_id", "agent", "revision", "status", "request_id")
"""The fields a line may carry beside its message, in this order."""
REQUEST_ID_KEY = "x-request-id"

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")
"""The id of the call being served (set by each transport's handler with serving()):
the client's, or UNNAMED until a line is logged, which names it then."""
UNNAMED = "-"
"""A call served without an id of its client's: one is made up only if a line is
logged while it is served. Most calls log nothing, and making an id costs a read of
os.urandom, about 1% of an UpdateStatus call's time."""

changes = logging.getLogger("task_manager.changes")


def configure(log_format: str, level: str) -> None:
    """Logs to stderr in log_format, at level and above."""
    handler = logging.StreamHandler()
    handler.addFilter(_with_request_id)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[handler], force=True)


def serving(given: str | None) -> None:
    """Lines logged from here on (in this context: the call's task) name the request
    id the client gave (bounded), or one made up for the call when first needed."""
    request_id.set(given[:64] if given else UNNAMED)


def _with_request_id(record: logging.LogRecord) -> bool:
    if not hasattr(record, "request_id") and (current := request_id.get()):
        if current == UNNAMED:  # logging runs in the caller's context: the call's
            current = uuid.uuid4().hex[:16]
            request_id.set(current)
        record.request_id = current
    return True


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, message, then FIELDS present."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for field in FIELDS:
            value = getattr(record, field, None)
            if value not in (None, ""):
                line[field] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def log_changes(committed: Sequence[Change]) -> None:
    """A change feed subscriber: a DEBUG line per committed change."""
    if not changes.isEnabledFor(logging.DEBUG):
        return
    for change in committed:
        task = change.task
        status = Status.Name(task.status.status).removeprefix("STATUS_")
        changes.debug(
            "task %s is %s (status_version %d)",
            task.version.task_id,
            status,
            task.version.status_version,
            extra={
                "task_id": task.version.task_id,
                "agent": assignee_entity_id(task) or "",
                "revision": change.revision,
                "status": status,
            },
        )
