"""The Task Manager: a gRPC gateway that hands tasks to agents and tracks their status.

Layers, outside in: server.py (process) -> service.py (gRPC) -> lifecycle.py (rules)
-> storage (the durable store). dispatch.py routes committed changes to agent streams.
"""

__version__ = "0.1.0"
"""The version of the distribution (agent-task-gateway): pyproject.toml reads it here."""
