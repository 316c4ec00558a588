"""A BlobStore in a directory (beside the SQLite database, by default).

Layout: `sha256/<first two hex digits>/<digest>` for stored payloads, `uploading/` for
writers in progress. A writer writes a file of its own in `uploading/`; its commit
fsyncs it and renames it into place (then fsyncs the directory), so a payload is either
wholly there or not at all, also across a crash. Files left in `uploading/` by a crash
are removed when the store opens. Reads and the commit's fsync run in worker threads.

A payload's file's mtime is when it was last stored (an upload of bytes already there
touches it): the collector deletes only payloads idle since before its cutoff, and it
checks and deletes under the directory's lock, which an upload's commit holds too, so
an upload answered "stored" never loses its bytes to a collection running meanwhile.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import secrets
import shutil
import threading
import time
from collections.abc import AsyncIterator, Collection
from pathlib import Path
from typing import BinaryIO

import anyio.to_thread

from storage.base import StoreError
from storage.blobs import READ_CHUNK_BYTES, BlobRef, DigestMismatch, StorageFull

_DIRECTORY_LOCKS: dict[Path, threading.Lock] = {}
_DIRECTORY_LOCKS_LOCK = threading.Lock()


def _directory_lock(root: Path) -> threading.Lock:
    """The one lock of a payload directory, shared by every store object on it in this
    process (the task store checks and collects payloads through one of its own)."""
    with _DIRECTORY_LOCKS_LOCK:
        return _DIRECTORY_LOCKS.setdefault(root.resolve(), threading.Lock())


def payload_directory(database: Path) -> Path:
    """Where an SQLite database's payloads are: `<file>.payloads` beside it."""
    return database.with_name(f"{database.name}.payloads")


READ_AHEAD_CHUNKS = 8
"""How many chunks a download reads per trip to a worker thread (2 MiB at 256 KiB): the
trip and its wake-up cost the loop more than reading a chunk from the page cache."""


def _read_chunks(file: BinaryIO) -> list[bytes]:
    """Up to READ_AHEAD_CHUNKS chunks from where file is; fewer only at its end."""
    chunks: list[bytes] = []
    while len(chunks) < READ_AHEAD_CHUNKS and (chunk := file.read(READ_CHUNK_BYTES)):
        chunks.append(chunk)
    return chunks


class DirectoryBlobStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self._stored = root / "sha256"
        self._uploading = root / "uploading"
        self.lock = _directory_lock(root)
        """Held while a payload is put in place (or touched) and while one is collected."""

    @classmethod
    def open(cls, root: Path) -> DirectoryBlobStore:
        store = cls(root)
        shutil.rmtree(store._uploading, ignore_errors=True)  # what a crash left unfinished
        store._uploading.mkdir(parents=True, exist_ok=True)
        store._stored.mkdir(exist_ok=True)
        return store

    def path_of(self, digest: str) -> Path:
        return self._stored / digest[:2] / digest

    def writer(self) -> _FileWriter:
        return _FileWriter(self)

    async def stat(self, digest: str) -> BlobRef | None:
        return (await self.stat_many([digest])).get(digest)

    async def stat_many(self, digests: Collection[str]) -> dict[str, BlobRef]:
        return await anyio.to_thread.run_sync(self._stat_all, digests)

    def _stat_all(self, digests: Collection[str]) -> dict[str, BlobRef]:
        found = {}
        for digest in digests:
            try:
                found[digest] = BlobRef(digest, self.path_of(digest).stat().st_size)
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise _store_error(exc) from exc
        return found

    async def read(self, digest: str, offset: int = 0) -> AsyncIterator[bytes]:
        try:
            file = open(self.path_of(digest), "rb")  # noqa: SIM115, ASYNC230  (as in write)
        except OSError as exc:
            raise _store_error(exc) from exc
        try:
            file.seek(offset)
            while True:
                try:
                    chunks = await anyio.to_thread.run_sync(_read_chunks, file)
                except OSError as exc:
                    raise _store_error(exc) from exc
                for chunk in chunks:
                    yield chunk
                if len(chunks) < READ_AHEAD_CHUNKS:
                    return
        finally:
            file.close()

    async def close(self) -> None:
        pass

    def present(self, digest: str) -> bool:
        """Whether the payload is stored (a quick check, from the task store's writer)."""
        return self.path_of(digest).exists()

    def delete_if_idle(self, digest: str, before_ns: int) -> bool:
        """Deletes the payload if it was last stored before before_ns."""
        path = self.path_of(digest)
        with self.lock:
            try:
                if path.stat().st_mtime_ns >= before_ns:
                    return False
                path.unlink()
            except FileNotFoundError:
                return False
            _fsync_directory(path.parent)
            return True

    async def idle_payloads(self, before_ns: int, after: str, limit: int) -> list[str]:
        """As BlobStore's; referenced payloads too (their references are the task
        store's)."""
        return await anyio.to_thread.run_sync(self._idle_payloads, before_ns, after, limit)

    def _idle_payloads(self, before_ns: int, after: str, limit: int) -> list[str]:
        found: list[str] = []
        for prefix in sorted(p for p in self._stored.iterdir() if p.name >= after[:2]):
            for path in sorted(p for p in prefix.iterdir() if p.name > after):
                with contextlib.suppress(FileNotFoundError):
                    if path.stat().st_mtime_ns < before_ns:
                        found.append(path.name)
                        if len(found) == limit:
                            return found
        return found


