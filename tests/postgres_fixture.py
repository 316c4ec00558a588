"""Pytest plugin: one private PostgreSQL server for the session, a fresh database per test.

Started only when a test asks for it; a machine without PostgreSQL fails such tests, never
skips them (`make test` installs it).
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest

from devtools.private_postgres import PostgresNotFound, PostgresStartError, PrivatePostgres


@pytest.fixture(scope="session")
def private_postgres() -> Iterator[PrivatePostgres]:
    """The session's PostgreSQL server (fsync=off: nothing in it has to outlive the run)."""
    server = PrivatePostgres(settings={"fsync": "off"})
    failure = None
    try:
        server.start()
    except (PostgresNotFound, PostgresStartError) as error:
        failure = str(error)
    if failure is not None:
        # Outside the except block: the message alone, no chain of tracebacks. Session-scoped,
        # so pytest reports this one failure for every later test that asks.
        pytest.fail(f"the private PostgreSQL server did not start: {failure}", pytrace=False)
    yield server
    server.stop()


@pytest.fixture
def postgres_url(private_postgres: PrivatePostgres) -> Iterator[str]:
    """The URL of a database made for this test alone, dropped after it."""
    name = f"test_{secrets.token_hex(6)}"
    url = private_postgres.create_database(name)
    yield url
    private_postgres.drop_database(name)
