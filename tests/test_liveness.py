"""Timeouts, attempts, retry backoff, scheduled release and restart grace.

Time is a ManualClock moved by the tests: no test waits for a timeout in real time.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp
from google.protobuf.wrappers_pb2 import StringValue

from task_manager import lifecycle, liveness
from task_manager.clock import ManualClock, timestamp
from task_manager.server import TaskManagerServer
from task_manager.v1 import task_manager_pb2 as pb
from tests.helpers import REPO_ROOT, AsyncStub, create_request, server_settings

pytestmark = pytest.mark.anyio
S = pb.Status


def seconds(value: float) -> Duration:
    duration = Duration()
    duration.FromNanoseconds(int(value * 1e9))
    return duration


class Harness:
    """A server on a ManualClock, and a stub to it."""

    def __init__(self, db: str, clock: ManualClock, **settings: object) -> None:
        self.db = db
        self.clock = clock
        self.settings = settings
        self.server: TaskManagerServer | None = None
        self.channel: grpc.aio.Channel | None = None
        self.stub: AsyncStub

    async def start(self) -> Harness:
        self.server = await TaskManagerServer.start(
            server_settings(self.db, **self.settings), self.clock
        )
        self.channel = grpc.aio.insecure_channel(self.server.address)
        self.stub = AsyncStub(self.channel)
        return self

    async def stop(self) -> None:
        if self.channel is not None:
            await self.channel.close(None)
        if self.server is not None:
            await self.server.stop()

    async def create(
        self, policy: pb.TaskPolicy, scheduled_time: Timestamp | None = None
    ) -> pb.Task:
        request = create_request("drone-1")
        request.policy.CopyFrom(policy)
        if scheduled_time is not None:
            request.scheduled_time.CopyFrom(scheduled_time)
        return (await self.stub.CreateTask(request)).task

    async def get(self, task_id: str) -> pb.Task:
        return (await self.stub.GetTask(pb.GetTaskRequest(task_id=task_id))).task

    async def report(
        self, task: pb.Task, status: pb.Status.ValueType, **status_fields: object
    ) -> pb.Task:
        update = pb.StatusUpdate(
            version=pb.TaskVersion(
                task_id=task.version.task_id, status_version=task.version.status_version
            ),
            status=pb.TaskStatus(status=status, **status_fields),  # type: ignore[arg-type]
        )
        return (await self.stub.UpdateStatus(pb.UpdateStatusRequest(status_update=update))).task

    async def until(self, task_id: str, done: Callable[[pb.Task], bool]) -> pb.Task:
        """Polls the task until done(task): the timekeeper acts just after an advance."""
        with anyio.fail_after(20):
            while True:
                task = await self.get(task_id)
                if done(task):
                    return task
                await anyio.sleep(0.01)

    async def settled(self) -> None:
        """Waits until the timekeeper has looked at the store at the current time."""
        assert self.server is not None and self.server.timekeeper is not None
        await self.server.timekeeper.idle_at(self.clock.now_ns())


@pytest.fixture
async def harness(database: str) -> AsyncIterator[Harness]:
    running = await Harness(database, ManualClock()).start()
    yield running
    await running.stop()


def status_is(status: pb.Status.ValueType) -> Callable[[pb.Task], bool]:
    return lambda task: task.status.status == status


async def test_receipt_timeout_on_the_last_attempt_ends_the_task(harness: Harness) -> None:
    task = await harness.create(pb.TaskPolicy(receipt_timeout=seconds(30)))
    assert task.attempt == 1 and task.policy.max_attempts == 1
    harness.clock.advance(29)
    await harness.settled()
    assert (await harness.get(task.version.task_id)).status.status == S.STATUS_SENT
    harness.clock.advance(1)
    ended = await harness.until(task.version.task_id, status_is(S.STATUS_DONE_NOT_OK))
    assert ended.status.task_error.code == pb.ERROR_CODE_TIMEOUT
    assert "receipt_timeout (30 s)" in ended.status.task_error.message
    assert ended.version.status_version == 3
    (attempt,) = ended.attempts
    assert attempt.number == 1 and attempt.entity_id == "drone-1"
    assert attempt.outcome == S.STATUS_DONE_NOT_OK
    assert attempt.error.code == pb.ERROR_CODE_TIMEOUT


async def test_a_timeout_with_attempts_left_sends_the_task_again(harness: Harness) -> None:
    listen = harness.stub.ListenAsAgent(
        pb.ListenAsAgentRequest(entity_ids=pb.EntityIds(entity_ids=["drone-1"]))
    )
    await listen.initial_metadata()
    task = await harness.create(pb.TaskPolicy(receipt_timeout=seconds(10), max_attempts=2))
    with anyio.fail_after(20):
        first = await listen.read()
    assert isinstance(first, pb.ListenAsAgentResponse)
    assert first.execute_request.task.attempt == 1
    harness.clock.advance(10)
    with anyio.fail_after(20):
        again = await listen.read()
    assert isinstance(again, pb.ListenAsAgentResponse)
    resent = again.execute_request.task
    assert resent.attempt == 2 and resent.status.status == S.STATUS_SENT
    assert resent.version.status_version == task.version.status_version + 1
    assert [a.number for a in resent.attempts] == [1, 2]
    assert resent.attempts[0].error.code == pb.ERROR_CODE_TIMEOUT
    assert not resent.attempts[1].HasField("end_time")
    history = await harness.stub.GetTaskHistory(
        pb.GetTaskHistoryRequest(task_id=task.version.task_id)
    )
    assert [entry.attempt for entry in history.entries] == [0, 1, 2]
    assert "attempt 1 of 2 failed: receipt_timeout" in history.entries[-1].reason
    harness.clock.advance(10)  # the second and last attempt times out too
    ended = await harness.until(task.version.task_id, status_is(S.STATUS_DONE_NOT_OK))
    assert ended.attempt == 2 and len(ended.attempts) == 2
    listen.cancel()


async def test_any_update_refreshes_the_heartbeat(harness: Harness) -> None:
    task = await harness.create(pb.TaskPolicy(heartbeat_timeout=seconds(20), max_attempts=2))
    task = await harness.report(task, S.STATUS_MACHINE_RECEIPT)
    task = await harness.report(task, S.STATUS_EXECUTING)
    for _ in range(3):  # 45 s in all, never 20 s without an update
        harness.clock.advance(15)
        await harness.settled()
        task = await harness.report(task, S.STATUS_EXECUTING)  # same status, a heartbeat
    assert task.status.status == S.STATUS_EXECUTING and task.attempt == 1
    harness.clock.advance(20)
    resent = await harness.until(task.version.task_id, status_is(S.STATUS_SENT))
    assert resent.attempt == 2
    assert "heartbeat_timeout (20 s)" in resent.attempts[0].error.message
    harness.clock.advance(20)  # not received: the heartbeat does not run yet
    await harness.settled()
    assert (await harness.get(task.version.task_id)).status.status == S.STATUS_SENT


async def test_execution_timeout_bounds_the_whole_attempt(harness: Harness) -> None:
    task = await harness.create(
        pb.TaskPolicy(heartbeat_timeout=seconds(20), execution_timeout=seconds(50))
    )
    task = await harness.report(task, S.STATUS_EXECUTING)
    for _ in range(4):
        harness.clock.advance(10)
        await harness.settled()
        task = await harness.report(task, S.STATUS_EXECUTING)
    harness.clock.advance(10)
    ended = await harness.until(task.version.task_id, status_is(S.STATUS_DONE_NOT_OK))
    assert "execution_timeout (50 s)" in ended.status.task_error.message


async def test_a_failed_attempt_is_retried_but_rejected_and_cancelled_are_not(
    harness: Harness,
) -> None:
    policy = pb.TaskPolicy(max_attempts=3)
    task = await harness.create(policy)
    failed = pb.TaskError(code=pb.ERROR_CODE_FAILED, message="motor stalled")
    retried = await harness.report(task, S.STATUS_DONE_NOT_OK, task_error=failed)
    assert retried.status.status == S.STATUS_SENT and retried.attempt == 2
    assert retried.attempts[0].error.message == "motor stalled"
    # The same report again (its answer lost) is recognised, not applied twice.
    assert await harness.report(task, S.STATUS_DONE_NOT_OK, task_error=failed) == retried
    done = await harness.report(retried, S.STATUS_DONE_OK)
    assert done.status.status == S.STATUS_DONE_OK
    assert [a.outcome for a in done.attempts] == [S.STATUS_DONE_NOT_OK, S.STATUS_DONE_OK]

    for code in (pb.ERROR_CODE_REJECTED, pb.ERROR_CODE_CANCELLED):
        other = await harness.create(policy)
        refused = pb.TaskError(code=code, message="no")
        ended = await harness.report(other, S.STATUS_DONE_NOT_OK, task_error=refused)
        assert ended.status.status == S.STATUS_DONE_NOT_OK and ended.attempt == 1

    last = await harness.create(pb.TaskPolicy(max_attempts=1))
    ended = await harness.report(last, S.STATUS_DONE_NOT_OK, task_error=failed)
    assert ended.status.status == S.STATUS_DONE_NOT_OK
    assert ended.status.task_error.message == "motor stalled"


async def test_retry_backoff_waits_at_scheduled_in_manager(harness: Harness) -> None:
    policy = pb.TaskPolicy(max_attempts=4, retry_backoff=seconds(10), max_retry_backoff=seconds(15))
    task = await harness.create(policy)
    failed = pb.TaskError(code=pb.ERROR_CODE_FAILED, message="try later")
    waiting = await harness.report(task, S.STATUS_DONE_NOT_OK, task_error=failed)
    assert waiting.status.status == S.STATUS_SCHEDULED_IN_MANAGER
    assert waiting.scheduled_time.ToNanoseconds() == harness.clock.now_ns() + 10 * 10**9
    harness.clock.advance(9)
    await harness.settled()
    assert (await harness.get(task.version.task_id)).attempt == 1
    harness.clock.advance(1)
    second = await harness.until(task.version.task_id, status_is(S.STATUS_SENT))
    assert second.attempt == 2
    waiting = await harness.report(second, S.STATUS_DONE_NOT_OK, task_error=failed)
    # 10 s * 2, capped at 15 s.
    assert waiting.scheduled_time.ToNanoseconds() == harness.clock.now_ns() + 15 * 10**9


async def test_a_cancel_nobody_answers_ends_the_task_without_a_retry(harness: Harness) -> None:
    task = await harness.create(pb.TaskPolicy(heartbeat_timeout=seconds(5), max_attempts=3))
    await harness.report(task, S.STATUS_EXECUTING)
    await harness.stub.CancelTask(pb.CancelTaskRequest(task_id=task.version.task_id))
    harness.clock.advance(5)
    ended = await harness.until(task.version.task_id, status_is(S.STATUS_DONE_NOT_OK))
    assert ended.attempt == 1
    assert ended.status.task_error.code == pb.ERROR_CODE_TIMEOUT


async def test_a_task_scheduled_in_the_future_is_released_then(harness: Harness) -> None:
    at = timestamp(harness.clock.now_ns() + 60 * 10**9)
    task = await harness.create(pb.TaskPolicy(), scheduled_time=at)
    assert task.status.status == S.STATUS_SCHEDULED_IN_MANAGER
    assert task.version.status_version == 2 and task.attempt == 0
    harness.clock.advance(59)
    await harness.settled()
    assert (await harness.get(task.version.task_id)).status.status == (
        S.STATUS_SCHEDULED_IN_MANAGER
    )
    harness.clock.advance(1)
    sent = await harness.until(task.version.task_id, status_is(S.STATUS_SENT))
    assert sent.version.status_version == 3 and sent.attempt == 1
    past = await harness.create(pb.TaskPolicy(), scheduled_time=timestamp(0))
    assert past.status.status == S.STATUS_SENT  # a past time releases at once


async def test_deadlines_survive_a_restart_with_a_grace_period(database: str) -> None:
    clock = ManualClock()
    first = await Harness(database, clock).start()
    policy = pb.TaskPolicy(heartbeat_timeout=seconds(30), max_attempts=2)
    silent = await first.create(policy)
    silent = await first.report(silent, S.STATUS_EXECUTING)
    reporting = await first.report(await first.create(policy), S.STATUS_EXECUTING)
    later = timestamp(clock.now_ns() + 100 * 10**9)
    scheduled = await first.create(pb.TaskPolicy(), scheduled_time=later)
    await first.stop()

    clock.advance(300)  # the server was down for five minutes: every deadline is overdue
    second = await Harness(database, clock).start()
    try:
        # A scheduled release is not a liveness timeout: it happens at once.
        await second.until(scheduled.version.task_id, status_is(S.STATUS_SENT))
        await second.settled()
        assert (await second.get(silent.version.task_id)).attempt == 1  # grace: 30 s
        clock.advance(20)
        await second.report(reporting, S.STATUS_EXECUTING)  # its agent is back
        clock.advance(10)
        resent = await second.until(silent.version.task_id, status_is(S.STATUS_SENT))
        assert resent.attempt == 2
        await second.settled()
        alive = await second.get(reporting.version.task_id)
        assert alive.status.status == S.STATUS_EXECUTING and alive.attempt == 1
    finally:
        await second.stop()


def _agent_process(target: str, *flags: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.agent_process", "--target", target, *flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=REPO_ROOT,
    )


async def test_an_agent_killed_mid_task_is_timed_out_and_another_finishes(
    database: str,
) -> None:
    # Real time here: a real process is killed, and heartbeats are real.
    server = await TaskManagerServer.start(server_settings(database))
    doomed = _agent_process(server.address, "--entity-id", "drone-1", "--pool", "pool-a", "--hang")
    spare: subprocess.Popen[str] | None = None
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = AsyncStub(channel)
            request = create_request(None)
            request.relations.assignee.team.entity_id = "pool-a"
            request.policy.CopyFrom(pb.TaskPolicy(heartbeat_timeout=seconds(3), max_attempts=2))
            task = (await stub.CreateTask(request)).task
            assert doomed.stdout is not None
            line = await anyio.to_thread.run_sync(doomed.stdout.readline)
            assert line.startswith(f"started {task.version.task_id} attempt 1")

            async def current() -> pb.Task:
                return (await stub.GetTask(pb.GetTaskRequest(task_id=task.version.task_id))).task

            # Heartbeats (every second) keep a silent handler's attempt alive past the
            # heartbeat_timeout: 4 of them after its progress report take 4 s. (A timeout
            # of 3 s leaves a loaded machine room to be late with a heartbeat.)
            with anyio.fail_after(30):
                while (running := await current()).version.status_version < 11:  # noqa: ASYNC110
                    await anyio.sleep(0.1)
            assert running.attempt == 1 and running.status.status == S.STATUS_EXECUTING
            assert running.status.progress.Is(StringValue.DESCRIPTOR)

            spare = _agent_process(server.address, "--entity-id", "drone-2", "--pool", "pool-a")
            doomed.kill()
            with anyio.fail_after(60):
                while (done := await current()).status.status != S.STATUS_DONE_OK:  # noqa: ASYNC110
                    await anyio.sleep(0.1)
        first, second = done.attempts
        assert first.outcome == S.STATUS_DONE_NOT_OK
        assert "heartbeat_timeout (3 s)" in first.error.message
        assert first.entity_id == "drone-1" and second.entity_id == "drone-2"
        assert second.outcome == S.STATUS_DONE_OK and done.attempt == 2
        result = StringValue()
        done.status.result.Unpack(result)
        assert result.value == "done by drone-2"
    finally:
        for process in (doomed, spare):
            if process is not None:
                process.kill()
                process.wait(30)
                if process.stdout is not None:
                    process.stdout.close()
        await server.stop()


async def test_list_agents_tracks_streams_last_seen_and_lost(database: str) -> None:
    clock = ManualClock()
    first = await Harness(database, clock, agent_lost_after_s=60.0).start()

    async def agents(harness: Harness) -> list[pb.AgentPresence]:
        return list((await harness.stub.ListAgents(pb.ListAgentsRequest())).agents)

    try:
        listen = first.stub.ListenAsAgent(
            pb.ListenAsAgentRequest(entity_ids=pb.EntityIds(entity_ids=["drone-1"]))
        )
        await listen.initial_metadata()
        opened_ns = clock.now_ns()
        await first.create(pb.TaskPolicy())
        clock.advance(5)
        (drone,) = await agents(first)
        assert drone.entity_id == "drone-1"
        assert drone.state == pb.AGENT_STATE_CONNECTED and drone.streams_open == 1
        assert drone.first_seen.ToNanoseconds() == opened_ns
        assert drone.last_seen.ToNanoseconds() == clock.now_ns()
        assert drone.tasks_in_flight == 1
        listen.cancel()
        closed_ns = clock.now_ns()
        with anyio.fail_after(20):
            while (drone := (await agents(first))[0]).streams_open:  # noqa: ASYNC110
                await anyio.sleep(0.01)  # the server notices the cancel on its own time
        assert drone.state == pb.AGENT_STATE_DISCONNECTED
        assert drone.last_seen.ToNanoseconds() == closed_ns
        clock.advance(60)
        assert (await agents(first))[0].state == pb.AGENT_STATE_LOST
    finally:
        await first.stop()
    second = await Harness(database, clock, agent_lost_after_s=60.0).start()
    try:
        (remembered,) = await agents(second)  # a restart forgets no agent
        assert remembered.state == pb.AGENT_STATE_LOST
        assert remembered.first_seen.ToNanoseconds() == opened_ns
        assert remembered.last_seen.ToNanoseconds() == closed_ns
        assert remembered.tasks_in_flight == 1
        none = await second.stub.ListAgents(pb.ListAgentsRequest(entity_ids=["rover-9"]))
        assert list(none.agents) == []
    finally:
        await second.stop()


@pytest.mark.parametrize("kind", ["receipt_timeout", "heartbeat_timeout", "execution_timeout"])
@pytest.mark.parametrize("attempts", [1, 2])
async def test_every_timeout_with_and_without_attempts_left(
    harness: Harness, kind: str, attempts: int
) -> None:
    policy = pb.TaskPolicy(max_attempts=attempts)
    getattr(policy, kind).CopyFrom(seconds(10))
    task = await harness.create(policy)
    if kind != "receipt_timeout":
        task = await harness.report(task, S.STATUS_MACHINE_RECEIPT)
    harness.clock.advance(5)
    if kind == "execution_timeout":
        await harness.report(task, S.STATUS_EXECUTING)  # updates do not extend an attempt
    harness.clock.advance(4.999)
    await harness.settled()
    assert (await harness.get(task.version.task_id)).attempt == 1
    harness.clock.advance(0.001)
    if attempts == 1:
        ended = await harness.until(task.version.task_id, status_is(S.STATUS_DONE_NOT_OK))
        assert ended.status.task_error.code == pb.ERROR_CODE_TIMEOUT
        assert ended.status.task_error.message.startswith(f"{kind} (10 s) passed")
        assert len(ended.attempts) == 1
    else:
        resent = await harness.until(task.version.task_id, lambda t: t.attempt == 2)
        assert resent.status.status == S.STATUS_SENT
        assert resent.attempts[0].error.message.startswith(f"{kind} (10 s) passed")


async def test_an_agents_scheduled_time_is_recorded(harness: Harness) -> None:
    task = await harness.create(pb.TaskPolicy())
    planned = timestamp(harness.clock.now_ns() + 3_600 * 10**9)
    update = pb.StatusUpdate(
        version=pb.TaskVersion(task_id=task.version.task_id, status_version=2),
        status=pb.TaskStatus(status=S.STATUS_WILCO),
        scheduled_time=planned,
    )
    answered = await harness.stub.UpdateStatus(pb.UpdateStatusRequest(status_update=update))
    assert answered.task.scheduled_time == planned
    assert (await harness.get(task.version.task_id)).scheduled_time == planned
    history = await harness.stub.GetTaskHistory(
        pb.GetTaskHistoryRequest(task_id=task.version.task_id)
    )
    assert history.entries[-1].scheduled_time == planned


def test_retry_backoff_doubles_up_to_its_cap_or_ten_years() -> None:
    day = seconds(86_400)
    capped = pb.TaskPolicy(retry_backoff=day, max_retry_backoff=seconds(3 * 86_400))
    assert [liveness.retry_backoff_ns(capped, n) // 10**9 for n in (1, 2, 3)] == [
        86_400,
        172_800,
        259_200,
    ]
    uncapped = pb.TaskPolicy(retry_backoff=day)
    assert liveness.retry_backoff_ns(uncapped, 99) == liveness.MAX_DURATION_S * 10**9
    assert liveness.retry_backoff_ns(pb.TaskPolicy(), 5) == 0


async def test_a_failure_after_a_cancel_request_is_not_retried(harness: Harness) -> None:
    task = await harness.create(pb.TaskPolicy(max_attempts=3))
    task = await harness.report(task, S.STATUS_EXECUTING)
    await harness.stub.CancelTask(pb.CancelTaskRequest(task_id=task.version.task_id))
    cancelling = await harness.get(task.version.task_id)
    failed = pb.TaskError(code=pb.ERROR_CODE_FAILED, message="crashed while stopping")
    ended = await harness.report(cancelling, S.STATUS_DONE_NOT_OK, task_error=failed)
    assert ended.status.status == S.STATUS_DONE_NOT_OK and ended.attempt == 1


async def test_a_deadline_that_fails_to_fire_is_tried_again(
    harness: Harness, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    real_expire = lifecycle.expire
    failures: list[tuple[Any, ...]] = []

    def flaky_expire(*args: Any) -> lifecycle.Expiry:
        if not failures:
            failures.append(args)
            raise RuntimeError("injected: the unit failed once")
        return real_expire(*args)

    # A fault injected into the lifecycle: the only way to reach this path on purpose.
    monkeypatch.setattr(lifecycle, "expire", flaky_expire)
    task = await harness.create(pb.TaskPolicy(receipt_timeout=seconds(10)))
    harness.clock.advance(10)
    await harness.settled()
    assert failures and (await harness.get(task.version.task_id)).status.status == S.STATUS_SENT
    assert any("could not fire" in record.getMessage() for record in caplog.records)
    harness.clock.advance(1)  # the timekeeper's poll interval
    ended = await harness.until(task.version.task_id, status_is(S.STATUS_DONE_NOT_OK))
    assert ended.status.task_error.code == pb.ERROR_CODE_TIMEOUT


async def test_an_attempt_ends_once_its_agent_was_lost_for_lost_agent_timeout(
    database: str,
) -> None:
    harness = await Harness(database, ManualClock(), agent_lost_after_s=60.0).start()
    try:
        watched = await harness.create(
            pb.TaskPolicy(lost_agent_timeout=seconds(30), max_attempts=2)
        )
        plain = await harness.create(pb.TaskPolicy())  # no lost_agent_timeout: waits for good
        selector = pb.ListenAsAgentRequest(entity_ids=pb.EntityIds(entity_ids=["drone-1"]))
        stream = harness.stub.ListenAsAgent(selector)
        for _ in range(2):
            await stream.read()
        watched = await harness.report(watched, S.STATUS_EXECUTING)
        plain = await harness.report(plain, S.STATUS_EXECUTING)
        stream.cancel()  # the agent goes away with both tasks
        with anyio.fail_after(20):
            while (await list_agent(harness, "drone-1")).streams_open:  # noqa: ASYNC110
                await anyio.sleep(0.01)
        harness.clock.advance(60 + 29)  # LOST for 29 s
        await harness.settled()
        assert (await harness.get(watched.version.task_id)).status.status == S.STATUS_EXECUTING
        harness.clock.advance(2)
        await harness.settled()
        retried = await harness.get(watched.version.task_id)
        untouched = await harness.get(plain.version.task_id)
    finally:
        await harness.stop()
    assert retried.status.status == S.STATUS_SENT
    assert retried.attempt == 2
    assert retried.attempts[0].error.code == pb.ERROR_CODE_TIMEOUT
    assert retried.attempts[0].error.message == (
        "lost_agent_timeout (30 s) passed: agent drone-1 has had no stream since it was lost"
        " (attempt 1)"
    )
    assert untouched == plain


async def test_lost_agent_timeout_ends_the_attempt_of_a_pool_member_that_left(
    database: str,
) -> None:
    harness = await Harness(database, ManualClock(), agent_lost_after_s=60.0).start()
    try:
        request = create_request(None)
        request.relations.assignee.team.entity_id = "pool-a"
        request.policy.lost_agent_timeout.CopyFrom(seconds(30))
        await harness.stub.CreateTask(request)
        selector = pb.ListenAsAgentRequest(
            entity_ids=pb.EntityIds(entity_ids=["worker-1", "pool-a"])
        )
        stream = harness.stub.ListenAsAgent(selector)
        response = await stream.read()
        assert isinstance(response, pb.ListenAsAgentResponse)
        held = await harness.report(response.execute_request.task, S.STATUS_EXECUTING)
        stream.cancel()
        with anyio.fail_after(20):
            while (await list_agent(harness, "worker-1")).streams_open:  # noqa: ASYNC110
                await anyio.sleep(0.01)
        harness.clock.advance(60 + 31)
        await harness.settled()
        ended = await harness.get(held.version.task_id)
    finally:
        await harness.stop()
    assert ended.status.status == S.STATUS_DONE_NOT_OK
    assert ended.status.task_error.message.startswith(
        "lost_agent_timeout (30 s) passed: agent worker-1 "
    )


async def list_agent(harness: Harness, entity_id: str) -> pb.AgentPresence:
    request = pb.ListAgentsRequest(entity_ids=[entity_id])
    return (await harness.stub.ListAgents(request)).agents[0]
