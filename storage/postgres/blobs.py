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
from collections.abc import AsyncIterator, Collection
from typing import Any

import psycopg
import psycopg.errors

from storage.base import StoreError
from storage.blobs import READ_CHUNK_BYTES, BlobRef, DigestMismatch, StorageFull
from storage.postgres.schema import describe, first_line

AsyncConnection = psycopg.AsyncConnection[Any]


WALL_CLOCK = "(extract(epoch from clock_timestamp()) * 1e9)::bigint"
"""The database's wall clock in ns, as every replica reads it."""

ROW_BYTES = 1024 * 1024
"""Bytes per chunk row, whatever the client's messages: a download reads few rows."""


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
        return (await self.stat_many([digest])).get(digest)

    async def stat_many(self, digests: Collection[str]) -> dict[str, BlobRef]:
        conn = await self._connect("payload stat")
        async with conn:
            try:
                cursor = await conn.execute(
                    "SELECT digest, size FROM payloads WHERE digest = ANY(%s)", (list(digests),)
                )
                rows = await cursor.fetchall()
            except psycopg.Error as exc:
                raise _store_error(exc) from exc
        return {digest: BlobRef(digest, size) for digest, size in rows}

    async def read(self, digest: str, offset: int = 0) -> AsyncIterator[bytes]:
        conn = await self._connect("payload read")
        async with conn:
            try:
                async for chunk in _chunks(conn, digest, offset):
                    yield chunk
            except psycopg.Error as exc:
                raise _store_error(exc) from exc

    async def close(self) -> None:
        pass

    async def idle_payloads(self, before_ns: int, after: str, limit: int) -> list[str]:
        conn = await self._connect("payload collection")
        async with conn:
            try:
                cursor = await conn.execute(
                    "SELECT digest FROM payloads p WHERE stored_ns < %s AND digest > %s"
                    " AND NOT EXISTS (SELECT 1 FROM payload_refs r WHERE r.digest = p.digest)"
                    " ORDER BY digest LIMIT %s",
                    (before_ns, after, limit),
                )
                return [row[0] for row in await cursor.fetchall()]
            except psycopg.Error as exc:
                raise _store_error(exc) from exc


async def _chunks(conn: AsyncConnection, digest: str, offset: int) -> AsyncIterator[bytes]:
    """A payload's rows one at a time (memory stays one row), read as binary."""
    found = await (
        await conn.execute("SELECT upload_id FROM payloads WHERE digest = %s", (digest,))
    ).fetchone()
    if found is None:
        return
    (upload_id,) = found
    # The row holding offset: the last one starting at or before it.
    position = await (
        await conn.execute(
            "SELECT max(start) FROM payload_chunks WHERE upload_id = %s AND start <= %s",
            (upload_id, offset),
        )
    ).fetchone()
    start = position[0] if position is not None and position[0] is not None else 0
    while True:
        cursor = conn.cursor(binary=True)
        await cursor.execute(
            "SELECT start, data FROM payload_chunks WHERE upload_id = %s AND start >= %s"
            " ORDER BY start LIMIT 1",
            (upload_id, start),
        )
        row = await cursor.fetchone()
        if row is None:
            return
        start, data = row
        data = bytes(data)[max(offset - start, 0) :]
        for at in range(0, len(data), READ_CHUNK_BYTES):
            yield data[at : at + READ_CHUNK_BYTES]
        start += 1


class _RowWriter:
    def __init__(self, store: PostgresBlobStore) -> None:
        self._store = store
        self._upload_id = secrets.token_hex(16)
        self._conn: AsyncConnection | None = None
        self._hash = hashlib.sha256()
        self._size = 0
        self._pending = bytearray()
        """Bytes not yet in a row: rows are ROW_BYTES, whatever the client's chunks."""
        self._written = 0

    async def _transaction(self) -> AsyncConnection:
        if self._conn is None:
            self._conn = await self._store._connect("payload upload")
            try:
                await self._conn.execute("BEGIN")
            except psycopg.Error as exc:
                await self.abort()
                raise _store_error(exc) from exc
        return self._conn

    async def write(self, chunk: bytes | memoryview) -> None:
        self._hash.update(chunk)
        self._size += len(chunk)
        self._pending += chunk
        while len(self._pending) >= ROW_BYTES:
            await self._flush(ROW_BYTES)

    async def _flush(self, size: int) -> None:
        row, self._pending = bytes(self._pending[:size]), self._pending[size:]
        conn = await self._transaction()
        try:
            await conn.execute(
                "INSERT INTO payload_chunks (upload_id, start, data) VALUES (%s, %s, %s)",
                (self._upload_id, self._written, row),
            )
        except psycopg.Error as exc:
            await self.abort()
            raise _store_error(exc) from exc
        self._written += len(row)

    async def commit(self, expected: BlobRef) -> tuple[BlobRef, bool]:
        received = BlobRef(self._hash.hexdigest(), self._size)
        if received != expected:
            await self.abort()
            raise DigestMismatch(expected, received)
        try:
            if self._pending:
                await self._flush(len(self._pending))
            conn = await self._transaction()
            while True:
                inserted = await conn.execute(
                    "INSERT INTO payloads (digest, upload_id, size, stored_ns)"
                    f" VALUES (%s, %s, %s, {WALL_CLOCK}) ON CONFLICT (digest) DO NOTHING",
                    (received.digest, self._upload_id, received.size),
                )
                if inserted.rowcount == 1:
                    await conn.execute("COMMIT")
                    return received, False
                # Stored already: these chunks are not needed, and the payload counts as
                # stored now for the collector (unless it collected it just now: then
                # these chunks are the payload after all).
                touched = await conn.execute(
                    f"UPDATE payloads SET stored_ns = {WALL_CLOCK} WHERE digest = %s",
                    (received.digest,),
                )
                if touched.rowcount == 1:
                    await conn.execute(
                        "DELETE FROM payload_chunks WHERE upload_id = %s", (self._upload_id,)
                    )
                    await conn.execute("COMMIT")
                    return received, True
        except psycopg.Error as exc:
            raise _store_error(exc) from exc
        finally:
            await self.abort()

    async def abort(self) -> None:
        self._pending.clear()
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close()  # an open transaction is rolled back


def _store_error(exc: psycopg.Error) -> StoreError:
    if isinstance(exc, psycopg.errors.DiskFull):
        return StorageFull(f"no room left for payloads in the database: {first_line(exc)}")
    return StoreError(f"could not store or read a payload: {first_line(exc)}")
