"""Timeouts, attempts and scheduled releases: when the task manager must act on its own.

Pure functions of a task's stored state. The deadline a task has is computed here on every
write and stored with it, so timers survive restarts; the timekeeper fires what is due.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

# Enum values are read as pb.STATUS_*: module attributes, far cheaper per write than
# Status.STATUS_* (a Python-level lookup on the enum wrapper).
from task_manager import statuses
from task_manager.v1 import task_manager_pb2 as pb
from task_manager.v1.task_manager_pb2 import Task, TaskPolicy

MAX_DURATION_S = 10 * 366 * 24 * 3600
"""The longest timeout or retry backoff (about 10 years): deadlines stay far inside the
int64 nanoseconds they are stored as."""


class DeadlineKind(StrEnum):
    RELEASE = "scheduled_time"
    RECEIPT = "receipt_timeout"
    HEARTBEAT = "heartbeat_timeout"
    EXECUTION = "execution_timeout"


@dataclass(frozen=True, order=True)
class Deadline:
    at_ns: int
    kind: DeadlineKind


def next_deadline(task: Task, agent_task: Task | None) -> Deadline | None:
    """The earliest moment the task manager must act on this task by itself."""
    status = task.status.status
    if status == pb.STATUS_SCHEDULED_IN_MANAGER:
        if not task.HasField("scheduled_time"):
            return None
        return Deadline(ns(task.scheduled_time), DeadlineKind.RELEASE)
    if status not in statuses.WITH_AN_AGENT or not task.attempts:
        return None
    policy = task.policy
    execution_ns = duration_ns(policy.execution_timeout)
    receipt_ns = duration_ns(policy.receipt_timeout)
    heartbeat_ns = duration_ns(policy.heartbeat_timeout)
    if not (execution_ns or receipt_ns or heartbeat_ns):
        return None  # the common case: no timeouts
    started_ns = ns(task.attempts[-1].start_time)
    deadlines = []
    if execution_ns > 0:
        deadlines.append(Deadline(started_ns + execution_ns, DeadlineKind.EXECUTION))
    received = agent_task is not None and agent_task.status.status != pb.STATUS_SENT
    if not received and receipt_ns > 0:
        deadlines.append(Deadline(started_ns + receipt_ns, DeadlineKind.RECEIPT))
    if received and agent_task is not None and heartbeat_ns > 0:
        at_ns = ns(agent_task.last_update_time) + heartbeat_ns
        deadlines.append(Deadline(at_ns, DeadlineKind.HEARTBEAT))
    return min(deadlines, default=None)


def effective_policy(requested: TaskPolicy, defaults: TaskPolicy) -> TaskPolicy:
    """The request's policy with every unset field taken from the server's defaults."""
    policy = layered(requested, defaults)
    policy.max_attempts = policy.max_attempts or 1
    return policy


def layered(requested: TaskPolicy, under: TaskPolicy) -> TaskPolicy:
    """The fields requested sets, over those under sets (a task type's defaults)."""
    policy = TaskPolicy()
    policy.CopyFrom(under)
    for field, value in requested.ListFields():
        if field.message_type is not None:
            getattr(policy, field.name).CopyFrom(value)
        else:
            setattr(policy, field.name, value)
    return policy


def retry_backoff_ns(policy: TaskPolicy, ended_attempt: int) -> int:
    """How long to wait before the attempt after ended_attempt: doubling from
    retry_backoff, at most max_retry_backoff (or MAX_DURATION_S without one)."""
    base = duration_ns(policy.retry_backoff)
    if base <= 0:
        return 0
    backoff = base << min(max(ended_attempt - 1, 0), 62)
    cap = duration_ns(policy.max_retry_backoff) or MAX_DURATION_S * 1_000_000_000
    return min(backoff, cap)


def timeout_message(kind: DeadlineKind, task: Task, agent: str) -> str:
    policy = task.policy
    waited = {
        DeadlineKind.RECEIPT: policy.receipt_timeout,
        DeadlineKind.HEARTBEAT: policy.heartbeat_timeout,
        DeadlineKind.EXECUTION: policy.execution_timeout,
    }[kind]
    what = {
        DeadlineKind.RECEIPT: f"agent {agent} did not report receiving the task",
        DeadlineKind.HEARTBEAT: f"agent {agent} sent no update",
        DeadlineKind.EXECUTION: "the attempt did not finish",
    }[kind]
    return f"{kind.value} ({seconds(waited)}) passed: {what} (attempt {task.attempt})"


def seconds(duration: Duration) -> str:
    return f"{duration.ToNanoseconds() / 1e9:g} s"


def ns(stamp: Timestamp) -> int:
    return stamp.seconds * 1_000_000_000 + stamp.nanos


def duration_ns(value: Duration) -> int:
    return value.seconds * 1_000_000_000 + value.nanos


def duration(seconds_value: float) -> Duration:
    value = Duration()
    value.FromNanoseconds(int(seconds_value * 1e9))
    return value
