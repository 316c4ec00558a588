"""Payload faults: a disk that fills, a payload over the size limit, a server killed
mid-upload. Each is a clear error; nothing is half-stored or referenced; the server serves on."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import grpc
import psycopg
import pytest

from storage import is_postgresql
from storage.directory_blobs import payload_directory
from task_manager.server import TaskManagerServer
from task_manager.v1 import task_manager_pb2 as pb
from task_manager.validation import FieldLimits
from tests.helpers import AsyncStub, ServerProcess, create_request, server_settings
from tests.test_payloads import CHUNK, chunked, download, ref_of, refusal, upload

pytestmark = pytest.mark.anyio
MiB = 1024 * 1024
DISK_MIB = 4
"""The size of the small disk the full-disk tests give the payloads (a tmpfs)."""
LIMIT = 6 * MiB
"""The payload size limit of the small-disk server: above its disk, so the disk fills first."""


def small_disk_wrapper(directory: Path) -> list[str]:
    """A wrapper (ServerProcess's) that runs the server with directory a tmpfs of DISK_MIB
    of its own, in a user and mount namespace: nothing else sees the mount, and it goes
    with the process. Fails the test, saying what is missing, where that cannot be done."""
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.fail(
            "the full-disk tests need `unshare` (util-linux) on PATH to mount a small tmpfs",
            pytrace=False,
        )
    script = f'mount -t tmpfs -o size={DISK_MIB}m tmpfs "$1" && shift && exec "$@"'
    wrapper = [unshare, "--map-root-user", "--mount", "sh", "-c", script, "sh", str(directory)]
    probe = subprocess.run([*wrapper, "true"], capture_output=True, text=True, timeout=60)
    if probe.returncode != 0:
        pytest.fail(
            f"the full-disk tests cannot mount a {DISK_MIB} MiB tmpfs in a user and mount"
            f" namespace (`unshare --map-root-user --mount`, which needs unprivileged user"
            f" namespaces): exit {probe.returncode}: {probe.stderr.strip()}",
            pytrace=False,
        )
    return wrapper


def as_seen_by(server: ServerProcess, path: Path) -> Path:
    """path as the server's process sees it, in its mount namespace (with its tmpfs)."""
    assert server.process is not None and path.is_absolute()
    return Path("/proc", str(server.process.pid), "root", *path.parts[1:])


def files_in(directory: Path) -> list[Path]:
    return sorted(path for path in directory.rglob("*") if path.is_file())


@contextmanager
def serving(server: ServerProcess) -> Iterator[ServerProcess]:
    """The server started; killed at the end if a failed test left it running."""
    server.start()
    try:
        yield server
    finally:
        if server.process is not None and server.process.poll() is None:
            server.kill()


async def eventually(
    condition: Callable[[], Awaitable[bool]], what: str, within_s: float = 20.0
) -> None:
    """Polls condition until it holds (nothing tells a test of these states as they come)."""
    with anyio.move_on_after(within_s):
        while True:
            if await condition():
                return
            await anyio.sleep(0.02)
    raise AssertionError(f"timed out after {within_s}s waiting for {what}")


async def not_found(stub: AsyncStub, sha256: str) -> bool:
    code, _ = await refusal(stub.StatPayload(pb.StatPayloadRequest(sha256=sha256)))
    return code == grpc.StatusCode.NOT_FOUND


def held_for(name: str) -> pb.CreateTaskRequest:
    """A task held until its input `name` is attached."""
    request = create_request("agent-1")
    request.inputs.add(name=name)
    return request


# -- a full disk --------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[ServerProcess]:
    """A server (SQLite) whose payload directory, and only that, is a DISK_MIB tmpfs."""
    db = tmp_path / "tasks.db"
    payloads = payload_directory(db)
    payloads.mkdir()
    server = ServerProcess(
        str(db),
        options=("--limit", f"payload_bytes={LIMIT}"),
        wrapper=small_disk_wrapper(payloads),
    )
    with serving(server):
        disk = os.statvfs(as_seen_by(server, payloads))
        assert disk.f_blocks * disk.f_frsize == DISK_MIB * MiB, "the payloads are not on the tmpfs"
        yield server
        assert server.terminate() == 0


def payloads_of(server: ServerProcess) -> Path:
    return as_seen_by(server, payload_directory(Path(server.db)))


async def test_an_upload_that_fills_the_disk_is_resource_exhausted_and_leaves_nothing(
    small_disk: ServerProcess,
) -> None:
    too_big = os.urandom((DISK_MIB + 1) * MiB)  # under the size limit, over the disk
    async with grpc.aio.insecure_channel(small_disk.address) as channel:
        stub = AsyncStub(channel)
        code, message = await refusal(upload(stub, too_big))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, message
        assert "no room left for payloads" in message, message
        # Nothing half-stored: no payload, no file (its writer's goes before the answer).
        assert await not_found(stub, ref_of(too_big).sha256)
        assert files_in(payloads_of(small_disk)) == []
        # Nothing refers to it: neither a new task nor an attach to a held one.
        request = create_request("agent-1")
        request.inputs.add(name="mesh", payload=ref_of(too_big))
        code, message = await refusal(stub.CreateTask(request))
        assert code == grpc.StatusCode.NOT_FOUND, message
        assert message.startswith("inputs[0].payload: no payload with sha256"), message
        task = (await stub.CreateTask(held_for("mesh"))).task
        attach = pb.AttachInputRequest(
            task_id=task.version.task_id, name="mesh", payload=ref_of(too_big)
        )
        code, _ = await refusal(stub.AttachInput(attach))
        assert code == grpc.StatusCode.NOT_FOUND
        got = (await stub.GetTask(pb.GetTaskRequest(task_id=task.version.task_id))).task
        assert list(got.pending_inputs) == ["mesh"] and got == task
        # The server serves on, and the room the refused upload took is free again: a
        # payload of most of the disk fits, round-trips, and a task takes it.
        fits = os.urandom((DISK_MIB - 1) * MiB)
        stored = await upload(stub, fits)
        assert stored.payload == ref_of(fits) and not stored.already_stored
        assert await download(stub, stored.payload.sha256) == fits
        attach.payload.CopyFrom(stored.payload)
        released = (await stub.AttachInput(attach)).task
        assert released.status.status == pb.Status.STATUS_SENT
        assert [(i.name, i.payload) for i in released.inputs] == [("mesh", stored.payload)]
    assert [path.name for path in files_in(payloads_of(small_disk))] == [stored.payload.sha256]


async def test_of_two_uploads_racing_for_the_last_room_one_is_stored_whole(
    small_disk: ServerProcess,
) -> None:
    # Each fits alone, both do not: the one whose write finds the disk full is refused
    # and frees its room at once, so the other always completes.
    first, second = os.urandom(3 * MiB), os.urandom(3 * MiB)
    outcomes: dict[bytes, tuple[grpc.StatusCode, str] | pb.UploadPayloadResponse] = {}

    async def attempt(stub: AsyncStub, data: bytes) -> None:
        try:
            outcomes[data] = await upload(stub, data)
        except grpc.aio.AioRpcError as error:
            outcomes[data] = (error.code(), error.details() or "")

    async with grpc.aio.insecure_channel(small_disk.address) as channel:
        stub = AsyncStub(channel)
        async with anyio.create_task_group() as group:
            for data in (first, second):
                group.start_soon(attempt, stub, data)
        stored = [
            data for data, got in outcomes.items() if isinstance(got, pb.UploadPayloadResponse)
        ]
        refused = [got for got in outcomes.values() if isinstance(got, tuple)]
        assert len(stored) == 1 and len(refused) == 1, outcomes
        code, message = refused[0]
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "no room left" in message
        (winner,) = stored
        (loser,) = (data for data in (first, second) if data is not winner)
        assert await not_found(stub, ref_of(loser).sha256)
        assert await download(stub, ref_of(winner).sha256) == winner
        task = (await stub.CreateTask(create_request("agent-1"))).task  # and serves on
        assert (await stub.GetTask(pb.GetTaskRequest(task_id=task.version.task_id))).task == task
    assert [path.name for path in files_in(payloads_of(small_disk))] == [ref_of(winner).sha256]


# -- a payload over the size limit -----------------------------------------------------


SMALL_LIMIT = 1 * MiB


@pytest.fixture
async def small_limit(database: str) -> AsyncIterator[TaskManagerServer]:
    settings = server_settings(database, limits=FieldLimits(payload_bytes=SMALL_LIMIT))
    running = await TaskManagerServer.start(settings)
    yield running
    await running.stop()


async def stored_anywhere(database: str) -> list[str]:
    """Whatever of payloads the database's blob store keeps, even in part: files, rows."""
    if not is_postgresql(database):
        root = payload_directory(Path(database))
        return [str(path.relative_to(root)) for path in files_in(root)]
    conn: psycopg.AsyncConnection[Any] = await psycopg.AsyncConnection.connect(database)
    async with conn:
        rows = await (
            await conn.execute(
                "SELECT 'payload ' || digest FROM payloads"
                " UNION ALL SELECT 'chunk of ' || upload_id FROM payload_chunks"
            )
        ).fetchall()
    return [row[0] for row in rows]


async def test_a_payload_over_the_configured_limit_is_invalid_and_nothing_is_stored(
    small_limit: TaskManagerServer, database: str
) -> None:
    over = os.urandom(SMALL_LIMIT + 1)
    says = f"{SMALL_LIMIT + 1} is more than the {SMALL_LIMIT} bytes a payload may have"
    async with grpc.aio.insecure_channel(small_limit.address) as channel:
        stub = AsyncStub(channel)
        code, message = await refusal(upload(stub, over))  # the bytes sent after all
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert message == f"header.size: {says}"
        assert await not_found(stub, ref_of(over).sha256)
        assert await stored_anywhere(database) == []
        request = create_request("agent-1")
        request.inputs.add(name="mesh", payload=ref_of(over))
        code, message = await refusal(stub.CreateTask(request))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert message == f"inputs[0].payload.size: {says}"
        # The limit itself is allowed, and the server serves on.
        at_limit = over[:SMALL_LIMIT]
        stored = await upload(stub, at_limit)
        assert stored.payload == ref_of(at_limit)
        assert await download(stub, stored.payload.sha256) == at_limit


# -- a server killed mid-upload --------------------------------------------------------


async def upload_in_progress(database: str) -> bool:
    """Whether the server holds bytes of an upload not yet committed: a file in
    `uploading/` (of at least a chunk), or an upload's transaction that has written."""
    if not is_postgresql(database):
        uploading = payload_directory(Path(database)) / "uploading"
        return any(path.stat().st_size >= CHUNK for path in files_in(uploading))
    return await upload_transactions(database) > 0


async def upload_transactions(database: str) -> int:
    """The server's upload connections to the database with a transaction that wrote."""
    conn: psycopg.AsyncConnection[Any] = await psycopg.AsyncConnection.connect(database)
    async with conn:
        row = await (
            await conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND application_name = 'task-manager payload upload'"
                " AND backend_xid IS NOT NULL"
            )
        ).fetchone()
    assert row is not None
    count: int = row[0]
    return count


