"""WatchTasks: ordered, unique, gapless, resumable, bookmarked, bounded."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import grpc
import pytest

from agent_kit import OperatorClient
from storage import open_store
from storage.base import TaskSelector
from task_manager import lifecycle
from task_manager.auth import ANONYMOUS
from task_manager.clock import ManualClock, SystemClock, Timer
from task_manager.config import Settings
from task_manager.server import TaskManagerServer
from task_manager.v1 import task_manager_pb2 as pb
from task_manager.watch import WatchHub, WatchSpec, watch_stream
from tests.helpers import AsyncStub, create_request, server_settings, status_update, trailer

pytestmark = pytest.mark.anyio
S = pb.Status
READ_S = 20.0

WatchCall = grpc.aio.UnaryStreamCall[pb.WatchTasksRequest, pb.WatchTasksResponse]


def watch(stub: AsyncStub, **fields: object) -> WatchCall:
    return stub.WatchTasks(pb.WatchTasksRequest(**fields))  # type: ignore[arg-type]


async def read(call: WatchCall) -> pb.WatchTasksResponse:
    message = await asyncio.wait_for(call.read(), READ_S)
    assert isinstance(message, pb.WatchTasksResponse), f"stream ended: {message}"
    return message


async def events(call: WatchCall, count: int) -> list[pb.WatchTasksResponse]:
    got: list[pb.WatchTasksResponse] = []
    while len(got) < count:
        message = await read(call)
        if message.HasField("event"):
            got.append(message)
    return got


async def read_until_it_fails(call: WatchCall) -> None:
    while True:
        await read(call)


async def all_revisions(stub: AsyncStub) -> list[int]:
    """Every revision in the store, from every task's history."""
    tasks = (await stub.QueryTasks(pb.QueryTasksRequest(page_size=1000))).tasks
    revisions: list[int] = []
    for task in tasks:
        history = await stub.GetTaskHistory(pb.GetTaskHistoryRequest(task_id=task.version.task_id))
        revisions.extend(entry.revision for entry in history.entries)
    return sorted(revisions)


async def make_changes(stub: AsyncStub, tasks: int = 3) -> list[pb.Task]:
    made = []
    for _ in range(tasks):
        task = (await stub.CreateTask(create_request())).task
        task = (await stub.UpdateStatus(status_update(task, S.STATUS_EXECUTING))).task
        made.append(task)
    return made


async def test_watch_from_now_gets_every_change_once_in_revision_order(stub: AsyncStub) -> None:
    await make_changes(stub, 2)  # before the watch: not wanted
    call = watch(stub)
    await call.initial_metadata()
    before = await stub.GetTaskHistory(
        pb.GetTaskHistoryRequest(task_id=(await make_changes(stub, 1))[0].version.task_id)
    )
    first_new = before.entries[0].revision
    await make_changes(stub, 2)
    got = await events(call, 9)  # 3 tasks x (CREATED, SENT, EXECUTING)
    revisions = [m.revision for m in got]
    assert revisions == list(range(first_new, first_new + 9))
    assert revisions == (await all_revisions(stub))[-9:]
    types = [m.event.event_type for m in got]
    assert types == [pb.EVENT_TYPE_CREATED, pb.EVENT_TYPE_UPDATE, pb.EVENT_TYPE_UPDATE] * 3
    call.cancel()


async def test_history_replay_equals_what_live_watchers_saw(stub: AsyncStub) -> None:
    live = watch(stub, start_revision=1)
    made = await make_changes(stub, 3)
    await stub.CancelTask(pb.CancelTaskRequest(task_id=made[0].version.task_id, reason="r"))
    seen_live = await events(live, 10)
    replay = watch(stub, start_revision=1)
    replayed = await events(replay, 10)
    assert replayed == seen_live
    assert [m.revision for m in replayed] == await all_revisions(stub)
    resumed = watch(stub, start_revision=seen_live[4].revision + 1)
    assert await events(resumed, 5) == seen_live[5:]
    for call in (live, replay, resumed):
        call.cancel()


