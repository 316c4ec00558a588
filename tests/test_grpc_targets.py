"""Targets as users type them: a host alone means the default port, IPv6 literals too.

One function (agent_kit._grpc.target_with_port) serves the Agent, the operator clients and taskctl.
"""

from __future__ import annotations

import threading

import pytest

from agent_kit import Agent, OperatorClient, SyncOperatorClient, TaskContext
from agent_kit._grpc import DEFAULT_PORT, target_with_port
from task_manager.config import DEFAULT_LISTEN


@pytest.mark.parametrize(
    ("typed", "meant"),
    [
        ("localhost", f"localhost:{DEFAULT_PORT}"),
        ("10.0.0.7", f"10.0.0.7:{DEFAULT_PORT}"),
        ("gateway.example:7000", "gateway.example:7000"),
        ("[::1]", f"[::1]:{DEFAULT_PORT}"),
        ("[::1]:7000", "[::1]:7000"),
        ("::1", f"[::1]:{DEFAULT_PORT}"),
        ("dns:///gateway.example:7000", "dns:///gateway.example:7000"),
        ("unix:/run/task-manager.sock", "unix:/run/task-manager.sock"),
    ],
)
def test_a_target_without_a_port_gets_the_default_port(typed: str, meant: str) -> None:
    assert target_with_port(typed) == meant


def test_the_default_port_is_the_one_the_server_listens_on() -> None:
    assert DEFAULT_LISTEN.rsplit(":", 1)[1] == str(DEFAULT_PORT)


@pytest.mark.parametrize(
    "typed", ["", ":7000", "host:", "host:http", "host:0", "host:70000", "[::1"]
)
def test_a_malformed_target_is_refused_with_what_was_wrong(typed: str) -> None:
    with pytest.raises(ValueError, match="malformed target"):
        target_with_port(typed)


@pytest.mark.anyio
async def test_the_agent_and_the_async_client_refuse_a_malformed_target() -> None:
    async def handler(task: TaskContext) -> None:
        return None

    with pytest.raises(ValueError, match="malformed target"):
        await Agent("gateway:http", "drone-1", handler).run()
    with pytest.raises(ValueError, match="malformed target"):
        OperatorClient("gateway:http")


def test_the_sync_client_refuses_a_malformed_target_and_leaves_no_thread() -> None:
    before = threading.active_count()
    with pytest.raises(ValueError, match="malformed target"):
        SyncOperatorClient("gateway:http")
    assert threading.active_count() == before
