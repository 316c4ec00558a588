"""The PostgreSQL backend (`--db postgresql://...`): several replicas on one database."""

from storage.postgres.credentials import credentials_session
from storage.postgres.store import PostgresStore

__all__ = ["PostgresStore", "credentials_session"]
