"""Several replicas on one PostgreSQL database: the contract holds across them.

Each replica is a real `task-manager serve` process on the session's private PostgreSQL
(or, for the restart test, on one of its own). Agents, operators and watchers connect
to any replica; what one acknowledges, the others serve at once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import TypeVar

import aiohttp
import anyio
import grpc
import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent_kit import Agent, OperatorClient, TaskContext, TaskPolicy
from devtools.private_postgres import PrivatePostgres
from task_manager.config import Settings
from task_manager.v1 import task_manager_pb2 as pb
from tests.helpers import (
    AsyncStub,
    ServerProcess,
    assert_store_consistent,
    running,
    status_update,
    trailer,
)

pytestmark = pytest.mark.anyio
T = TypeVar("T")
S = pb.Status
WAIT_S = 60.0
FAST_LEASE = ("--replica-lease", "2")
NO_TAIL_POLL = ("--tail-poll", str(100 * WAIT_S))


@contextmanager
def replicas(url: str, count: int, options: tuple[str, ...] = ()) -> Iterator[list[ServerProcess]]:
    started: list[ServerProcess] = []
    try:
        for _ in range(count):
            started.append(ServerProcess(url, options=options).start())
        yield started
    finally:
        for replica in started:
            if replica.process is not None and replica.process.poll() is None:
                replica.terminate()


def both(*servers: ServerProcess) -> str:
    """A gRPC target naming every replica: a client fails over to the next one."""
    return "ipv4:" + ",".join(server.address for server in servers)


async def eventually(check: Callable[[], Awaitable[T | None]], what: str) -> T:
    """Polls check until it returns something true, within WAIT_S."""
    deadline = time.monotonic() + WAIT_S
    while not (value := await check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)
    return value


class Watcher:
    """A WatchTasks call on one replica, keeping the revision of every event."""

    def __init__(self, address: str, start_revision: int = 0) -> None:
        self.revisions: list[int] = []
        self._channel = grpc.aio.insecure_channel(address)
        self._call = AsyncStub(self._channel).WatchTasks(
            pb.WatchTasksRequest(start_revision=start_revision)
        )
        self._reading: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Watcher:
        await self._call.initial_metadata()  # subscribed: nothing after this is missed
        self._reading = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._call.cancel()
        if self._reading is not None:
            await asyncio.gather(self._reading, return_exceptions=True)
        await self._channel.close(None)

    async def _read(self) -> None:
        async for response in self._call:
            if response.HasField("event"):
                self.revisions.append(response.revision)

    async def until_seen(self, count: int) -> list[int]:
        async def enough() -> bool:
            return len(self.revisions) >= count

        await eventually(enough, f"{count} events")
        return self.revisions


async def all_revisions(address: str) -> list[int]:
    """Every revision in history, read from the start by a watch on address."""
    newest = await current_revision(address)
    async with Watcher(address, start_revision=1) as watcher:
        return list(await watcher.until_seen(newest))


async def wait_for(client: OperatorClient, task_id: str, statuses: set[int]) -> pb.Task:
    with anyio.fail_after(WAIT_S):
        while True:
            try:
                task = await client.get_task(task_id)
                if task.status.status in statuses:
                    return task
            except grpc.aio.AioRpcError as error:
                if error.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
            await asyncio.sleep(0.05)


async def current_revision(address: str) -> int:
    """The newest revision, as a watch's first heartbeat after the snapshot says."""
    async with grpc.aio.insecure_channel(address) as channel:
        call = AsyncStub(channel).WatchTasks(pb.WatchTasksRequest(include_preexisting=True))
        async for response in call:
            if response.HasField("heartbeat"):
                call.cancel()
                return response.revision
    raise AssertionError("the watch ended before its first heartbeat")