async def test_an_upload_cut_by_sigkill_leaves_nothing_and_succeeds_whole_after_restart(
    database: str,
) -> None:
    data = os.urandom(4 * MiB)
    sent_half = anyio.Event()
    hang_up = anyio.Event()

    async def half_then_wait() -> AsyncIterator[pb.UploadPayloadRequest]:
        yield pb.UploadPayloadRequest(header=ref_of(data))
        for chunk in chunked(data[: len(data) // 2]):
            yield pb.UploadPayloadRequest(chunk=chunk)
        sent_half.set()
        await hang_up.wait()

    with serving(ServerProcess(database)) as server:
        async with grpc.aio.insecure_channel(server.address) as channel:
            call = AsyncStub(channel).UploadPayload(half_then_wait())
            await sent_half.wait()
            await eventually(lambda: upload_in_progress(database), "bytes of the upload stored")
            server.kill()
            hang_up.set()
            code, _ = await refusal(call)
            assert code == grpc.StatusCode.UNAVAILABLE
    if is_postgresql(database):

        async def rolled_back() -> bool:
            return await upload_transactions(database) == 0

        # The database rolls back the dead server's transaction, with its chunks.
        await eventually(rolled_back, "the killed upload's transaction to end")
        assert await stored_anywhere(database) == []
    else:
        # The killed writer's file is left (no code ran): the restart must remove it.
        assert len(files_in(payload_directory(Path(database)) / "uploading")) == 1

    with serving(ServerProcess(database)) as restarted:
        if not is_postgresql(database):
            assert files_in(payload_directory(Path(database)) / "uploading") == []
        async with grpc.aio.insecure_channel(restarted.address) as channel:
            stub = AsyncStub(channel)
            assert await not_found(stub, ref_of(data).sha256)
            stored = await upload(stub, data)
            assert stored.payload == ref_of(data) and not stored.already_stored
            assert await download(stub, stored.payload.sha256) == data
        if is_postgresql(database):
            assert await orphan_chunks(database) == 0
        assert restarted.terminate() == 0


async def orphan_chunks(database: str) -> int:
    """Chunk rows of no stored payload (on PostgreSQL)."""
    conn: psycopg.AsyncConnection[Any] = await psycopg.AsyncConnection.connect(database)
    async with conn:
        row = await (
            await conn.execute(
                "SELECT count(*) FROM payload_chunks c WHERE NOT EXISTS"
                " (SELECT 1 FROM payloads p WHERE p.upload_id = c.upload_id)"
            )
        ).fetchone()
    assert row is not None
    count: int = row[0]
    return count
