"""Durable task stores behind one protocol (storage.base.Store); SQLite is the default."""