async def test_agents_watchers_and_writers_on_different_replicas(postgres_url: str) -> None:
    with replicas(postgres_url, 3) as (a, b, c):

        async def done(task: TaskContext) -> None:
            return None

        # The watcher on C subscribes before anything is written: it must see it all.
        tasks_each = 15
        async with (
            Watcher(c.address) as watcher,
            running(Agent(a.address, "drone-1", done)),
            OperatorClient(a.address) as on_a,
            OperatorClient(b.address) as on_b,
        ):
            created = await asyncio.gather(
                *(on_b.create_task(assignee_entity_id="drone-1") for _ in range(tasks_each)),
                *(on_a.create_task(assignee_entity_id="drone-1") for _ in range(tasks_each)),
            )
            for task in created:
                await wait_for(on_b, task.version.task_id, {S.STATUS_DONE_OK})
            newest = await current_revision(b.address)
            seen = list(await watcher.until_seen(newest))
        assert seen == list(range(1, newest + 1))
        # Resuming elsewhere, from the middle: the same revisions, no gap, no duplicate.
        async with Watcher(b.address, start_revision=100) as resumed:
            assert await resumed.until_seen(newest - 99) == seen[99:]
        # B read A's commits (its agent's reports) from the database, and says how late.
        tail = await scrape(b)
        assert tail["task_manager_replica_tail_lag_seconds_count"] >= 1
        assert tail["task_manager_replica_tail_lag_seconds_sum"] >= 0
        assert "task_manager_replica_tail_lag_revisions" in tail
    assert_store_consistent(postgres_url)


async def scrape(server: ServerProcess) -> dict[str, float]:
    """The server's /metrics samples without labels, by name."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(server.http_url + "metrics") as response,
    ):
        assert response.status == 200, await response.text()
        text = await response.text()
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if not sample.labels
    }


async def test_two_replicas_racing_one_update_status_one_wins_one_aborts(
    postgres_url: str,
) -> None:
    with replicas(postgres_url, 2) as (a, b):
        async with (
            grpc.aio.insecure_channel(a.address) as to_a,
            grpc.aio.insecure_channel(b.address) as to_b,
            OperatorClient(a.address) as client,
        ):
            stubs = (AsyncStub(to_a), AsyncStub(to_b))
            for n in range(20):
                task = await client.create_task(assignee_entity_id="drone-1")
                # Two different updates from one version (the same one twice would be
                # an idempotent retry, and both would be answered OK).
                updates = [
                    status_update(task, S.STATUS_MACHINE_RECEIPT),
                    status_update(task, S.STATUS_ACK),
                ]
                outcomes = await asyncio.gather(
                    *(stub.UpdateStatus(u) for stub, u in zip(stubs, updates, strict=True)),
                    return_exceptions=True,
                )
                won = [o for o in outcomes if isinstance(o, pb.UpdateStatusResponse)]
                lost = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
                assert len(won) == 1 and len(lost) == 1, (n, outcomes)
                assert lost[0].code() == grpc.StatusCode.ABORTED
                winner_version = won[0].task.version.status_version
                assert trailer(lost[0], "x-current-status-version") == str(winner_version)


async def test_a_replica_killed_mid_load_loses_and_repeats_nothing(postgres_url: str) -> None:
    with replicas(postgres_url, 2) as (a, b):
        ran: dict[str, int] = {}

        async def count(task: TaskContext) -> None:
            ran[task.task_id] = ran.get(task.task_id, 0) + 1

        acknowledged: list[str] = []
        async with (
            running(Agent(both(a, b), "drone-1", count)),
            OperatorClient(b.address) as client,
        ):

            async def create(n: int) -> None:
                task = await client.create_task(assignee_entity_id="drone-1")
                acknowledged.append(task.version.task_id)

            await asyncio.gather(*(create(n) for n in range(20)))
            a.kill()  # the agent's replica: it reconnects to B
            await asyncio.gather(*(create(n) for n in range(20, 40)))
            for task_id in acknowledged:
                await wait_for(client, task_id, {S.STATUS_DONE_OK})
        assert len(acknowledged) == 40
        # Every acknowledged task ran (a handler may run again if A died before its
        # DONE_OK committed: the report is retried, never recorded twice).
        assert set(ran) == set(acknowledged)
        revisions = await all_revisions(b.address)
        assert revisions == list(range(1, len(revisions) + 1))
    assert_store_consistent(postgres_url)


async def listening(url: str) -> list[int] | None:
    """The backend pids of the replicas' LISTEN connections, once there are two."""
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        cursor = await conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name = 'task-manager listen'"
            " AND datname = current_database() ORDER BY pid"
        )
        pids = [pid for (pid,) in await cursor.fetchall()]
    return pids if len(pids) == 2 else None


