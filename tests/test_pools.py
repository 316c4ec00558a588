"""Pool dispatch (Team assignees) and flow control (max_in_flight)."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager

import anyio
import grpc
import pytest
from google.protobuf.duration_pb2 import Duration

from agent_kit._grpc import ClientAuth, open_stub
from storage import add_credential
from task_manager.auth import Role, new_token
from task_manager.clock import ManualClock
from task_manager.config import Settings
from task_manager.server import TaskManagerServer
from task_manager.v1 import task_manager_pb2 as pb
from tests.helpers import AsyncStub, ServerProcess, create_request, server_settings

pytestmark = pytest.mark.anyio
S = pb.Status
Stream = grpc.aio.UnaryStreamCall[pb.ListenAsAgentRequest, pb.ListenAsAgentResponse]


def pool_task(pool: str = "pool-a", policy: pb.TaskPolicy | None = None) -> pb.CreateTaskRequest:
    request = create_request(None)
    request.relations.assignee.team.entity_id = pool
    if policy is not None:
        request.policy.CopyFrom(policy)
    return request


async def member(stub: AsyncStub, entity_id: str, *pools: str, max_in_flight: int = 0) -> Stream:
    call: Stream = stub.ListenAsAgent(
        pb.ListenAsAgentRequest(
            entity_ids=pb.EntityIds(entity_ids=[entity_id, *(pools or ("pool-a",))]),
            max_in_flight=max_in_flight,
        )
    )
    await call.initial_metadata()
    return call


async def next_execute(call: Stream) -> pb.Task:
    with anyio.fail_after(20):
        response = await call.read()
    assert isinstance(response, pb.ListenAsAgentResponse), response
    assert response.WhichOneof("request") == "execute_request", response
    return response.execute_request.task


async def report(stub: AsyncStub, task: pb.Task, status: pb.Status.ValueType) -> pb.Task:
    update = pb.StatusUpdate(
        version=pb.TaskVersion(
            task_id=task.version.task_id, status_version=task.version.status_version
        ),
        status=pb.TaskStatus(status=status),
    )
    return (await stub.UpdateStatus(pb.UpdateStatusRequest(status_update=update))).task


async def test_n_idle_members_get_one_task_each(stub: AsyncStub) -> None:
    members = {name: await member(stub, name) for name in ("drone-1", "drone-2", "drone-3")}
    created = [(await stub.CreateTask(pool_task())).task for _ in range(3)]
    assert all(task.status.status == S.STATUS_SENT and task.attempt == 1 for task in created)
    received = {name: await next_execute(call) for name, call in members.items()}
    # Each member got one task, held by that member and by nobody else.
    assert {task.attempts[-1].entity_id for task in received.values()} == set(members)
    for name, task in received.items():
        assert task.attempts[-1].entity_id == name
    assert sorted(t.version.task_id for t in received.values()) == sorted(
        t.version.task_id for t in created
    )
    for call in members.values():
        call.cancel()


async def test_a_member_that_leaves_before_receipt_hands_the_task_on(stub: AsyncStub) -> None:
    first = await member(stub, "drone-1", max_in_flight=1)
    task = (await stub.CreateTask(pool_task())).task
    held = await next_execute(first)
    assert held.attempts[-1].entity_id == "drone-1"
    first.cancel()  # gone without reporting receipt
    second = await member(stub, "drone-2")
    handed = await next_execute(second)
    assert handed.version.task_id == task.version.task_id
    assert handed.attempts[-1].entity_id == "drone-2" and handed.attempt == 1
    history = await stub.GetTaskHistory(pb.GetTaskHistoryRequest(task_id=task.version.task_id))
    reasons = [entry.reason for entry in history.entries]
    assert "pool member drone-1 left before receiving it" in reasons
    done = await report(stub, handed, S.STATUS_DONE_OK)
    assert done.status.status == S.STATUS_DONE_OK
    second.cancel()


async def test_a_pool_task_waits_for_a_member(stub: AsyncStub) -> None:
    task = (await stub.CreateTask(pool_task("pool-b"))).task
    assert task.status.status == S.STATUS_SENT and task.attempts[-1].entity_id == ""
    late = await member(stub, "rover-1", "pool-b")
    assert (await next_execute(late)).version.task_id == task.version.task_id
    late.cancel()


async def test_a_retry_goes_to_another_member(
    clocked: tuple[TaskManagerServer, ManualClock],
) -> None:
    server, clock = clocked
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = AsyncStub(channel)
        calls = {name: await member(stub, name) for name in ("drone-1", "drone-2")}
        timeout = Duration(seconds=10)
        task = (
            await stub.CreateTask(
                pool_task(policy=pb.TaskPolicy(heartbeat_timeout=timeout, max_attempts=2))
            )
        ).task
        with anyio.fail_after(20):
            while not (holder := (await get(stub, task)).attempts[-1].entity_id):  # noqa: ASYNC110
                await anyio.sleep(0.01)
        first = await next_execute(calls[holder])
        await report(stub, first, S.STATUS_MACHINE_RECEIPT)  # then silence
        other = "drone-2" if holder == "drone-1" else "drone-1"
        # The other member is busier (one task, no timeout): only the rule that a retry
        # goes elsewhere makes it the choice over the now idle first holder.
        await stub.CreateTask(pool_task())
        busy = await next_execute(calls[other])
        assert busy.attempts[-1].entity_id == other
        clock.advance(10)
        retried = await next_execute(calls[other])
        assert retried.attempt == 2 and retried.attempts[-1].entity_id == other
        assert retried.attempts[0].entity_id == holder
        assert retried.attempts[0].error.code == pb.ERROR_CODE_TIMEOUT
        for call in calls.values():
            call.cancel()


async def get(stub: AsyncStub, task: pb.Task) -> pb.Task:
    return (await stub.GetTask(pb.GetTaskRequest(task_id=task.version.task_id))).task


async def test_flow_control_never_exceeds_max_in_flight(stub: AsyncStub) -> None:
    limit, total = 5, 1_000
    worker = await member(stub, "worker-1", "pool-w", max_in_flight=limit)

    async def create_one() -> None:
        await stub.CreateTask(create_request("worker-1"))

    async def create_all() -> None:
        for _ in range(total // 100):
            async with anyio.create_task_group() as group:
                for _ in range(100):
                    group.start_soon(create_one)

    counts = {"received": 0, "completions_sent": 0, "most": 0}
    arrived, arrivals = anyio.create_memory_object_stream[pb.Task](total)

    async def read_all() -> None:
        # Reads as fast as tasks arrive, whatever the completer does: a server that sent
        # beyond the limit would show here at once.
        async with arrived:
            while counts["received"] < total:
                task = await next_execute(worker)
                counts["received"] += 1
                # A completion lets the server send one more: count it from when it is sent.
                unfinished = counts["received"] - counts["completions_sent"]
                counts["most"] = max(counts["most"], unfinished)
                assert unfinished <= limit, "the server sent beyond max_in_flight"
                await arrived.send(task)

    rng = random.Random(7)
    async with anyio.create_task_group() as group:
        group.start_soon(create_all)
        group.start_soon(read_all)
        window: list[pb.Task] = []
        async with arrivals:
            async for task in arrivals:
                window.append(task)
                # Complete only with a full window (or at the end), in a random order.
                if len(window) == limit or counts["received"] == total:
                    rng.shuffle(window)
                    for finished in window:
                        counts["completions_sent"] += 1
                        await report(stub, finished, S.STATUS_DONE_OK)
                    window.clear()
    received, most = counts["received"], counts["most"]
    assert most == limit and received == total
    agents = await stub.ListAgents(pb.ListAgentsRequest(entity_ids=["worker-1"]))
    assert agents.agents[0].tasks_in_flight == 0
    worker.cancel()


async def test_only_the_holding_member_may_report(database: str) -> None:
    tokens = {}
    for name, role, entities in (
        ("ops", Role.OPERATOR, ()),
        ("drone-1", Role.AGENT, ("drone-1", "pool-a")),
        ("drone-2", Role.AGENT, ("drone-2", "pool-a")),
    ):
        credential, tokens[name] = new_token(name, role, entities, time.time_ns())
        add_credential(database, credential)
    server = await TaskManagerServer.start(server_settings(database))
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:

            def as_(name: str) -> AsyncStub:
                return open_stub(channel, ClientAuth(token=tokens[name]))

            one = await member(as_("drone-1"), "drone-1")
            task = (await as_("ops").CreateTask(pool_task())).task
            held = await next_execute(one)
            with pytest.raises(grpc.aio.AioRpcError) as denied:
                await report(as_("drone-2"), held, S.STATUS_MACHINE_RECEIPT)
            assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "drone-1" in (denied.value.details() or "")
            done = await report(as_("drone-1"), held, S.STATUS_DONE_OK)
            assert done.version.task_id == task.version.task_id
            one.cancel()
    finally:
        await server.stop()


async def test_cancelling_a_pool_task_no_member_holds_ends_it_at_once(stub: AsyncStub) -> None:
    task = (await stub.CreateTask(pool_task("pool-empty"))).task
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.CompleteTask(pb.CompleteTaskRequest(task_id=task.version.task_id))
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    cancelled = (await stub.CancelTask(pb.CancelTaskRequest(task_id=task.version.task_id))).task
    assert cancelled.status.status == S.STATUS_DONE_NOT_OK
    assert cancelled.status.task_error.code == pb.ERROR_CODE_CANCELLED
    late = await member(stub, "rover-2", "pool-empty")
    other = (await stub.CreateTask(pool_task("pool-empty"))).task
    # The cancelled task never reaches the member who came later; the next one does.
    assert (await next_execute(late)).version.task_id == other.version.task_id
    late.cancel()


async def test_a_member_that_left_with_a_pool_task_is_listed_holding_it(stub: AsyncStub) -> None:
    worker = await member(stub, "worker-1")
    created = (await stub.CreateTask(pool_task())).task
    task = await next_execute(worker)
    assert task.version.task_id == created.version.task_id
    await report(stub, task, S.STATUS_EXECUTING)
    worker.cancel()  # the member goes away, past receipt: the task stays with it
    with anyio.fail_after(20):
        while True:
            agents = (await stub.ListAgents(pb.ListAgentsRequest(entity_ids=["worker-1"]))).agents
            if not agents[0].streams_open:
                break
            await anyio.sleep(0.01)
    assert list(agents[0].held_task_ids) == [created.version.task_id]
    assert agents[0].tasks_in_flight == 1


# -- after a restart: a member has a lease to reconnect -------------------------------

LEASE_S = 6.0
LEASE = ("--replica-lease", str(LEASE_S))


@contextmanager
def serving(database: str) -> Iterator[ServerProcess]:
    """A `task-manager serve` process with a short --replica-lease, for the block."""
    server = ServerProcess(database, options=LEASE).start()
    try:
        yield server
    finally:
        if server.process is not None and server.process.poll() is None:
            server.terminate()


class Member:
    """A pool member's stream that never reports, keeping the ids of the tasks sent to it."""

    def __init__(self, address: str, entity_id: str) -> None:
        self.sent: list[str] = []
        self._channel = grpc.aio.insecure_channel(address)
        self._entity_id = entity_id
        self._reading: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Member:
        call = await member(AsyncStub(self._channel), self._entity_id)
        self._reading = asyncio.create_task(self._read(call))
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._reading is not None:
            self._reading.cancel()
            await asyncio.gather(self._reading, return_exceptions=True)
        await self._channel.close(None)

    async def _read(self, call: Stream) -> None:
        with contextlib.suppress(grpc.aio.AioRpcError):  # its server was killed
            async for response in call:
                if response.WhichOneof("request") == "execute_request":
                    self.sent.append(response.execute_request.task.version.task_id)

    async def first_sent(self) -> str:
        with anyio.fail_after(30):
            while not self.sent:  # noqa: ASYNC110
                await anyio.sleep(0.02)
        return self.sent[0]


