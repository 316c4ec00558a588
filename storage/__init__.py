"""Where tasks are kept: the Store contract (base.py) and its backends.

`open_store(target)` picks the backend from the target: a `postgresql://` URL, or else
the path of an SQLite file.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from storage import sql
from storage.base import Credential, Store
from storage.blobs import BlobStore
from storage.feed import TAIL_POLL_S
from storage.group_commit import WRITER_NICENESS
from storage.sql import Session

POSTGRESQL_SCHEMES = ("postgresql://", "postgres://")


def is_postgresql(target: str) -> bool:
    """Whether target names a PostgreSQL database (a URL) rather than an SQLite file."""
    return target.startswith(POSTGRESQL_SCHEMES)


async def open_store(
    target: str, writer_niceness: int = WRITER_NICENESS, tail_poll_s: float = TAIL_POLL_S
) -> Store:
    """Opens (creating or migrating) the store at target. tail_poll_s: how often a
    PostgreSQL store reads other replicas' commits unwoken (SQLite has no others).
    Raises StoreError with a readable message if it cannot be opened."""
    if is_postgresql(target):
        from storage.postgres import PostgresStore

        return await PostgresStore.open(target, writer_niceness, tail_poll_s)
    from storage.sqlite import SqliteStore

    return await SqliteStore.open(target, writer_niceness)


def open_blob_store(target: str) -> BlobStore:
    """The payload store beside the task store at target: the same PostgreSQL database
    (its schema migrated by open_store), or a directory `<file>.payloads` beside the
    SQLite file."""
    if is_postgresql(target):
        from storage.postgres.blobs import PostgresBlobStore

        return PostgresBlobStore(target)
    from storage.directory_blobs import DirectoryBlobStore, payload_directory

    return DirectoryBlobStore.open(payload_directory(Path(target)))


# -- credentials, for `task-manager tokens`: whether or not a server has the store open --


@contextmanager
def _credentials_session(target: str) -> Iterator[Session]:
    """A session on target's database, migrated, in which each statement commits."""
    if is_postgresql(target):
        from storage import postgres

        with postgres.credentials_session(target) as session:
            yield session
    else:
        from storage import sqlite

        with sqlite.credentials_session(Path(target)) as conn:
            yield conn


def add_credential(target: str, credential: Credential) -> None:
    with _credentials_session(target) as session:
        sql.insert_credential(session, credential)


def list_credentials(target: str) -> list[Credential]:
    with _credentials_session(target) as session:
        return sql.read_credentials(session)


def revoke_credential(target: str, credential_id: str, now_ns: int) -> bool:
    """Revokes a credential; False if there is no such credential or it was revoked."""
    with _credentials_session(target) as session:
        return sql.revoke_credential(session, credential_id, now_ns)
