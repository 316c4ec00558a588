"""Payloads over gRPC: chunked uploads checked against their digest, downloads from any
offset, and nothing stored for an upload that is wrong or cut short."""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

import anyio
import grpc
import pytest

from agent_kit import OperatorClient, SyncOperatorClient
from storage import is_postgresql
from task_manager.server import TaskManagerServer
from task_manager.v1 import task_manager_pb2 as pb
from tests.helpers import AsyncStub, ServerProcess

pytestmark = pytest.mark.anyio
CHUNK = 64 * 1024


def ref_of(data: bytes) -> pb.PayloadRef:
    return pb.PayloadRef(sha256=hashlib.sha256(data).hexdigest(), size=len(data))


async def parts(
    header: pb.PayloadRef | None, chunks: Iterable[bytes]
) -> AsyncIterator[pb.UploadPayloadRequest]:
    if header is not None:
        yield pb.UploadPayloadRequest(header=header)
    for chunk in chunks:
        yield pb.UploadPayloadRequest(chunk=chunk)


def chunked(data: bytes, size: int = CHUNK) -> list[bytes]:
    return [data[at : at + size] for at in range(0, len(data), size)]


async def upload(stub: AsyncStub, data: bytes) -> pb.UploadPayloadResponse:
    return await stub.UploadPayload(parts(ref_of(data), chunked(data)))


async def download(stub: AsyncStub, sha256: str, offset: int = 0) -> bytes:
    received = []
    expected_offset = offset
    async for response in stub.DownloadPayload(
        pb.DownloadPayloadRequest(sha256=sha256, offset=offset)
    ):
        assert response.offset == expected_offset
        received.append(response.chunk)
        expected_offset += len(response.chunk)
    return b"".join(received)


async def refusal(call: object) -> tuple[grpc.StatusCode, str]:
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as error:
        return error.code(), error.details() or ""
    raise AssertionError("the call was accepted")


async def test_a_payload_round_trips_and_resumes_from_any_offset(stub: AsyncStub) -> None:
    data = os.urandom(3 * 1024 * 1024 + 777)
    stored = await upload(stub, data)
    assert stored.payload == ref_of(data) and not stored.already_stored
    stat = await stub.StatPayload(pb.StatPayloadRequest(sha256=stored.payload.sha256))
    assert stat.payload == ref_of(data)
    assert await download(stub, stored.payload.sha256) == data
    for offset in (1, CHUNK + 3, len(data) - 1, len(data)):
        assert await download(stub, stored.payload.sha256, offset) == data[offset:]
    again = await stub.UploadPayload(parts(ref_of(data), chunked(data, 1_000_003)))
    assert again.already_stored and again.payload == stored.payload


