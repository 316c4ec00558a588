"""Who gets which task: the open ListenAsAgent streams, keyed by agent entity id.

Committed changes arrive here (after the commit, in revision order) and become Execute,
Cancel or Complete requests on every stream of the assignee. Never blocks: a stream that
falls behind is ended, and its agent reconnects to receive the backlog again.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import contextmanager

from storage.base import Change, assignee_entity_id
from task_manager.errors import ServerShuttingDown, StreamEnded, StreamFellBehind
from task_manager.v1.task_manager_pb2 import (
    CancelRequest,
    CompleteRequest,
    ExecuteRequest,
    ListenAsAgentResponse,
    Status,
    Task,
)

DEFAULT_STREAM_BUFFER = 1_024
"""Requests queued for one stream at most before it counts as fallen behind."""


def agent_request_for(task: Task) -> ListenAsAgentResponse | None:
    """The request a task at its current status puts on its agent's stream, if any."""
    status = task.status.status
    if status == Status.STATUS_SENT:
        return ListenAsAgentResponse(execute_request=ExecuteRequest(task=task))
    if status == Status.STATUS_CANCEL_REQUESTED:
        cancel = CancelRequest(task_id=task.version.task_id, assignee=task.relations.assignee)
        return ListenAsAgentResponse(cancel_request=cancel)
    if status == Status.STATUS_COMPLETE_REQUESTED:
        return ListenAsAgentResponse(complete_request=CompleteRequest(task_id=task.version.task_id))
    return None


class AgentStream:
    """The requests waiting for one ListenAsAgent call, in revision order."""

    def __init__(self, entity_ids: frozenset[str], buffer: int) -> None:
        self.entity_ids = entity_ids
        self._buffer = buffer
        self._pending: deque[tuple[int, bytes]] = deque()
        self._wakeup = asyncio.Event()
        self._ended: StreamEnded | None = None

    def offer(self, revision: int, request: bytes) -> None:
        """Queues an encoded ListenAsAgentResponse of the change at revision."""
        if self._ended is not None:
            return
        if len(self._pending) >= self._buffer:
            self.end(
                StreamFellBehind(
                    f"the agent stream fell more than {self._buffer} requests behind;"
                    " reconnect to receive the backlog"
                )
            )
            return
        self._pending.append((revision, request))
        self._wakeup.set()

    def end(self, reason: StreamEnded) -> None:
        self._ended = reason
        self._pending.clear()
        self._wakeup.set()

    async def requests_after(self, revision: int) -> AsyncIterator[bytes]:
        """Yields the requests of changes after revision (the backlog already covered the
        rest), waiting for new ones; raises the reason when the stream is ended."""
        while True:
            while self._pending:
                request_revision, request = self._pending.popleft()
                if request_revision > revision:
                    yield request
            if self._ended is not None:
                raise self._ended
            self._wakeup.clear()
            await self._wakeup.wait()


class Dispatcher:
    """Routes committed changes to the agent streams that must hear of them."""

    def __init__(self, stream_buffer: int = DEFAULT_STREAM_BUFFER) -> None:
        self._stream_buffer = stream_buffer
        self._streams_by_entity: dict[str, set[AgentStream]] = {}
        self._closing: ServerShuttingDown | None = None

    @contextmanager
    def open_stream(self, entity_ids: frozenset[str]) -> Iterator[AgentStream]:
        """Registers a stream for the block's duration. Register BEFORE reading the
        backlog, so a change committed in between is queued, not lost."""
        if self._closing is not None:
            raise self._closing
        stream = AgentStream(entity_ids, self._stream_buffer)
        for entity_id in entity_ids:
            self._streams_by_entity.setdefault(entity_id, set()).add(stream)
        try:
            yield stream
        finally:
            for entity_id in entity_ids:
                streams = self._streams_by_entity[entity_id]
                streams.discard(stream)
                if not streams:
                    del self._streams_by_entity[entity_id]

    def publish(self, changes: Sequence[Change]) -> None:
        """Called after each commit with its changes, in revision order."""
        for change in changes:
            entity_id = assignee_entity_id(change.task)
            if entity_id is None:
                continue
            streams = self._streams_by_entity.get(entity_id)
            if not streams:
                continue
            request = agent_request_for(change.task)
            if request is None:
                continue
            encoded = request.SerializeToString()  # once for every stream of the agent
            for stream in streams:
                stream.offer(change.revision, encoded)

    def close(self) -> None:
        """Ends every stream with ServerShuttingDown and refuses new ones."""
        self._closing = ServerShuttingDown("the task manager is shutting down; reconnect")
        for streams in list(self._streams_by_entity.values()):
            for stream in list(streams):
                stream.end(self._closing)
