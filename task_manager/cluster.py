"""This replica among the others serving one database.

Each replica records which agents it has streams open for, with a lease it renews
every refresh (storage: agent_streams). From those rows every replica knows which
agents are connected anywhere (ListAgents, lost agents), and any replica can tell that
a pool task's member has no stream left on any live replica: its replica closed the
stream or died. Such a task is handed back to its pool. A dead replica's leases lapse
after replica_lease_s (timed by the database's clock, which every replica reads), so
its pool tasks move on within replica_lease_s plus one refresh; a late write from it
fails the compare-and-set, as the task moved on. A replica hands nothing back until
replica_lease_s after it joined: the members of its predecessor (on SQLite, the same
server before a restart) get that long to reconnect.

The replicas also record that they are up (each renews its own row every refresh), so
a replica joining can tell a rolling restart (another renewed within two refreshes: the
gateway stayed up, agents could report to the others) from a start of the whole gateway
(none did: it was down). The restart grace is measured from when the gateway came up.

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

from storage.base import Store, Uptime, WriteTransaction
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
        self.up_since_ns = clock.now_ns()
        """When the gateway last came up, on this process's clock (set by join)."""
        self._sweep_from_ns = 0
        """When orphaned pool tasks start to be handed back, on the database's clock."""

    async def join(self) -> None:
        """At start, in one write: records this replica as up, and learns since when the
        gateway has been up. On a database no other server writes, the gateway comes up
        now, and the leases left by this server's predecessor are void at once (not after
        they lapse). With other servers, it came up now only if none of them renewed
        within two refreshes (it was down); else this is a rolling restart, and the
        gateway keeps the time it came up. So a lone replica that dies and is restarted
        within two refreshes finds the gateway still up (no new restart grace); one that
        stopped cleanly has left, and its restart brings the gateway up again."""
        replica_id, shared = self.replica_id, self._store.shared
        down_after_ns = 2 * self._refresh_ns if shared else None

        def join(tx: WriteTransaction) -> Uptime:
            if not shared:
                tx.forget_other_replicas(replica_id)
            return tx.join_cluster(replica_id, down_after_ns)

        uptime = await self._store.write(join)
        # The database's clock may differ from this process's (and a test's clock is
        # its own): what carries over is how long ago the gateway came up.
        self.up_since_ns = self._clock.now_ns() - (uptime.now_ns - uptime.up_since_ns)
        self._sweep_from_ns = uptime.now_ns + self._lease_ns

    async def leave(self) -> None:
        """At a clean stop: this replica no longer counts as up, so if it was the last,
        the next to start brings the gateway up again (with a restart grace)."""
        replica_id = self.replica_id
        await self._store.write(lambda tx: tx.leave_cluster(replica_id))

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
        back the pool tasks whose member no live replica has a stream for.

        The hand-back starts a lease after join: a member whose stream was on this
        server's predecessor (its lease voided at join on SQLite, lapsing on PostgreSQL)
        has that long to reconnect and be sent its task again, not see it go to another
        member."""
        local = self._presence.local_entity_ids()
        replica_id, lease_ns = self.replica_id, self._lease_ns

        def renew(tx: WriteTransaction) -> int:
            tx.renew_streams(replica_id, local, lease_ns)
            return tx.renew_replica(replica_id)

        now_ns = await self._store.write(renew)
        streams = await self._store.live_streams()
        remote = Counter(entity for entity, replica in streams if replica != replica_id)
        self._presence.update_cluster(await self._store.seen_agents(), remote)
        if now_ns >= self._sweep_from_ns:
            for task in await self._store.orphaned_pool_tasks(ORPHANS_PER_SWEEP):
                self._dispatcher.hand_back(task)
        self.refreshes += 1


def _log_failure(future: asyncio.Future[None]) -> None:
    if not future.cancelled() and (error := future.exception()) is not None:
        log.warning("recording agent presence failed: %s", error)
