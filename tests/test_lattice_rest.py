"""The Lattice Tasks REST + SSE API, driven by the real, unchanged Lattice SDK
(anduril-lattice-sdk 5.x, sync and async) against the real server on both backends."""

from __future__ import annotations

import base64
import contextlib
import json
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import anyio
import httpx
import pytest
from anduril import (
    AsyncLattice,
    EntityIdsSelector,
    GoogleProtobufAny,
    Lattice,
    Principal,
    Relations,
    System,
    TaskStatus,
)
from anduril.core.api_error import ApiError
from anduril.errors import BadRequestError, NotFoundError, UnauthorizedError
from google.protobuf.timestamp_pb2 import Timestamp
from prometheus_client.parser import text_string_to_metric_families

from storage import add_credential
from task_manager.auth import Role, new_token
from task_manager.clock import ManualClock
from task_manager.server import TaskManagerServer
from task_manager.v1 import task_manager_pb2 as pb
from task_manager.web.lattice import MIN_HEARTBEAT_MS
from tests.helpers import AsyncStub, create_request, server_settings, sse_events

pytestmark = pytest.mark.anyio

WALK = ("STATUS_MACHINE_RECEIPT", "STATUS_ACK", "STATUS_WILCO", "STATUS_EXECUTING")
STRUCT = "type.googleapis.com/google.protobuf.Struct"
SURVEY = "type.googleapis.com/acme.drones.v1.Survey"
"""A type this gateway has no descriptor for: carried as its bytes."""


Connect = Callable[..., AsyncLattice]
"""connect(server, **options): an SDK client of the server (token "t" unless options
give one, or client credentials)."""


@pytest.fixture
async def connect() -> AsyncIterator[Connect]:
    """Makes SDK clients that share one HTTP client, closed after the test."""
    async with httpx.AsyncClient(timeout=60) as http:

        def client(server: TaskManagerServer, **options: Any) -> AsyncLattice:
            if "client_id" not in options:
                options.setdefault("token", "t")
            return AsyncLattice(base_url=base_url(server), httpx_client=http, **options)

        yield client


def base_url(server: TaskManagerServer) -> str:
    return server.http_url.rstrip("/")


def any_of(type_url: str, **fields: object) -> GoogleProtobufAny:
    """An Any as the SDK sends it: its @type, the message's fields beside it."""
    return GoogleProtobufAny.model_validate({"@type": type_url, **fields})


def agent(entity_id: str) -> Principal:
    return Principal(system=System(entity_id=entity_id))


def selector(entity_id: str) -> EntityIdsSelector:
    return EntityIdsSelector(entity_ids=[entity_id])


@asynccontextmanager
async def agent_stream(client: AsyncLattice, entity_id: str) -> AsyncIterator[Any]:
    """The agent's SSE stream, its heartbeats left out, closed on the way out."""

    async def requests() -> AsyncGenerator[Any, None]:
        async for event in client.tasks.stream_as_agent(
            agent_selector=selector(entity_id), heartbeat_interval_ms=1000
        ):
            if event.event == "agent_request":
                yield event

    stream = requests()
    async with contextlib.aclosing(stream):
        yield stream


async def next_of(stream: AsyncIterator[Any]) -> Any:
    with anyio.fail_after(20):
        return await anext(stream)


async def test_the_async_sdk_walks_a_task_from_create_to_done(
    server: TaskManagerServer, connect: Connect
) -> None:
    client = connect(server)
    async with agent_stream(client, "drone-1") as requests:
        created = await client.tasks.create_task(
            display_name="survey field 7",
            description="north corner first",
            specification=any_of(STRUCT, value={"field": 7, "passes": [1, 2]}),
            relations=Relations(assignee=agent("drone-1")),
        )
        assert created.status.status == "STATUS_SENT"
        assert created.version.status_version == 2
        delivered = (await next_of(requests)).execute_request.task
        assert delivered.version.task_id == created.version.task_id
        assert delivered.specification.type == STRUCT
        assert delivered.specification.value == {"field": 7, "passes": [1, 2]}

        task = delivered
        for status in (*WALK, "STATUS_DONE_OK"):
            task = await client.tasks.update_task_status(
                task.version.task_id,
                status_version=task.version.status_version,
                new_status=TaskStatus(status=status),
                author=agent("drone-1"),
            )
            assert task.status.status == status

    fetched = await client.tasks.get_task(created.version.task_id)
    assert fetched.status.status == "STATUS_DONE_OK"
    assert fetched.version.status_version == 2 + len(WALK) + 1
    assert fetched.last_updated_by.system.entity_id == "drone-1"
    page = await client.tasks.query_tasks(status_filter={"status": "STATUS_DONE_OK"})
    assert [t.version.task_id for t in page.tasks] == [created.version.task_id]
    assert not page.next_page_token


