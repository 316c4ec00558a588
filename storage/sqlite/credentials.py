"""Credentials in an SQLite database: read by the server, written by `task-manager tokens`
whether or not a server has the database open (the server reloads them as they change)."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import sqlite_utils

from storage.base import Credential, StoreError
from storage.sqlite.schema import connect, lock_database, migrate


def read_credentials(conn: sqlite3.Connection) -> list[Credential]:
    rows = conn.execute(
        "SELECT credential_id, kind, principal, role, entity_ids, secret_hash, created_ns,"
        " revoked_ns FROM credentials ORDER BY created_ns, credential_id"
    ).fetchall()
    return [
        Credential(row[0], row[1], row[2], row[3], tuple(json.loads(row[4])), *row[5:])
        for row in rows
    ]


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


def insert_credential(conn: sqlite3.Connection, credential: Credential) -> None:
    sqlite_utils.Database(conn).table("credentials").insert(
        {**asdict(credential), "entity_ids": json.dumps(list(credential.entity_ids))}
    )


def revoke(conn: sqlite3.Connection, credential_id: str, now_ns: int) -> bool:
    cursor = conn.execute(
        "UPDATE credentials SET revoked_ns = ? WHERE credential_id = ? AND revoked_ns IS NULL",
        (now_ns, credential_id),
    )
    return cursor.rowcount == 1


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
