"""Fixtures: a real Task Manager on a free local port with a temp SQLite file."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from agent_kit import OperatorClient
from task_manager.clock import ManualClock
from task_manager.config import Settings
from task_manager.server import TaskManagerServer
from tests.helpers import AsyncStub


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[TaskManagerServer]:
    running = await TaskManagerServer.start(
        Settings(listen="127.0.0.1:0", db=tmp_path / "tasks.db", shutdown_grace_s=1.0)
    )
    yield running
    await running.stop()


@pytest.fixture
async def clocked(tmp_path: Path) -> AsyncIterator[tuple[TaskManagerServer, ManualClock]]:
    """A server whose time moves only when the test advances the clock."""
    clock = ManualClock()
    running = await TaskManagerServer.start(
        Settings(listen="127.0.0.1:0", db=tmp_path / "tasks.db", shutdown_grace_s=1.0), clock
    )
    yield running, clock
    await running.stop()


@pytest.fixture
async def channel(server: TaskManagerServer) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(server.address) as open_channel:
        yield open_channel


@pytest.fixture
def stub(channel: grpc.aio.Channel) -> AsyncStub:
    return AsyncStub(channel)


@pytest.fixture
async def client(server: TaskManagerServer) -> AsyncIterator[OperatorClient]:
    """An operator client of the server fixture's server."""
    async with OperatorClient(server.address) as operator:
        yield operator
