"""A BlobStore in the PostgreSQL database itself: replicas share payloads as they share
tasks, with no file system in common.

A payload is its chunks as they arrived (`payload_chunks`, keyed by upload and offset)
and one row naming them (`payloads`, keyed by digest). A writer holds one transaction
from its first chunk to its commit: the chunks and the row become visible, and durable,
together, or (aborted, mismatched, cut off by a crash) not at all. Each writer and
each read has a connection of its own, so a long upload never holds up the task
store's writer.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import AsyncIterator
from typing import Any

import psycopg

from storage.base import StoreError
from storage.blobs import READ_CHUNK_BYTES, BlobRef, DigestMismatch
from storage.postgres.schema import describe, first_line

AsyncConnection = psycopg.AsyncConnection[Any]


class PostgresBlobStore:
    def __init__(self, url: str) -> None:
        self._url = url

    async def _connect(self, purpose: str) -> AsyncConnection:
        try:
            return await psycopg.AsyncConnection.connect(
                self._url, autocommit=True, application_name=f"task-manager {purpose}"
            )
        except psycopg.Error as exc:
            raise StoreError(f"cannot connect to {describe(self._url)}: {first_line(exc)}") from exc

    def writer(self) -> _RowWriter:
        return _RowWriter(self)

    async def stat(self, digest: str) -> BlobRef | None:
        conn = await self._connect("payload stat")
        async with conn:
            row = await (
                await conn.execute("SELECT size FROM payloads WHERE digest = %s", (digest,))
            ).fetchone()
        return None if row is None else BlobRef(digest, row[0])

    async def read(self, digest: str, offset: int = 0) -> AsyncIterator[bytes]:
        conn = await self._connect("payload read")
        async with conn:
            # The chunks' places first, then each chunk on its own: memory stays one chunk.
            places = await (
                await conn.execute(
                    "SELECT c.upload_id, c.start FROM payloads p JOIN payload_chunks c"
                    " ON c.upload_id = p.upload_id WHERE p.digest = %s"
                    " AND c.start + length(c.data) > %s ORDER BY c.start",
                    (digest, offset),
                )
            ).fetchall()
            for upload_id, start in places:
                (data,) = await (
                    await conn.execute(
                        "SELECT data FROM payload_chunks WHERE upload_id = %s AND start = %s",
                        (upload_id, start),
                    )
                ).fetchone() or (b"",)
                data = bytes(data)[max(offset - start, 0) :]
                for at in range(0, len(data), READ_CHUNK_BYTES):
                    yield data[at : at + READ_CHUNK_BYTES]

    async def close(self) -> None:
        pass


class _RowWriter:
    def __init__(self, store: PostgresBlobStore) -> None:
        self._store = store
        self._upload_id = secrets.token_hex(16)
        self._conn: AsyncConnection | None = None
        self._hash = hashlib.sha256()
        self._size = 0

    async def _transaction(self) -> AsyncConnection:
        if self._conn is None:
            self._conn = await self._store._connect("payload upload")
            await self._conn.execute("BEGIN")
        return self._conn

    async def write(self, chunk: bytes) -> None:
        if not chunk:
            return
        conn = await self._transaction()
        try:
            await conn.execute(
                "INSERT INTO payload_chunks (upload_id, start, data) VALUES (%s, %s, %s)",
                (self._upload_id, self._size, chunk),
            )
        except psycopg.Error as exc:
            await self.abort()
            raise StoreError(f"could not store a payload chunk: {first_line(exc)}") from exc
        self._hash.update(chunk)
        self._size += len(chunk)

    async def commit(self, expected: BlobRef) -> tuple[BlobRef, bool]:
        received = BlobRef(self._hash.hexdigest(), self._size)
        if received != expected:
            await self.abort()
            raise DigestMismatch(expected, received)
        conn = await self._transaction()
        try:
            inserted = await conn.execute(
                "INSERT INTO payloads (digest, upload_id, size) VALUES (%s, %s, %s)"
                " ON CONFLICT (digest) DO NOTHING",
                (received.digest, self._upload_id, received.size),
            )
            if inserted.rowcount == 1:
                await conn.execute("COMMIT")
                return received, False
            await conn.execute("ROLLBACK")  # stored already: these chunks are not needed
            return received, True
        except psycopg.Error as exc:
            raise StoreError(f"could not store a payload: {first_line(exc)}") from exc
        finally:
            await self.abort()

    async def abort(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close()  # an open transaction is rolled back
