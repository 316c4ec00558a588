"""Moving payloads: uploads and resumable, digest-checked downloads, for the operator
client and for agents alike, and the outputs a task's run produced."""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import anyio

from agent_kit._grpc import AsyncStub
from task_manager.v1 import task_manager_pb2 as pb

CHUNK_BYTES = 1024 * 1024
"""What an upload sends per message."""

PayloadSource = bytes | str | os.PathLike[str]
"""Bytes, or the path of a file whose content is the payload."""

Progress = Callable[[int, int], None]
"""Called as a transfer moves on: (bytes done, bytes in all)."""


async def upload(
    stub: AsyncStub, source: PayloadSource, progress: Progress | None = None
) -> pb.PayloadRef:
    """Stores bytes, or a file's content, as a payload; answers its reference. A file
    is read twice (hashed, then sent), in chunks, never whole in memory."""
    if isinstance(source, bytes):
        header = pb.PayloadRef(sha256=hashlib.sha256(source).hexdigest(), size=len(source))
    else:
        source = Path(source)
        header = await anyio.to_thread.run_sync(_file_ref, source)

    async def chunks() -> AsyncIterator[bytes]:
        if isinstance(source, bytes):
            for at in range(0, len(source), CHUNK_BYTES):
                yield source[at : at + CHUNK_BYTES]
            return
        async with await anyio.open_file(source, "rb") as file:
            while chunk := await file.read(CHUNK_BYTES):
                yield chunk

    async def parts() -> AsyncIterator[pb.UploadPayloadRequest]:
        yield pb.UploadPayloadRequest(header=header)
        sent = 0
        async for chunk in chunks():
            yield pb.UploadPayloadRequest(chunk=chunk)
            sent += len(chunk)
            if progress is not None:
                progress(sent, header.size)

    return (await stub.UploadPayload(parts())).payload


async def download(
    stub: AsyncStub,
    sha256: str,
    destination: str | os.PathLike[str],
    task_id: str = "",
    progress: Progress | None = None,
) -> pb.PayloadRef:
    """Writes a payload to a file, checked against its digest as it comes. The bytes go
    to `.<name>.partial` beside it first (a payload name never starts with a dot, so no
    output of a task takes that name), and an interrupted download resumes from it; the
    file appears under its name only whole. An agent names the task whose input it is."""
    target = Path(destination)
    partial = target.with_name(f".{target.name}.partial")
    stat_request = pb.StatPayloadRequest(sha256=sha256, task_id=task_id)
    stat = (await stub.StatPayload(stat_request)).payload
    for attempt in ("resume", "again"):
        have, digest = await anyio.to_thread.run_sync(_hashed_prefix, partial, stat.size)
        if attempt == "again":
            have, digest = 0, hashlib.sha256()
        request = pb.DownloadPayloadRequest(sha256=sha256, offset=have, task_id=task_id)
        async with await anyio.open_file(partial, "ab" if have else "wb") as file:
            async for response in stub.DownloadPayload(request):
                if response.offset != have:
                    raise ValueError(f"payload {sha256} came out of order")
                digest.update(response.chunk)
                await file.write(response.chunk)
                have += len(response.chunk)
                if progress is not None:
                    progress(have, stat.size)
        if have == stat.size and digest.hexdigest() == sha256:
            await anyio.to_thread.run_sync(os.replace, partial, target)
            return stat
        # The partial file was not a part of this payload: once more from the start.
    await anyio.Path(partial).unlink(missing_ok=True)
    raise ValueError(f"the bytes downloaded are not payload {sha256}")


def task_outputs(task: pb.Task) -> dict[str, pb.PayloadRef]:
    """A task's results: the outputs of the attempt that ended it DONE_OK, by name;
    empty while it has none (an earlier, failed attempt's outputs are not its)."""
    for attempt in reversed(task.attempts):
        if attempt.outcome == pb.STATUS_DONE_OK:
            return {output.name: output.payload for output in attempt.outputs}
    return {}


class InputCache:
    """An agent's task inputs on local disk, fetched once per digest into a directory:
    tasks sharing an input (a session's, a retry's) share the file, and so do agent
    processes given the same directory (each download holds a lock file beside it).
    Without a directory, a temporary one, removed by close()."""

    def __init__(self, directory: str | os.PathLike[str] | None) -> None:
        self._directory = None if directory is None else Path(directory)
        self._temporary: Path | None = None
        self._locks: dict[str, anyio.Lock] = {}

    async def path(self, stub: AsyncStub, task_id: str, payload: pb.PayloadRef) -> Path:
        if self._directory is None:
            self._temporary = Path(await anyio.to_thread.run_sync(_temporary_directory))
            self._directory = self._temporary
        await anyio.Path(self._directory).mkdir(parents=True, exist_ok=True)
        path = self._directory / payload.sha256
        async with self._locks.setdefault(payload.sha256, anyio.Lock()):
            if await anyio.Path(path).exists():
                return path
            lock_file = self._directory / f".{payload.sha256}.lock"
            async with await anyio.open_file(lock_file, "wb") as lock:
                # flock blocks, so in a thread (a cancel waits for it); the lock goes
                # when the file closes, or with the process.
                await anyio.to_thread.run_sync(fcntl.flock, lock.wrapped, fcntl.LOCK_EX)
                if not await anyio.Path(path).exists():  # another process may have won
                    await download(stub, payload.sha256, path, task_id)
        return path

    def close(self) -> None:
        """Removes the temporary directory, if this cache made one."""
        if self._temporary is not None:
            shutil.rmtree(self._temporary, ignore_errors=True)
            self._temporary = self._directory = None


def _temporary_directory() -> str:
    return tempfile.mkdtemp(prefix="agent-kit-inputs-")


def _hashed_prefix(path: Path, size: int) -> tuple[int, hashlib._Hash]:
    """How much of a payload of size a partial file holds, and the hash of it so far;
    none of it if the file is missing or longer than the payload."""
    digest = hashlib.sha256()
    try:
        if path.stat().st_size > size:
            return 0, digest
        with path.open("rb") as file:
            while chunk := file.read(CHUNK_BYTES):
                digest.update(chunk)
        return path.stat().st_size, digest
    except FileNotFoundError:
        return 0, digest


def _file_ref(path: Path) -> pb.PayloadRef:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(CHUNK_BYTES):
            digest.update(chunk)
    return pb.PayloadRef(sha256=digest.hexdigest(), size=path.stat().st_size)