async def test_filters_match_the_task_after_each_change_and_are_anded(stub: AsyncStub) -> None:
    call = watch(
        stub,
        filter=pb.WatchFilter(assignee_entity_ids=["agent-7"], statuses=[S.STATUS_EXECUTING]),
    )
    await call.initial_metadata()
    other = (await stub.CreateTask(create_request("agent-8"))).task
    await stub.UpdateStatus(status_update(other, S.STATUS_EXECUTING))
    mine = (await stub.CreateTask(create_request("agent-7"))).task
    running = (await stub.UpdateStatus(status_update(mine, S.STATUS_EXECUTING))).task
    (only,) = await events(call, 1)
    assert only.event.task == running
    call.cancel()


async def test_snapshot_lists_unfinished_tasks_at_one_revision_then_goes_live(
    stub: AsyncStub,
) -> None:
    unfinished = await make_changes(stub, 2)
    done = (await stub.CreateTask(create_request())).task
    await stub.UpdateStatus(status_update(done, S.STATUS_DONE_OK))
    call = watch(stub, include_preexisting=True)
    snapshot = [await read(call), await read(call)]
    assert [m.event.event_type for m in snapshot] == [pb.EVENT_TYPE_PREEXISTING] * 2
    assert [m.event.task for m in snapshot] == unfinished
    marker = await read(call)
    assert marker.HasField("heartbeat")
    assert marker.revision == snapshot[0].revision == snapshot[1].revision
    assert marker.revision == (await all_revisions(stub))[-1]
    new = (await stub.CreateTask(create_request())).task
    (live,) = await events(call, 1)
    assert live.event.task.version.task_id == new.version.task_id
    assert live.revision == marker.revision + 1
    call.cancel()


async def test_snapshot_and_live_events_rebuild_the_store_under_concurrent_writes(
    stub: AsyncStub,
) -> None:
    await make_changes(stub, 5)
    stop = asyncio.Event()

    async def writer() -> None:
        while not stop.is_set():
            task = (await stub.CreateTask(create_request())).task
            for status in (S.STATUS_EXECUTING, S.STATUS_DONE_OK):
                task = (await stub.UpdateStatus(status_update(task, status))).task

    writers = [asyncio.create_task(writer()) for _ in range(3)]
    await asyncio.sleep(0.05)
    call = watch(stub, include_preexisting=True, heartbeat_interval_ms=100)
    state: dict[str, pb.Task] = {}
    await asyncio.sleep(0.3)
    stop.set()
    await asyncio.gather(*writers)
    final_revision = (await all_revisions(stub))[-1]
    while True:
        message = await read(call)
        if message.HasField("event"):
            state[message.event.task.version.task_id] = message.event.task
        elif message.revision >= final_revision:
            break  # a bookmark past the last change: everything has arrived
    call.cancel()
    tasks = (await stub.QueryTasks(pb.QueryTasksRequest(page_size=1000))).tasks
    for task in tasks:
        if task.version.task_id in state:
            assert state[task.version.task_id] == task
        else:  # finished before the snapshot, untouched since
            assert task.status.status == S.STATUS_DONE_OK


async def test_idle_watcher_gets_heartbeat_bookmarks_that_advance(
    clocked: tuple[TaskManagerServer, ManualClock],
) -> None:
    server, clock = clocked
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = AsyncStub(channel)
        call = watch(
            stub, filter=pb.WatchFilter(task_ids=["never-made"]), heartbeat_interval_ms=1000
        )
        await call.initial_metadata()
        opening = await read(call)  # where the watch starts, said at once
        assert (opening.HasField("heartbeat"), opening.revision) == (True, 0)
        await make_changes(stub, 1)  # changes this watcher does not want
        current = (await all_revisions(stub))[-1]
        clock.advance(0.5)
        clock.advance(0.6)
        beat = await read(call)
        assert beat.HasField("heartbeat")
        assert beat.revision == current
        await make_changes(stub, 1)
        clock.advance(1.1)
        later = await read(call)
        assert later.HasField("heartbeat")
        assert later.revision == (await all_revisions(stub))[-1] > current
        call.cancel()


