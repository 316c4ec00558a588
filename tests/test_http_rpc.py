"""This gateway's own API over HTTP (POST /rpc/task_manager.v1.TaskManager/<Method>, JSON),
and its revisioned watch as Server-Sent Events resumed by Last-Event-ID, across a
restart, exactly as a gRPC watcher resumes by start_revision."""

from __future__ import annotations

import json
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import anyio
import grpc
import pytest

from storage import add_credential, revoke_credential
from task_manager.auth import Role, new_token
from task_manager.server import TaskManagerServer
from task_manager.v1 import task_manager_pb2 as pb
from tests.helpers import (
    AsyncStub,
    create_request,
    http_session,
    server_settings,
    sse_events,
    stub_for,
    token_for,
)
from tests.test_payloads import upload

pytestmark = pytest.mark.anyio

RPC = "rpc/task_manager.v1.TaskManager/"


@pytest.fixture
async def http(server: TaskManagerServer) -> AsyncIterator[aiohttp.ClientSession]:
    async with http_session(server) as session:
        yield session


async def call(
    session: aiohttp.ClientSession, method: str, body: object, token: str = ""
) -> tuple[int, dict[str, Any]]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with session.post(RPC + method, json=body, headers=headers) as answer:
        assert answer.content_type == "application/json", await answer.text()
        return answer.status, await answer.json()


async def test_unary_methods_take_and_answer_their_messages_as_json(
    http: aiohttp.ClientSession, stub: AsyncStub
) -> None:
    created = (await stub.CreateTask(create_request("drone-1"))).task
    task_id = created.version.task_id
    status, history = await call(http, "GetTaskHistory", {"taskId": task_id})
    assert status == 200, history
    assert [e["status"]["status"] for e in history["entries"]] == ["STATUS_CREATED", "STATUS_SENT"]
    assert [int(e["revision"]) for e in history["entries"]] == sorted(
        int(e["revision"]) for e in history["entries"]
    )

    status, submitted = await call(
        http,
        "SubmitSessions",
        {
            "sessions": [
                {"displayName": "two", "tasks": [{"displayName": "a"}, {"displayName": "b"}]}
            ]
        },
    )
    assert status == 200, submitted
    (session,) = submitted["sessions"]
    assert len(session["taskIds"]) == 2
    status, got = await call(http, "GetSession", {"sessionId": session["sessionId"]})
    assert (status, got["session"]["taskCount"]) == (200, 2)

    status, agents = await call(http, "ListAgents", {})
    assert (status, agents) == (200, {})  # nobody connected yet: no agents known


async def test_bad_calls_are_refused_with_the_field_named_and_nothing_stored(
    http: aiohttp.ClientSession, stub: AsyncStub
) -> None:
    for method, body, http_status, named in (
        ("CreateTask", {"displayName": "x" * 10_000}, 400, "display_name"),
        ("CreateTask", {"policy": {"maxAttempts": "many"}}, 400, "maxAttempts"),
        (
            "CreateTask",
            {"relations": {"assignee": {"system": {"entityId": ""}}}, "taskId": "/"},
            400,
            "task_id",
        ),
        ("GetTask", {"taskId": "missing"}, 404, "missing"),
        ("SubmitSessions", {"sessions": []}, 400, "sessions"),
    ):
        status, refusal = await call(http, method, body)
        assert status == http_status, (method, refusal)
        assert named in refusal["message"], (method, refusal)
    for path in ("NoSuchMethod", "ReportStatus"):  # ReportStatus: gRPC's only
        async with http.post(RPC + path, json={}) as answer:
            assert answer.status == 404
            assert (await answer.json())["status"] == "NOT_FOUND"  # JSON, as every error
    async with http.get(RPC + "ListenAsAgent") as answer:  # a stream that acts: POST only
        assert (answer.status, answer.headers["Allow"]) == (405, "POST")
        refused = await answer.json()
        assert (refused["code"], refused["status"]) == (12, "UNIMPLEMENTED")
        assert "GET" in refused["message"]
    assert not (await stub.QueryTasks(pb.QueryTasksRequest())).tasks