def test_the_sync_sdk_walks_a_task_and_its_agent_streams_in_a_thread(
    server_url_in_thread: str,
) -> None:
    with httpx.Client(timeout=60) as http:
        walk_with_the_sync_sdk(Lattice(base_url=server_url_in_thread, token="t", httpx_client=http))


def walk_with_the_sync_sdk(client: Lattice) -> None:
    created = client.tasks.create_task(
        display_name="sync", relations=Relations(assignee=agent("rover-2"))
    )
    events = client.tasks.stream_as_agent(agent_selector=selector("rover-2"))
    delivered = next(e for e in events if e.event == "agent_request").execute_request.task
    assert delivered.version.task_id == created.version.task_id
    task = delivered
    for status in (*WALK, "STATUS_DONE_NOT_OK"):
        task = client.tasks.update_task_status(
            task.version.task_id,
            status_version=task.version.status_version,
            new_status=TaskStatus(status=status),
        )
    assert client.tasks.get_task(created.version.task_id).status.status == "STATUS_DONE_NOT_OK"


@pytest.fixture
def server_url_in_thread(database: str) -> Iterator[str]:
    """A server on its own event loop in a thread, for the sync SDK (which blocks)."""
    with anyio.from_thread.start_blocking_portal() as portal:
        server = portal.call(TaskManagerServer.start, server_settings(database))
        try:
            yield base_url(server)
        finally:
            portal.call(server.stop)


async def test_a_cancel_reaches_the_agent_and_an_unsent_task_cancels_at_once(
    server: TaskManagerServer, connect: Connect
) -> None:
    client = connect(server)
    async with agent_stream(client, "drone-3") as requests:
        sent = await client.tasks.create_task(relations=Relations(assignee=agent("drone-3")))
        await next_of(requests)
        cancelled = await client.tasks.cancel_task(sent.version.task_id)
        assert cancelled.status.status == "STATUS_CANCEL_REQUESTED"
        cancel = (await next_of(requests)).cancel_request
        assert cancel.task_id == sent.version.task_id
    held = await client.tasks.create_task(
        relations=Relations(assignee=agent("drone-3")), is_executed_elsewhere=True
    )
    done = await client.tasks.cancel_task(held.version.task_id)
    assert (done.status.status, done.status.task_error.code) == (
        "STATUS_DONE_NOT_OK",
        "ERROR_CODE_CANCELLED",
    )


async def test_the_long_poll_offers_a_request_until_the_agent_receipts_it(
    server: TaskManagerServer, connect: Connect
) -> None:
    client = connect(server)
    first = await client.tasks.create_task(relations=Relations(assignee=agent("buoy-4")))
    for _ in range(2):  # not acted on: offered again
        polled = await client.tasks.listen_as_agent(agent_selector=selector("buoy-4"))
        assert polled.execute_request.task.version.task_id == first.version.task_id
    await client.tasks.update_task_status(
        first.version.task_id,
        status_version=first.version.status_version,
        new_status=TaskStatus(status="STATUS_MACHINE_RECEIPT"),
    )
    second = await client.tasks.create_task(relations=Relations(assignee=agent("buoy-4")))
    polled = await client.tasks.listen_as_agent(agent_selector=selector("buoy-4"))
    assert polled.execute_request.task.version.task_id == second.version.task_id


