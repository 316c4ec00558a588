"""Test helpers: builders for requests, and a real server in a subprocess.

Everything here talks to a real Task Manager over real gRPC; nothing is mocked.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, TypeVar

import aiohttp
import anyio
import grpc
import psycopg
import pytest

from agent_kit import Agent, ClientAuth
from agent_kit._grpc import AsyncStub as AsyncStub
from agent_kit._grpc import open_stub
from devtools.private_postgres import PrivatePostgres
from storage import add_credential
from storage.base import Credential
from task_manager.auth import Role, new_token
from task_manager.config import HTTP_OFF, Settings
from task_manager.v1 import task_manager_pb2 as pb

if TYPE_CHECKING:
    from task_manager.server import TaskManagerServer

T = TypeVar("T")
REPO_ROOT = Path(__file__).resolve().parent.parent


def agent(entity_id: str) -> pb.Principal:
    return pb.Principal(system=pb.System(entity_id=entity_id))


def create_request(
    entity_id: str | None = "agent-1", task_id: str = "", **fields: object
) -> pb.CreateTaskRequest:
    fields = {"display_name": "test task", **fields}
    request = pb.CreateTaskRequest(task_id=task_id, **fields)  # type: ignore[arg-type]
    if entity_id is not None:
        request.relations.assignee.CopyFrom(agent(entity_id))
    return request


def status_update(
    task: pb.Task, status: pb.Status.ValueType, version: int | None = None, **status_fields: object
) -> pb.UpdateStatusRequest:
    """An update of task to status, based on the version given (default: the task's)."""
    return pb.UpdateStatusRequest(
        status_update=pb.StatusUpdate(
            version=pb.TaskVersion(
                task_id=task.version.task_id,
                status_version=task.version.status_version if version is None else version,
            ),
            status=pb.TaskStatus(status=status, **status_fields),  # type: ignore[arg-type]
            author=agent(task.relations.assignee.system.entity_id or "someone"),
        )
    )


def token_for(
    db: str, principal: str, role: Role, *entities: str, scopes: Sequence[str] = ()
) -> tuple[Credential, str]:
    """A new bearer token, stored in db (a server reads it at start, or within a second)."""
    credential, token = new_token(principal, role, entities, time.time_ns(), scopes)
    add_credential(db, credential)
    return credential, token


def stub_for(channel: grpc.aio.Channel, token: str | None) -> AsyncStub:
    return open_stub(channel, ClientAuth(token=token))


def trailer(error: grpc.aio.AioRpcError, key: str) -> str | None:
    """A trailing metadata value of a failed call."""
    # aio gives (key, value) pairs; grpc-stubs types them as objects with .key/.value.
    pairs: Iterable[tuple[str, str]] = error.trailing_metadata() or ()  # type: ignore[assignment]
    return dict(pairs).get(key)


def http_session(server: TaskManagerServer) -> aiohttp.ClientSession:
    """A client of server's HTTP front: paths are relative to its root URL."""
    return aiohttp.ClientSession(base_url=server.http_url)


@asynccontextmanager
async def running(agent: Agent, connect_within_s: float = 30.0) -> AsyncIterator[Agent]:
    """The agent runs, and is connected, for the block; stopped when it ends."""
    async with anyio.create_task_group() as group:
        group.start_soon(agent.run)
        with anyio.fail_after(connect_within_s):
            await agent.wait_connected()
        yield agent
        agent.stop()


class Databases:
    """Makes new, empty databases of either backend."""

    def __init__(self, request: pytest.FixtureRequest, tmp: pytest.TempPathFactory) -> None:
        self._request = request
        self._tmp = tmp

    def new(self, backend: str) -> str:
        """A new database's target (`--db`): an SQLite path or a postgresql:// URL."""
        if backend == "sqlite":
            return str(self._tmp.mktemp("db") / "tasks.db")
        if backend == "postgresql":
            return self._postgres().create_database()
        raise AssertionError(f"no such backend: {backend}")

    def drop(self, target: str) -> None:
        """Frees a database made by new() (a temp SQLite file goes with the session)."""
        if target.startswith("postgresql://"):
            self._postgres().drop_database(target.rsplit("/", 1)[1])

    def _postgres(self) -> PrivatePostgres:
        # Asked for only here: a run on SQLite alone starts no PostgreSQL.
        server: PrivatePostgres = self._request.getfixturevalue("private_postgres")
        return server


def assert_store_consistent(db: str) -> None:
    """The database is sound: SQLite's own integrity check passes, and on either backend
    history holds every revision from the compacted one to the newest, once, and every
    task has its creation cursor."""
    if db.startswith("postgresql://"):
        conn: Any = psycopg.connect(db)
    else:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    try:
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        revisions = [row[0] for row in conn.execute("SELECT revision FROM history ORDER BY 1")]
        expected = list(range(meta["compacted_revision"] + 1, meta["revision"] + 1))
        assert revisions == expected, "history has a gap or a duplicate"
        assert conn.execute("SELECT COUNT(*) FROM tasks WHERE cursor IS NULL").fetchone()[0] == 0
    finally:
        conn.close()


def server_settings(database: str, **options: object) -> Settings:
    """Settings for a test's server: a free port, a short shutdown grace, the options."""
    merged: dict[str, object] = {
        "listen": "127.0.0.1:0",
        "http_listen": "127.0.0.1:0",
        "shutdown_grace_s": 1.0,
        **options,
    }
    return Settings(db=database, **merged)  # type: ignore[arg-type]


def wait_until(condition: Callable[[], T | None], timeout: float = 20.0, what: str = "") -> T:
    """Polls condition until it returns something other than None/False, or fails."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or condition}")
        time.sleep(0.02)


def _log_path_for(db: str) -> Path:
    """Beside an SQLite file; for a URL, a new file where the test session keeps logs."""
    if not db.startswith("postgresql://"):
        return Path(db + ".server.log")
    handle, name = tempfile.mkstemp(
        prefix="server-", suffix=".log", dir=os.environ.get(LOG_DIR_VARIABLE)
    )
    os.close(handle)
    return Path(name)


LOG_DIR_VARIABLE = "TASK_MANAGER_TEST_LOGS"
"""Where server processes of a database URL log (set by conftest.py to a temp dir)."""


class ServerProcess:
    """`task-manager serve` as a child process on a free port, for crash and restart tests."""

    def __init__(
        self, db: str, port: int = 0, options: Sequence[str] = (), wrapper: Sequence[str] = ()
    ) -> None:
        self.db = db
        """An SQLite file or a postgresql:// URL (the `database` fixture makes either)."""
        self.port = port
        self.options = options
        """More `task-manager serve` options."""
        self.wrapper = wrapper
        """A command that runs the server's command (its arguments follow) and execs it,
        so the process is still the server's: e.g. one setting up a namespace first."""
        self.process: subprocess.Popen[str] | None = None
        self.address = ""
        self.http_url = ""
        """The HTTP front's root URL (http://127.0.0.1:PORT/), unless --http-listen off."""
        self.log_path = _log_path_for(db)

    def start(self, timeout: float = 60.0) -> ServerProcess:
        self.process = subprocess.Popen(
            [
                *self.wrapper,
                sys.executable,
                "-m",
                "task_manager",
                "serve",
                "--listen",
                f"127.0.0.1:{self.port}",
                "--db",
                self.db,
                *self.options,
            ],
            stdout=subprocess.PIPE,
            # A file, not a pipe: nobody reads the log while the server runs, and a full
            # pipe would block its logging.
            stderr=self._log(),
            text=True,
            cwd=REPO_ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()  # blocks until serving, or exit
        if not line.startswith("task-manager: serving on "):
            self.process.wait(timeout)
            self._close_pipes()
            raise AssertionError(f"server did not start: {line!r}: {self.log_text()}")
        self.address = line.rsplit(" ", 1)[1].strip()
        self.port = int(self.address.rsplit(":", 1)[1])
        options = list(self.options)
        http_off = (
            "--http-listen" in options and HTTP_OFF in options[options.index("--http-listen") :][:2]
        )
        if not http_off:  # the HTTP front is on: its line follows
            http_line = self.process.stdout.readline()
            assert http_line.startswith("task-manager: HTTP on "), http_line
            self.http_url = http_line.split()[3]
        channel = grpc.insecure_channel(self.address)
        grpc.channel_ready_future(channel).result(timeout=timeout)
        channel.close()
        return self

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, as in a crash."""
        assert self.process is not None
        self.process.kill()
        self.process.wait(30)
        self._close_pipes()

    def terminate(self, timeout: float = 30.0) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout)
        self._close_pipes()
        return code

    def log_text(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def _log(self) -> IO[str]:
        self._log_file = self.log_path.open("a")
        return self._log_file

    def _close_pipes(self) -> None:
        assert self.process is not None
        if self.process.stdout is not None:
            self.process.stdout.close()
        self._log_file.close()


async def sse_events(response: aiohttp.ClientResponse) -> AsyncGenerator[dict[str, Any], None]:
    """The events of a Server-Sent Events answer, as {"id"?, "event", "data" (parsed
    JSON)}; comment lines (keep-alives) left out."""
    event: dict[str, Any] = {}
    async for raw_line in response.content:
        line = raw_line.decode().rstrip("\n")
        if not line:
            if event:
                yield event
            event = {}
            continue
        if line.startswith(":"):
            continue
        key, _, value = line.partition(": ")
        event[key] = json.loads(value) if key == "data" else value