async def test_rate_limit_keeps_the_latest_state_per_window_and_never_drops_created_or_finished(
    clocked: tuple[TaskManagerServer, ManualClock],
) -> None:
    server, clock = clocked
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = AsyncStub(channel)
        call = watch(
            stub,
            rate_limit=pb.RateLimit(update_per_task_limit_ms=1000),
            heartbeat_interval_ms=3_600_000,
        )
        await call.initial_metadata()
        task = (await stub.CreateTask(create_request())).task  # CREATED, then SENT
        second = (await stub.CreateTask(create_request(None))).task
        (created, second_created) = await events(call, 2)
        assert created.event.event_type == pb.EVENT_TYPE_CREATED
        assert second_created.event.task.version.task_id == second.version.task_id
        for progress in ("10%", "50%", "90%"):
            task = (
                await stub.UpdateStatus(
                    status_update(task, S.STATUS_EXECUTING, progress=_progress(progress))
                )
            ).task
        clock.advance(1.0)  # the window opens: only the latest state comes
        (latest,) = await events(call, 1)
        assert latest.event.task == task
        done = (await stub.UpdateStatus(status_update(task, S.STATUS_DONE_OK))).task
        clock.advance(1.0)
        (finished,) = await events(call, 1)
        assert finished.event.task == done
        call.cancel()


async def test_slow_watcher_is_cut_off_while_a_fast_one_keeps_up(database: str) -> None:
    settings = server_settings(database, watch_buffer=20)
    server = await TaskManagerServer.start(settings)
    options = [("grpc.http2.bdp_probe", 0)]  # a small window: the slow reader pushes back
    try:
        async with grpc.aio.insecure_channel(server.address, options=options) as channel:
            stub = AsyncStub(channel)
            slow = watch(stub)
            fast = watch(stub)
            await slow.initial_metadata()
            await fast.initial_metadata()
            bulky = create_request(None)
            bulky.specification.value = b"x" * 8192
            received = 0

            async def consume_fast() -> None:
                nonlocal received
                while received < 300:
                    if (await read(fast)).HasField("event"):
                        received += 1

            consumer = asyncio.create_task(consume_fast())
            for _ in range(300):
                await stub.CreateTask(bulky)
            await asyncio.wait_for(consumer, READ_S)
            assert received == 300
            with pytest.raises(grpc.aio.AioRpcError) as ended:
                await read_until_it_fails(slow)
            assert ended.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "resume" in (ended.value.details() or "")
            fast.cancel()
    finally:
        await server.stop()


async def test_compacted_history_is_out_of_range_and_the_sdk_relists(database: str) -> None:
    settings = server_settings(database, retention_revisions=3, retention_age_s=0)
    server = await TaskManagerServer.start(settings)
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = AsyncStub(channel)
            made = await make_changes(stub, 4)  # revisions 1..12
            compacted = await server.compact()
            assert compacted == 9
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await read(watch(stub, start_revision=5))
            assert caught.value.code() == grpc.StatusCode.OUT_OF_RANGE
            assert trailer(caught.value, "x-compact-revision") == "9"
            assert "compacted" in (caught.value.details() or "")
            assert len(await events(watch(stub, start_revision=10), 3)) == 3
        async with OperatorClient(server.address) as client:
            seen = client.watch(start_revision=5)
            relisted = [await anext(seen) for _ in range(4)]
            assert [m.event.event_type for m in relisted] == [pb.EVENT_TYPE_PREEXISTING] * 4
            assert [m.event.task for m in relisted] == made
            new = await client.create_task(display_name="after the relist")
            live = await anext(seen)
            assert live.event.task.version.task_id == new.version.task_id
            await seen.aclose()
    finally:
        await server.stop()