async def test_a_key_that_is_no_field_is_refused_with_the_key_named(
    http: aiohttp.ClientSession, stub: AsyncStub
) -> None:
    for body, named in (
        ({"displayNmae": "a typo"}, "body.displayNmae"),
        ({"policy": {"maxAttempts": 2, "retries": 3}}, "body.policy.retries"),
        ({"inputs": [{"name": "mesh", "sha256": "ab"}]}, "body.inputs[0].sha256"),
    ):
        status, refusal = await call(http, "CreateTask", body)
        assert (status, refusal["status"]) == (400, "INVALID_ARGUMENT"), refusal
        assert refusal["message"].startswith(named), refusal
    watch = {"request": json.dumps({"heartbeatIntervalMs": 1000, "startRevison": "5"})}
    async with http.get(RPC + "WatchTasks", params=watch) as answer:  # a stream's too
        assert answer.status == 400
        assert (await answer.json())["message"].startswith("request.startRevison")
    assert not (await stub.QueryTasks(pb.QueryTasksRequest())).tasks
    status, created = await call(http, "CreateTask", {"displayName": "spelt right"})
    assert status == 200, created


async def test_roles_hold_over_http_as_over_grpc(database: str) -> None:
    credential, viewer = new_token("watcher", Role.VIEWER, (), time.time_ns())
    add_credential(database, credential)
    server = await TaskManagerServer.start(server_settings(database))
    try:
        async with http_session(server) as session:
            status, refusal = await call(session, "CreateTask", {}, token=viewer)
            assert (status, refusal["status"]) == (403, "PERMISSION_DENIED")
            status, refusal = await call(session, "QueryTasks", {})
            assert (status, refusal["status"]) == (401, "UNAUTHENTICATED")
            status, answer = await call(session, "QueryTasks", {}, token=viewer)
            assert status == 200, answer
    finally:
        await server.stop()


@asynccontextmanager
async def watching(url: str, last_event_id: str = "") -> AsyncIterator[AsyncIterator[Any]]:
    """A GET watch, as an EventSource makes it: its task events (and error), once its
    headers say it is subscribed."""
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    params = {"request": json.dumps({"heartbeatIntervalMs": 1000})}
    get = f"{url}{RPC}WatchTasks"
    async with (
        aiohttp.ClientSession() as session,
        session.get(get, headers=headers, params=params) as r,
    ):
        assert r.status == 200, await r.text()
        events = sse_events(r)

        async def task_events() -> AsyncIterator[Any]:
            async for event in events:
                if event["event"] in ("event", "error"):
                    yield event

        yield task_events()
        await events.aclose()


async def first(events: AsyncIterator[Any], count: int) -> list[Any]:
    with anyio.fail_after(20):
        return [await anext(events) for _ in range(count)]


async def test_an_event_source_resumes_by_last_event_id_across_a_restart(database: str) -> None:
    server = await TaskManagerServer.start(server_settings(database))
    try:
        async with watching(server.http_url) as events:  # from now
            for name in ("a", "b"):
                await server_create(server, name)
            seen = await first(events, 4)
    finally:
        await server.stop()
    revisions = [int(e["id"]) for e in seen]
    assert revisions == sorted(set(revisions)) and len(revisions) == 4

    # Two more tasks while no one watches, on a new server over the same database.
    server = await TaskManagerServer.start(server_settings(database))
    try:
        for name in ("c", "d"):
            await server_create(server, name)
        async with watching(server.http_url, last_event_id=str(revisions[1])) as events:
            resumed = [int(e["id"]) for e in await first(events, 6)]
        # What followed the last id seen, each once: two seen before the restart, four after.
        assert resumed[:2] == revisions[2:]
        assert resumed == [r for r in await all_revisions(server) if r > revisions[1]]
    finally:
        await server.stop()


async def server_create(server: TaskManagerServer, name: str) -> None:
    """A task created over gRPC and released to its agent: two changes."""
    async with grpc.aio.insecure_channel(server.address) as channel:
        await AsyncStub(channel).CreateTask(create_request("drone-9", display_name=name))


async def all_revisions(server: TaskManagerServer) -> list[int]:
    async with http_session(server) as session:
        _, page = await call(session, "QueryTasks", {})
        revisions = []
        for task in page["tasks"]:
            _, history = await call(
                session, "GetTaskHistory", {"taskId": task["version"]["taskId"]}
            )
            revisions += [int(e["revision"]) for e in history["entries"]]
    return sorted(revisions)


