"""The SQLite schema moves forward by version number and keeps what it had."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import sqlite_utils

from storage.base import StoreError
from storage.sqlite import SqliteStore
from storage.sqlite.schema import MIGRATIONS
from task_manager.v1 import task_manager_pb2 as pb

pytestmark = pytest.mark.anyio


def version_1_database(path: Path) -> pb.TaskHistoryEntry:
    """A database as the first schema left it, with one task and its history."""
    conn = sqlite3.connect(path, isolation_level=None)
    MIGRATIONS[0](sqlite_utils.Database(conn))
    conn.execute("PRAGMA user_version = 1")
    task = pb.Task(
        version=pb.TaskVersion(task_id="old-task-1", definition_version=1, status_version=1)
    )
    task.status.status = pb.STATUS_CREATED
    task.relations.assignee.system.entity_id = "drone-1"
    task.last_update_time.FromNanoseconds(1_600_000_000_123_456_789)
    entry = pb.TaskHistoryEntry(
        revision=1, task_id="old-task-1", status_version=1, definition_version=1
    )
    entry.status.CopyFrom(task.status)
    entry.time.CopyFrom(task.last_update_time)
    conn.execute(
        "INSERT INTO tasks (task_id, cursor, status, status_version, last_update_ns, task)"
        " VALUES (?, 1, ?, 1, ?, ?)",
        ("old-task-1", pb.STATUS_CREATED, 1_600_000_000_123_456_789, task.SerializeToString()),
    )
    conn.execute(
        "INSERT INTO history (revision, task_id, entry) VALUES (1, ?, ?)",
        ("old-task-1", entry.SerializeToString()),
    )
    conn.close()
    return entry


async def test_a_version_1_database_is_migrated_and_keeps_its_history(tmp_path: Path) -> None:
    entry = version_1_database(tmp_path / "old.db")
    store = await SqliteStore.open(tmp_path / "old.db")
    try:
        assert list(await store.history("old-task-1", 0, 10)) == [entry]
        changes = await store.changes_after(0, 10)
        assert [c.entry for c in changes] == [entry]
        assert await store.current_revision() == 1
    finally:
        await store.close()
    conn = sqlite3.connect(tmp_path / "old.db")
    assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    assert conn.execute("SELECT time_ns FROM history").fetchone()[0] == 1_600_000_000_123_456_789
    assert conn.execute("SELECT holder_entity_id FROM tasks").fetchone()[0] == "drone-1"
    conn.close()


async def test_a_database_from_a_newer_server_is_refused(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "new.db")
    conn.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    conn.close()
    with pytest.raises(StoreError, match="newer than this server"):
        await SqliteStore.open(tmp_path / "new.db")