@pytest.mark.parametrize(
    ("fields", "mentions"),
    [
        ({"heartbeat_interval_ms": 50}, "heartbeat_interval_ms"),
        ({"rate_limit": pb.RateLimit(update_per_task_limit_ms=100)}, "rate_limit"),
        ({"include_preexisting": True, "start_revision": 3}, "start_revision"),
        ({"filter": pb.WatchFilter(statuses=[77])}, "filter.statuses"),  # type: ignore[list-item]
        ({"filter": pb.WatchFilter(task_ids=["bad id"])}, "filter.task_ids"),
    ],
)
async def test_bad_watch_requests_are_invalid_argument(
    stub: AsyncStub, fields: dict[str, object], mentions: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await read(watch(stub, **fields))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert mentions in (caught.value.details() or "")


async def test_wait_returns_the_finished_task_and_times_out_clearly(
    server: TaskManagerServer, stub: AsyncStub
) -> None:
    from agent_kit import WaitTimeout

    task = (await stub.CreateTask(create_request())).task
    async with OperatorClient(server.address) as client:
        with pytest.raises(WaitTimeout, match=task.version.task_id):
            await client.wait(task.version.task_id, timeout=0.2)
        waiter = asyncio.create_task(client.wait(task.version.task_id, timeout=READ_S))
        running = (await stub.UpdateStatus(status_update(task, S.STATUS_EXECUTING))).task
        done = (await stub.UpdateStatus(status_update(running, S.STATUS_DONE_OK))).task
        assert await waiter == done
        assert await client.wait(task.version.task_id) == done  # already finished


async def test_cancel_on_exit_cancels_the_task_when_the_block_fails(
    server: TaskManagerServer,
) -> None:
    async with OperatorClient(server.address) as client:
        task = await client.create_task(assignee_entity_id="agent-1")
        with pytest.raises(RuntimeError):
            async with client.cancel_on_exit(task.version.task_id):
                raise RuntimeError("operator script crashed")
        cancelled = await client.get_task(task.version.task_id)
        assert cancelled.status.status == S.STATUS_CANCEL_REQUESTED
        kept = await client.create_task(assignee_entity_id="agent-1")
        async with client.cancel_on_exit(kept.version.task_id):
            pass
        assert (await client.get_task(kept.version.task_id)).status.status == S.STATUS_SENT


def _progress(text: str) -> pb.google_dot_protobuf_dot_any__pb2.Any:  # type: ignore[name-defined]
    from google.protobuf.any_pb2 import Any
    from google.protobuf.wrappers_pb2 import StringValue

    packed = Any()
    packed.Pack(StringValue(value=text))
    return packed


async def test_compaction_runs_once_per_interval_of_the_clock(database: str) -> None:
    clock = ManualClock()
    settings = server_settings(database, compaction_interval_s=60)
    server = await TaskManagerServer.start(settings, clock=clock)
    try:
        await until(lambda: server.compactions == 1)  # once at start
        clock.advance(60)
        await until(lambda: server.compactions >= 2)
        # Not a wait for something to happen: a window in which nothing may happen while
        # the clock stands still (a spinning loop compacts hundreds of times in it).
        await asyncio.sleep(0.2)
        assert server.compactions == 2
    finally:
        await server.stop()


async def until(condition: Callable[[], bool]) -> None:
    """Polls condition with a deadline."""
    async with asyncio.timeout(READ_S):
        while not condition():  # noqa: ASYNC110 - a counter has no event to wait on
            await asyncio.sleep(0.01)


async def test_a_change_committed_right_after_subscribing_is_never_lost(database: str) -> None:
    # Deterministic version of the race: the change commits in the gap between the
    # watch's registration (its headers go out) and the rest of its setup.
    store = await open_store(database)
    hub = WatchHub(store.feed.revision)
    store.feed.subscribe(hub.publish)
    try:
        clock = SystemClock()
        request = pb.CreateTaskRequest(display_name="raced")
        task = await store.write(
            lambda tx: (
                lifecycle.create_task(
                    tx, request, "raced-1", Settings().task_policy(), clock.now_ns()
                ).task
            )
        )
        update = status_update(task, S.STATUS_EXECUTING).status_update
        task_revision = store.feed.revision  # the create's: where the watch will start

        async def commit_a_change() -> None:
            await store.write(
                lambda tx: lifecycle.update_status(tx, update, ANONYMOUS, clock.now_ns())
            )

        spec = WatchSpec(selector=TaskSelector(task_ids=frozenset({"raced-1"})))
        stream = watch_stream(spec, hub, store, clock, on_subscribed=commit_a_change)
        responses = []
        for _ in range(2):  # the opening bookmark, then the change
            answer = await asyncio.wait_for(anext(stream), 5)
            responses.append(
                pb.WatchTasksResponse.FromString(answer) if isinstance(answer, bytes) else answer
            )
        opening, event = responses
        assert (opening.HasField("heartbeat"), opening.revision) == (True, task_revision)
        assert event.event.task.status.status == S.STATUS_EXECUTING
        await stream.aclose()  # type: ignore[attr-defined]
    finally:
        await store.close()


class EarlyTimersClock(SystemClock):
    """Real time, but every timer fires 1 ms before now_ns() reaches its deadline, as
    loop timers (monotonic) may against the wall clock."""

    def call_at(self, deadline_ns: int, callback: Callable[[], None]) -> Timer:
        return super().call_at(deadline_ns - 1_000_000, callback)


async def test_heartbeats_keep_coming_when_timers_fire_early() -> None:
    hub = WatchHub()
    spec = WatchSpec(selector=TaskSelector(), heartbeat_interval_ns=50_000_000)
    with hub.open(spec.selector) as subscribed:
        stream = subscribed.responses_after(0, hub, EarlyTimersClock(), spec, committed=0)
        for _ in range(5):
            beat = await asyncio.wait_for(anext(stream), 5)
            assert isinstance(beat, pb.WatchTasksResponse)
            assert beat.HasField("heartbeat")
        await stream.aclose()  # type: ignore[attr-defined]


async def test_a_snapshot_filtered_on_finished_statuses_lists_nothing(stub: AsyncStub) -> None:
    unfinished = (await stub.CreateTask(create_request())).task
    done = (await stub.UpdateStatus(status_update(unfinished, S.STATUS_DONE_OK))).task
    await stub.CreateTask(create_request())  # unfinished: must not be listed
    call = watch(stub, include_preexisting=True, filter=pb.WatchFilter(statuses=[S.STATUS_DONE_OK]))
    marker = await read(call)  # no PREEXISTING event: the snapshot's closing heartbeat
    assert marker.HasField("heartbeat")
    again = (await stub.CreateTask(create_request())).task
    finished = (await stub.UpdateStatus(status_update(again, S.STATUS_DONE_OK))).task
    (live,) = await events(call, 1)
    assert live.event.task == finished
    assert done.status.status == S.STATUS_DONE_OK
    call.cancel()


async def test_history_of_a_task_whose_entries_were_all_compacted_is_empty_not_missing(
    database: str,
) -> None:
    settings = server_settings(database, retention_revisions=2, retention_age_s=0)
    server = await TaskManagerServer.start(settings)
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = AsyncStub(channel)
            old = (await stub.CreateTask(create_request(task_id="old-task-1"))).task
            await make_changes(stub, 2)
            await server.compact()
            history = await stub.GetTaskHistory(pb.GetTaskHistoryRequest(task_id="old-task-1"))
            assert list(history.entries) == []
            still = await stub.GetTask(pb.GetTaskRequest(task_id="old-task-1"))
            assert still.task == old
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.GetTaskHistory(pb.GetTaskHistoryRequest(task_id="never-made"))
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        await server.stop()
