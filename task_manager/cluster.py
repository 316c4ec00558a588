"""This replica among the others serving one database.

Each replica records which agents it has streams open for, with a lease it renews
every refresh (storage: agent_streams). From those rows every replica knows which
agents are connected anywhere (ListAgents, lost agents), and any replica can tell that
a pool task's member has no stream left on any live replica: its replica closed the
stream or died. Such a task is handed back to its pool. A dead replica's leases lapse
after replica_lease_s (timed by the database's clock, which every replica reads), so
its pool tasks move on within replica_lease_s plus one refresh; a late write from it
fails the compare-and-set, as the task moved on.

On SQLite there is one replica, and the same code runs with no others to see.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid
from collections import Counter
from collections.abc import Collection

from storage.base import Store, WriteTransaction
from task_manager.clock import Clock, sleep_until
from task_manager.dispatch import Dispatcher
from task_manager.presence import Presence

log = logging.getLogger(__name__)

ORPHANS_PER_SWEEP = 1_000


def new_replica_id() -> str:
    """Unique per process: the host and pid say which one it is, the suffix tells a
    restarted process from its predecessor."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class Cluster:
    def __init__(
        self,
        store: Store,
        presence: Presence,
        dispatcher: Dispatcher,
        clock: Clock,
        lease_ns: int,
        refresh_ns: int,
    ) -> None:
        self.replica_id = new_replica_id()
        self._store = store
        self._presence = presence
        self._dispatcher = dispatcher
        self._clock = clock
        self._lease_ns = lease_ns
        self._refresh_ns = refresh_ns
        self.refreshes = 0

    async def join(self) -> None:
        """At start: on a database no other server writes, the leases left by this
        server's predecessor are void at once (not after they lapse)."""
        if not self._store.shared:
            replica_id = self.replica_id
            await self._store.write(lambda tx: tx.forget_other_replicas(replica_id))

    def streams_changed(self, entity_ids: Collection[str], now_ns: int) -> None:
        """A stream for these agents opened or closed here (Presence already counts it):
        records them as seen now, and this replica's leases as they stand. Submitted at
        once, so an agent's lease commits before any pool task is handed to it."""
        local = self._presence.local_entity_ids()
        replica_id, lease_ns = self.replica_id, self._lease_ns

        def record(tx: WriteTransaction) -> None:
            for entity_id in entity_ids:
                tx.agent_seen(entity_id, now_ns)
            tx.renew_streams(replica_id, local, lease_ns)

        # Not awaited: presence is bookkeeping, and a stream must not wait on the disk.
        self._store.submit(record).add_done_callback(_log_failure)

    async def run(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception:
                log.exception("refreshing this replica's leases failed; trying again")
            await sleep_until(self._clock, self._clock.now_ns() + self._refresh_ns)

    async def refresh(self) -> None:
        """Renews this replica's leases, learns the other replicas' streams, and hands
        back the pool tasks whose member no live replica has a stream for."""
        local = self._presence.local_entity_ids()
        replica_id, lease_ns = self.replica_id, self._lease_ns
        await self._store.write(lambda tx: tx.renew_streams(replica_id, local, lease_ns))
        streams = await self._store.live_streams()
        remote = Counter(entity for entity, replica in streams if replica != replica_id)
        self._presence.update_cluster(await self._store.seen_agents(), remote)
        for task in await self._store.orphaned_pool_tasks(ORPHANS_PER_SWEEP):
            self._dispatcher.hand_back(task)
        self.refreshes += 1


def _log_failure(future: asyncio.Future[None]) -> None:
    if not future.cancelled() and (error := future.exception()) is not None:
        log.warning("recording agent presence failed: %s", error)
