"""QueryTasks and GetTask views: filters, pages, manager and agent views."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from task_manager.v1 import task_manager_pb2 as pb
from tests.helpers import AsyncStub, create_request, status_update

pytestmark = pytest.mark.anyio
S = pb.Status
Q = pb.QueryTasksRequest


async def all_pages(stub: AsyncStub, request: Q) -> list[pb.Task]:
    tasks: list[pb.Task] = []
    while True:
        page = await stub.QueryTasks(request)
        tasks.extend(page.tasks)
        if not page.page_token:
            return tasks
        request.page_token = page.page_token


def ids(tasks: list[pb.Task]) -> list[str]:
    return [t.version.task_id for t in tasks]


async def test_query_returns_every_task_oldest_first_in_pages_of_page_size(
    stub: AsyncStub,
) -> None:
    created = [(await stub.CreateTask(create_request())).task for _ in range(7)]
    first = await stub.QueryTasks(Q(page_size=3))
    assert ids(list(first.tasks)) == ids(created[:3])
    assert first.page_token
    assert ids(await all_pages(stub, Q(page_size=3))) == ids(created)


async def test_default_page_size_is_100(stub: AsyncStub) -> None:
    await asyncio.gather(*(stub.CreateTask(create_request(None)) for _ in range(101)))
    page = await stub.QueryTasks(Q())
    assert len(page.tasks) == 100
    assert page.page_token
    rest = await stub.QueryTasks(Q(page_token=page.page_token))
    assert len(rest.tasks) == 1
    assert not rest.page_token


async def test_pages_never_skip_or_repeat_a_task_while_tasks_are_being_created(
    stub: AsyncStub,
) -> None:
    before = ids([(await stub.CreateTask(create_request(None))).task for _ in range(30)])
    stop = asyncio.Event()

    async def keep_creating() -> list[str]:
        made = []
        while not stop.is_set():
            made.append((await stub.CreateTask(create_request(None))).task.version.task_id)
        return made

    creator = asyncio.create_task(keep_creating())
    seen: list[str] = []
    token = ""
    while True:
        page = await stub.QueryTasks(Q(page_size=4, page_token=token))
        seen.extend(ids(list(page.tasks)))
        if len(seen) >= 60 or not page.page_token:
            break
        token = page.page_token
        await asyncio.sleep(0)  # let the creator interleave with the pages
    stop.set()
    during = await creator
    assert len(seen) == len(set(seen)), "a task was repeated"
    everything = before + during
    assert seen == everything[: len(seen)], "a task was skipped or reordered"


async def test_parent_task_id_filter(stub: AsyncStub) -> None:
    parent = (await stub.CreateTask(create_request(None))).task
    children = []
    for _ in range(3):
        request = create_request()
        request.relations.parent_task_id = parent.version.task_id
        children.append((await stub.CreateTask(request)).task)
    await stub.CreateTask(create_request())
    found = await all_pages(stub, Q(parent_task_id=parent.version.task_id))
    assert ids(found) == ids(children)


async def test_status_filter_inclusive_and_exclusive(stub: AsyncStub) -> None:
    created = (await stub.CreateTask(create_request(None))).task
    sent = (await stub.CreateTask(create_request())).task
    running = (await stub.CreateTask(create_request())).task
    running = (await stub.UpdateStatus(status_update(running, S.STATUS_EXECUTING))).task
    inclusive = Q(
        status_filter=Q.StatusFilter(
            status=[S.STATUS_SENT, S.STATUS_EXECUTING], filter_type=Q.FILTER_TYPE_INCLUSIVE
        )
    )
    assert ids(await all_pages(stub, inclusive)) == ids([sent, running])
    exclusive = Q(
        status_filter=Q.StatusFilter(status=[S.STATUS_SENT], filter_type=Q.FILTER_TYPE_EXCLUSIVE)
    )
    assert ids(await all_pages(stub, exclusive)) == ids([created, running])
    unset_type = Q(status_filter=Q.StatusFilter(status=[S.STATUS_CREATED]))
    assert ids(await all_pages(stub, unset_type)) == ids([created])


async def test_update_time_range_filter_is_inclusive_at_both_ends(
    stub: AsyncStub,
) -> None:
    first = (await stub.CreateTask(create_request())).task
    second = (await stub.CreateTask(create_request())).task
    third = (await stub.CreateTask(create_request())).task
    request = Q()
    request.update_time_range.update_start_time.CopyFrom(second.last_update_time)
    request.update_time_range.update_end_time.CopyFrom(second.last_update_time)
    assert ids(await all_pages(stub, request)) == ids([second])
    request.update_time_range.ClearField("update_end_time")
    assert ids(await all_pages(stub, request)) == ids([second, third])
    request = Q()
    request.update_time_range.update_end_time.CopyFrom(first.last_update_time)
    assert ids(await all_pages(stub, request)) == ids([first])


async def test_agent_view_shows_what_the_agent_last_reported(stub: AsyncStub) -> None:
    task = (await stub.CreateTask(create_request())).task
    agent_view = pb.GetTaskRequest(task_id=task.version.task_id, task_view=pb.TASK_VIEW_AGENT)
    assert (await stub.GetTask(agent_view)).task.status.status == S.STATUS_SENT
    reported = (await stub.UpdateStatus(status_update(task, S.STATUS_EXECUTING))).task
    cancel = pb.CancelTaskRequest(task_id=task.version.task_id)
    requested = (await stub.CancelTask(cancel)).task
    manager_view = await stub.GetTask(pb.GetTaskRequest(task_id=task.version.task_id))
    assert manager_view.task == requested
    assert (await stub.GetTask(agent_view)).task == reported
    query = Q(view=pb.TASK_VIEW_AGENT, status_filter=Q.StatusFilter(status=[S.STATUS_EXECUTING]))
    assert await all_pages(stub, query) == [reported]


async def test_task_never_sent_has_no_agent_view(stub: AsyncStub) -> None:
    task = (await stub.CreateTask(create_request(None))).task
    request = pb.GetTaskRequest(task_id=task.version.task_id, task_view=pb.TASK_VIEW_AGENT)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetTask(request)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert await all_pages(stub, Q(view=pb.TASK_VIEW_AGENT)) == []


async def test_get_task_honours_the_current_definition_version(stub: AsyncStub) -> None:
    task = (await stub.CreateTask(create_request())).task
    for version in (0, 1):
        request = pb.GetTaskRequest(task_id=task.version.task_id, definition_version=version)
        assert (await stub.GetTask(request)).task == task
