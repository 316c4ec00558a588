"""Collects payloads no task refers to, once they have been idle for a grace period:
uploads never used (a client that went away between its upload and its create), and
bytes uploaded for a create that was refused.

A payload lives while a task that refers to it is kept (tasks are kept for good), so
only never-referenced payloads are collected. The grace gives a client time from its
upload to the create or attach that refers to it; the store makes the race between a
collection and such a reference safe either way (WriteTransaction.collect_payload).
Each replica may run one: two collecting the same payload is no harm. Pure Python.
"""

from __future__ import annotations

import asyncio
import logging
import time
from functools import partial

from storage.base import Store, WriteTransaction
from storage.blobs import BlobStore

log = logging.getLogger(__name__)

BATCH = 1_000
"""Candidates read at a time, in digest order."""


def _collect(digest: str, idle_before_ns: int, tx: WriteTransaction) -> bool:
    return tx.collect_payload(digest, idle_before_ns)


class PayloadCollector:
    def __init__(self, store: Store, blobs: BlobStore, grace_s: float, sweep_s: float) -> None:
        self._store = store
        self._blobs = blobs
        self._grace_ns = int(grace_s * 1e9)
        self._sweep_s = sweep_s

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._sweep_s)
            try:
                collected = await self.collect()
            except Exception:
                log.exception("collecting unreferenced payloads failed; trying again later")
                continue
            if collected:
                log.info("collected %d unreferenced payloads", collected)

    async def collect(self) -> int:
        """One pass: deletes every payload no task refers to that has been idle for the
        grace period; answers how many it deleted."""
        # Payload ages are on the wall clock (file times, the database's clock), not the
        # task manager's clock.
        idle_before_ns = time.time_ns() - self._grace_ns
        collected = 0
        after = ""
        while True:
            candidates = await self._blobs.idle_payloads(idle_before_ns, after, BATCH)
            for digest in candidates:
                if await self._store.write(partial(_collect, digest, idle_before_ns)):
                    collected += 1
            if len(candidates) < BATCH:
                return collected
            after = candidates[-1]
