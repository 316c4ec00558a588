"""The embedded SQLite backend: the zero-setup default (`--db PATH`)."""

from storage.sqlite.credentials import credentials_session
from storage.sqlite.store import SqliteStore

__all__ = ["SqliteStore", "credentials_session"]
