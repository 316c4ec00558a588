"""Sessions of tasks (after AWS HTC-Grid): many tasks submitted at once, stored all or
none, and followed as one.

A session is stored as submitted (its id, name, author, its tasks' ids); its state is
its tasks': counted by status, it is PENDING until an agent received one of them,
RUNNING until all are finished, then COMPLETED if all ended DONE_OK, else FAILED.
CancelSession cancels the unfinished tasks (as CancelTask each) and leaves it CANCELLED.
Pure Python over a store's transaction: no gRPC, no SQL.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import replace

from storage.base import SessionTasks, StoredSession, WriteTransaction
from task_manager import lifecycle, liveness, scopes, statuses
from task_manager.clock import timestamp
from task_manager.errors import (
    FailedPrecondition,
    SessionIdTaken,
    SessionNotFound,
    TaskIdTaken,
)
from task_manager.v1 import task_manager_pb2 as pb
from task_manager.v1.task_manager_pb2 import (
    Principal,
    Session,
    SessionState,
    SessionSubmission,
    StatusCount,
    SubmittedSession,
    TaskPolicy,
    TraceContext,
)

NOT_RECEIVED = statuses.UNRELEASED | {pb.STATUS_SENT}
"""The statuses of a task no agent holds."""
GOING = frozenset({SessionState.SESSION_STATE_PENDING, SessionState.SESSION_STATE_RUNNING})


def fingerprint(submission: SessionSubmission, author: Principal | None) -> bytes:
    """What makes two submissions the same: their content (ids left empty included) and
    who submitted it. Compared as bytes: a retry is the same request sent again."""
    digest = hashlib.sha256(submission.SerializeToString(deterministic=True))
    if author is not None:
        digest.update(author.SerializeToString(deterministic=True))
    return digest.digest()


def _retried(session_id: str, existing: StoredSession, digest: bytes) -> SubmittedSession:
    if existing.fingerprint != digest:
        raise SessionIdTaken(session_id)
    return SubmittedSession(session_id=session_id, task_ids=existing.task_ids, already_existed=True)


def submit(
    tx: WriteTransaction,
    submissions: Sequence[SessionSubmission],
    author: Principal | None,
    defaults: TaskPolicy,
    now_ns: int,
    digests: Sequence[bytes],
    trace_context: TraceContext | None = None,
) -> list[SubmittedSession]:
    """Stores every session of the request with its tasks, or (by raising) none. A
    session whose id is taken is a retry if it has the same content (digests: each
    submission's fingerprint, taken as the client sent it): it answers the stored ids
    and writes nothing."""
    answers = []
    for index, (submission, digest) in enumerate(zip(submissions, digests, strict=True)):
        session_id = submission.session_id or scopes.canonical(submission.scope, lifecycle.new_id())
        existing = tx.load_session(session_id)
        if existing is not None:
            answers.append(_retried(session_id, existing, digest))
            continue
        task_ids = [
            task.task_id or scopes.canonical(submission.scope, lifecycle.new_id())
            for task in submission.tasks
        ]
        session = Session(
            session_id=session_id,
            display_name=submission.display_name,
            task_count=len(task_ids),
            create_time=timestamp(now_ns),
        )
        if author is not None:
            session.created_by.CopyFrom(author)
        deadline_ns = None
        if submission.HasField("timeout"):
            session.timeout.CopyFrom(submission.timeout)
            deadline_ns = now_ns + submission.timeout.ToNanoseconds()
            session.deadline.CopyFrom(timestamp(deadline_ns))
        stored = StoredSession(session, digest, task_ids, deadline_ns=deadline_ns)
        if not tx.insert_session(stored):
            # Another replica stored it meanwhile (the insert waited for its commit).
            raced = tx.load_session(session_id)
            if raced is None:  # not expected: the id was taken, so its row is there
                raise SessionIdTaken(session_id)
            answers.append(_retried(session_id, raced, digest))
            continue
        for position, (request, task_id) in enumerate(zip(submission.tasks, task_ids, strict=True)):
            task_request = pb.CreateTaskRequest()
            task_request.CopyFrom(request)
            if author is not None:
                task_request.author.CopyFrom(author)
            try:
                created = lifecycle.create_task(
                    tx, task_request, task_id, defaults, now_ns, session_id, trace_context
                )
            except TaskIdTaken as taken:
                field = f"sessions[{index}].tasks[{position}].task_id"
                raise TaskIdTaken(task_id, taken.differing, field) from taken
            # A task outside this session differs in its session_id: never created.existed.
            assert not created.existed
        answers.append(SubmittedSession(session_id=session_id, task_ids=task_ids))
    return answers


def cancel(
    tx: WriteTransaction, session_id: str, author: Principal | None, reason: str, now_ns: int
) -> None:
    """Cancels every unfinished task of the session and records the session cancelled.
    A cancelled session answers OK again; a finished one is FAILED_PRECONDITION."""
    stored = tx.load_session(session_id)
    if stored is None:
        raise SessionNotFound(session_id)
    if stored.cancelled_ns is not None:
        return
    if stored.timed_out_ns is not None:
        raise FailedPrecondition(f"session {session_id} timed out; its tasks were cancelled")
    unfinished = tx.unfinished_session_tasks(session_id)
    if not unfinished:
        raise FailedPrecondition(f"session {session_id} has finished; nothing to cancel")
    for task_id in unfinished:
        lifecycle.cancel_task(tx, task_id, author, reason or "session cancelled", now_ns)
    tx.update_session(replace(stored, cancelled_ns=now_ns, deadline_ns=None))


def expire(tx: WriteTransaction, session_id: str, now_ns: int) -> bool:
    """Acts on a session whose deadline has come: its unfinished tasks are cancelled and
    it is timed out (FAILED); a finished or cancelled one just drops its deadline. True
    if it timed out. A session another replica is acting on right now is left to it."""
    stored = tx.claim_session(session_id)
    if stored is None or stored.deadline_ns is None or stored.deadline_ns > now_ns:
        return False
    unfinished = tx.unfinished_session_tasks(session_id)
    if not unfinished or stored.cancelled_ns is not None:
        tx.update_session(replace(stored, deadline_ns=None))
        return False
    reason = f"the session's timeout ({liveness.seconds(stored.session.timeout)}) passed"
    for task_id in unfinished:
        lifecycle.cancel_task(tx, task_id, lifecycle.MANAGER, reason, now_ns)
    tx.update_session(replace(stored, deadline_ns=None, timed_out_ns=now_ns))
    return True


def view(stored: StoredSession, tasks: SessionTasks) -> Session:
    """The session as GetSession shows it: counts by status and the state they make."""
    session = Session()
    session.CopyFrom(stored.session)
    for status in sorted(tasks.counts):
        session.counts.append(
            StatusCount(status=pb.Status.ValueType(status), count=tasks.counts[status])
        )
    session.state = state(stored, tasks)
    session.timed_out = stored.timed_out_ns is not None
    if stored.deadline_ns is None or session.state not in GOING:
        session.ClearField("deadline")  # nothing left for it to act on
    finished = all(status in statuses.TERMINAL for status in tasks.counts)
    if stored.cancelled_ns is not None:
        session.end_time.CopyFrom(timestamp(stored.cancelled_ns))
    elif stored.timed_out_ns is not None:
        session.end_time.CopyFrom(timestamp(stored.timed_out_ns))
    elif finished and tasks.counts:
        session.end_time.CopyFrom(timestamp(tasks.newest_update_ns))
    return session


def state(stored: StoredSession, tasks: SessionTasks) -> SessionState.ValueType:
    if stored.cancelled_ns is not None:
        return SessionState.SESSION_STATE_CANCELLED
    if stored.timed_out_ns is not None:
        return SessionState.SESSION_STATE_FAILED
    present = set(tasks.counts)
    if present <= statuses.TERMINAL:
        if present <= {pb.STATUS_DONE_OK}:
            return SessionState.SESSION_STATE_COMPLETED
        return SessionState.SESSION_STATE_FAILED
    if not tasks.received and present <= NOT_RECEIVED:
        return SessionState.SESSION_STATE_PENDING
    return SessionState.SESSION_STATE_RUNNING
