"""Credentials in an SQLite database: read by the server, written by `task-manager tokens`
whether or not a server has the database open (the server reloads them as they change)."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from storage.base import StoreError
from storage.sqlite.schema import connect, lock_database, migrate


@contextmanager
def credentials_session(path: Path) -> Iterator[sqlite3.Connection]:
    """A connection for managing credentials, whether or not a server has the database
    open (the server reloads credentials as they change). Creates and migrates the
    database if no server holds it."""
    try:
        lock = lock_database(path)
    except StoreError:
        lock = None  # a server holds it, and has migrated it
    conn = connect(path)
    try:
        if lock is not None:
            migrate(conn, path)
        yield conn
    finally:
        conn.close()
        if lock is not None:
            lock.close()
