"""The HTTP front: health, readiness and /metrics, on its own port beside gRPC, with the
gRPC side's TLS, authentication and exposure rule."""

from __future__ import annotations

import socket
import ssl
import time
from pathlib import Path

import aiohttp
import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from storage import add_credential
from task_manager.auth import Role, new_token
from task_manager.server import ServerStartError, TaskManagerServer
from task_manager.v1 import task_manager_pb2 as pb
from tests.certs import TestCA
from tests.helpers import (
    AsyncStub,
    ServerProcess,
    create_request,
    http_session,
    server_settings,
    status_update,
)
from tests.test_dispatch import listen, next_request

pytestmark = pytest.mark.anyio


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a scrape, by name and labels."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def scrape(session: aiohttp.ClientSession, token: str = "") -> str:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with session.get("metrics", headers=headers) as response:
        assert response.status == 200, await response.text()
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return await response.text()


async def test_health_and_readiness_answer_while_the_server_serves(
    server: TaskManagerServer,
) -> None:
    async with http_session(server) as session:
        async with session.get("healthz") as response:
            assert (response.status, await response.text()) == (200, "ok\n")
        async with session.get("readyz") as response:
            assert (response.status, await response.text()) == (200, "ready\n")


async def test_a_path_or_method_not_served_answers_the_json_of_every_other_error(
    server: TaskManagerServer,
) -> None:
    async with http_session(server) as session:
        for path in ("no-such-page", "console/no-such-file.js"):
            async with session.get(path) as response:
                assert (response.status, response.content_type) == (404, "application/json")
                refused = await response.json()
                assert (refused["code"], refused["status"]) == (5, "NOT_FOUND")
                assert f"/{path}" in refused["message"]
        async with session.post("healthz", json={}) as response:
            assert (response.status, response.content_type) == (405, "application/json")
            assert set(response.headers["Allow"].split(",")) == {"GET", "HEAD"}
            refused = await response.json()
            assert (refused["code"], refused["status"]) == (12, "UNIMPLEMENTED")
            assert "POST" in refused["message"]


