"""Credentials in a PostgreSQL database, for `task-manager tokens`: the servers on it
reload them as they change."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import psycopg

from storage.base import StoreError
from storage.postgres.schema import PgSession, connect, describe, migrate


@contextmanager
def credentials_session(url: str) -> Iterator[PgSession]:
    """A session for managing credentials (each statement commits), the schema migrated."""
    conn = connect(url, "tokens")
    try:
        migrate(conn, url)
        yield PgSession(conn)
    except psycopg.Error as exc:
        raise StoreError(f"{describe(url)}: {exc}") from exc
    finally:
        conn.close()