async def test_the_task_stream_sends_unfinished_tasks_then_changes_with_revisions(
    server: TaskManagerServer, connect: Connect
) -> None:
    client = connect(server)
    before = await client.tasks.create_task(relations=Relations(assignee=agent("a-5")))
    finished = await client.tasks.create_task(
        relations=Relations(assignee=agent("a-5")), is_executed_elsewhere=True
    )
    await client.tasks.cancel_task(finished.version.task_id)
    url = f"{base_url(server)}/api/v1/tasks/stream"
    async with aiohttp.ClientSession() as session:
        with anyio.fail_after(20):
            async with session.post(url, json={"heartbeatIntervalMs": 1000}) as raw:
                assert raw.headers["Content-Type"].startswith("text/event-stream")
                events = sse_events(raw)
                preexisting = await anext(events)
                event = preexisting["data"]["taskEvent"]
                assert event["eventType"] == "EVENT_TYPE_PREEXISTING"
                assert event["task"]["version"]["taskId"] == before.version.task_id
                assert "id" not in preexisting  # resuming after one would skip the rest
                snapshot_end = await anext(events)
                assert snapshot_end["data"]["event"] == "heartbeat"
                created = await client.tasks.create_task(relations=Relations(assignee=agent("a-5")))
                live = await anext(events)
                await events.aclose()
    assert live["data"]["taskEvent"]["eventType"] == "EVENT_TYPE_CREATED"
    assert live["data"]["taskEvent"]["task"]["version"]["taskId"] == created.version.task_id
    assert int(live["id"]) > int(snapshot_end["id"])

    async with contextlib.aclosing(
        client.tasks.stream_tasks(exclude_preexisting_tasks=True, heartbeat_interval_ms=1000)
    ) as typed:
        first = await next_of(typed)  # subscribed once the first event arrives
        assert first.event == "heartbeat"
        await client.tasks.cancel_task(created.version.task_id)
        while (event := await next_of(typed)).event == "heartbeat":
            pass
    assert event.task_event.event_type == "EVENT_TYPE_UPDATE"
    assert event.task_event.task.status.status == "STATUS_CANCEL_REQUESTED"


async def test_a_message_type_the_gateway_does_not_know_keeps_its_bytes(
    server: TaskManagerServer, stub: AsyncStub, connect: Connect
) -> None:
    client = connect(server)
    survey = b"\x0a\x05north\x10\x03"
    created = await client.tasks.create_task(
        specification=any_of(SURVEY, **{"@bytes": base64.b64encode(survey).decode()}),
        relations=Relations(assignee=agent("a-6")),
    )
    over_grpc = await stub.GetTask(pb.GetTaskRequest(task_id=created.version.task_id))
    assert (over_grpc.task.specification.type_url, over_grpc.task.specification.value) == (
        SURVEY,
        survey,
    )
    # Created over gRPC, read over REST: the same bytes.
    grpc_created = create_request("a-6")
    grpc_created.specification.type_url = SURVEY
    grpc_created.specification.value = survey
    made = await stub.CreateTask(grpc_created)
    read = await client.tasks.get_task(made.task.version.task_id)
    assert read.specification.type == SURVEY
    assert base64.b64decode(getattr(read.specification, "@bytes")) == survey

    with pytest.raises(BadRequestError) as refused:
        await client.tasks.create_task(specification=any_of(SURVEY, area="north"))
    assert "specification" in refused.value.body["message"]
    assert "does not know" in refused.value.body["message"]


async def test_bad_requests_are_refused_with_the_field_named_and_nothing_stored(
    server: TaskManagerServer, stub: AsyncStub, connect: Connect
) -> None:
    client = connect(server)
    with pytest.raises(NotFoundError) as missing:
        await client.tasks.get_task("no-such-task")
    assert missing.value.body["status"] == "NOT_FOUND"
    with pytest.raises(BadRequestError) as bad_status:
        await client.tasks.update_task_status(
            "no-such-task", status_version=1, new_status=TaskStatus(status="STATUS_SIDEWAYS")
        )
    assert "newStatus" in bad_status.value.body["message"]
    url = f"{base_url(server)}/api/v1/tasks"
    async with aiohttp.ClientSession() as session:
        for body, field in (
            (b"{not json", "body"),
            (b"[1, 2]", "body"),
            (json.dumps({"displayName": 7}).encode(), "body"),
            (json.dumps({"executionConstraints": {"startAfter": "soon"}}).encode(), "startAfter"),
            (json.dumps({"taskId": "x" * 500}).encode(), "task_id"),
        ):
            json_type = {"Content-Type": "application/json"}
            async with session.post(url, data=body, headers=json_type) as answer:
                assert answer.status == 400, await answer.text()
                refusal = await answer.json()
                assert refusal["status"] == "INVALID_ARGUMENT"
                assert field in refusal["message"], refusal
        # What a page of another site can make a browser send unasked: refused.
        for content_type in ("text/plain", "application/x-www-form-urlencoded"):
            async with session.post(
                url, data=b"{}", headers={"Content-Type": content_type}
            ) as answer:
                assert answer.status == 400
                assert "Content-Type" in (await answer.json())["message"]
    assert not (await stub.QueryTasks(pb.QueryTasksRequest())).tasks


