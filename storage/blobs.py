"""Where payload bytes live: the BlobStore contract, apart from the task store.

A payload is stored once per content, under its SHA-256 digest (hex). Bytes are written
through a BlobWriter as they arrive, hashed on the way; `commit` makes them durable
(fsync, or the database's commit) and only then answers the reference, so nothing is
ever referenced that is not wholly stored. A writer that is aborted, or whose bytes do
not match the digest asked for, leaves nothing readable behind.

Two implementations pass one contract suite (tests/test_blob_contract.py): a directory
beside the SQLite database (storage/directory_blobs.py) and the PostgreSQL database
itself (storage/postgres/blobs.py), so replicas need no shared file system.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Collection
from dataclasses import dataclass
from typing import Protocol

from storage.base import StoreError

DIGEST_PATTERN = re.compile(r"[0-9a-f]{64}")
READ_CHUNK_BYTES = 256 * 1024
"""What a download sends per message, at most."""


@dataclass(frozen=True, slots=True)
class BlobRef:
    digest: str
    """SHA-256 of the bytes, 64 lowercase hex digits."""
    size: int


class StorageFull(StoreError):
    """No room is left where payloads are kept (the disk, a quota)."""


class DigestMismatch(Exception):
    """The bytes written are not those the writer was told to expect."""

    def __init__(self, expected: BlobRef, received: BlobRef) -> None:
        super().__init__(
            f"the bytes received ({received.size} bytes, sha256 {received.digest}) are not"
            f" those announced ({expected.size} bytes, sha256 {expected.digest})"
        )
        self.expected = expected
        self.received = received


class BlobWriter(Protocol):
    async def write(self, chunk: bytes | memoryview) -> None: ...

    async def commit(self, expected: BlobRef) -> tuple[BlobRef, bool]:
        """Makes the bytes durable if they are those expected (else raises
        DigestMismatch, keeping nothing); answers the reference and whether these bytes
        were stored already (then nothing new is kept)."""
        ...

    async def abort(self) -> None:
        """Discards what was written (an upload cut short). Safe after commit."""
        ...


class BlobStore(Protocol):
    def writer(self) -> BlobWriter:
        """A writer for new bytes: commit or abort it."""
        ...

    async def stat(self, digest: str) -> BlobRef | None: ...

    async def stat_many(self, digests: Collection[str]) -> dict[str, BlobRef]:
        """The payloads stored of digests, by digest (one look for a session's many)."""
        ...

    def read(self, digest: str, offset: int = 0) -> AsyncIterator[bytes]:
        """The bytes from offset (at most READ_CHUNK_BYTES a chunk); nothing if offset is
        the size. The caller checks the digest exists and the offset is within it."""
        ...

    async def idle_payloads(self, before_ns: int, after: str, limit: int) -> list[str]:
        """Up to limit payloads last stored (uploaded, or uploaded again) before
        before_ns, on the wall clock, in digest order from the first after `after`: the
        collector's candidates. Whether a task refers
        to one, and its deletion, are the task store's (WriteTransaction.collect_payload)."""
        ...

    async def close(self) -> None: ...
