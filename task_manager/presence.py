"""Agent presence: which entity ids have listened, which are connected, which are lost.

Pure bookkeeping on a clock. This replica's open streams are counted here as they open
and close; first and last seen are also stored, with this replica's stream leases
(task_manager/cluster.py), so a restarted server still lists every agent it ever saw,
and every replica sees the agents connected to the others.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from storage.base import SeenAgent
from task_manager.clock import timestamp
from task_manager.task_types import TypeKey
from task_manager.v1.task_manager_pb2 import AgentPresence, AgentState, TaskTypeRef

HELD_TASK_IDS_LISTED = 100
"""An agent's held tasks listed by id at most; all are counted."""


@dataclass
class _Agent:
    first_seen_ns: int
    last_seen_ns: int
    streams: int = 0
    """Open here."""
    remote_streams: int = 0
    """Open on other replicas (as of the last cluster refresh): one per replica."""
    task_types: Counter[TypeKey] = field(default_factory=Counter)
    """Declared by its streams open here, each counted once per stream."""

    @property
    def connected(self) -> bool:
        return self.streams + self.remote_streams > 0


class Presence:
    def __init__(self, lost_after_ns: int) -> None:
        self._lost_after_ns = lost_after_ns
        self._agents: dict[str, _Agent] = {}

    def load(self, seen: Iterable[SeenAgent]) -> None:
        """What the store remembers from before this server started."""
        for agent in seen:
            self._agents[agent.entity_id] = _Agent(agent.first_seen_ns, agent.last_seen_ns)

    def opened(
        self, entity_ids: Iterable[str], now_ns: int, task_types: Iterable[TypeKey] = ()
    ) -> None:
        declared = Counter(task_types)
        for entity_id in entity_ids:
            agent = self._agents.setdefault(entity_id, _Agent(now_ns, now_ns))
            agent.streams += 1
            agent.last_seen_ns = now_ns
            agent.task_types.update(declared)

    def closed(
        self, entity_ids: Iterable[str], now_ns: int, task_types: Iterable[TypeKey] = ()
    ) -> None:
        declared = Counter(task_types)
        for entity_id in entity_ids:
            agent = self._agents[entity_id]
            agent.streams -= 1
            agent.last_seen_ns = now_ns
            agent.task_types.subtract(declared)
            agent.task_types = +agent.task_types  # drops those no stream declares now

    def update_cluster(self, seen: Iterable[SeenAgent], remote_streams: Mapping[str, int]) -> None:
        """What the database says of every replica's agents: first and last seen, and the
        streams other replicas hold."""
        for stored in seen:
            agent = self._agents.setdefault(
                stored.entity_id, _Agent(stored.first_seen_ns, stored.last_seen_ns)
            )
            agent.first_seen_ns = min(agent.first_seen_ns, stored.first_seen_ns)
            agent.last_seen_ns = max(agent.last_seen_ns, stored.last_seen_ns)
        for entity_id, agent in self._agents.items():
            agent.remote_streams = remote_streams.get(entity_id, 0)

    def local_entity_ids(self) -> list[str]:
        """The agents with a stream open here, sorted."""
        return sorted(e for e, agent in self._agents.items() if agent.streams > 0)

    def lost(self, now_ns: int) -> list[tuple[str, int]]:
        """The agents LOST at now_ns, each with the moment it became LOST, by entity id."""
        return sorted(
            (entity_id, agent.last_seen_ns + self._lost_after_ns)
            for entity_id, agent in self._agents.items()
            if not agent.connected and now_ns - agent.last_seen_ns >= self._lost_after_ns
        )

    def known(self, entity_ids: Iterable[str] = ()) -> list[str]:
        """The entity ids asked for that have been seen (all of them if none is asked for),
        sorted."""
        wanted = set(entity_ids)
        return sorted(e for e in self._agents if not wanted or e in wanted)

    def describe(self, entity_id: str, held_task_ids: Sequence[str], now_ns: int) -> AgentPresence:
        agent = self._agents[entity_id]
        if agent.connected:
            state, last_seen_ns = AgentState.AGENT_STATE_CONNECTED, now_ns
        elif now_ns - agent.last_seen_ns >= self._lost_after_ns:
            state, last_seen_ns = AgentState.AGENT_STATE_LOST, agent.last_seen_ns
        else:
            state, last_seen_ns = AgentState.AGENT_STATE_DISCONNECTED, agent.last_seen_ns
        return AgentPresence(
            entity_id=entity_id,
            state=state,
            streams_open=agent.streams + agent.remote_streams,
            first_seen=timestamp(agent.first_seen_ns),
            last_seen=timestamp(last_seen_ns),
            tasks_in_flight=len(held_task_ids),
            held_task_ids=held_task_ids[:HELD_TASK_IDS_LISTED],
            task_types=[
                TaskTypeRef(name=name, version=version)
                for name, version in sorted(agent.task_types)
            ],
        )