class _FileWriter:
    def __init__(self, store: DirectoryBlobStore) -> None:
        self._store = store
        self._path = store._uploading / secrets.token_hex(16)
        self._file: BinaryIO | None = None
        self._hash = hashlib.sha256()
        self._size = 0
        self._lock = threading.Lock()
        """Held by the commit's thread and by a discard: a cancelled upload's abort waits
        for a commit still running in its thread, rather than race it."""

    async def write(self, chunk: bytes | memoryview) -> None:
        # On the event loop: a write lands in the page cache (the commit's fsync, the
        # slow part, runs in a thread), and a thread hop here could be cut off by a
        # cancel with the file open in it, left to leak.
        try:
            if self._file is None:
                self._file = open(self._path, "xb")  # noqa: SIM115, ASYNC230  (closed by commit or abort)
            self._file.write(chunk)
        except OSError as exc:
            await self.abort()
            raise _store_error(exc) from exc
        self._hash.update(chunk)
        self._size += len(chunk)

    async def commit(self, expected: BlobRef) -> tuple[BlobRef, bool]:
        received = BlobRef(self._hash.hexdigest(), self._size)
        if received != expected:
            await self.abort()
            raise DigestMismatch(expected, received)
        try:
            existed = await anyio.to_thread.run_sync(self._put_in_place, received.digest)
        except OSError as exc:
            await self.abort()
            raise _store_error(exc) from exc
        return received, existed

    def _put_in_place(self, digest: str) -> bool:
        with self._lock, self._store.lock:
            final = self._store.path_of(digest)
            if final.exists():  # the same bytes are stored already
                _stamp(final)  # stored again now, as far as the collector is concerned
                self._discard_locked()
                # Perhaps renamed there by an upload still syncing its directory: synced
                # here too, so this reference is as durable as that one.
                _fsync_directory(final.parent)
                _fsync_directory(final.parent.parent)
                return True
            if self._file is None:  # no bytes at all: an empty payload
                self._file = open(self._path, "xb")  # noqa: SIM115  (closed below)
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            final.parent.mkdir(exist_ok=True)
            os.replace(self._path, final)
            _stamp(final)
            _fsync_directory(final.parent)
            _fsync_directory(final.parent.parent)
            return False

    async def abort(self) -> None:
        # At once, with no thread hop: an upload cut off aborts while being cancelled.
        self._discard()

    def _discard(self) -> None:
        with self._lock:
            self._discard_locked()

    def _discard_locked(self) -> None:
        # A close that fails (its buffer cannot be flushed to a full disk) must not keep
        # the file: it is unlinked whatever happens.
        try:
            if self._file is not None:
                with contextlib.suppress(OSError):
                    self._file.close()
        finally:
            self._path.unlink(missing_ok=True)


def _stamp(path: Path) -> None:
    """Sets a payload's mtime to now, precisely (a file system's own times are coarse,
    a tick or so behind the clock the collector's cutoff is read from)."""
    now = time.time_ns()
    os.utime(path, ns=(now, now))


def _store_error(exc: OSError) -> StoreError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StorageFull(f"no room left for payloads in {exc.filename or 'the store'}")
    return StoreError(f"could not store a payload: {exc.strerror or exc}")


def _fsync_directory(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
