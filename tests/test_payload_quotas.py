"""Payload quotas: each principal's bytes stored (refused before the bytes come, freed
when collected) and upload rate (slowed down, not refused)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import grpc
import pytest

from agent_kit._grpc import ClientAuth, open_stub
from storage import add_credential
from task_manager.auth import Role, new_token
from task_manager.server import TaskManagerServer
from task_manager.v1 import task_manager_pb2 as pb
from tests.helpers import AsyncStub, server_settings
from tests.test_payloads import ref_of, refusal, upload

pytestmark = pytest.mark.anyio
QUOTA = 1_000
FIRST, SECOND = b"f" * 600, b"s" * 600


@asynccontextmanager
async def operators(database: str, **options: object) -> AsyncIterator[dict[str, AsyncStub]]:
    """A server with auth on and the options, and a stub for each of two operators."""
    tokens = {}
    for name in ("ops", "ops-2"):
        credential, tokens[name] = new_token(name, Role.OPERATOR, (), time.time_ns())
        add_credential(database, credential)
    server = await TaskManagerServer.start(server_settings(database, **options))
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            yield {name: open_stub(channel, ClientAuth(token=t)) for name, t in tokens.items()}
    finally:
        await server.stop()


async def stored(stub: AsyncStub, data: bytes) -> bool:
    try:
        await stub.StatPayload(pb.StatPayloadRequest(sha256=ref_of(data).sha256))
    except grpc.aio.AioRpcError as error:
        assert error.code() == grpc.StatusCode.NOT_FOUND, error
        return False
    return True


async def test_an_upload_past_the_quota_is_refused_before_its_bytes_and_stores_nothing(
    database: str,
) -> None:
    async with operators(database, payload_quota_bytes=QUOTA) as stubs:
        ops, other = stubs["ops"], stubs["ops-2"]
        assert not (await upload(ops, FIRST)).already_stored
        never_sent = anyio.Event()

        async def header_only() -> AsyncIterator[pb.UploadPayloadRequest]:
            yield pb.UploadPayloadRequest(header=ref_of(SECOND))
            await never_sent.wait()  # the bytes would follow: the answer comes first

        with anyio.fail_after(20):
            got, details = await refusal(ops.UploadPayload(header_only()))
        never_sent.set()
        assert got == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "'ops' has 600 bytes of payloads stored" in details
        assert "600 more would pass its quota of 1000 bytes" in details
        assert not await stored(ops, SECOND)
        # What it stored already is no more: uploading it again passes.
        assert (await upload(ops, FIRST)).already_stored
        # Each principal has its own: the other stores the same bytes and more.
        assert (await upload(other, FIRST)).already_stored
        got, _ = await refusal(upload(other, SECOND))
        assert got == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert (await upload(other, b"x" * 400)).payload == ref_of(b"x" * 400)


async def test_a_collected_payload_no_longer_counts(database: str) -> None:
    options = {"payload_quota_bytes": QUOTA, "payload_grace_s": 0.0, "payload_sweep_s": 3_600.0}
    settings = server_settings(database, **options)
    server = await TaskManagerServer.start(settings)
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = AsyncStub(channel)
            await upload(stub, FIRST)
            got, _ = await refusal(upload(stub, SECOND))
            assert got == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert server.payload_collector is not None
            assert await server.payload_collector.collect() == 1  # no task refers to FIRST
            assert not (await upload(stub, SECOND)).already_stored
    finally:
        await server.stop()


async def test_an_upload_over_the_rate_is_slowed_down_not_refused(database: str) -> None:
    rate = 256 * 1024
    data = bytes(range(256)) * 4096  # 1 MiB: a second's burst, then 3 s at the rate
    async with operators(database, upload_bytes_per_second=float(rate)) as stubs:
        started = time.monotonic()
        response = await upload(stubs["ops"], data)
        elapsed = time.monotonic() - started
        assert response.payload == ref_of(data)
        # A lower bound only: a loaded machine makes it slower, never faster.
        assert elapsed >= (len(data) - rate) / rate * 0.9, elapsed
