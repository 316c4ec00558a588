"""Fixtures: a real Task Manager on a free local port, on each backend in turn.

Every test that takes `database` (or a fixture built on it: `server`, `clocked`, `stub`,
`client`) runs once per backend: a temp SQLite file, and a fresh database on the private
PostgreSQL server the session starts (tests/postgres_fixture.py).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import pytest

from agent_kit import OperatorClient
from task_manager.cli import environment_variable
from task_manager.clock import ManualClock
from task_manager.server import TaskManagerServer
from tests.event_loops import SuiteEventLoop
from tests.helpers import LOG_DIR_VARIABLE, AsyncStub, Databases, server_settings

pytest_plugins = ["tests.postgres_fixture"]

BACKENDS = ("sqlite", "postgresql")
HTTP_LISTEN_VARIABLE = environment_variable("--http-listen")


@pytest.fixture(scope="session")
def anyio_backend() -> tuple[str, dict[str, Any]]:
    return "asyncio", {"loop_factory": SuiteEventLoop}


@pytest.fixture(scope="session", autouse=True)
def _server_logs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    os.environ[LOG_DIR_VARIABLE] = str(tmp_path_factory.mktemp("server-logs"))
    yield
    del os.environ[LOG_DIR_VARIABLE]


@pytest.fixture(scope="session", autouse=True)
def _http_on_free_ports() -> Iterator[None]:
    """Servers the tests start as processes put their HTTP front on a free port, not on
    the default 8080 (another server, or a user's own, may hold it)."""
    os.environ[HTTP_LISTEN_VARIABLE] = "127.0.0.1:0"
    yield
    del os.environ[HTTP_LISTEN_VARIABLE]


@pytest.fixture(scope="session", params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """The store backend the test runs on."""
    param: str = request.param
    return param


@pytest.fixture(scope="session")
def databases(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Databases:
    return Databases(request, tmp_path_factory)


@pytest.fixture
def database(backend: str, databases: Databases) -> Iterator[str]:
    """A new, empty database on the backend under test."""
    target = databases.new(backend)
    yield target
    databases.drop(target)


@pytest.fixture
async def server(database: str) -> AsyncIterator[TaskManagerServer]:
    running = await TaskManagerServer.start(server_settings(database))
    yield running
    await running.stop()


@pytest.fixture
async def clocked(database: str) -> AsyncIterator[tuple[TaskManagerServer, ManualClock]]:
    """A server whose time moves only when the test advances the clock."""
    clock = ManualClock()
    running = await TaskManagerServer.start(server_settings(database), clock)
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