async def test_a_terminated_listen_connection_reconnects_and_the_tail_catches_up(
    postgres_url: str,
) -> None:
    # The tails' fallback poll never comes within the test: only a LISTEN connection
    # that is back, and the catch-up after it, can bring B's commits to A.
    with replicas(postgres_url, 2, NO_TAIL_POLL) as (a, b):
        before = await eventually(lambda: listening(postgres_url), "two LISTEN connections")
        # Live on A, from now: only A's tail can bring B's commits to this watch.
        async with Watcher(a.address) as watcher, OperatorClient(b.address) as on_b:
            with psycopg.connect(postgres_url, autocommit=True) as conn:
                for pid in before:
                    conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
            # At once: likely before A listens again, so that its NOTIFY is lost.
            for _ in range(2):
                await on_b.create_task(assignee_entity_id="drone-1")
            assert await watcher.until_seen(4) == [1, 2, 3, 4]
        after = await eventually(lambda: listening(postgres_url), "two LISTEN connections")
        assert not set(after) & set(before)


async def test_replicas_recover_when_postgresql_restarts_under_load() -> None:
    with PrivatePostgres(settings={"fsync": "off"}) as postgres:
        url = postgres.create_database()
        with replicas(url, 2) as (a, b):
            acknowledged: list[str] = []
            async with OperatorClient(both(a, b)) as client:

                async def create_until(deadline: float) -> None:
                    while time.monotonic() < deadline:
                        try:
                            task = await client.create_task(assignee_entity_id="drone-1")
                        except grpc.aio.AioRpcError as error:
                            assert error.code() == grpc.StatusCode.UNAVAILABLE, error
                            await asyncio.sleep(0.05)
                        else:
                            acknowledged.append(task.version.task_id)

                load = asyncio.create_task(create_until(time.monotonic() + 8))

                async def loaded() -> bool:
                    return len(acknowledged) >= 20

                await eventually(loaded, "20 tasks before the restart")
                await asyncio.to_thread(postgres.restart)
                before_restart = len(acknowledged)
                await load
                assert len(acknowledged) > before_restart  # writes went on after it
                # Both replicas serve again, and every acknowledged task is there.
                for replica in (a, b):
                    async with OperatorClient(replica.address) as direct:
                        with anyio.fail_after(WAIT_S):
                            while True:
                                try:
                                    await direct.create_task(assignee_entity_id="drone-2")
                                    break
                                except grpc.aio.AioRpcError as error:
                                    assert error.code() == grpc.StatusCode.UNAVAILABLE
                                    await asyncio.sleep(0.1)
                        for task_id in acknowledged:
                            assert (await direct.get_task(task_id)).version.task_id == task_id
            assert acknowledged
        assert_store_consistent(url)


async def test_two_timekeepers_fire_each_deadline_once(postgres_url: str) -> None:
    with replicas(postgres_url, 2) as (a, _):
        async with OperatorClient(a.address) as client:
            policy = TaskPolicy(receipt_timeout=0.3, max_attempts=1)
            tasks = await asyncio.gather(
                *(client.create_task(assignee_entity_id="nobody", policy=policy) for _ in range(20))
            )
            for task in tasks:
                ended = await wait_for(client, task.version.task_id, {S.STATUS_DONE_NOT_OK})
                history = await client.history(task.version.task_id)
                assert [e.status.status for e in history] == [
                    S.STATUS_CREATED,
                    S.STATUS_SENT,
                    S.STATUS_DONE_NOT_OK,
                ], ended


@asynccontextmanager
async def silent_member(address: str, member: str, pool: str) -> AsyncIterator[None]:
    """A pool member that listens and never reports."""
    async with grpc.aio.insecure_channel(address) as channel:
        call = AsyncStub(channel).ListenAsAgent(
            pb.ListenAsAgentRequest(entity_ids=pb.EntityIds(entity_ids=[member, pool]))
        )
        await call.initial_metadata()
        try:
            yield
        finally:
            call.cancel()


async def test_a_pool_task_whose_holders_replica_dies_goes_to_a_member_elsewhere(
    postgres_url: str,
) -> None:
    with replicas(postgres_url, 2, options=FAST_LEASE) as (a, b):

        async def done(task: TaskContext) -> None:
            return None

        async with (
            OperatorClient(b.address) as client,
            silent_member(a.address, "m-1", "pool-a"),
        ):
            task = await client.create_task(assignee_pool="pool-a")
            task_id = task.version.task_id

            async def held_by() -> str:
                return (await client.get_task(task_id)).attempts[-1].entity_id

            assert await eventually(held_by, "a holder") == "m-1"
            async with running(Agent(b.address, "m-2", done, pools=["pool-a"])):
                a.kill()
                finished = await wait_for(client, task_id, {S.STATUS_DONE_OK})
        assert finished.attempts[-1].entity_id == "m-2"


