"""Revisioned event fan-out to watchers: committed changes in, WatchTasks responses out.

A watch registers (and starts queueing) before it reads history or a snapshot, and skips
what that read covered, so nothing is lost in between (DESIGN.md section 3). Each watch
has a bounded queue: one that falls behind is ended, never waited for.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property

from storage.base import Change, Snapshot, Store, TaskSelector
from task_manager import statuses, wire
from task_manager.clock import Clock, Timer, timestamp
from task_manager.errors import ServerShuttingDown, StreamEnded, StreamFellBehind
from task_manager.v1.task_manager_pb2 import (
    EventType,
    Heartbeat,
    TaskEvent,
    TaskView,
    WatchTasksResponse,
)
from task_manager.wakeup import Wakeup

DEFAULT_WATCH_BUFFER = 10_000
"""Events queued for one watch at most before it counts as fallen behind."""
HISTORY_PAGE = 1_000


@dataclass(frozen=True)
class WatchSpec:
    """A checked WatchTasksRequest."""

    selector: TaskSelector
    start_revision: int = 0
    include_preexisting: bool = False
    heartbeat_interval_ns: int = 30 * 10**9
    rate_limit_ns: int = 0


@dataclass(eq=False)
class Announced:
    """One committed change on its way to watchers; encoded once for all of them."""

    change: Change
    created: bool = field(init=False)

    def __post_init__(self) -> None:
        self.created = self.change.entry.status_version == 1

    @property
    def revision(self) -> int:
        return self.change.revision

    @cached_property
    def encoded(self) -> bytes:
        event = TaskEvent(
            event_type=EventType.EVENT_TYPE_CREATED
            if self.created
            else EventType.EVENT_TYPE_UPDATE,
            task_view=TaskView.TASK_VIEW_MANAGER,
            time=self.change.entry.time,
        )
        encoded_event = wire.TASK_EVENT.encode(self.change.encoded_task, event)
        return wire.WATCH_EVENT.encode(encoded_event, WatchTasksResponse(revision=self.revision))


class Watch:
    """The changes waiting for one WatchTasks call, in revision order."""

    def __init__(self, selector: TaskSelector, buffer: int, opened_at_revision: int) -> None:
        self.selector = selector
        self.opened_at_revision = opened_at_revision
        """Every change after this one is offered to the watch; none before it is."""
        self._buffer = buffer
        self._pending: deque[Announced] = deque()
        self._wakeup = Wakeup()
        self._ended: StreamEnded | None = None

    def offer(self, announced: Announced) -> None:
        if self._ended is not None or not self.selector.matches(announced.change.task):
            return
        if len(self._pending) >= self._buffer:
            self.end(
                StreamFellBehind(
                    f"the watcher fell more than {self._buffer} events behind;"
                    " resume with start_revision = the last revision seen + 1"
                )
            )
            return
        self._pending.append(announced)
        self._wakeup.set()

    def end(self, reason: StreamEnded) -> None:
        self._ended = reason
        self._pending.clear()
        self._wakeup.set()

    async def responses_after(
        self, covered: int, hub: WatchHub, clock: Clock, spec: WatchSpec, *, committed: int
    ) -> AsyncIterator[bytes | WatchTasksResponse]:
        """Queued changes after `covered`, rate-limited per task if asked, with heartbeats
        whenever the stream has been quiet for the heartbeat interval.

        `committed` is a revision known to be committed when the backlog ended. It is
        below `covered` only for a start_revision ahead of the store: a heartbeat then
        claims what has been committed, never the revision the watcher waits for."""
        window = spec.rate_limit_ns
        held: dict[str, Announced] = {}  # per task, the latest change waiting for its window
        window_opens: dict[str, int] = {}  # per task, when it may next be sent
        last_sent_ns = clock.now_ns()
        timer: Timer | None = None  # armed and not yet fired
        timer_at = 0

        def on_timer() -> None:
            # The timer says itself that it fired: comparing clock readings cannot, as
            # a timer may fire a hair before now_ns() reaches its deadline.
            nonlocal timer
            timer = None
            self._wakeup.set()

        try:
            while True:
                now = clock.now_ns()  # once per batch: the batch goes out at one instant
                while self._pending:
                    announced = self._pending.popleft()
                    if announced.revision <= covered:
                        continue  # the backlog already had it
                    if window:
                        task_id = announced.change.task.version.task_id
                        if not announced.created and window_opens.get(task_id, 0) > now:
                            held[task_id] = announced  # a newer state replaces the held one
                            continue
                        window_opens[task_id] = now + window
                        held.pop(task_id, None)  # an older held state must not follow it
                    yield announced.encoded
                    last_sent_ns = now
                if self._ended is not None:
                    raise self._ended
                if held:
                    for task_id, announced in sorted(held.items(), key=lambda i: i[1].revision):
                        if window_opens[task_id] <= now:
                            yield announced.encoded
                            del held[task_id]
                            last_sent_ns = now
                            window_opens[task_id] = now + window
                if window:  # forget windows that have passed, so memory stays bounded
                    for task_id in [
                        t for t, at in window_opens.items() if at <= now and t not in held
                    ]:
                        del window_opens[task_id]
                if now - last_sent_ns >= spec.heartbeat_interval_ns and not self._pending:
                    bookmark = hub.revision
                    if held:
                        bookmark = min(bookmark, min(a.revision for a in held.values()) - 1)
                    yield _heartbeat(max(min(covered, committed), bookmark), clock)
                    last_sent_ns = now
                deadline = last_sent_ns + spec.heartbeat_interval_ns
                if held:
                    deadline = min(deadline, min(window_opens[task_id] for task_id in held))
                if self._pending or self._ended is not None:
                    continue
                # One timer, re-armed only when an earlier wake-up is needed: a timer that
                # fires early just makes the loop look again.
                if timer is None or timer_at > deadline:
                    if timer is not None:
                        timer.cancel()
                    timer, timer_at = clock.call_at(deadline, on_timer), deadline
                await self._wakeup.wait()  # no await since the checks: nothing missed
        finally:
            if timer is not None:
                timer.cancel()


class WatchHub:
    """Fans committed changes out to every open watch. `revision` is the latest change
    published here: every change up to it has been offered to every watch."""

    def __init__(self, revision: int = 0, buffer: int = DEFAULT_WATCH_BUFFER) -> None:
        self.revision = revision
        self._buffer = buffer
        self._watches: set[Watch] = set()
        self._closing: ServerShuttingDown | None = None

    @contextmanager
    def open(self, selector: TaskSelector) -> Iterator[Watch]:
        if self._closing is not None:
            raise self._closing
        watch = Watch(selector, self._buffer, opened_at_revision=self.revision)
        self._watches.add(watch)
        try:
            yield watch
        finally:
            self._watches.discard(watch)

    def open_watches(self) -> int:
        return len(self._watches)

    def publish(self, changes: Sequence[Change]) -> None:
        for change in changes:
            self.revision = change.revision
            if self._watches:
                announced = Announced(change)
                for watch in self._watches:
                    watch.offer(announced)

    def close(self) -> None:
        self._closing = ServerShuttingDown("the task manager is shutting down; resume elsewhere")
        for watch in list(self._watches):
            watch.end(self._closing)


async def watch_stream(
    spec: WatchSpec,
    hub: WatchHub,
    store: Store,
    clock: Clock,
    on_subscribed: Callable[[], Awaitable[None]],
) -> AsyncIterator[bytes | WatchTasksResponse]:
    """The responses of one WatchTasks call: backlog (history or snapshot), then live.
    on_subscribed runs once the watch is registered, before the backlog is read."""
    with hub.open(spec.selector) as watch:
        await on_subscribed()
        # covered: every matching change up to this revision is in the backlog sent.
        if spec.include_preexisting:
            selector = spec.selector
            unfinished = (selector.statuses or statuses.NOT_TERMINAL) & statuses.NOT_TERMINAL
            if unfinished:
                snapshot = await store.snapshot(dataclasses.replace(selector, statuses=unfinished))
            else:  # the filter names finished statuses only: no unfinished task matches
                snapshot = Snapshot(tasks=(), revision=watch.opened_at_revision)
            now = timestamp(clock.now_ns())
            for task in snapshot.tasks:
                event = TaskEvent(
                    event_type=EventType.EVENT_TYPE_PREEXISTING,
                    task=task,
                    task_view=TaskView.TASK_VIEW_MANAGER,
                    time=now,
                )
                yield WatchTasksResponse(revision=snapshot.revision, event=event)
            covered = committed = snapshot.revision
            yield _heartbeat(covered, clock)  # marks the end of the snapshot
        elif spec.start_revision > 0:
            # A start_revision ahead of the store is accepted, as etcd does: the watch
            # waits for it and skips what comes before it.
            covered = spec.start_revision - 1
            committed = min(covered, hub.revision)
            while True:
                page = await store.changes_after(covered, HISTORY_PAGE, spec.selector.task_ids)
                for change in page:
                    if spec.selector.matches(change.task):
                        yield Announced(change).encoded
                    covered = committed = change.revision
                if len(page) < HISTORY_PAGE:
                    break
        else:
            # From now: not the store's revision read later (a change committed after the
            # subscription but before that read would be skipped and lost), but the
            # point from which this watch is offered every change. Said at once (a
            # bookmark, as etcd's created response carries its revision): a watcher that
            # reconnects before the first change resumes from there, not from a later now.
            covered = committed = watch.opened_at_revision
            yield _heartbeat(covered, clock)
        async for response in watch.responses_after(covered, hub, clock, spec, committed=committed):
            yield response


def _heartbeat(revision: int, clock: Clock) -> WatchTasksResponse:
    return WatchTasksResponse(
        revision=revision, heartbeat=Heartbeat(timestamp=timestamp(clock.now_ns()))
    )
