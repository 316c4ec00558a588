"""The PostgreSQL backend (`--db postgresql://...`): several replicas on one database."""

from storage.postgres.credentials import add_credential, list_credentials, revoke_credential
from storage.postgres.store import PostgresStore

__all__ = ["PostgresStore", "add_credential", "list_credentials", "revoke_credential"]
