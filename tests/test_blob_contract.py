"""The BlobStore contract, one suite for every implementation: a directory beside the
SQLite file and the PostgreSQL database (storage/blobs.py)."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import AsyncIterator

import pytest

from storage import open_blob_store, open_store
from storage.blobs import READ_CHUNK_BYTES, BlobRef, BlobStore, DigestMismatch

pytestmark = pytest.mark.anyio


@pytest.fixture
async def blobs(database: str) -> AsyncIterator[BlobStore]:
    store = await open_store(database)  # migrates the schema the blob store shares
    await store.close()
    blob_store = open_blob_store(database)
    yield blob_store
    await blob_store.close()


def ref_of(data: bytes) -> BlobRef:
    return BlobRef(hashlib.sha256(data).hexdigest(), len(data))


async def put(blobs: BlobStore, data: bytes, chunk: int = 100_000) -> tuple[BlobRef, bool]:
    writer = blobs.writer()
    for at in range(0, len(data), chunk):
        await writer.write(data[at : at + chunk])
    return await writer.commit(ref_of(data))


async def read_all(blobs: BlobStore, digest: str, offset: int = 0) -> bytes:
    return b"".join([chunk async for chunk in blobs.read(digest, offset)])


# Big enough for reads to span a store's units (PostgreSQL's 1 MiB rows, the directory's
# reads of several chunks), and one a whole number of chunks.
@pytest.mark.parametrize("size", [20 * READ_CHUNK_BYTES + 12_345, 16 * READ_CHUNK_BYTES])
async def test_bytes_written_read_back_whole_and_from_any_offset(
    blobs: BlobStore, size: int
) -> None:
    data = os.urandom(size)
    ref, existed = await put(blobs, data, chunk=70_001)
    assert ref == ref_of(data) and not existed
    assert await blobs.stat(ref.digest) == ref
    assert await read_all(blobs, ref.digest) == data
    chunks = [chunk async for chunk in blobs.read(ref.digest)]
    assert max(len(chunk) for chunk in chunks) <= READ_CHUNK_BYTES
    assert sum(len(chunk) for chunk in chunks) == len(data)
    offsets = (1, 69_999, 70_001, READ_CHUNK_BYTES, 9 * READ_CHUNK_BYTES + 1, len(data) - 1)
    for offset in (*offsets, len(data)):
        assert await read_all(blobs, ref.digest, offset) == data[offset:]


async def test_the_same_bytes_are_stored_once(blobs: BlobStore) -> None:
    data = b"the same bytes" * 1_000
    first, existed_first = await put(blobs, data)
    second, existed_second = await put(blobs, data, chunk=7)
    assert first == second and not existed_first and existed_second
    assert await read_all(blobs, first.digest) == data


async def test_an_empty_payload_is_a_payload(blobs: BlobStore) -> None:
    ref, _ = await put(blobs, b"")
    assert ref == ref_of(b"") and await blobs.stat(ref.digest) == ref
    assert await read_all(blobs, ref.digest) == b""


async def test_a_mismatch_or_an_abort_keeps_nothing(blobs: BlobStore) -> None:
    data = os.urandom(50_000)
    writer = blobs.writer()
    await writer.write(data)
    with pytest.raises(DigestMismatch):
        await writer.commit(ref_of(data + b"x"))
    assert await blobs.stat(ref_of(data).digest) is None
    assert await blobs.stat(ref_of(data + b"x").digest) is None
    cut = blobs.writer()
    await cut.write(data[:10_000])
    await cut.abort()
    assert await blobs.stat(ref_of(data[:10_000]).digest) is None
    # Neither left anything that a later, whole upload of the same bytes trips over.
    ref, existed = await put(blobs, data)
    assert not existed and await read_all(blobs, ref.digest) == data


async def test_an_unknown_digest_has_no_stat(blobs: BlobStore) -> None:
    assert await blobs.stat("0" * 64) is None


async def test_stat_many_answers_the_stored_ones_of_many_digests(blobs: BlobStore) -> None:
    stored = [(await put(blobs, f"many {n}".encode() * n))[0] for n in range(3)]
    unknown = ["0" * 64, "f" * 64]
    asked = [ref.digest for ref in stored] + unknown
    assert await blobs.stat_many(asked) == {ref.digest: ref for ref in stored}
    assert await blobs.stat_many(unknown) == {}
    assert await blobs.stat_many([]) == {}


async def test_idle_payloads_are_listed_in_digest_order_and_a_new_upload_makes_one_fresh(
    blobs: BlobStore,
) -> None:
    refs = [(await put(blobs, f"idle {n}".encode()))[0] for n in range(5)]
    refs.sort(key=lambda ref: ref.digest)
    between = time.time_ns()
    again, existed = await put(blobs, b"idle 2")
    assert existed
    listed = await blobs.idle_payloads(between, "", 100)
    assert listed == sorted(r.digest for r in refs if r != again)
    assert await blobs.idle_payloads(time.time_ns(), "", 100) == sorted(r.digest for r in refs)
    first_two = await blobs.idle_payloads(time.time_ns(), "", 2)
    assert first_two == [r.digest for r in refs[:2]]
    rest = await blobs.idle_payloads(time.time_ns(), first_two[-1], 100)
    assert rest == [r.digest for r in refs[2:]]
    assert await blobs.idle_payloads(0, "", 100) == []  # nothing is that old
