"""Credentials in a PostgreSQL database, for `task-manager tokens`: the servers on it
reload them as they change."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import psycopg

from storage.base import Credential, StoreError
from storage.postgres.schema import PgSession, connect, describe, migrate
from storage.sql import insert_credential, read_credentials
from storage.sql import revoke_credential as revoke


@contextmanager
def _session(url: str) -> Iterator[PgSession]:
    conn = connect(url, "tokens")
    try:
        migrate(conn, url)
        yield PgSession(conn)
    except psycopg.Error as exc:
        raise StoreError(f"{describe(url)}: {exc}") from exc
    finally:
        conn.close()


def add_credential(url: str, credential: Credential) -> None:
    with _session(url) as session:
        insert_credential(session, credential)


def list_credentials(url: str) -> list[Credential]:
    with _session(url) as session:
        return read_credentials(session)


def revoke_credential(url: str, credential_id: str, now_ns: int) -> bool:
    """Revokes a credential; False if there is no such credential or it was revoked."""
    with _session(url) as session:
        return revoke(session, credential_id, now_ns)
