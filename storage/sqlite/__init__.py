"""The embedded SQLite backend: the zero-setup default (`--db PATH`)."""

from storage.sqlite.credentials import add_credential, list_credentials, revoke_credential
from storage.sqlite.store import SqliteStore

__all__ = ["SqliteStore", "add_credential", "list_credentials", "revoke_credential"]