async def test_a_resume_from_a_compacted_revision_gets_an_error_event(database: str) -> None:
    settings = server_settings(database, retention_revisions=1, retention_age_s=0.0)
    server = await TaskManagerServer.start(settings)
    try:
        for name in ("a", "b", "c"):
            await server_create(server, name)
        compacted = await server.compact()
        assert compacted > 1
        async with watching(server.http_url, last_event_id="1") as events:
            (error,) = await first(events, 1)
        assert error["event"] == "error"
        assert (error["data"]["status"], error["data"]["httpStatus"]) == ("OUT_OF_RANGE", 400)
        assert error["data"]["compactRevision"] == compacted
        async with (
            aiohttp.ClientSession() as session,
            session.get(
                server.http_url + RPC + "WatchTasks", headers={"Last-Event-ID": "soon"}
            ) as answer,
        ):
            assert answer.status == 400
            assert "Last-Event-ID" in (await answer.json())["message"]
    finally:
        await server.stop()


async def test_the_openapi_document_describes_every_route_served(
    server: TaskManagerServer, http: aiohttp.ClientSession
) -> None:
    async with http.get("openapi.json") as answer:
        assert answer.status == 200
        document = await answer.json()
    assert document["openapi"].startswith("3.")
    assert server.http is not None
    served = {
        (route.method.lower(), route.resource.canonical)
        for route in server.http.routes()
        if route.method != "HEAD" and route.resource is not None
    }
    undocumented = {
        "/healthz",
        "/readyz",
        "/metrics",
        "/openapi.json",
        "/api/v1/oauth/token",
        "/",
        "/console/{name}",
    }
    documented = {
        (verb, path) for path, operations in document["paths"].items() for verb in operations
    }
    missing = {
        (verb, path)
        for verb, path in served
        if path not in undocumented and not (verb == "get" and ("post", path) in documented)
    } - documented
    assert not missing
    schemas = document["components"]["schemas"]

    def refs(node: object) -> list[str]:
        if isinstance(node, dict):
            own = [str(node["$ref"])] if "$ref" in node else []
            return own + [ref for value in node.values() for ref in refs(value)]
        if isinstance(node, list):
            return [ref for value in node for ref in refs(value)]
        return []

    names = {ref.removeprefix("#/components/schemas/") for ref in refs(document)}
    assert names and names <= set(schemas)
    task = schemas["task_manager.v1.Task"]["properties"]
    assert task["status"] == {"$ref": "#/components/schemas/task_manager.v1.TaskStatus"}
    assert task["createTime"] == {"type": "string", "format": "date-time"}


PAYLOADS = "payloads/"


async def test_a_payload_downloads_as_its_bytes_and_a_cut_download_resumes(
    http: aiohttp.ClientSession, stub: AsyncStub
) -> None:
    data = os.urandom(4 * 1024 * 1024 + 13)  # many chunks
    ref = (await upload(stub, data)).payload
    async with http.get(PAYLOADS + ref.sha256) as answer:
        assert answer.status == 200
        assert answer.headers["Content-Type"] == "application/octet-stream"
        assert answer.headers["Content-Length"] == str(len(data))
        assert answer.headers["ETag"] == f'"{ref.sha256}"'
        assert await answer.read() == data
    async with http.get(PAYLOADS + ref.sha256) as answer:  # cut after its first bytes
        head = await answer.content.readexactly(100_000)
        answer.close()
    resume = {"Range": f"bytes={len(head)}-"}
    async with http.get(PAYLOADS + ref.sha256, headers=resume) as answer:
        assert answer.status == 206
        assert answer.headers["Content-Range"] == f"bytes {len(head)}-{len(data) - 1}/{len(data)}"
        assert answer.headers["Content-Length"] == str(len(data) - len(head))
        assert head + await answer.read() == data
    async with http.get(PAYLOADS + ref.sha256, headers={"Range": "bytes=0-9"}) as answer:
        assert answer.status == 200  # a Range of another form is ignored: all of it
        assert len(await answer.read()) == len(data)
    past_the_end = {"Range": f"bytes={len(data)}-"}
    async with http.get(PAYLOADS + ref.sha256, headers=past_the_end) as answer:
        assert (answer.status, answer.headers["Content-Range"]) == (416, f"bytes */{len(data)}")
        assert (await answer.json())["status"] == "OUT_OF_RANGE"
    async with http.head(PAYLOADS + ref.sha256) as answer:
        assert (answer.status, answer.headers["Content-Length"]) == (200, str(len(data)))
        assert await answer.read() == b""
    etag = f'"{ref.sha256}"'
    for held in (etag, f"W/{etag}", f'"{"0" * 64}", {etag}', "*"):
        async with http.get(PAYLOADS + ref.sha256, headers={"If-None-Match": held}) as answer:
            assert (answer.status, answer.headers["ETag"]) == (304, etag), held
            assert await answer.read() == b""
    other = {"If-None-Match": f'"{"0" * 64}"'}
    async with http.get(PAYLOADS + ref.sha256, headers=other) as answer:
        assert answer.status == 200 and await answer.read() == data
    async with http.get(PAYLOADS + "0" * 64) as answer:
        assert (answer.status, (await answer.json())["status"]) == (404, "NOT_FOUND")
    async with http.get(PAYLOADS + "not-a-digest") as answer:
        assert answer.status == 400
        assert (await answer.json())["message"].startswith("sha256")


