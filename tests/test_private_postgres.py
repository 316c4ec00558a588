"""The private PostgreSQL harness itself (devtools/private_postgres.py): real servers,
real connections, and no server process outliving its owner."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest

from devtools.private_postgres import PostgresNotFound, PostgresStartError, PrivatePostgres
from tests.helpers import REPO_ROOT

# The harness's own tests run with or without tests/conftest.py registering the plugin.


def alive(pid: int) -> bool:
    """Whether the process runs: a zombie (exited, not yet reaped by init) does not."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):  # gone, before the open or the read
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def wait_until_gone(pids: set[int], timeout_s: float = 20.0) -> set[int]:
    """The pids still alive at the deadline (polled, so an early end returns at once)."""
    deadline = time.monotonic() + timeout_s
    while (left := {pid for pid in pids if alive(pid)}) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def server_pids(url: str) -> set[int]:
    """The postmaster and every process it runs (backends, checkpointer, walwriter, ...)."""
    with psycopg.connect(url) as connection:
        rows = connection.execute("SELECT pid FROM pg_stat_activity").fetchall()
        data_dir = connection.execute("SHOW data_directory").fetchone()
    assert data_dir is not None
    postmaster = int((Path(data_dir[0]) / "postmaster.pid").read_text().split()[0])
    return {postmaster, *(row[0] for row in rows)}


def test_a_query_runs_in_the_fresh_database_the_url_names(postgres_url: str) -> None:
    with psycopg.connect(postgres_url) as connection:
        row = connection.execute(
            "SELECT current_database(), pg_encoding_to_char(encoding), 6 * 7"
            " FROM pg_database WHERE datname = current_database()"
        ).fetchone()
    assert row == (postgres_url.rpartition("/")[2], "UTF8", 42)


def test_two_databases_are_independent(private_postgres: PrivatePostgres) -> None:
    first, second = private_postgres.create_database(), private_postgres.create_database()
    with psycopg.connect(first) as connection:
        connection.execute("CREATE TABLE tasks (task_id text PRIMARY KEY)")
        connection.execute("INSERT INTO tasks VALUES ('t-1')")
    with psycopg.connect(second) as connection:
        found = connection.execute("SELECT to_regclass('tasks')").fetchone()
    assert found == (None,)
    for url in (first, second):
        private_postgres.drop_database(url.rpartition("/")[2])


def test_a_database_is_dropped_while_a_session_holds_it(
    private_postgres: PrivatePostgres,
) -> None:
    url = private_postgres.create_database()
    with psycopg.connect(url) as holder:
        private_postgres.drop_database(url.rpartition("/")[2])
        with pytest.raises(psycopg.OperationalError):
            holder.execute("SELECT 1")


def test_the_session_server_runs_with_fsync_off_and_room_for_many_connections(
    private_postgres: PrivatePostgres,
) -> None:
    with psycopg.connect(private_postgres.url()) as connection:
        settings = connection.execute(
            "SELECT name, setting FROM pg_settings WHERE name IN"
            " ('fsync', 'max_connections', 'synchronous_commit', 'listen_addresses')"
        ).fetchall()
    assert dict(settings) == {
        "fsync": "off",
        "max_connections": "300",
        "synchronous_commit": "on",
        "listen_addresses": "127.0.0.1",
    }


def test_restart_keeps_the_data_and_the_port() -> None:
    with PrivatePostgres(settings={"fsync": "off"}) as server:
        url, port = server.create_database(), server.port
        session = psycopg.connect(url, autocommit=True)
        session.execute("CREATE TABLE tasks (task_id text PRIMARY KEY)")
        session.execute("INSERT INTO tasks VALUES ('t-1')")
        server.restart()
        with pytest.raises(psycopg.OperationalError):
            session.execute("SELECT 1")  # a restart ends open sessions
        session.close()
        assert server.port == port
        with psycopg.connect(url) as connection:
            rows = connection.execute("SELECT task_id FROM tasks").fetchall()
    assert rows == [("t-1",)]


def test_stop_leaves_no_server_process_and_no_files() -> None:
    server = PrivatePostgres(settings={"fsync": "off"})
    server.start()
    root = server.root
    still_connected = psycopg.connect(server.create_database())
    pids = server_pids(server.url())
    assert len(pids) > 3  # the postmaster, two sessions, background processes
    server.stop()
    still_connected.close()
    assert wait_until_gone(pids, timeout_s=0) == set()
    assert not root.exists()
    server.stop()  # a second stop does nothing


def test_a_killed_owner_takes_its_server_along() -> None:
    """SIGKILL runs no atexit: the parent-death signal ends the server instead."""
    owner = subprocess.Popen(
        [sys.executable, "-c", KILLED_OWNER],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert owner.stdout is not None
    root, url = owner.stdout.readline().split()
    try:
        pids = server_pids(url)
        owner.kill()
        owner.wait()
        assert wait_until_gone(pids) == set()
    finally:
        owner.stdout.close()
        subprocess.run(["rm", "-rf", root], check=True)  # its owner had no time to


KILLED_OWNER = """
import threading
from devtools.private_postgres import PrivatePostgres
server = PrivatePostgres(settings={"fsync": "off"})
server.start()
print(server.root, server.url(), flush=True)
threading.Event().wait()
"""


def test_the_command_line_server_stops_on_sigterm() -> None:
    tool = subprocess.Popen(
        [sys.executable, "-m", "devtools.private_postgres", "--set", "fsync=off"],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert tool.stdout is not None
    with tool.stdout:
        url = tool.stdout.readline().strip()
        assert url.startswith("postgresql://")
        pids = server_pids(url)
        tool.send_signal(signal.SIGTERM)
        assert tool.wait(timeout=30) == 0
    assert wait_until_gone(pids, timeout_s=0) == set()


def test_a_failed_start_shows_the_server_log() -> None:
    server = PrivatePostgres(settings={"max_connections": "plenty"})
    with pytest.raises(PostgresStartError, match='invalid value for parameter "max_connections"'):
        server.start()
    assert server.pid is None


def test_missing_binaries_say_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PG_BINDIR", os.devnull)
    with pytest.raises(PostgresNotFound, match="apt-get install postgresql"):
        PrivatePostgres().start()
