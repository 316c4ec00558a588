"""Credentials in an SQLite database: read by the server, written by `task-manager tokens`
whether or not a server has the database open (the server reloads them as they change)."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from storage.base import Credential, StoreError
from storage.sql import insert_credential, read_credentials
from storage.sql import revoke_credential as revoke
from storage.sqlite.schema import connect, lock_database, migrate


@contextmanager
def _credentials_connection(path: Path) -> Iterator[sqlite3.Connection]:
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


def add_credential(path: Path, credential: Credential) -> None:
    with _credentials_connection(path) as conn:
        insert_credential(conn, credential)


def list_credentials(path: Path) -> list[Credential]:
    with _credentials_connection(path) as conn:
        return read_credentials(conn)


def revoke_credential(path: Path, credential_id: str, now_ns: int) -> bool:
    """Revokes a credential; False if there is no such credential or it was revoked."""
    with _credentials_connection(path) as conn:
        return revoke(conn, credential_id, now_ns)