async def test_deliver_after_holds_the_task_in_the_manager_until_then(
    server: TaskManagerServer, connect: Connect
) -> None:
    client = connect(server)
    later = time.time() + 3600
    held = await client.tasks.create_task(
        relations=Relations(assignee=agent("a-7")),
        delivery_constraints={"deliverAfter": _rfc3339(later - 60)},
        execution_constraints={"startAfter": _rfc3339(later)},
    )
    assert held.status.status == "STATUS_SCHEDULED_IN_MANAGER"
    assert abs(held.scheduled_time.timestamp() - later) < 1


def _rfc3339(epoch_s: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch_s))


@pytest.fixture
async def authenticated(database: str) -> AsyncIterator[tuple[TaskManagerServer, dict[str, str]]]:
    """A server with authentication on, and tokens by name: an operator, drone-1's agent."""
    tokens = {}
    for name, role, entities in (("ops", Role.OPERATOR, ()), ("drone", Role.AGENT, ("drone-1",))):
        credential, tokens[name] = new_token(name, role, entities, time.time_ns())
        add_credential(database, credential)
    server = await TaskManagerServer.start(server_settings(database))
    try:
        yield server, tokens
    finally:
        await server.stop()


async def test_tokens_roles_and_stale_versions_map_to_http_codes(
    authenticated: tuple[TaskManagerServer, dict[str, str]], connect: Connect
) -> None:
    server, tokens = authenticated
    with pytest.raises(UnauthorizedError) as bogus:
        await connect(server, token="tmk_bogus").tasks.get_task("t-1")
    assert bogus.value.body["status"] == "UNAUTHENTICATED"

    operator = connect(server, token=tokens["ops"])
    theirs = await operator.tasks.create_task(relations=Relations(assignee=agent("drone-2")))
    mine = await operator.tasks.create_task(relations=Relations(assignee=agent("drone-1")))
    drone = connect(server, token=tokens["drone"], max_retries=0)
    with pytest.raises(ApiError) as forbidden:
        await drone.tasks.update_task_status(
            theirs.version.task_id,
            status_version=theirs.version.status_version,
            new_status=TaskStatus(status="STATUS_MACHINE_RECEIPT"),
        )
    assert forbidden.value.status_code == 403
    with pytest.raises(ApiError) as forbidden_create:
        await drone.tasks.create_task(relations=Relations(assignee=agent("drone-1")))
    assert forbidden_create.value.status_code == 403

    receipted = await drone.tasks.update_task_status(
        mine.version.task_id,
        status_version=mine.version.status_version,
        new_status=TaskStatus(status="STATUS_MACHINE_RECEIPT"),
    )
    with pytest.raises(ApiError) as stale:
        await drone.tasks.update_task_status(
            mine.version.task_id,
            status_version=mine.version.status_version,  # the version before the receipt
            new_status=TaskStatus(status="STATUS_ACK"),
        )
    assert stale.value.status_code == 412
    assert stale.value.body["currentStatusVersion"] == receipted.version.status_version
    await drone.tasks.update_task_status(
        mine.version.task_id,
        status_version=receipted.version.status_version,
        new_status=TaskStatus(status="STATUS_DONE_OK"),
    )
    with pytest.raises(BadRequestError) as terminal:
        await drone.tasks.update_task_status(
            mine.version.task_id,
            status_version=receipted.version.status_version + 1,
            new_status=TaskStatus(status="STATUS_EXECUTING"),
        )
    assert terminal.value.body["status"] == "FAILED_PRECONDITION"


async def test_client_credentials_get_a_token_and_a_wrong_secret_gets_401(
    authenticated: tuple[TaskManagerServer, dict[str, str]], connect: Connect
) -> None:
    server, tokens = authenticated
    _, credential_id, secret = tokens["ops"].split("_", 2)
    client = connect(server, client_id=credential_id, client_secret=secret)
    created = await client.tasks.create_task(display_name="by oauth")
    assert created.created_by.user.user_id == "ops"  # the token's principal: it was used
    wrong = connect(server, client_id=credential_id, client_secret="nope")
    with pytest.raises(UnauthorizedError) as refused:
        await wrong.tasks.get_task(created.version.task_id)
    assert refused.value.body["error"] == "invalid_client"


async def test_open_streams_end_cleanly_when_the_server_stops(
    database: str, connect: Connect
) -> None:
    server = await TaskManagerServer.start(server_settings(database))
    client = connect(server)
    try:
        async with agent_stream(client, "drone-8") as requests:
            await client.tasks.create_task(relations=Relations(assignee=agent("drone-8")))
            await next_of(requests)
            with anyio.fail_after(10):  # well inside aiohttp's own 60 s wait for handlers
                await server.stop()
            with pytest.raises(StopAsyncIteration):
                await next_of(requests)  # the stream ended; the SDK's iterator ends
    finally:
        await server.stop()


