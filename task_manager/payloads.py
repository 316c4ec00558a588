"""Payloads, the data plane: task inputs and outputs as bytes apart from the tasks.

An upload is a header (the sha256 and size to come) and then the bytes; they go to the
blob store as they arrive (never whole in memory), hashed on the way, and are stored
only if they are what the header said. A download reads from any offset, so a cut
transfer resumes. Each principal has a quota of bytes stored and of upload rate
(PayloadQuotas). Pure Python over a BlobStore and the task store: no gRPC.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from storage.base import Store, WriteTransaction
from storage.blobs import DIGEST_PATTERN, BlobRef, BlobStore, DigestMismatch
from task_manager.auth import RateLimiter
from task_manager.clock import Clock, sleep_until
from task_manager.errors import InvalidArgument, OutOfRange, PayloadNotFound, QuotaExceeded
from task_manager.v1.task_manager_pb2 import (
    DownloadPayloadResponse,
    PayloadRef,
    UploadPayloadRequest,
)


def digest(value: str, field: str = "sha256") -> str:
    if not DIGEST_PATTERN.fullmatch(value):
        raise InvalidArgument(field, f"{value!r:.80} is not a sha256: 64 lowercase hex digits")
    return value


def ref_message(ref: BlobRef) -> PayloadRef:
    return PayloadRef(sha256=ref.digest, size=ref.size)


class PayloadQuotas:
    """Per principal: the bytes of the payloads it uploaded that are stored, counted in
    the task store (one sum every replica sees), and how fast it uploads, paced on this
    replica (the upload slows: gRPC's flow control holds the client back)."""

    def __init__(self, store: Store, clock: Clock, stored_bytes: int, bytes_per_second: float):
        self._store = store
        self._clock = clock
        self.stored_bytes = stored_bytes
        """0: no quota (the bytes are counted all the same)."""
        self._rate = RateLimiter(bytes_per_second, clock) if bytes_per_second > 0 else None

    async def admit(self, principal: str, header: BlobRef) -> None:
        """Refuses, before its bytes come, an upload that would pass the quota."""
        if not self.stored_bytes:
            return
        stored, counted = await self._store.stored_bytes(principal, header.digest)
        if not counted and stored + header.size > self.stored_bytes:
            raise QuotaExceeded(principal, stored, header.size, self.stored_bytes)

    async def pace(self, principal: str, received: int) -> None:
        """Returns once received more bytes are within the principal's upload rate."""
        if self._rate is not None:
            wait_s = self._rate.reserve(principal, received)
            if wait_s > 0:
                await sleep_until(self._clock, self._clock.now_ns() + int(wait_s * 1e9))

    async def charge(self, principal: str, stored: BlobRef) -> None:
        """Counts stored bytes against the quota. Uploads racing admit() may find the
        quota passed only now: refused then, the bytes are left for the collector."""

        def charge(tx: WriteTransaction) -> int | None:
            return tx.charge_upload(principal, stored.digest, stored.size, self.stored_bytes)

        if await self._store.write(charge) is None:
            used, _ = await self._store.stored_bytes(principal, stored.digest)
            raise QuotaExceeded(principal, used, stored.size, self.stored_bytes)


async def upload(
    parts: AsyncIterator[UploadPayloadRequest | memoryview],
    blobs: BlobStore,
    max_bytes: int,
    quotas: PayloadQuotas,
    principal: str,
) -> tuple[BlobRef, bool]:
    """Stores what parts carry for principal; answers the reference and whether it was
    stored already. Anything wrong (no header first, more or other bytes than it said, a
    stream that ends or fails early, a quota passed) stores nothing. A part may be a
    chunk's bytes alone, as wire.upload_part leaves them."""
    header = await _header(parts, max_bytes)
    await quotas.admit(principal, header)
    writer = blobs.writer()
    received = 0
    try:
        async for part in parts:
            chunk = part if isinstance(part, memoryview) else _chunk_of(part)
            received += len(chunk)
            if received > header.size:
                raise InvalidArgument(
                    "chunk", f"brings the bytes to {received}, past the header's {header.size}"
                )
            await quotas.pace(principal, len(chunk))
            await writer.write(chunk)
        try:
            stored, existed = await writer.commit(header)
        except DigestMismatch as mismatch:
            raise InvalidArgument("chunk", str(mismatch)) from None
        await quotas.charge(principal, stored)
        return stored, existed
    finally:
        # Also when the upload is cancelled (its client went away): shielded, so the
        # abort runs to its end. After a commit there is nothing left to discard.
        await asyncio.shield(writer.abort())


def _chunk_of(part: UploadPayloadRequest) -> bytes:
    kind = part.WhichOneof("part")
    if kind == "header":
        raise InvalidArgument("header", "comes once, first")
    if kind is None:
        raise InvalidArgument("part", "is empty: send a header, then chunks")
    return part.chunk  # once: each read of a bytes field copies it


async def _header(
    parts: AsyncIterator[UploadPayloadRequest | memoryview], max_bytes: int
) -> BlobRef:
    first = await anext(parts, None)
    if not isinstance(first, UploadPayloadRequest) or first.WhichOneof("part") != "header":
        raise InvalidArgument("header", "must come first: the sha256 and size of the bytes")
    header = BlobRef(digest(first.header.sha256, "header.sha256"), first.header.size)
    if header.size > max_bytes:
        raise InvalidArgument(
            "header.size", f"{header.size} is more than the {max_bytes} bytes a payload may have"
        )
    return header


async def stat(blobs: BlobStore, sha256: str) -> BlobRef:
    found = await blobs.stat(digest(sha256))
    if found is None:
        raise PayloadNotFound(sha256)
    return found


async def download(
    blobs: BlobStore, sha256: str, offset: int
) -> AsyncIterator[DownloadPayloadResponse]:
    """The payload's bytes from offset, each chunk with where it starts."""
    found = await stat(blobs, sha256)
    if offset > found.size:
        raise OutOfRange(f"offset {offset} is past the payload's {found.size} bytes")
    at = offset
    async for chunk in blobs.read(found.digest, offset):
        yield DownloadPayloadResponse(offset=at, chunk=chunk)
        at += len(chunk)
