"""ListenAsAgent: what an agent receives, live and on (re)connect."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest

from storage.base import Change
from task_manager.dispatch import Dispatcher
from task_manager.server import TaskManagerServer
from task_manager.v1 import task_manager_pb2 as pb
from tests.helpers import AsyncStub, create_request, server_settings, status_update

pytestmark = pytest.mark.anyio
S = pb.Status
READ_TIMEOUT = 20.0

AgentCall = grpc.aio.UnaryStreamCall[pb.ListenAsAgentRequest, pb.ListenAsAgentResponse]


def listen(stub: AsyncStub, *entity_ids: str) -> AgentCall:
    request = pb.ListenAsAgentRequest(entity_ids=pb.EntityIds(entity_ids=list(entity_ids)))
    return stub.ListenAsAgent(request)


async def next_request(call: AgentCall) -> pb.ListenAsAgentResponse:
    message = await asyncio.wait_for(call.read(), READ_TIMEOUT)
    assert isinstance(message, pb.ListenAsAgentResponse), f"stream ended: {message}"
    return message


async def executed_ids(call: AgentCall, count: int) -> list[str]:
    ids = []
    for _ in range(count):
        message = await next_request(call)
        assert message.WhichOneof("request") == "execute_request", message
        ids.append(message.execute_request.task.version.task_id)
    return ids


async def drain(call: AgentCall) -> None:
    """Reads until the stream fails (the error propagates) or hangs (a timeout)."""
    while True:
        await next_request(call)


async def create(stub: AsyncStub, entity_id: str = "agent-1") -> pb.Task:
    return (await stub.CreateTask(create_request(entity_id))).task


async def test_listening_agent_receives_a_new_task_at_sent(stub: AsyncStub) -> None:
    call = listen(stub, "agent-1")
    first = await create(stub)  # may arrive from the backlog or live: either is fine
    assert await executed_ids(call, 1) == [first.version.task_id]
    second = await create(stub)
    message = await next_request(call)
    assert message.execute_request.task == second
    assert message.execute_request.task.status.status == S.STATUS_SENT
    call.cancel()


async def test_connecting_agent_first_gets_its_sent_tasks_oldest_first_then_new_ones(
    stub: AsyncStub,
) -> None:
    backlog = [await create(stub) for _ in range(5)]
    call = listen(stub, "agent-1")
    assert await executed_ids(call, 5) == [t.version.task_id for t in backlog]
    live = await create(stub)
    assert await executed_ids(call, 1) == [live.version.task_id]
    call.cancel()


async def test_task_stays_deliverable_until_the_agent_reports_past_sent(
    stub: AsyncStub,
) -> None:
    received, pending = await create(stub), await create(stub)
    await stub.UpdateStatus(status_update(received, S.STATUS_MACHINE_RECEIPT))
    call = listen(stub, "agent-1")
    assert await executed_ids(call, 1) == [pending.version.task_id]
    marker = await create(stub)  # proves nothing else was queued before it
    assert await executed_ids(call, 1) == [marker.version.task_id]
    call.cancel()


async def test_every_stream_of_the_same_entity_receives_the_task(
    stub: AsyncStub,
) -> None:
    calls = [listen(stub, "agent-1") for _ in range(3)]
    task = await create(stub)
    for call in calls:
        assert await executed_ids(call, 1) == [task.version.task_id]
        call.cancel()


async def test_a_stream_receives_the_tasks_of_every_entity_in_its_selector(
    stub: AsyncStub,
) -> None:
    a = await create(stub, "agent-a")
    call = listen(stub, "agent-a", "agent-b")
    assert await executed_ids(call, 1) == [a.version.task_id]
    b = await create(stub, "agent-b")
    assert await executed_ids(call, 1) == [b.version.task_id]
    call.cancel()


async def test_an_agent_receives_only_its_own_tasks(stub: AsyncStub) -> None:
    call = listen(stub, "agent-1")
    await create(stub, "agent-2")
    await stub.CreateTask(create_request(None))
    mine = await create(stub, "agent-1")
    assert await executed_ids(call, 1) == [mine.version.task_id]
    call.cancel()


async def test_cancel_request_is_pushed_and_pushed_again_on_reconnect(
    stub: AsyncStub,
) -> None:
    task = await create(stub)
    task = (await stub.UpdateStatus(status_update(task, S.STATUS_EXECUTING))).task
    call = listen(stub, "agent-1")
    marker = await create(stub)
    assert await executed_ids(call, 1) == [marker.version.task_id]
    await stub.CancelTask(pb.CancelTaskRequest(task_id=task.version.task_id))
    message = await next_request(call)
    assert message.cancel_request.task_id == task.version.task_id
    assert message.cancel_request.assignee == task.relations.assignee
    call.cancel()

    again = listen(stub, "agent-1")
    first = await next_request(again)  # the backlog is in task creation order
    second = await next_request(again)
    assert first.cancel_request.task_id == task.version.task_id
    assert second.execute_request.task.version.task_id == marker.version.task_id
    again.cancel()


async def test_update_to_cancel_requested_pushes_a_cancel_request(
    stub: AsyncStub,
) -> None:
    task = await create(stub)
    task = (await stub.UpdateStatus(status_update(task, S.STATUS_EXECUTING))).task
    call = listen(stub, "agent-1")
    await stub.UpdateStatus(status_update(task, S.STATUS_CANCEL_REQUESTED))
    assert (await next_request(call)).cancel_request.task_id == task.version.task_id
    call.cancel()


async def test_complete_request_is_pushed_and_pushed_again_on_reconnect(
    stub: AsyncStub,
) -> None:
    task = await create(stub)
    task = (await stub.UpdateStatus(status_update(task, S.STATUS_EXECUTING))).task
    call = listen(stub, "agent-1")
    await stub.CompleteTask(pb.CompleteTaskRequest(task_id=task.version.task_id))
    assert (await next_request(call)).complete_request.task_id == task.version.task_id
    call.cancel()
    again = listen(stub, "agent-1")
    assert (await next_request(again)).complete_request.task_id == task.version.task_id
    again.cancel()


async def test_task_created_while_the_agent_connects_arrives_exactly_once(
    stub: AsyncStub,
) -> None:
    # The subscribe-then-backlog race: each task is committed at about the moment the
    # stream reads its backlog. It must arrive once: not lost, not twice.
    for round_number in range(30):
        entity_id = f"racer-{round_number}"
        call = listen(stub, entity_id)
        task = await create(stub, entity_id)
        assert await executed_ids(call, 1) == [task.version.task_id]
        marker = await create(stub, entity_id)
        assert await executed_ids(call, 1) == [marker.version.task_id]
        call.cancel()


async def test_a_disconnected_stream_does_not_block_dispatch_to_others(
    stub: AsyncStub, server: TaskManagerServer
) -> None:
    gone = listen(stub, "agent-1")
    await create(stub)
    await executed_ids(gone, 1)
    gone.cancel()
    staying = listen(stub, "agent-1")
    tasks = [await create(stub) for _ in range(3)]
    received = await executed_ids(staying, 4)
    assert received[1:] == [t.version.task_id for t in tasks]
    staying.cancel()


@pytest.fixture
async def small_buffer_stub(database: str) -> AsyncIterator[AsyncStub]:
    running = await TaskManagerServer.start(server_settings(database, stream_buffer=4))
    # No BDP probing: the HTTP/2 window stays small, so a client that stops reading
    # really pushes back on the server instead of buffering megabytes.
    options = [("grpc.http2.bdp_probe", 0)]
    async with grpc.aio.insecure_channel(running.address, options=options) as channel:
        yield AsyncStub(channel)
    await running.stop()


async def test_a_stream_that_stops_reading_is_ended_and_never_blocks_others(
    small_buffer_stub: AsyncStub,
) -> None:
    stub = small_buffer_stub
    stalled = listen(stub, "stalled")
    await create(stub, "stalled")
    await executed_ids(stalled, 1)  # connected; now it stops reading
    bulky = create_request("stalled")
    bulky.specification.value = b"x" * 8192
    created = [(await stub.CreateTask(bulky)).task.version.task_id for _ in range(300)]
    healthy = listen(stub, "healthy")
    fast = await create(stub, "healthy")
    assert await executed_ids(healthy, 1) == [fast.version.task_id]
    # The stalled agent, once it reads again, finds its stream ended with a clear status.
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        await drain(stalled)
    assert ended.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "fell" in (ended.value.details() or "")
    # Reconnecting delivers everything still at SENT: nothing was lost.
    again = listen(stub, "stalled")
    backlog = await executed_ids(again, 301)
    assert backlog[1:] == created
    again.cancel()
    healthy.cancel()


async def test_empty_selector_is_invalid_argument(stub: AsyncStub) -> None:
    for request in (
        pb.ListenAsAgentRequest(),
        pb.ListenAsAgentRequest(entity_ids=pb.EntityIds(entity_ids=[])),
        pb.ListenAsAgentRequest(entity_ids=pb.EntityIds(entity_ids=[""])),
    ):
        call = stub.ListenAsAgent(request)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call.read()
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "entity" in (caught.value.details() or "")


async def test_server_stop_ends_agent_streams_with_unavailable(
    stub: AsyncStub, server: TaskManagerServer
) -> None:
    call = listen(stub, "agent-1")
    task = await create(stub)
    assert await executed_ids(call, 1) == [task.version.task_id]
    await server.stop()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await next_request(call)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


def _sent_change(task_id: str, revision: int) -> Change:
    task = pb.Task(
        version=pb.TaskVersion(task_id=task_id, definition_version=1, status_version=2),
        status=pb.TaskStatus(status=S.STATUS_SENT),
        relations=pb.Relations(assignee=pb.Principal(system=pb.System(entity_id="agent-1"))),
    )
    entry = pb.TaskHistoryEntry(revision=revision)
    return Change(entry=entry, task=task, encoded_task=task.SerializeToString())


async def test_a_change_the_backlog_held_is_not_sent_again_when_published_after_it() -> None:
    """A commit is visible to reads before the feed publishes it, so an agent's backlog
    can hold a change that reaches the dispatcher only once the stream is live."""

    def no_hand_over(task: pb.Task, holder: str, reason: str) -> asyncio.Future[pb.Task | None]:
        raise AssertionError("no pool task here")

    dispatcher = Dispatcher(no_hand_over)
    first, second = _sent_change("first", 7), _sent_change("second", 8)
    with dispatcher.open_stream(frozenset({"agent-1"}), max_in_flight=0) as stream:
        dispatcher.start(stream, [(first.task, first.encoded_task)], revision=7)
        dispatcher.publish([first])  # published late: already in the backlog
        dispatcher.publish([second])
        received = []
        async for request in stream.requests():
            message = pb.ListenAsAgentResponse.FromString(request)
            received.append(message.execute_request.task.version.task_id)
            if len(received) == 2:
                break
    assert received == ["first", "second"]