async def test_a_stream_refused_before_it_opens_answers_its_http_status(
    authenticated: tuple[TaskManagerServer, dict[str, str]], connect: Connect
) -> None:
    server, tokens = authenticated
    bogus = connect(server, token="tmk_bogus")
    with pytest.raises(UnauthorizedError):
        await anext(bogus.tasks.stream_as_agent(agent_selector=selector("drone-1")))
    drone = connect(server, token=tokens["drone"])
    with pytest.raises(ApiError) as forbidden:
        await anext(drone.tasks.stream_as_agent(agent_selector=selector("drone-2")))
    assert forbidden.value.status_code == 403


async def test_a_scoped_task_is_addressed_by_its_canonical_id(
    server: TaskManagerServer, stub: AsyncStub, connect: Connect
) -> None:
    request = create_request("drone-1", task_id="42-north")
    request.scope = "survey"
    created = (await stub.CreateTask(request)).task
    assert created.version.task_id == "survey/42-north"  # what a Lattice client sees
    client = connect(server)
    fetched = await client.tasks.get_task("survey/42-north")  # sent with its slash
    assert fetched.version.task_id == "survey/42-north"
    updated = await client.tasks.update_task_status(
        "survey/42-north",
        status_version=fetched.version.status_version,
        new_status=TaskStatus(status="STATUS_MACHINE_RECEIPT"),
    )
    assert updated.status.status == "STATUS_MACHINE_RECEIPT"


async def test_an_agent_stream_whose_client_vanishes_is_closed_at_once(
    server: TaskManagerServer,
) -> None:
    async def open_streams(session: aiohttp.ClientSession) -> float:
        async with session.get(f"{base_url(server)}/metrics") as scraped:
            text = await scraped.text()
        return next(
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == "task_manager_agent_streams"
        )

    async with aiohttp.ClientSession() as session:
        answer = await session.post(
            f"{base_url(server)}/api/v1/agent/stream",
            json={"agentSelector": {"entityIds": ["drone-6"]}, "heartbeatIntervalMs": 30000},
        )
        assert answer.status == 200
        assert await open_streams(session) == 1
        assert answer.connection is not None and answer.connection.transport is not None
        answer.connection.transport.abort()  # gone without a word
        answer.release()
        with anyio.fail_after(20):  # polled: the server says nothing when it has closed it
            while True:
                if await open_streams(session) == 0:
                    break
                await anyio.sleep(0.05)


async def test_agent_stream_heartbeats_keep_a_floor_and_carry_the_services_time(
    clocked: tuple[TaskManagerServer, ManualClock],
) -> None:
    server, clock = clocked
    url = f"{base_url(server)}/api/v1/agent/stream"
    body = {"agentSelector": {"entityIds": ["drone-3"]}, "heartbeatIntervalMs": 1}
    arrived, stamps = [], []
    async with aiohttp.ClientSession() as session, session.post(url, json=body) as answer:
        assert answer.status == 200
        events = sse_events(answer)
        with anyio.fail_after(20):
            for _ in range(4):
                event = await anext(events)
                assert event["event"] == "heartbeat", event
                arrived.append(time.monotonic())
                stamps.append(event["data"]["timestamp"])
        await events.aclose()
    # Asked for every millisecond, sent every MIN_HEARTBEAT_MS at most (three intervals,
    # less the lateness the first may have had).
    assert arrived[-1] - arrived[0] >= 3 * MIN_HEARTBEAT_MS / 1000 - 0.05
    # Stamped by the service's clock, which this test holds still, not the machine's.
    expected = Timestamp(seconds=clock.now_ns() // 10**9).ToJsonString()
    assert stamps == [expected] * 4


async def test_a_key_of_no_field_is_ignored_as_a_newer_sdk_may_send_one(
    server: TaskManagerServer, stub: AsyncStub
) -> None:
    body = {"displayName": "from a newer SDK", "someFieldOfLater": {"x": 1}}
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{base_url(server)}/api/v1/tasks", json=body) as answer,
    ):
        assert answer.status == 200, await answer.text()
        task_id = (await answer.json())["version"]["taskId"]
    stored = await stub.GetTask(pb.GetTaskRequest(task_id=task_id))
    assert stored.task.display_name == "from a newer SDK"