@pytest.mark.parametrize(
    ("header", "chunks", "field", "says"),
    [
        (None, [b"abc"], "header", "must come first"),
        (ref_of(b"abc"), [b"abd"], "chunk", "are not those announced"),
        (ref_of(b"abcdef"), [b"abc"], "chunk", "are not those announced"),  # ends early
        (ref_of(b"abc"), [b"abc", b"d"], "chunk", "past the header's 3"),
        (pb.PayloadRef(sha256="ABC", size=3), [b"abc"], "header.sha256", "is not a sha256"),
        (
            pb.PayloadRef(sha256=ref_of(b"x").sha256, size=(1 << 30) + 1),
            [b"x"],
            "header.size",
            "is more than the 1073741824 bytes",
        ),
    ],
    ids=["no header", "other bytes", "short", "too long", "bad digest", "too big"],
)
async def test_a_wrong_upload_is_invalid_and_stores_nothing(
    stub: AsyncStub, header: pb.PayloadRef | None, chunks: list[bytes], field: str, says: str
) -> None:
    code, message = await refusal(stub.UploadPayload(parts(header, chunks)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert message.startswith(f"{field}: ") and says in message, message
    for data in (b"abc", b"abd", b"abcdef", b"abcd", b"x"):
        code, _ = await refusal(stub.StatPayload(pb.StatPayloadRequest(sha256=ref_of(data).sha256)))
        assert code == grpc.StatusCode.NOT_FOUND


async def test_an_upload_cut_off_mid_stream_leaves_nothing(
    server: TaskManagerServer, stub: AsyncStub, database: str
) -> None:
    data = os.urandom(1024 * 1024)
    sent_half = anyio.Event()
    never = anyio.Event()

    async def half_then_hang() -> AsyncIterator[pb.UploadPayloadRequest]:
        yield pb.UploadPayloadRequest(header=ref_of(data))
        for chunk in chunked(data[: len(data) // 2]):
            yield pb.UploadPayloadRequest(chunk=chunk)
        sent_half.set()
        await never.wait()

    call = stub.UploadPayload(half_then_hang())
    await sent_half.wait()
    call.cancel()
    code, _ = await refusal(stub.StatPayload(pb.StatPayloadRequest(sha256=ref_of(data).sha256)))
    assert code == grpc.StatusCode.NOT_FOUND
    if not is_postgresql(database):
        # The writer's own file goes when the server sees the cancel: nothing half-kept.
        uploading = Path(f"{database}.payloads") / "uploading"
        with anyio.fail_after(20):
            while True:  # polled: the server has no event to tell a test of it
                if not any(uploading.iterdir()):
                    break
                await anyio.sleep(0.05)
    # The same bytes whole, later, are a new payload.
    stored = await upload(stub, data)
    assert not stored.already_stored and await download(stub, stored.payload.sha256) == data


async def test_reading_what_is_not_there(stub: AsyncStub) -> None:
    code, message = await refusal(
        stub.StatPayload(pb.StatPayloadRequest(sha256=ref_of(b"none").sha256))
    )
    assert code == grpc.StatusCode.NOT_FOUND and "no payload with sha256" in message
    code, _ = await refusal(download(stub, ref_of(b"none").sha256))
    assert code == grpc.StatusCode.NOT_FOUND
    stored = await upload(stub, b"four")
    code, message = await refusal(download(stub, stored.payload.sha256, 5))
    assert code == grpc.StatusCode.OUT_OF_RANGE and "past the payload's 4 bytes" in message
    code, message = await refusal(stub.StatPayload(pb.StatPayloadRequest(sha256="x")))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and message.startswith("sha256: ")


async def test_the_sdk_uploads_a_file_and_resumes_a_download(
    server: TaskManagerServer, tmp_path: Path
) -> None:
    data = os.urandom(2 * 1024 * 1024 + 5)
    source = tmp_path / "mesh.bin"
    source.write_bytes(data)
    async with OperatorClient(server.address) as client:
        ref = await client.upload_payload(source)
        assert ref == ref_of(data)
        assert await client.upload_payload(data) == ref  # bytes, the same payload
        assert await client.upload_payload(str(source)) == ref  # a path as a string
        target = tmp_path / "copy.bin"
        partial = tmp_path / ".copy.bin.partial"
        partial.write_bytes(data[:1_000_000])  # an interrupted download: resumed
        assert await client.download_payload(ref.sha256, target) == ref
        assert target.read_bytes() == data and not partial.exists()
        for stranger in (b"not a part of it" * 1_000, os.urandom(len(data) + 1)):
            partial.write_bytes(stranger)  # not a prefix of it: downloaded again
            assert await client.download_payload(ref.sha256, str(target)) == ref
            assert target.read_bytes() == data and not partial.exists()


def test_the_sync_sdk_round_trips_bytes(database: str, tmp_path: Path) -> None:
    server = ServerProcess(database).start()
    try:
        with SyncOperatorClient(server.address) as client:
            ref = client.upload_payload(b"sync bytes")
            assert client.download_payload(ref.sha256, tmp_path / "out") == ref
    finally:
        assert server.terminate() == 0
    assert (tmp_path / "out").read_bytes() == b"sync bytes"
