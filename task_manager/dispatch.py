"""Who gets which task: the open ListenAsAgent streams, keyed by entity id.

Committed changes arrive here (after the commit, in revision order) and become Execute,
Cancel or Complete requests on the streams that must hear of them:

- A task assigned to an agent (a System entity id) goes to every stream listening for it.
- A task assigned to a pool (a Team entity id) goes to one member at a time. A member is a
  stream listening for the pool and for its own entity id. The dispatcher picks the member
  with the fewest unfinished tasks (never the one whose attempt just failed, if another
  can take it) and records it on the attempt with a write; the task goes to that member
  once the write commits. A member that leaves before reporting receipt hands its pool
  tasks back, and they go to another member; so does a member no replica has a stream
  for any more (its replica died: task_manager/cluster.py finds those).
- A stream with max_in_flight holds ExecuteRequests back while its agent has that many
  unfinished tasks, and sends them, oldest first, as those tasks end. Nothing is dropped.

Never blocks: a stream that falls behind is ended, and its agent reconnects to receive
its backlog again.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from storage.base import Change, ConcurrentModification
from task_manager import statuses, wire
from task_manager.errors import ServerShuttingDown, StreamEnded, StreamFellBehind
from task_manager.task_types import TypeKey, can_run

# Enum values are read as pb.STATUS_*: module attributes, far cheaper per write than
# Status.STATUS_* (a Python-level lookup on the enum wrapper).
from task_manager.v1 import task_manager_pb2 as pb
from task_manager.v1.task_manager_pb2 import (
    CancelRequest,
    CompleteRequest,
    ListenAsAgentResponse,
    Task,
)
from task_manager.wakeup import Wakeup

log = logging.getLogger(__name__)

DEFAULT_STREAM_BUFFER = 1_024
"""Requests queued for one stream at most before it counts as fallen behind."""
HandOver = Callable[[Task, str, str], "asyncio.Future[Task | None]"]
"""Records a new holder of a pool task: (task as seen, old holder, new holder). The
future holds the task after the write, or None if the task had moved on."""
Dispatched = Callable[[int], None]
"""Told, as an ExecuteRequest leaves for its agent, when the change that sent it was
made (ns since the epoch, by the service's clock): the dispatch latency. Only for
requests routed as their change was published, not for a stream's backlog, whose
tasks may have waited hours for their agent to connect."""


def agent_request(task: Task, encoded_task: bytes) -> bytes | None:
    """The request (an encoded ListenAsAgentResponse) a task at its current status puts
    on its agent's stream, if any. encoded_task is the task's stored encoding."""
    status = task.status.status
    if status == pb.STATUS_SENT:
        return wire.LISTEN_EXECUTE.encode(wire.EXECUTE_REQUEST.encode(encoded_task))
    if status == pb.STATUS_CANCEL_REQUESTED:
        cancel = CancelRequest(task_id=task.version.task_id, assignee=task.relations.assignee)
        return ListenAsAgentResponse(cancel_request=cancel).SerializeToString()
    if status == pb.STATUS_COMPLETE_REQUESTED:
        complete = CompleteRequest(task_id=task.version.task_id)
        return ListenAsAgentResponse(complete_request=complete).SerializeToString()
    return None


def pool_of(task: Task) -> str | None:
    assignee = task.relations.assignee
    return assignee.team.entity_id or None if assignee.WhichOneof("agent") == "team" else None


def holder_of(task: Task) -> str:
    """The member holding a pool task's current attempt; empty while it has none."""
    return task.attempts[-1].entity_id if task.attempts else ""


@dataclass
class _Held:
    status: int
    pool: str | None
    status_version: int


class AgentStream:
    """The requests waiting for one ListenAsAgent call, and the tasks its agent holds."""

    def __init__(
        self,
        entity_ids: frozenset[str],
        max_in_flight: int,
        buffer: int,
        include_held_tasks: bool = False,
        task_types: frozenset[TypeKey] = frozenset(),
        dispatched: Dispatched | None = None,
    ) -> None:
        self.entity_ids = entity_ids
        self.max_in_flight = max_in_flight
        self.include_held_tasks = include_held_tasks
        """Whether the backlog also re-sends the tasks its agents hold past SENT."""
        self.task_types = task_types
        """What its agent declared it runs; a pool gives it only tasks of those."""
        self._buffer = buffer
        self._dispatched = dispatched
        self._pending: deque[tuple[bytes, int]] = deque()
        """Requests, each with the time its change sent it (0: not timed)."""
        self._held: dict[str, _Held] = {}
        self._waiting: OrderedDict[str, tuple[Task, bytes]] = OrderedDict()
        self.loading: list[Change] | None = []
        """Changes published while the backlog is read; replayed after it, then None."""
        self.backlog_revision = 0
        """The revision the backlog was read at: a change up to it is in the backlog."""
        self.last_assigned = 0
        self.starting = False
        """While the backlog is routed: it may exceed the buffer, which bounds live traffic."""
        self._wakeup = Wakeup()
        self._ended: StreamEnded | None = None

    def member_for(self, pool: str) -> str:
        """This stream's member id in a pool: its own (smallest other) entity id."""
        return min((e for e in self.entity_ids if e != pool), default="")

    @property
    def in_flight(self) -> int:
        return len(self._held)

    def has_room(self) -> bool:
        return not self.max_in_flight or len(self._held) < self.max_in_flight

    def send(self, request: bytes, sent_ns: int = 0) -> None:
        if self._ended is not None:
            return
        if len(self._pending) >= self._buffer and not self.starting:
            self.end(
                StreamFellBehind(
                    f"the agent stream fell more than {self._buffer} requests behind;"
                    " reconnect to receive the backlog"
                )
            )
            return
        self._pending.append((request, sent_ns))
        self._wakeup.set()

    def send_execute(self, task: Task, request: bytes) -> None:
        """Sends an ExecuteRequest now, or once there is room (flow control)."""
        task_id = task.version.task_id
        if task_id in self._held or self.has_room():
            self.hold(task, pb.STATUS_SENT, pool_of(task))
            self.send(request, self._sent_ns(task))
        else:
            self._waiting[task_id] = (task, request)

    def hold(self, task: Task, status: int, pool: str | None) -> None:
        task_id = task.version.task_id
        if self._waiting:
            self._waiting.pop(task_id, None)
        held = self._held.get(task_id)
        if held is None:
            self._held[task_id] = _Held(status, pool, task.version.status_version)
        else:  # the common case: a status change of a task it has
            held.status, held.status_version = status, task.version.status_version

    def forget(self, task_id: str) -> bool:
        """The task is no longer this agent's to run; True if that freed room."""
        if self._waiting:
            self._waiting.pop(task_id, None)
        if self._held.pop(task_id, None) is None:
            return False
        while self._waiting and self.has_room():
            _, (task, request) = self._waiting.popitem(last=False)
            self.hold(task, pb.STATUS_SENT, pool_of(task))
            self.send(request, self._sent_ns(task))
        return True

    def _sent_ns(self, task: Task) -> int:
        if self._dispatched is None or self.starting:  # not timed: the backlog
            return 0
        return task.last_update_time.ToNanoseconds()

    def holds(self, task_id: str) -> bool:
        return task_id in self._held

    def held_status(self, task_id: str) -> int | None:
        held = self._held.get(task_id)
        return None if held is None else held.status

    def unreceived_pool_tasks(self) -> list[tuple[str, _Held]]:
        return [
            (task_id, held)
            for task_id, held in self._held.items()
            if held.pool is not None and held.status == pb.STATUS_SENT
        ]

    def end(self, reason: StreamEnded) -> None:
        self._ended = reason
        self._pending.clear()
        self._wakeup.set()

    async def requests(self) -> AsyncIterator[bytes]:
        """Yields requests as they come; raises the reason when the stream is ended."""
        while True:
            while self._pending:
                request, sent_ns = self._pending.popleft()
                if sent_ns and self._dispatched is not None:
                    self._dispatched(sent_ns)
                yield request
            if self._ended is not None:
                raise self._ended
            await self._wakeup.wait()  # no await since the checks: nothing missed


class Dispatcher:
    """Routes committed changes to the agent streams that must hear of them."""

    def __init__(
        self,
        hand_over: HandOver,
        stream_buffer: int = DEFAULT_STREAM_BUFFER,
        dispatched: Dispatched | None = None,
    ) -> None:
        self._hand_over = hand_over
        self._stream_buffer = stream_buffer
        self._dispatched = dispatched
        self._streams_by_entity: dict[str, set[AgentStream]] = {}
        self._unassigned: dict[str, OrderedDict[str, Task]] = {}
        """Pool tasks at SENT without a holder, by pool, oldest first."""
        self._handing_over: set[str] = set()
        self._ticks = itertools.count(1)
        self._closing: ServerShuttingDown | None = None

    @contextmanager
    def open_stream(
        self,
        entity_ids: frozenset[str],
        max_in_flight: int,
        include_held_tasks: bool = False,
        task_types: frozenset[TypeKey] = frozenset(),
    ) -> Iterator[AgentStream]:
        """Registers a stream for the block's duration. Register BEFORE reading the
        backlog (then call start), so a change committed in between is not lost."""
        if self._closing is not None:
            raise self._closing
        stream = AgentStream(
            entity_ids,
            max_in_flight,
            self._stream_buffer,
            include_held_tasks,
            task_types,
            self._dispatched,
        )
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
            self._hand_back(stream)

    def start(
        self, stream: AgentStream, backlog: Iterable[tuple[Task, bytes]], revision: int
    ) -> None:
        """Routes the backlog (the agents' unfinished tasks, read at revision, each with
        its stored encoding) to the stream, then the changes published since that it had
        to skip until now."""
        stream.starting = True
        stream.backlog_revision = revision
        try:
            for task, encoded_task in backlog:
                self._route(task, encoded_task, [stream])
                if stream.include_held_tasks and stream.holds(task.version.task_id):
                    self._resend_held(stream, task, encoded_task)
            loaded, stream.loading = stream.loading or [], None
            for change in loaded:
                if change.revision > revision:
                    self._route(change.task, change.encoded_task, [stream])
        finally:
            stream.starting = False
        for pool in stream.entity_ids:
            self._assign(pool)

    @staticmethod
    def _resend_held(stream: AgentStream, task: Task, encoded_task: bytes) -> None:
        """Restart recovery: an ExecuteRequest for a task the stream's agent holds past
        SENT, at its current status, so that an agent that restarted learns of it."""
        if agent_request(task, encoded_task) is None:  # past SENT, nothing else pending
            stream.send(wire.LISTEN_EXECUTE.encode(wire.EXECUTE_REQUEST.encode(encoded_task)))

    def publish(self, changes: Sequence[Change]) -> None:
        """Called after each commit with its changes, in revision order."""
        for change in changes:
            task = change.task
            pool = pool_of(task)
            entity_id = pool or _system_entity(task)
            if entity_id is None:
                continue
            streams = self._streams_by_entity.get(entity_id)
            if not streams and pool is None:
                continue  # nobody listens for this agent: nothing to send or count
            live = []
            for stream in streams or ():
                if stream.loading is not None:
                    stream.loading.append(change)
                elif change.revision > stream.backlog_revision:
                    # A commit is visible to reads before the feed publishes it: the
                    # backlog may already have held this change.
                    live.append(stream)
            if pool is not None:
                self._route_pool_task(task, change.encoded_task, pool, live)
            else:
                self._route_agent_task(task, change.encoded_task, entity_id, live)

    def close(self) -> None:
        """Ends every stream with ServerShuttingDown and refuses new ones."""
        self._closing = ServerShuttingDown("the task manager is shutting down; reconnect")
        for streams in list(self._streams_by_entity.values()):
            for stream in list(streams):
                stream.end(self._closing)

    # -- routing ----------------------------------------------------------------------

    def _route(self, task: Task, encoded_task: bytes, streams: Sequence[AgentStream]) -> None:
        pool = pool_of(task)
        if pool is not None:
            self._route_pool_task(task, encoded_task, pool, streams)
            return
        entity_id = _system_entity(task)
        if entity_id is not None:
            self._route_agent_task(task, encoded_task, entity_id, streams)

    def _route_agent_task(
        self, task: Task, encoded_task: bytes, entity_id: str, streams: Sequence[AgentStream]
    ) -> None:
        if not streams:
            return
        request = agent_request(task, encoded_task)  # once for every stream of the agent
        for stream in streams:
            if entity_id in stream.entity_ids:
                self._deliver(stream, task, request, None)

    def _route_pool_task(
        self, task: Task, encoded_task: bytes, pool: str, streams: Sequence[AgentStream]
    ) -> None:
        task_id, status, holder = task.version.task_id, task.status.status, holder_of(task)
        # A change of the task is committed: any hand-over written before it is done (the
        # store announces a commit before it resolves the writes' futures).
        self._handing_over.discard(task_id)
        request = agent_request(task, encoded_task)
        for stream in streams:
            if pool not in stream.entity_ids:
                continue
            if holder and stream.member_for(pool) == holder:
                # Another stream of the same member may declare other types: a task is
                # sent only to a stream that runs it.
                if status != pb.STATUS_SENT or can_run(stream.task_types, task):
                    self._deliver(stream, task, request, pool)
            elif stream.forget(task_id):
                self._assign_all(stream.entity_ids)
        waiting = self._unassigned.setdefault(pool, OrderedDict())
        waiting.pop(task_id, None)
        if status == pb.STATUS_SENT and not holder:
            waiting[task_id] = task
            self._assign(pool)
        # A holder with no stream here may be listening on another replica: only the
        # cluster sweep, which sees every replica's leases, hands its task back.
        if not waiting:
            del self._unassigned[pool]

    def _deliver(
        self, stream: AgentStream, task: Task, request: bytes | None, pool: str | None
    ) -> None:
        status = task.status.status
        if status not in statuses.WITH_AN_AGENT:
            if stream.forget(task.version.task_id):
                self._assign_all(stream.entity_ids)
        elif status == pb.STATUS_SENT:
            assert request is not None
            stream.send_execute(task, request)
        else:
            # A cancel or complete request goes out once per stream: a change that leaves
            # the status as it was (an output attached meanwhile) sends it again to no one.
            already_sent = stream.held_status(task.version.task_id) == status
            stream.hold(task, status, pool)
            if request is not None and not already_sent:
                stream.send(request)

    def open_streams(self) -> int:
        """Agent streams open (one listening for several entity ids counts once)."""
        return len({stream for streams in self._streams_by_entity.values() for stream in streams})

    # -- pools ------------------------------------------------------------------------

    def _assign_all(self, entity_ids: Iterable[str]) -> None:
        for entity_id in entity_ids:
            if entity_id in self._unassigned:
                self._assign(entity_id)

    def _assign(self, pool: str) -> None:
        """Gives waiting pool tasks, oldest first, to members with room that run them (a
        task no such member runs waits, and does not hold back the tasks after it)."""
        waiting = self._unassigned.get(pool)
        if not waiting:
            return
        with_room: list[AgentStream] | None = None  # found again after each assignment
        unrunnable: set[TypeKey] = set()  # no member with room runs these, this pass
        for task_id, task in list(waiting.items()):
            if task_id in self._handing_over:
                continue
            kind = (task.task_type.name, task.task_type.version)
            if kind in unrunnable:
                continue
            if with_room is None:
                with_room = [
                    stream
                    for stream in self._streams_by_entity.get(pool, ())
                    if stream.loading is None and stream.member_for(pool) and stream.has_room()
                ]
            if not with_room:
                return
            members = [stream for stream in with_room if can_run(stream.task_types, task)]
            if not members:  # an untyped task runs anywhere: only a typed one gets here
                unrunnable.add(kind)
                continue
            with_room = None
            tried = {attempt.entity_id for attempt in task.attempts[:-1]}
            fresh = [stream for stream in members if stream.member_for(pool) not in tried]
            chosen = min(fresh or members, key=lambda s: (s.in_flight, s.last_assigned))
            chosen.last_assigned = next(self._ticks)
            chosen.hold(task, pb.STATUS_SENT, pool)  # its room is taken during the write
            del waiting[task_id]
            self._write_holder(task, "", chosen.member_for(pool), chosen)

    def _member_listening(self, pool: str, member: str) -> bool:
        return any(s.member_for(pool) == member for s in self._streams_by_entity.get(pool, ()))

    def hand_back(self, task: Task) -> None:
        """Gives a pool task at SENT back to its pool, unless its holder listens here:
        no replica has a stream for that member any more (task_manager/cluster.py)."""
        pool, holder = pool_of(task), holder_of(task)
        if pool is not None and holder and not self._member_listening(pool, holder):
            self._write_holder(task, holder, "")

    def _hand_back(self, stream: AgentStream) -> None:
        """A closed member stream gives back the pool tasks it had not yet received;
        not while the server shuts down: the member is about to reconnect (here after
        the restart, or to another replica), and has a lease period to do so
        (task_manager/cluster.py), as after a crash."""
        if self._closing is not None:
            return
        for task_id, held in stream.unreceived_pool_tasks():
            assert held.pool is not None
            member = stream.member_for(held.pool)
            if not self._member_listening(held.pool, member):
                seen = Task()
                seen.version.task_id = task_id
                seen.version.status_version = held.status_version
                self._write_holder(seen, member, "")

    def _write_holder(
        self, task: Task, old: str, new: str, reserved: AgentStream | None = None
    ) -> None:
        task_id = task.version.task_id
        if task_id in self._handing_over:
            return
        self._handing_over.add(task_id)

        def written(future: asyncio.Future[Task | None]) -> None:
            self._handing_over.discard(task_id)
            error = None if future.cancelled() else future.exception()
            failed = future.cancelled() or error is not None
            # Losing the compare-and-set to another replica's hand-over is no failure.
            if failed and not isinstance(error, ConcurrentModification):
                log.warning("could not hand pool task %s from %r to %r", task_id, old, new)
            moved_on = failed or future.result() is None
            # The task moved on, so the room taken for it is free again.
            if moved_on and reserved is not None and reserved.forget(task_id):
                self._assign_all(reserved.entity_ids)

        self._hand_over(task, old, new).add_done_callback(written)


def _system_entity(task: Task) -> str | None:
    assignee = task.relations.assignee
    if assignee.WhichOneof("agent") != "system":
        return None
    return assignee.system.entity_id or None
