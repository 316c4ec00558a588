"""Where tasks are kept: the Store contract (base.py) and its backends.

`open_store(target)` picks the backend from the target: a `postgresql://` URL, or else
the path of an SQLite file.
"""

from __future__ import annotations

from pathlib import Path

from storage.base import Credential, Store
from storage.group_commit import WRITER_NICENESS

POSTGRESQL_SCHEMES = ("postgresql://", "postgres://")


def is_postgresql(target: str) -> bool:
    """Whether target names a PostgreSQL database (a URL) rather than an SQLite file."""
    return target.startswith(POSTGRESQL_SCHEMES)


async def open_store(target: str, writer_niceness: int = WRITER_NICENESS) -> Store:
    """Opens (creating or migrating) the store at target. Raises StoreError with a
    readable message if it cannot be opened."""
    if is_postgresql(target):
        from storage.postgres import PostgresStore

        return await PostgresStore.open(target, writer_niceness)
    from storage.sqlite import SqliteStore

    return await SqliteStore.open(target, writer_niceness)


# -- credentials, for `task-manager tokens`: whether or not a server has the store open --


def add_credential(target: str, credential: Credential) -> None:
    if is_postgresql(target):
        from storage import postgres

        return postgres.add_credential(target, credential)
    from storage import sqlite

    return sqlite.add_credential(Path(target), credential)


def list_credentials(target: str) -> list[Credential]:
    if is_postgresql(target):
        from storage import postgres

        return postgres.list_credentials(target)
    from storage import sqlite

    return sqlite.list_credentials(Path(target))


def revoke_credential(target: str, credential_id: str, now_ns: int) -> bool:
    """Revokes a credential; False if there is no such credential or it was revoked."""
    if is_postgresql(target):
        from storage import postgres

        return postgres.revoke_credential(target, credential_id, now_ns)
    from storage import sqlite

    return sqlite.revoke_credential(Path(target), credential_id, now_ns)
