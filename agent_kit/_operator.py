"""The operator client: create, get, query, cancel, complete, history.

Async first (`OperatorClient`); `SyncOperatorClient` runs the same client in a
background event loop for scripts.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from datetime import datetime
from types import TracebackType
from typing import Any, ParamSpec, TypeVar

import anyio.from_thread
from google.protobuf import any_pb2
from google.protobuf.message import Message

from agent_kit._grpc import AsyncStub, open_channel
from task_manager.v1 import task_manager_pb2 as pb

P = ParamSpec("P")
T = TypeVar("T")
Q = pb.QueryTasksRequest


def assignee(entity_id: str) -> pb.Principal:
    """The principal of the agent with this entity id."""
    return pb.Principal(system=pb.System(entity_id=entity_id))


class OperatorClient:
    """Async client for operators. Use as `async with OperatorClient(target) as client`.

    Failed calls raise grpc.aio.AioRpcError with the server's code and message
    (NOT_FOUND, INVALID_ARGUMENT, FAILED_PRECONDITION, ...).
    """

    def __init__(self, target: str, *, author: pb.Principal | None = None) -> None:
        self.target = target
        self.author = author
        self._channel = open_channel(target)
        self._stub = AsyncStub(self._channel)

    async def __aenter__(self) -> OperatorClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close(None)

    async def create_task(
        self,
        *,
        assignee_entity_id: str | None = None,
        specification: Message | None = None,
        display_name: str = "",
        description: str = "",
        task_id: str = "",
        parent_task_id: str = "",
        is_executed_elsewhere: bool = False,
    ) -> pb.Task:
        """Creates a task; with an assignee it is sent to that agent at once."""
        request = pb.CreateTaskRequest(
            display_name=display_name,
            description=description,
            task_id=task_id,
            is_executed_elsewhere=is_executed_elsewhere,
            relations=pb.Relations(parent_task_id=parent_task_id),
        )
        if assignee_entity_id is not None:
            request.relations.assignee.CopyFrom(assignee(assignee_entity_id))
        if specification is not None:
            request.specification.CopyFrom(_packed(specification))
        if self.author is not None:
            request.author.CopyFrom(self.author)
        return (await self._stub.CreateTask(request)).task

    async def get_task(
        self, task_id: str, *, agent_view: bool = False, definition_version: int = 0
    ) -> pb.Task:
        view = pb.TASK_VIEW_AGENT if agent_view else pb.TASK_VIEW_MANAGER
        request = pb.GetTaskRequest(
            task_id=task_id, task_view=view, definition_version=definition_version
        )
        return (await self._stub.GetTask(request)).task

    async def query_tasks(
        self,
        *,
        parent_task_id: str = "",
        statuses: Iterable[pb.Status.ValueType] = (),
        exclude_statuses: bool = False,
        updated_after: datetime | None = None,
        updated_before: datetime | None = None,
        agent_view: bool = False,
        page_size: int = 100,
    ) -> AsyncIterator[pb.Task]:
        """Every matching task, oldest first, fetching pages as it goes."""
        request = Q(
            parent_task_id=parent_task_id,
            view=pb.TASK_VIEW_AGENT if agent_view else pb.TASK_VIEW_MANAGER,
            page_size=page_size,
            status_filter=Q.StatusFilter(
                status=list(statuses),
                filter_type=Q.FILTER_TYPE_EXCLUSIVE
                if exclude_statuses
                else Q.FILTER_TYPE_INCLUSIVE,
            ),
        )
        if updated_after is not None:
            request.update_time_range.update_start_time.FromDatetime(updated_after)
        if updated_before is not None:
            request.update_time_range.update_end_time.FromDatetime(updated_before)
        while True:
            page = await self._stub.QueryTasks(request)
            for task in page.tasks:
                yield task
            if not page.page_token:
                return
            request.page_token = page.page_token

    async def cancel_task(self, task_id: str, reason: str = "") -> pb.Task:
        request = pb.CancelTaskRequest(task_id=task_id, reason=reason, author=self.author)
        return (await self._stub.CancelTask(request)).task

    async def complete_task(self, task_id: str, reason: str = "") -> pb.Task:
        request = pb.CompleteTaskRequest(task_id=task_id, reason=reason, author=self.author)
        return (await self._stub.CompleteTask(request)).task

    async def history(self, task_id: str) -> list[pb.TaskHistoryEntry]:
        """Every accepted change of the task, oldest first."""
        entries: list[pb.TaskHistoryEntry] = []
        request = pb.GetTaskHistoryRequest(task_id=task_id)
        while True:
            page = await self._stub.GetTaskHistory(request)
            entries.extend(page.entries)
            if not page.page_token:
                return entries
            request.page_token = page.page_token


class SyncOperatorClient:
    """OperatorClient for synchronous scripts: the same calls, blocking.

    Use as `with SyncOperatorClient(target) as client:`.
    """

    def __init__(self, target: str, *, author: pb.Principal | None = None) -> None:
        self._portal_context = anyio.from_thread.start_blocking_portal()
        self._portal = self._portal_context.__enter__()
        self._client: OperatorClient = self._portal.call(_make_client, target, author)

    def __enter__(self) -> SyncOperatorClient:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def close(self) -> None:
        self._portal.call(self._client.close)
        self._portal_context.__exit__(None, None, None)

    def create_task(self, **fields: Any) -> pb.Task:
        """Same arguments as OperatorClient.create_task."""
        return self._portal.call(lambda: self._client.create_task(**fields))

    def get_task(self, task_id: str, **options: Any) -> pb.Task:
        return self._portal.call(lambda: self._client.get_task(task_id, **options))

    def query_tasks(self, **filters: Any) -> list[pb.Task]:
        """Every matching task (all pages), oldest first."""

        async def collect() -> list[pb.Task]:
            return [task async for task in self._client.query_tasks(**filters)]

        return self._portal.call(collect)

    def cancel_task(self, task_id: str, reason: str = "") -> pb.Task:
        return self._portal.call(self._client.cancel_task, task_id, reason)

    def complete_task(self, task_id: str, reason: str = "") -> pb.Task:
        return self._portal.call(self._client.complete_task, task_id, reason)

    def history(self, task_id: str) -> list[pb.TaskHistoryEntry]:
        return self._portal.call(self._client.history, task_id)


async def _make_client(target: str, author: pb.Principal | None) -> OperatorClient:
    # The channel must be created on the portal's event loop, where it will be used.
    return OperatorClient(target, author=author)


def _packed(specification: Message) -> any_pb2.Any:
    if isinstance(specification, any_pb2.Any):
        return specification
    packed = any_pb2.Any()
    packed.Pack(specification)
    return packed
