"""Agent presence: which entity ids have listened, which are connected, which are lost.

Pure bookkeeping on a clock. The open streams are counted here as they open and close;
first and last seen are also stored (the servicer writes them), so a restarted server
still lists every agent it ever saw.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from storage.base import SeenAgent
from task_manager.clock import timestamp
from task_manager.v1.task_manager_pb2 import AgentPresence, AgentState

HELD_TASK_IDS_LISTED = 100
"""An agent's held tasks listed by id at most; all are counted."""


@dataclass
class _Agent:
    first_seen_ns: int
    last_seen_ns: int
    streams: int = 0


class Presence:
    def __init__(self, lost_after_ns: int) -> None:
        self._lost_after_ns = lost_after_ns
        self._agents: dict[str, _Agent] = {}

    def load(self, seen: Iterable[SeenAgent]) -> None:
        """What the store remembers from before this server started."""
        for agent in seen:
            self._agents[agent.entity_id] = _Agent(agent.first_seen_ns, agent.last_seen_ns)

    def opened(self, entity_ids: Iterable[str], now_ns: int) -> None:
        for entity_id in entity_ids:
            agent = self._agents.setdefault(entity_id, _Agent(now_ns, now_ns))
            agent.streams += 1
            agent.last_seen_ns = now_ns

    def closed(self, entity_ids: Iterable[str], now_ns: int) -> None:
        for entity_id in entity_ids:
            agent = self._agents[entity_id]
            agent.streams -= 1
            agent.last_seen_ns = now_ns

    def lost(self, now_ns: int) -> list[tuple[str, int]]:
        """The agents LOST at now_ns, each with the moment it became LOST, by entity id."""
        return sorted(
            (entity_id, agent.last_seen_ns + self._lost_after_ns)
            for entity_id, agent in self._agents.items()
            if agent.streams == 0 and now_ns - agent.last_seen_ns >= self._lost_after_ns
        )

    def known(self, entity_ids: Iterable[str] = ()) -> list[str]:
        """The entity ids asked for that have been seen (all of them if none is asked for),
        sorted."""
        wanted = set(entity_ids)
        return sorted(e for e in self._agents if not wanted or e in wanted)

    def describe(self, entity_id: str, held_task_ids: Sequence[str], now_ns: int) -> AgentPresence:
        agent = self._agents[entity_id]
        if agent.streams > 0:
            state, last_seen_ns = AgentState.AGENT_STATE_CONNECTED, now_ns
        elif now_ns - agent.last_seen_ns >= self._lost_after_ns:
            state, last_seen_ns = AgentState.AGENT_STATE_LOST, agent.last_seen_ns
        else:
            state, last_seen_ns = AgentState.AGENT_STATE_DISCONNECTED, agent.last_seen_ns
        return AgentPresence(
            entity_id=entity_id,
            state=state,
            streams_open=agent.streams,
            first_seen=timestamp(agent.first_seen_ns),
            last_seen=timestamp(last_seen_ns),
            tasks_in_flight=len(held_task_ids),
            held_task_ids=held_task_ids[:HELD_TASK_IDS_LISTED],
        )