async def sent_to_m1_then_the_server_stopped(database: str, stop: str = "kill") -> str:
    """A pool task SENT to member m-1 (which never reports receipt), and then the
    server was stopped (killed, or terminated: a clean stop): the task's id."""
    with serving(database) as server:
        async with Member(server.address, "m-1") as m1:
            async with grpc.aio.insecure_channel(server.address) as channel:
                task = (await AsyncStub(channel).CreateTask(pool_task())).task
            task_id = await m1.first_sent()
            assert task_id == task.version.task_id
            if stop == "kill":
                server.kill()
            else:
                assert server.terminate() == 0
    return task_id


async def task_on(address: str, task_id: str) -> pb.Task:
    async with grpc.aio.insecure_channel(address) as channel:
        return (await AsyncStub(channel).GetTask(pb.GetTaskRequest(task_id=task_id))).task


@pytest.mark.parametrize("stop", ["kill", "terminate"])
async def test_a_member_reconnecting_within_the_lease_after_a_restart_gets_its_pool_task(
    database: str, stop: str
) -> None:
    task_id = await sent_to_m1_then_the_server_stopped(database, stop)
    restarting = time.monotonic()
    with serving(database) as server:
        async with Member(server.address, "m-2") as m2:
            # Two refreshes with another member listening: a hand-back would reach it.
            watching_until = time.monotonic() + 2 * Settings().cluster_refresh_s
            while time.monotonic() < watching_until:
                assert m2.sent == [], "handed to m-2 before m-1 could reconnect"
                await asyncio.sleep(0.05)
            async with Member(server.address, "m-1") as m1:
                assert await m1.first_sent() == task_id
                assert time.monotonic() < restarting + LEASE_S, "m-1 came back too late"
                task = await task_on(server.address, task_id)
                assert m2.sent == []
    assert task.status.status == S.STATUS_SENT and task.attempt == 1
    assert task.attempts[-1].entity_id == "m-1"


async def test_a_pool_task_whose_member_does_not_reconnect_goes_back_after_the_lease(
    database: str,
) -> None:
    task_id = await sent_to_m1_then_the_server_stopped(database)
    restarting = time.monotonic()
    with serving(database) as server:
        async with Member(server.address, "m-2") as m2:
            assert await m2.first_sent() == task_id
            assert time.monotonic() >= restarting + LEASE_S, "handed back within the lease"
            task = await task_on(server.address, task_id)
    assert task.attempts[-1].entity_id == "m-2" and task.attempt == 1