async def test_a_download_is_admitted_and_authorised_as_download_payload_is(
    database: str,
) -> None:
    _, operator = token_for(database, "ops", Role.OPERATOR)
    _, viewer = token_for(database, "eyes", Role.VIEWER)
    _, runner = token_for(database, "drone-7", Role.AGENT, "drone-7")
    _, stranger = token_for(database, "drone-8", Role.AGENT, "drone-8")
    server = await TaskManagerServer.start(server_settings(database))
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = stub_for(channel, operator)
            ref = (await upload(stub, b"a mesh of the north field")).payload
            request = create_request("drone-7")
            request.inputs.add(name="mesh", payload=ref)
            task_id = (await stub.CreateTask(request)).task.version.task_id
        async with http_session(server) as session:

            async def download(token: str, **query: str) -> tuple[int, bytes]:
                headers = {"Authorization": f"Bearer {token}"} if token else {}
                url = PAYLOADS + ref.sha256
                async with session.get(url, headers=headers, params=query) as answer:
                    return answer.status, await answer.read()

            status, refused = await download("")
            assert (status, json.loads(refused)["status"]) == (401, "UNAUTHENTICATED")
            assert await download(viewer) == (200, b"a mesh of the north field")
            assert await download("", access_token=viewer) == (200, b"a mesh of the north field")
            status, refused = await download(runner)  # an agent names the task
            assert status == 400
            assert json.loads(refused)["message"].startswith("task_id")
            assert await download(runner, task_id=task_id) == (200, b"a mesh of the north field")
            status, refused = await download(stranger, task_id=task_id)
            assert (status, json.loads(refused)["status"]) == (403, "PERMISSION_DENIED")
    finally:
        await server.stop()


async def test_a_download_whose_credential_is_revoked_midway_is_cut_short(
    database: str,
) -> None:
    credential, viewer = token_for(database, "eyes", Role.VIEWER)
    _, operator = token_for(database, "ops", Role.OPERATOR)
    server = await TaskManagerServer.start(server_settings(database, credential_refresh_s=0.05))
    try:
        # More than the sockets and the client buffer: the server is still writing.
        data = os.urandom(32 * 1024 * 1024)
        async with grpc.aio.insecure_channel(server.address) as channel:
            ref = (await upload(stub_for(channel, operator), data)).payload
        headers = {"Authorization": f"Bearer {viewer}"}
        async with (
            http_session(server) as session,
            session.get(PAYLOADS + ref.sha256, headers=headers) as answer,
        ):
            assert answer.status == 200
            await answer.content.readexactly(64 * 1024)
            assert revoke_credential(database, credential.credential_id, time.time_ns())
            with anyio.fail_after(20):  # polled: revoked once new requests are refused
                while True:
                    async with session.get(PAYLOADS + ref.sha256, headers=headers) as again:
                        if again.status == 401:
                            break
                    await anyio.sleep(0.02)
            with pytest.raises(aiohttp.ClientPayloadError):  # ends short of Content-Length
                await answer.read()
    finally:
        await server.stop()
