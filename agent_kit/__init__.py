"""Client SDKs for the Task Manager.

- `Agent`: runs your async handler for each task sent to an agent entity; reports,
  versions, duplicates, cancellation and reconnects are handled for you.
- `OperatorClient` (async) and `SyncOperatorClient`: create (with a `TaskPolicy`), query,
  update, cancel, complete, watch, wait, and list agents.
"""

from agent_kit._agent import Agent, AgentError, Handler, TaskContext
from agent_kit._backoff import Backoff
from agent_kit._grpc import ClientAuth
from agent_kit._operator import (
    DefinitionConflict,
    OperatorClient,
    SyncOperatorClient,
    TaskPolicy,
    WaitTimeout,
    assignee,
)
from agent_kit._payloads import PayloadSource, task_outputs

__all__ = [
    "Agent",
    "AgentError",
    "Backoff",
    "ClientAuth",
    "DefinitionConflict",
    "Handler",
    "OperatorClient",
    "PayloadSource",
    "SyncOperatorClient",
    "TaskContext",
    "TaskPolicy",
    "WaitTimeout",
    "assignee",
    "task_outputs",
]
