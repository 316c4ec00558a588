"""The writer's Session on PostgreSQL: the shared SQL as prepared statements over libpq.

The writer runs a few statements thousands of times a second (a unit's load and
compare-and-set, the batch's numbering), and on PostgreSQL its thread is what bounds a
replica (bench/README.md, "Where a PostgreSQL replica's time goes"). psycopg's cursor
layer spends about 30 us of Python on each statement; calling libpq through psycopg's
own `pq` module, with each statement prepared once per connection, spends about 15
(both measured on the bench machine). libpq releases the GIL while it waits, as
psycopg does.

Parameters go as text, bytes as binary; results come in binary and are decoded by
column type. The statements are ours, so only the types they use are known here; any
other is an error, loud at once. executemany (history rows, once a batch) stays with
psycopg, which sends all its rows in one round trip.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator, Sequence
from typing import Any, cast

from psycopg import errors, pq

from storage.postgres.schema import Connection, PgSession
from storage.sql import Cursor

_INT8 = struct.Struct(">q")
_INT4 = struct.Struct(">i")
_INT2 = struct.Struct(">h")


def _text(value: bytes) -> str:
    return value.decode()


_DECODERS: dict[int, Callable[[bytes], Any]] = {
    20: lambda value: _INT8.unpack(value)[0],  # int8 (BIGINT)
    23: lambda value: _INT4.unpack(value)[0],  # int4 (INTEGER)
    21: lambda value: _INT2.unpack(value)[0],  # int2
    16: lambda value: value == b"\x01",  # bool
    17: bytes,  # bytea: binary results arrive as the bytes themselves
    25: _text,  # text
    1043: _text,  # varchar
    19: _text,  # name
}
"""Binary result decoders by type OID (pg_type)."""

_FORMAT_TEXT, _FORMAT_BINARY = 0, 1

MAX_PREPARED = 256
"""Statements prepared per connection at most. Some statements are made per call (an
IN list as long as its values, as renew_streams'); past this many, the rest run through
psycopg unprepared, so the server's memory for them stays bounded."""


class Rows:
    """One statement's result, as the shared SQL reads it (sql.Cursor)."""

    def __init__(self, result: pq.abc.PGresult) -> None:
        decoders = []
        for column in range(result.nfields):
            decoder = _DECODERS.get(result.ftype(column))
            if decoder is None:
                raise TypeError(f"no decoder for PostgreSQL type OID {result.ftype(column)}")
            decoders.append(decoder)
        self._rows = [
            tuple(
                None if (value := result.get_value(row, column)) is None else decode(value)
                for column, decode in enumerate(decoders)
            )
            for row in range(result.ntuples)
        ]
        self._next = 0
        self.rowcount = result.command_tuples if result.command_tuples is not None else -1

    def fetchone(self) -> Any:
        if self._next >= len(self._rows):
            return None
        self._next += 1
        return self._rows[self._next - 1]

    def fetchall(self) -> list[Any]:
        rows, self._next = self._rows[self._next :], len(self._rows)
        return rows

    def __iter__(self) -> Iterator[Any]:
        return iter(self.fetchall())


class PreparedSession:
    """A Session whose statements run prepared, straight through libpq. The statements
    it prepared live as long as its connection: make a new session for a new one."""

    def __init__(self, conn: Connection) -> None:
        if conn.info.encoding != "utf-8":  # what the decoders and _encode assume
            conn.execute("SET client_encoding TO 'UTF8'")
        # psycopg prepares nothing of its own here: seeing a ROLLBACK or a DISCARD pass
        # through it, it would deallocate every prepared statement, ours too.
        conn.prepare_threshold = None
        self._pgconn = conn.pgconn
        self._prepared: dict[str, bytes] = {}
        self._unprepared = PgSession(conn)
        """For executemany, and for the statements past MAX_PREPARED."""

    def execute(self, sql: str, params: Sequence[object] = ()) -> Cursor:
        name = self._prepared.get(sql)
        if name is None and len(self._prepared) >= MAX_PREPARED:
            return self._unprepared.execute(sql, params)
        if name is None:
            name = f"tm{len(self._prepared)}".encode()
            self._check(self._pgconn.prepare(name, _numbered(sql).encode()))
            self._prepared[sql] = name
        values, formats = _encode(params)
        # A None value is SQL NULL to libpq, as psycopg itself sends it; pq's type hints
        # leave it out.
        sent = cast(list[bytes], values)
        return Rows(self._check(self._pgconn.exec_prepared(name, sent, formats, _FORMAT_BINARY)))

    def execute_script(self, sql: str) -> bytes | None:
        """Statements without parameters or results (BEGIN, SAVEPOINT, NOTIFY; COMMIT),
        several in one round trip; the last one's command status (b"COMMIT")."""
        return self._check(self._pgconn.exec_(sql.encode())).command_status

    def executemany(self, sql: str, params: Sequence[Sequence[object]]) -> None:
        self._unprepared.executemany(sql, params)

    def _check(self, result: pq.abc.PGresult) -> pq.abc.PGresult:
        if result.status not in (pq.ExecStatus.COMMAND_OK, pq.ExecStatus.TUPLES_OK):
            raise errors.error_from_result(result, encoding="utf-8")
        return result


def _numbered(sql: str) -> str:
    """`?` placeholders as PostgreSQL's $1, $2, ... (no shared statement has a `?` of
    its own)."""
    parts = sql.split("?")
    return "".join(
        part + (f"${index}" if index < len(parts) else "")
        for index, part in enumerate(parts, start=1)
    )


def _encode(params: Sequence[object]) -> tuple[list[bytes | None], list[int]]:
    values: list[bytes | None] = []
    formats: list[int] = []
    for value in params:
        if value is None:
            values.append(None)
            formats.append(_FORMAT_TEXT)
        elif isinstance(value, bytes):
            values.append(value)
            formats.append(_FORMAT_BINARY)
        elif isinstance(value, bool):  # before int: bool is an int; "1" reads as either
            values.append(b"1" if value else b"0")
            formats.append(_FORMAT_TEXT)
        elif isinstance(value, int | str):
            text = str(value)
            if "\x00" in text:  # libpq would end the value there, silently
                raise ValueError("a text parameter holds a NUL character")
            values.append(text.encode())
            formats.append(_FORMAT_TEXT)
        else:
            raise TypeError(f"no encoding for a {type(value).__name__} parameter")
    return values, formats
