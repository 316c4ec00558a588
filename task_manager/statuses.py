"""The sets of task statuses the rest of the code reasons with, defined once.

A task moves CREATED (or SCHEDULED_IN_MANAGER) → SENT → ... → DONE_OK / DONE_NOT_OK;
each set below names one question asked of where it is on that path.
"""

from __future__ import annotations

from task_manager.v1.task_manager_pb2 import Status

ALL = frozenset(Status.values()) - {Status.STATUS_INVALID}
"""Every status a task can be at."""

TERMINAL = frozenset({Status.STATUS_DONE_OK, Status.STATUS_DONE_NOT_OK})
"""Finished: a task here takes no more updates."""

NOT_TERMINAL = ALL - TERMINAL

UNRELEASED = frozenset({Status.STATUS_CREATED, Status.STATUS_SCHEDULED_IN_MANAGER})
"""Not yet sent to any agent."""

WITH_AN_AGENT = ALL - UNRELEASED - TERMINAL
"""Sent to its agent (or on its way) and not finished: the agent holds it."""

NOT_WITH_AN_AGENT = UNRELEASED | TERMINAL

OPERATOR_REQUESTS = frozenset({Status.STATUS_CANCEL_REQUESTED, Status.STATUS_COMPLETE_REQUESTED})
"""An operator asked the agent to cancel or complete the task."""

SET_BY_MANAGER = frozenset(
    {Status.STATUS_CREATED, Status.STATUS_SCHEDULED_IN_MANAGER, Status.STATUS_SENT}
)
"""Set by the task manager itself; an UpdateStatus may not claim them."""