# -- restart grace: measured from when the gateway came up -----------------------------

GRACE_S = 8.0
GRACE = ("--restart-grace", str(GRACE_S))
HEARTBEAT = TaskPolicy(heartbeat_timeout=0.3, max_attempts=1)


async def silent_task(address: str) -> str:
    """A task its agent took to EXECUTING and then went silent: its heartbeat timeout
    is due 0.3 s later, and waits only for the restart grace."""
    async with OperatorClient(address) as client, grpc.aio.insecure_channel(address) as channel:
        task = await client.create_task(assignee_entity_id="drone-1", policy=HEARTBEAT)
        await AsyncStub(channel).UpdateStatus(status_update(task, S.STATUS_EXECUTING))
        return task.version.task_id


async def ended_by_timeout(address: str, task_id: str) -> pb.Task:
    async with OperatorClient(address) as client:
        ended = await wait_for(client, task_id, {S.STATUS_DONE_NOT_OK})
    assert ended.status.task_error.code == pb.ERROR_CODE_TIMEOUT, ended
    return ended


async def still_executing_until(address: str, task_id: str, until: float) -> None:
    """Checks that the task stays EXECUTING (its timeout held back) until `until`
    (time.monotonic), which must leave time to look."""
    assert time.monotonic() < until - 1.0, "the replica started too late to watch the grace"
    async with OperatorClient(address) as client:
        while time.monotonic() < until:
            task = await client.get_task(task_id)
            assert task.status.status == S.STATUS_EXECUTING, task
            await asyncio.sleep(0.1)


async def gateway_down(url: str) -> bool:
    """Whether no replica renewed within two refreshes: a replica starting now brings
    the gateway up (task_manager/cluster.py)."""
    down_after_ns = int(2 * Settings().cluster_refresh_s * 1e9)
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        cursor = await conn.execute(
            "SELECT (EXTRACT(EPOCH FROM clock_timestamp()) * 1000000000)::BIGINT"
            " - COALESCE(MAX(renewed_ns), 0) FROM replicas"
        )
        row = await cursor.fetchone()
    return row is not None and row[0] > down_after_ns


async def test_a_replica_joining_a_running_gateway_holds_no_overdue_timeout(
    postgres_url: str,
) -> None:
    with replicas(postgres_url, 1, GRACE) as (a,):
        # Once a timeout fired on A, the gateway's grace is over.
        await ended_by_timeout(a.address, await silent_task(a.address))
        joining = time.monotonic()
        with replicas(postgres_url, 1, GRACE) as (b,):
            a.kill()  # B alone fires deadlines now
            task_id = await silent_task(b.address)
            await ended_by_timeout(b.address, task_id)
            waited = time.monotonic() - joining
            assert waited < GRACE_S, f"fired {waited:.1f} s after B started: a grace of B's own"


async def test_a_gateway_whose_replicas_all_died_holds_timeouts_for_the_grace(
    postgres_url: str,
) -> None:
    with replicas(postgres_url, 2, GRACE) as (a, b):
        task_id = await silent_task(b.address)  # held: the gateway just came up
        a.kill()
        b.kill()
    await eventually(lambda: gateway_down(postgres_url), "the replicas' renewals to lapse")
    starting = time.monotonic()
    with replicas(postgres_url, 1, GRACE) as (c,):
        # C brought the gateway up after it started: the grace runs from then.
        await still_executing_until(c.address, task_id, starting + GRACE_S)
        await ended_by_timeout(c.address, task_id)


async def test_a_lone_replica_stopped_and_restarted_at_once_holds_timeouts_for_the_grace(
    postgres_url: str,
) -> None:
    with replicas(postgres_url, 1, GRACE) as (a,):
        task_id = await silent_task(a.address)
        a.terminate()  # a clean stop: A leaves, so the gateway is down at once
    starting = time.monotonic()
    with replicas(postgres_url, 1, GRACE) as (again,):
        await still_executing_until(again.address, task_id, starting + GRACE_S)
        await ended_by_timeout(again.address, task_id)
