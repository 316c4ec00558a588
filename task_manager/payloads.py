"""Payloads, the data plane: task inputs and outputs as bytes apart from the tasks.

An upload is a header (the sha256 and size to come) and then the bytes; they go to the
blob store as they arrive (never whole in memory), hashed on the way, and are stored
only if they are what the header said. A download reads from any offset, so a cut
transfer resumes. Pure Python over a BlobStore: no gRPC.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from storage.blobs import DIGEST_PATTERN, BlobRef, BlobStore, DigestMismatch
from task_manager.errors import InvalidArgument, OutOfRange, PayloadNotFound
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


async def upload(
    parts: AsyncIterator[UploadPayloadRequest], blobs: BlobStore, max_bytes: int
) -> tuple[BlobRef, bool]:
    """Stores what parts carry; answers the reference and whether it was stored already.
    Anything wrong (no header first, more or other bytes than it said, a stream that
    ends or fails early) stores nothing."""
    header = await _header(parts, max_bytes)
    writer = blobs.writer()
    received = 0
    try:
        async for part in parts:
            kind = part.WhichOneof("part")
            if kind == "header":
                raise InvalidArgument("header", "comes once, first")
            if kind is None:
                raise InvalidArgument("part", "is empty: send a header, then chunks")
            received += len(part.chunk)
            if received > header.size:
                raise InvalidArgument(
                    "chunk", f"brings the bytes to {received}, past the header's {header.size}"
                )
            await writer.write(part.chunk)
        try:
            return await writer.commit(header)
        except DigestMismatch as mismatch:
            raise InvalidArgument("chunk", str(mismatch)) from None
    finally:
        # Also when the upload is cancelled (its client went away): shielded, so the
        # abort runs to its end. After a commit there is nothing left to discard.
        await asyncio.shield(writer.abort())


async def _header(parts: AsyncIterator[UploadPayloadRequest], max_bytes: int) -> BlobRef:
    first = await anext(parts, None)
    if first is None or first.WhichOneof("part") != "header":
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