async def test_metrics_count_calls_by_method_and_code_and_what_the_server_holds(
    server: TaskManagerServer, stub: AsyncStub
) -> None:
    async with http_session(server) as session:
        call = listen(stub, "agent-1")
        try:
            # A task created while the stream still starts is sent from its backlog, which
            # is not timed; its first request shows the stream has started.
            await stub.CreateTask(create_request("agent-1"))
            await next_request(call)
            before = samples(await scrape(session))
            for _ in range(3):
                await stub.CreateTask(create_request("agent-1"))
                assert (await next_request(call)).WhichOneof("request") == "execute_request"
            with pytest.raises(grpc.aio.AioRpcError):
                await stub.GetTask(pb.GetTaskRequest(task_id="no-such-task"))
            after = samples(await scrape(session))
        finally:
            call.cancel()

    def moved(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert moved("task_manager_rpcs_total", method="CreateTask", code="OK") == 3
    assert moved("task_manager_rpcs_total", method="GetTask", code="NOT_FOUND") == 1
    assert moved("task_manager_rpc_duration_seconds_count", method="CreateTask") == 3
    assert moved("task_manager_tasks", status="STATUS_SENT") == 3
    assert after[("task_manager_agent_streams", ())] == 1
    assert moved("task_manager_store_batch_writes_sum") >= 3  # the writes
    commits = moved("task_manager_store_batch_writes_count")
    assert commits >= 1
    assert moved("task_manager_store_commit_seconds_count") == commits
    assert moved("task_manager_store_commit_seconds_sum") > 0
    assert moved("task_manager_dispatch_seconds_count") == 3  # one per ExecuteRequest
    assert moved("task_manager_dispatch_seconds_bucket", le="+Inf") == 3
    # Only a replica reads others' commits.
    assert (("task_manager_replica_tail_lag_revisions", ()) in after) == server.store.shared
    assert moved("task_manager_http_requests_total", route="/metrics", code="200") == 1


async def test_with_authentication_on_metrics_want_a_token_and_health_does_not(
    database: str,
) -> None:
    credential, token = new_token("prometheus", Role.VIEWER, (), time.time_ns())
    add_credential(database, credential)
    server = await TaskManagerServer.start(server_settings(database))
    try:
        async with http_session(server) as session:
            async with session.get("metrics") as response:
                assert response.status == 401
                assert response.headers["WWW-Authenticate"].startswith("Bearer")
                refused = await response.json()  # the Gate's refusal, as any route's
                assert refused["status"] == "UNAUTHENTICATED"
                assert "Authorization: Bearer" in refused["message"]
            for authorization, says in (
                ("Bearer not-a-token", "token"),
                (f"Basic {token}", "the Authorization header must be 'Bearer <token>'"),
            ):
                headers = {"Authorization": authorization}
                async with session.get("metrics", headers=headers) as response:
                    assert response.status == 401
                    assert says in (await response.json())["message"]
            assert "task_manager_rpcs_total" in await scrape(session, token)
            # As the other GET routes, it takes the token in the URL too (the Gate's rule).
            async with session.get("metrics", params={"access_token": token}) as response:
                assert response.status == 200
            async with session.get("healthz") as response:
                assert response.status == 200
    finally:
        await server.stop()


async def test_the_http_front_takes_the_grpc_sides_tls(database: str, tmp_path: Path) -> None:
    ca = TestCA(tmp_path)
    issued = ca.issue("localhost", server=True)
    settings = server_settings(database, tls_cert=issued.cert, tls_key=issued.key)
    server = await TaskManagerServer.start(settings)
    try:
        assert server.http_url.startswith("https://127.0.0.1:")
        trusted = ssl.create_default_context(cafile=str(ca.cert))
        async with http_session(server) as session:
            async with session.get("healthz", ssl=trusted) as response:
                assert response.status == 200
            with pytest.raises(aiohttp.ClientConnectorCertificateError):
                await session.get("healthz")  # the system's CAs do not know this one
    finally:
        await server.stop()


async def test_off_loopback_the_http_front_needs_tls_and_credentials(database: str) -> None:
    settings = server_settings(database, http_listen="0.0.0.0:0")
    with pytest.raises(ServerStartError, match=r"refusing to listen on 0\.0\.0\.0:0 without TLS"):
        await TaskManagerServer.start(settings)


async def test_an_http_port_in_use_fails_the_start_and_leaves_nothing_open(database: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = server_settings(database, http_listen=f"127.0.0.1:{port}")
        with pytest.raises(ServerStartError, match=f"cannot listen on 127.0.0.1:{port} .*http"):
            await TaskManagerServer.start(settings)
    # The store was closed: a server on the same database starts (SQLite's lock is free).
    server = await TaskManagerServer.start(server_settings(database))
    await server.stop()


def test_a_served_process_says_where_its_http_front_is_and_off_means_none(
    database: str,
) -> None:
    served = ServerProcess(database).start()
    try:
        assert served.http_url.startswith("http://127.0.0.1:")
        port = int(served.http_url.removesuffix("/").rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)):
            pass  # it listens there
    finally:
        assert served.terminate() == 0
    quiet = ServerProcess(database, options=["--http-listen", "off"])
    logged_before = len(quiet.log_text())  # SQLite's log is beside the file, appended
    quiet.start()
    try:
        assert quiet.http_url == ""
    finally:
        assert quiet.terminate() == 0
    assert "HTTP on" not in quiet.log_text()[logged_before:]


async def test_metrics_count_first_attempts_and_retries_apart(
    server: TaskManagerServer, stub: AsyncStub
) -> None:
    def attempts(scraped: str, kind: str) -> float:
        return samples(scraped).get(("task_manager_attempts_started_total", (("kind", kind),)), 0)

    async with http_session(server) as session:
        before = await scrape(session)
        request = create_request("agent-1")
        request.policy.max_attempts = 2
        task = (await stub.CreateTask(request)).task
        failed = status_update(task, pb.STATUS_DONE_NOT_OK)
        failed.status_update.status.task_error.code = pb.ERROR_CODE_FAILED
        retried = (await stub.UpdateStatus(failed)).task
        assert (retried.status.status, retried.attempt) == (pb.STATUS_SENT, 2)
        after = await scrape(session)
    assert attempts(after, "first") - attempts(before, "first") == 1
    assert attempts(after, "retry") - attempts(before, "retry") == 1


async def test_without_authentication_only_requests_addressed_to_loopback_are_answered(
    server: TaskManagerServer,
) -> None:
    async with http_session(server) as session:
        for host, answered in (
            ("127.0.0.1:8080", True),
            ("localhost", True),
            ("[::1]:8080", True),
            ("attacker.example:8080", False),  # a rebound name: refused
        ):
            async with session.get("readyz", headers={"Host": host}) as response:
                assert (response.status == 200) is answered, (host, response.status)
        async with session.get("console/console.js") as response:
            assert response.headers["X-Content-Type-Options"] == "nosniff"
            assert "frame-ancestors 'none'" in response.headers["Content-Security-Policy"]
