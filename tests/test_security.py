"""Authentication, authorship, revocation, TLS and mTLS, limits, and internal errors."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import anyio
import grpc
import psycopg
import psycopg.sql
import pytest

from agent_kit import Agent, ClientAuth, OperatorClient, TaskContext
from agent_kit._grpc import open_channel, open_stub
from storage import add_credential, is_postgresql, list_credentials, revoke_credential
from task_manager import lifecycle
from task_manager.auth import Role, certificate_binding
from task_manager.clock import ManualClock
from task_manager.server import ServerStartError, TaskManagerServer
from task_manager.v1 import task_manager_pb2 as pb
from task_manager.validation import FieldLimits
from tests.certs import TestCA
from tests.helpers import (
    REPO_ROOT,
    AsyncStub,
    create_request,
    server_settings,
    stub_for,
    token_for,
    trailer,
)

pytestmark = pytest.mark.anyio
S = pb.Status
OK = grpc.StatusCode.OK


async def start(db: str, clock: ManualClock | None = None, **settings: object) -> TaskManagerServer:
    return await TaskManagerServer.start(server_settings(db, **settings), clock)


async def code_of(call: object) -> grpc.StatusCode:
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


@pytest.fixture
def db(database: str) -> str:
    return database


async def test_without_credentials_the_loopback_server_is_open(db: str) -> None:
    server = await start(db)
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            task = (await AsyncStub(channel).CreateTask(create_request("drone-1"))).task
        assert task.version.status_version == 2
    finally:
        await server.stop()


async def test_once_a_token_exists_every_call_needs_one(
    db: str, caplog: pytest.LogCaptureFixture
) -> None:
    server = await start(db, credential_refresh_s=0.05)
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            anonymous = AsyncStub(channel)
            await anonymous.QueryTasks(pb.QueryTasksRequest())
            watch = anonymous.WatchTasks(pb.WatchTasksRequest())
            await watch.initial_metadata()
            _, token = token_for(db, "olivia", Role.OPERATOR)  # the running server picks it up
            with anyio.fail_after(10), pytest.raises(grpc.aio.AioRpcError) as ended:
                async for _ in watch:
                    pass
            assert ended.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with anyio.fail_after(10):
                # A poll: the server re-reads credentials on its own schedule.
                while await code_of(anonymous.QueryTasks(pb.QueryTasksRequest())) == OK:  # noqa: ASYNC110
                    await anyio.sleep(0.02)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await anonymous.QueryTasks(pb.QueryTasksRequest())
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "Bearer" in (refused.value.details() or "")
            assert any("denied QueryTasks" in r.getMessage() for r in caplog.records)
            await stub_for(channel, token).QueryTasks(pb.QueryTasksRequest())
            malformed = anonymous.QueryTasks(
                pb.QueryTasksRequest(), metadata=(("authorization", token),)
            )
            assert await code_of(malformed) == grpc.StatusCode.UNAUTHENTICATED
    finally:
        await server.stop()


def stored_bytes(db: str) -> list[bytes]:
    """Everything the database keeps: an SQLite file and its companions, or the text of
    every row of every table of a PostgreSQL database."""
    if not is_postgresql(db):
        return [path.read_bytes() for path in Path(db).parent.iterdir()]
    with psycopg.connect(db) as conn:
        tables = conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"
        ).fetchall()
        return [
            str(row[0]).encode()
            for (table,) in tables
            for row in conn.execute(
                psycopg.sql.SQL("SELECT t::text FROM {} t").format(psycopg.sql.Identifier(table))
            )
        ]


async def test_tokens_are_stored_only_as_hashes(db: str) -> None:
    credential, token = token_for(db, "olivia", Role.OPERATOR)
    secret = token.split("_", 2)[2]  # the secret itself may contain "_"
    assert secret not in credential.secret_hash
    stored = stored_bytes(db)
    assert stored
    for data in stored:
        assert secret.encode() not in data
    assert [row.credential_id for row in list_credentials(db)] == [credential.credential_id]


async def test_the_author_is_the_authenticated_caller(db: str) -> None:
    _, operator = token_for(db, "olivia", Role.OPERATOR)
    _, drone = token_for(db, "drone", Role.AGENT, "drone-1")
    server = await start(db)
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            olivia, agent = stub_for(channel, operator), stub_for(channel, drone)
            task = (await olivia.CreateTask(create_request("drone-1"))).task
            assert task.created_by == pb.Principal(user=pb.User(user_id="olivia"))
            impostor = create_request("drone-1", author=pb.Principal(user=pb.User(user_id="ada")))
            assert await code_of(olivia.CreateTask(impostor)) == grpc.StatusCode.PERMISSION_DENIED
            update = pb.StatusUpdate(
                version=pb.TaskVersion(task_id=task.version.task_id, status_version=2),
                status=pb.TaskStatus(status=S.STATUS_MACHINE_RECEIPT),
                author=pb.Principal(system=pb.System(entity_id="rover-1")),
            )
            claimed = agent.UpdateStatus(pb.UpdateStatusRequest(status_update=update))
            assert await code_of(claimed) == grpc.StatusCode.PERMISSION_DENIED
            update.ClearField("author")
            first = await agent.UpdateStatus(pb.UpdateStatusRequest(status_update=update))
            assert first.task.last_updated_by == pb.Principal(system=pb.System(entity_id="drone-1"))
            # A retry of the same update (author still unset) is recognised as one.
            again = await agent.UpdateStatus(pb.UpdateStatusRequest(status_update=update))
            assert again.task == first.task
    finally:
        await server.stop()


async def test_revoking_a_token_refuses_new_calls_and_ends_its_streams(db: str) -> None:
    credential, drone = token_for(db, "drone", Role.AGENT, "drone-1")
    _, viewer = token_for(db, "vera", Role.VIEWER)
    server = await start(db, credential_refresh_s=0.05)
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            agent = stub_for(channel, drone)
            listen = agent.ListenAsAgent(
                pb.ListenAsAgentRequest(entity_ids=pb.EntityIds(entity_ids=["drone-1"]))
            )
            await listen.initial_metadata()
            assert not listen.done()
            watch = stub_for(channel, viewer).WatchTasks(pb.WatchTasksRequest())
            await watch.initial_metadata()

            assert revoke_credential(db, credential.credential_id, time.time_ns())
            with anyio.fail_after(10), pytest.raises(grpc.aio.AioRpcError) as ended:
                async for _ in listen:
                    pass
            assert ended.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "revoked" in (ended.value.details() or "")
            get = agent.GetTask(pb.GetTaskRequest(task_id="whatever-1"))
            assert await code_of(get) == grpc.StatusCode.UNAUTHENTICATED
            assert not watch.done()  # another credential's stream is untouched
            watch.cancel()
    finally:
        await server.stop()


async def test_the_tokens_command_adds_lists_and_revokes(db: str) -> None:
    def tokens(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "task_manager", "tokens", "--db", db, *args],
            capture_output=True,
            text=True,
            cwd=REPO_ROOT,
            timeout=60,
            check=False,
        )

    added = tokens("add", "drone", "--role", "agent", "--entity", "drone-1")
    assert added.returncode == 0, added.stderr
    token = added.stdout.strip()
    assert token.startswith("tmk_")
    refused = tokens("add", "drone", "--role", "agent")
    assert refused.returncode == 2
    assert "entity id" in refused.stderr
    scoped = tokens("add", "survey-app", "--role", "operator", "--scope", "survey")
    assert scoped.returncode == 0, scoped.stderr
    refused = tokens("add", "drone", "--role", "agent", "--entity", "drone-2", "--scope", "survey")
    assert refused.returncode == 2
    assert "only operator and viewer credentials are limited to scopes" in refused.stderr
    refused = tokens("add", "survey-app", "--role", "operator", "--scope", "no/slash")
    assert refused.returncode == 2 and "is not a scope" in refused.stderr
    listed = tokens("list")
    line, scoped_line = listed.stdout.splitlines()
    credential_id = line.split()[0]
    assert "drone-1" in line and "active" in line and token not in line
    assert scoped_line.split()[2:6] == ["survey-app", "operator", "-", "survey"]
    server = await start(db)
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            listen = stub_for(channel, token).ListenAsAgent(
                pb.ListenAsAgentRequest(entity_ids=pb.EntityIds(entity_ids=["drone-1"]))
            )
            await listen.initial_metadata()
            assert not listen.done()
            listen.cancel()
    finally:
        await server.stop()
    assert tokens("revoke", credential_id).returncode == 0
    assert tokens("revoke", credential_id).returncode == 1  # already revoked
    assert "revoked" in tokens("list").stdout


async def test_off_loopback_the_server_needs_tls_and_credentials(db: str, tmp_path: Path) -> None:
    with pytest.raises(ServerStartError, match=r"without TLS .* and authentication"):
        await start(db, listen="0.0.0.0:0")
    token_for(db, "olivia", Role.OPERATOR)
    with pytest.raises(ServerStartError, match="--insecure"):
        await start(db, listen="0.0.0.0:0")  # credentials alone: tokens would travel in clear
    issued = TestCA(tmp_path).issue("localhost", server=True)
    server = await start(db, listen="0.0.0.0:0", tls_cert=issued.cert, tls_key=issued.key)
    await server.stop()


async def test_tls_with_a_token(db: str, tmp_path: Path) -> None:
    ca = TestCA(tmp_path)
    issued = ca.issue("localhost", server=True)
    _, token = token_for(db, "olivia", Role.OPERATOR)
    server = await start(db, tls_cert=issued.cert, tls_key=issued.key)
    try:
        target = f"127.0.0.1:{server.port}"
        auth = ClientAuth(token=token, tls_ca=ca.cert)
        async with OperatorClient(target, auth=auth) as client:
            task = await client.create_task(assignee_entity_id="drone-1")
            assert task.created_by.user.user_id == "olivia"
        async with grpc.aio.insecure_channel(target) as plaintext:
            call = stub_for(plaintext, token).QueryTasks(pb.QueryTasksRequest(), timeout=5)
            assert await code_of(call) == grpc.StatusCode.UNAVAILABLE
        untrusted = ClientAuth(token=token, tls_ca=TestCA(tmp_path, "other-ca").cert)
        async with open_channel(target, untrusted) as channel:
            call = open_stub(channel, untrusted).QueryTasks(pb.QueryTasksRequest(), timeout=5)
            assert await code_of(call) == grpc.StatusCode.UNAVAILABLE
    finally:
        await server.stop()


async def test_mutual_tls_names_the_principal_by_certificate(db: str, tmp_path: Path) -> None:
    ca = TestCA(tmp_path)
    issued = ca.issue("localhost", server=True)
    add_credential(db, certificate_binding("drone-cert", Role.AGENT, ["drone-1"], time.time_ns()))
    _, operator = token_for(db, "olivia", Role.OPERATOR)
    server = await start(db, tls_cert=issued.cert, tls_key=issued.key, client_ca=ca.cert)
    target = f"127.0.0.1:{server.port}"
    drone = ca.issue("drone-cert")
    operator_cert = ca.issue("olivia-laptop")
    stranger = ca.issue("stranger")
    try:
        with_olivia = ClientAuth(
            token=operator, tls_ca=ca.cert, tls_cert=operator_cert.cert, tls_key=operator_cert.key
        )
        async with OperatorClient(target, auth=with_olivia) as client:
            task = await client.create_task(assignee_entity_id="drone-1")
        as_drone = ClientAuth(tls_ca=ca.cert, tls_cert=drone.cert, tls_key=drone.key)
        agent = Agent(target, "drone-1", auth=as_drone)

        @agent.handler()
        async def run(ctx: TaskContext) -> None:
            pass

        async with anyio.create_task_group() as group:
            group.start_soon(agent.run)
            async with OperatorClient(target, auth=with_olivia) as client:
                with anyio.fail_after(20):
                    done = await client.wait(task.version.task_id)
            group.cancel_scope.cancel()
        assert done.status.status == S.STATUS_DONE_OK
        assert done.last_updated_by.system.entity_id == "drone-1"

        async with open_channel(target, as_drone) as channel:
            other = open_stub(channel, as_drone).ListenAsAgent(
                pb.ListenAsAgentRequest(entity_ids=pb.EntityIds(entity_ids=["rover-1"]))
            )
            with pytest.raises(grpc.aio.AioRpcError) as denied:
                async for _ in other:
                    pass
            assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
        # A name in the certificate's subject alternative names counts as much as its CN.
        by_san = ca.issue("workstation-17", alternative_name="drone-cert")
        as_san = ClientAuth(tls_ca=ca.cert, tls_cert=by_san.cert, tls_key=by_san.key)
        async with open_channel(target, as_san) as channel:
            reply = await open_stub(channel, as_san).GetTask(
                pb.GetTaskRequest(task_id=task.version.task_id)
            )
            assert reply.task.version.task_id == task.version.task_id
        unknown = ClientAuth(tls_ca=ca.cert, tls_cert=stranger.cert, tls_key=stranger.key)
        async with open_channel(target, unknown) as channel:
            call = open_stub(channel, unknown).GetTask(pb.GetTaskRequest(task_id="whatever-1"))
            assert await code_of(call) == grpc.StatusCode.UNAUTHENTICATED
        no_certificate = ClientAuth(tls_ca=ca.cert)
        async with open_channel(target, no_certificate) as channel:
            call = open_stub(channel, no_certificate).GetTask(
                pb.GetTaskRequest(task_id="whatever-1"), timeout=5
            )
            assert await code_of(call) == grpc.StatusCode.UNAVAILABLE  # handshake refused
    finally:
        await server.stop()


async def test_requests_over_the_rate_get_resource_exhausted_with_a_retry_hint(
    db: str,
) -> None:
    clock = ManualClock()
    server = await start(db, requests_per_second=5.0, clock=clock)
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = AsyncStub(channel)
            for _ in range(5):
                await stub.QueryTasks(pb.QueryTasksRequest())
            with pytest.raises(grpc.aio.AioRpcError) as limited:
                await stub.QueryTasks(pb.QueryTasksRequest())
            assert limited.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "5 requests per second" in (limited.value.details() or "")
            assert trailer(limited.value, "x-retry-after-ms") == "200"
            clock.advance(0.2)
            await stub.QueryTasks(pb.QueryTasksRequest())
    finally:
        await server.stop()


async def test_streams_per_principal_are_limited(db: str) -> None:
    server = await start(db, max_streams_per_principal=2)
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = AsyncStub(channel)
            first, second = (stub.WatchTasks(pb.WatchTasksRequest()) for _ in range(2))
            for call in (first, second):
                await call.initial_metadata()
            with pytest.raises(grpc.aio.AioRpcError) as limited:
                async for _ in stub.WatchTasks(pb.WatchTasksRequest()):
                    pass
            assert limited.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "2 open streams" in (limited.value.details() or "")
            first.cancel()
            with anyio.fail_after(10):  # the server counts the stream closed soon after
                while True:
                    third = stub.WatchTasks(pb.WatchTasksRequest())
                    await third.initial_metadata()
                    if not third.done():
                        break
                    await anyio.sleep(0.02)
            third.cancel()
            second.cancel()
    finally:
        await server.stop()


async def test_an_oversized_request_is_refused_and_changes_nothing(db: str) -> None:
    server = await start(db, max_request_bytes=4096)
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = AsyncStub(channel)
            big = create_request("drone-1", task_id="too-big-1", description="x" * 5000)
            assert await code_of(stub.CreateTask(big)) == grpc.StatusCode.RESOURCE_EXHAUSTED
            missing = stub.GetTask(pb.GetTaskRequest(task_id="too-big-1"))
            assert await code_of(missing) == grpc.StatusCode.NOT_FOUND
    finally:
        await server.stop()


async def test_field_limits_are_settings(db: str) -> None:
    server = await start(db, limits=FieldLimits(display_name_chars=10))
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = AsyncStub(channel)
            fits, too_long = create_request("drone-1"), create_request("drone-1")
            fits.display_name, too_long.display_name = "x" * 10, "x" * 11
            await stub.CreateTask(fits)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.CreateTask(too_long)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "display_name: is 11 characters long, more than 10" in (
                refused.value.details() or ""
            )
    finally:
        await server.stop()


async def test_an_internal_error_returns_only_an_id(
    db: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*args: object) -> pb.Task:
        raise RuntimeError("secret detail: /srv/keys")

    # A fault injected into the lifecycle: the only way to reach this path on purpose.
    monkeypatch.setattr(lifecycle, "create_task", broken)
    server = await start(db)
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await AsyncStub(channel).CreateTask(create_request("drone-1"))
    finally:
        await server.stop()
    assert failed.value.code() == grpc.StatusCode.INTERNAL
    details = failed.value.details() or ""
    assert details.startswith("internal error (id ")
    assert "secret" not in details and "Traceback" not in details
    error_id = details.removeprefix("internal error (id ").removesuffix(")")
    assert any(error_id in record.getMessage() for record in caplog.records)


async def test_tls_files_that_are_not_pem_are_a_clear_start_error(db: str, tmp_path: Path) -> None:
    issued = TestCA(tmp_path).issue("localhost", server=True)
    not_pem = tmp_path / "notes.txt"
    not_pem.write_text("hello")
    with pytest.raises(ServerStartError, match=r"--tls-key .* is not a PEM file"):
        await start(db, tls_cert=issued.cert, tls_key=not_pem)
    with pytest.raises(ServerStartError, match="cannot read --tls-cert"):
        await start(db, tls_cert=tmp_path / "missing.pem", tls_key=issued.key)
    with pytest.raises(ServerStartError, match="needs both"):
        await start(db, tls_cert=issued.cert)


async def test_admins_manage_credentials_over_the_api_with_immediate_effect(db: str) -> None:
    _, admin_token = token_for(db, "ada", Role.ADMIN)
    server = await start(db, credential_refresh_s=3600.0)  # no help from the reload loop
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            admin = stub_for(channel, admin_token)
            added = await admin.AddCredential(
                pb.AddCredentialRequest(principal="vera", role="viewer")
            )
            assert added.token.startswith("tmk_") and added.credential.role == "viewer"
            viewer = stub_for(channel, added.token)
            await viewer.QueryTasks(pb.QueryTasksRequest())  # in force at once
            watch = viewer.WatchTasks(pb.WatchTasksRequest())
            await watch.initial_metadata()

            listed = await admin.ListCredentials(pb.ListCredentialsRequest())
            assert {c.principal for c in listed.credentials} == {"ada", "vera"}
            assert added.token not in str(listed)

            credential_id = added.credential.credential_id
            revoked = await admin.RevokeCredential(
                pb.RevokeCredentialRequest(credential_id=credential_id)
            )
            assert revoked.credential.HasField("revoke_time")
            assert await code_of(viewer.QueryTasks(pb.QueryTasksRequest())) == (
                grpc.StatusCode.UNAUTHENTICATED
            )
            with anyio.fail_after(10), pytest.raises(grpc.aio.AioRpcError) as ended:
                async for _ in watch:
                    pass
            assert ended.value.code() == grpc.StatusCode.UNAUTHENTICATED
            again = admin.RevokeCredential(pb.RevokeCredentialRequest(credential_id=credential_id))
            assert await code_of(again) == grpc.StatusCode.NOT_FOUND
            for bad in (
                pb.AddCredentialRequest(principal="x", role="superuser"),
                pb.AddCredentialRequest(principal="drone-9", role="agent"),
                pb.AddCredentialRequest(principal="", role="viewer"),
            ):
                assert await code_of(admin.AddCredential(bad)) == grpc.StatusCode.INVALID_ARGUMENT
            cert = await admin.AddCredential(
                pb.AddCredentialRequest(
                    principal="drone-cert", role="agent", entity_ids=["drone-1"], certificate=True
                )
            )
            assert cert.token == "" and cert.credential.kind == "certificate"
    finally:
        await server.stop()
