"""WatchTasks start_revision at every boundary, over real gRPC: what is replayed, what a
heartbeat claims (never a revision not yet committed), and what is refused.

A start_revision ahead of the store waits for it (as in etcd); one no store can hold
(2^63 and up, still a legal uint64) is INVALID_ARGUMENT.
"""

from __future__ import annotations

import time

import grpc
import pytest

from storage.base import MAX_REVISION
from tests.helpers import AsyncStub, create_request
from tests.test_watch import WatchCall, all_revisions, make_changes, read, watch

pytestmark = pytest.mark.anyio
HEARTBEAT_MS = 100  # the minimum: bookmarks come quickly
UINT64_MAX = 2**64 - 1


async def setup(stub: AsyncStub) -> int:
    """Some history (each task: created, then executing); returns the current revision."""
    await make_changes(stub, 2)
    revisions = await all_revisions(stub)
    assert revisions == list(range(1, len(revisions) + 1))
    return revisions[-1]


async def until_heartbeat(stub: AsyncStub, call: WatchCall) -> tuple[list[int], int]:
    """The revisions of the events before the next heartbeat, and the heartbeat's
    bookmark, checked against what the store has committed by the time it arrived."""
    events: list[int] = []
    while True:
        message = await read(call)
        if message.HasField("heartbeat"):
            committed = (await all_revisions(stub))[-1]
            assert message.revision <= committed, (
                f"heartbeat claims revision {message.revision}, the store is at {committed}"
            )
            return events, message.revision
        events.append(message.revision)


async def bookmark_reaches(stub: AsyncStub, call: WatchCall, revision: int) -> list[int]:
    """Reads until a heartbeat claims `revision`; returns the events seen on the way."""
    seen: list[int] = []
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        events, bookmark = await until_heartbeat(stub, call)
        seen.extend(events)
        if bookmark == revision:
            return seen
        assert bookmark < revision, f"heartbeat claims {bookmark}, beyond {revision}"
    raise AssertionError(f"no heartbeat claimed revision {revision} within 20 s")


async def one_change(stub: AsyncStub) -> None:
    """A task nobody is assigned: one change, one revision."""
    await stub.CreateTask(create_request(None))


async def test_start_revision_0_is_from_now(stub: AsyncStub) -> None:
    current = await setup(stub)
    call = watch(stub, start_revision=0, heartbeat_interval_ms=HEARTBEAT_MS)
    assert await until_heartbeat(stub, call) == ([], current)
    await one_change(stub)
    assert await bookmark_reaches(stub, call, current + 1) == [current + 1]
    call.cancel()


async def test_start_revision_1_replays_all_history(stub: AsyncStub) -> None:
    current = await setup(stub)
    call = watch(stub, start_revision=1, heartbeat_interval_ms=HEARTBEAT_MS)
    assert await until_heartbeat(stub, call) == (list(range(1, current + 1)), current)
    call.cancel()


async def test_start_revision_current_replays_the_latest_change(stub: AsyncStub) -> None:
    current = await setup(stub)
    call = watch(stub, start_revision=current, heartbeat_interval_ms=HEARTBEAT_MS)
    assert await until_heartbeat(stub, call) == ([current], current)
    call.cancel()


async def test_start_revision_next_waits_for_the_next_change(stub: AsyncStub) -> None:
    current = await setup(stub)
    call = watch(stub, start_revision=current + 1, heartbeat_interval_ms=HEARTBEAT_MS)
    assert await until_heartbeat(stub, call) == ([], current)
    await one_change(stub)
    assert await bookmark_reaches(stub, call, current + 1) == [current + 1]
    call.cancel()


async def test_start_revision_ahead_skips_what_comes_before_it(stub: AsyncStub) -> None:
    current = await setup(stub)
    call = watch(stub, start_revision=current + 3, heartbeat_interval_ms=HEARTBEAT_MS)
    assert await until_heartbeat(stub, call) == ([], current)  # not current + 2
    await one_change(stub)
    await one_change(stub)
    assert await bookmark_reaches(stub, call, current + 2) == []
    await one_change(stub)
    assert await bookmark_reaches(stub, call, current + 3) == [current + 3]
    call.cancel()


@pytest.mark.parametrize("start", [10**15, MAX_REVISION], ids=["far-future", "2^63-1"])
async def test_start_revision_far_ahead_is_accepted_and_bookmarks_only_committed(
    stub: AsyncStub, start: int
) -> None:
    current = await setup(stub)
    call = watch(stub, start_revision=start, heartbeat_interval_ms=HEARTBEAT_MS)
    assert await until_heartbeat(stub, call) == ([], current)
    await one_change(stub)  # committed, but before the start: not delivered
    assert await bookmark_reaches(stub, call, current + 1) == []
    call.cancel()


@pytest.mark.parametrize("start", [MAX_REVISION + 1, UINT64_MAX], ids=["2^63", "2^64-1"])
async def test_start_revision_no_store_can_hold_is_invalid_argument(
    stub: AsyncStub, start: int
) -> None:
    await setup(stub)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await read(watch(stub, start_revision=start))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = caught.value.details() or ""
    assert f"start_revision: {start} is beyond the largest revision" in details
    assert str(MAX_REVISION) in details
