"""What the SQL core needs of a database: a small dialect per backend, and transactions
that nest (the core's domain rules join the stores' statements into one)."""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Any

Row = Any  # sqlite3.Row or a psycopg dict row: both index by column name


class Dialect(ABC):
    """The few places SQLite and PostgreSQL differ: connections, placeholders, aggregates,
    case folding, and their own append-only migrations."""

    name: str
    migrations: Sequence[str]
    # SQL of the database's clock in epoch seconds: staging leases are measured by one clock
    # for every front end on the catalog.
    clock: str
    # What ends a SELECT that locks the rows it returns and passes over those another
    # transaction holds: PostgreSQL's FOR UPDATE SKIP LOCKED; SQLite needs nothing (a write
    # transaction, BEGIN IMMEDIATE, already holds its one write lock).
    skip_locked: str = ""

    def sql(self, text: str) -> str:
        """The core's SQL (``?`` placeholders) in this backend's paramstyle."""
        return text

    @abstractmethod
    def aggregate(self, expression: str, separator: str) -> str:
        """SQL joining the values of ``expression`` with ``separator`` (a literal)."""

    def any_of(self, expression: str, values: Sequence[object]) -> tuple[str, list[object]]:
        """SQL true where ``expression`` equals one of ``values``, and its parameters: ``IN``
        with one ``?`` per value."""
        return f"{expression} IN ({', '.join('?' * len(values))})", list(values)

    def number(self, expression: str) -> str:
        """SQL of a numeric header value as a number, for comparisons."""
        return expression

    @abstractmethod
    def fold(self, expression: str) -> str:
        """SQL of ``expression`` as text in ASCII lower case (``like`` in srm_dicom.query)."""

    @abstractmethod
    def transaction(self) -> AbstractContextManager[Any]:
        """A connection inside a write transaction, committed on exit, rolled back on error."""

    @abstractmethod
    def reading(self) -> AbstractContextManager[Any]:
        """A connection for a short read."""

    @abstractmethod
    def streaming(self) -> AbstractContextManager[Any]:
        """A connection of its own for a long read that yields rows as it goes."""

    @abstractmethod
    def stream_cursor(self, connection: Any) -> Any:
        """A cursor of ``connection`` that fetches rows in batches from the server."""

    @abstractmethod
    def tuple_cursor(self, connection: Any) -> Any:
        """A cursor of ``connection`` whose rows are plain tuples (no per-row mapping: the
        aggregates read 10^4 rows, tests/bench/bench_query.py)."""

    @abstractmethod
    def lock_schema(self, connection: Any) -> None:
        """Keep other processes from migrating at the same time (inside the transaction)."""

    @abstractmethod
    def close(self) -> None: ...


class Database:
    """Statements of the SQL core on a dialect's connections. A transaction is per thread
    and nests: statements inside an open one join it."""

    def __init__(self, dialect: Dialect) -> None:
        self.dialect = dialect
        self._local = threading.local()

    @contextmanager
    def transaction(self) -> Iterator[Any]:
        current = getattr(self._local, "connection", None)
        if current is not None:
            if not self._local.writing:
                raise RuntimeError("catalog: a write inside a read-only block")
            yield current
            return
        with self.dialect.transaction() as connection:
            self._local.connection, self._local.writing = connection, True
            try:
                yield connection
            finally:
                self._local.connection = None

    @contextmanager
    def reading(self) -> Iterator[Any]:
        """One connection for several reads (they see one snapshot where the backend gives one)."""
        current = getattr(self._local, "connection", None)
        if current is not None:
            yield current
            return
        with self.dialect.reading() as connection:
            self._local.connection, self._local.writing = connection, False
            try:
                yield connection
            finally:
                self._local.connection = None

    def rows(self, sql: str, params: Sequence[object] = ()) -> list[Row]:
        with self.reading() as connection:
            return list(connection.execute(self.dialect.sql(sql), params).fetchall())

    def row(self, sql: str, params: Sequence[object] = ()) -> Row | None:
        with self.reading() as connection:
            return connection.execute(self.dialect.sql(sql), params).fetchone()

    def tuples(self, sql: str, params: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        """Rows as plain tuples, columns by position."""
        with self.reading() as connection:
            cursor = self.dialect.tuple_cursor(connection)
            cursor.execute(self.dialect.sql(sql), params)
            return list(cursor.fetchall())

    def write(self, sql: str, params: Sequence[object] = ()) -> int:
        """Run one statement (in the open transaction, or one of its own); the rows it changed."""
        with self.transaction() as connection:
            return int(connection.execute(self.dialect.sql(sql), params).rowcount)

    def write_many(self, sql: str, params: Sequence[Sequence[object]]) -> None:
        if params:
            with self.transaction() as connection:
                connection.cursor().executemany(self.dialect.sql(sql), params)

    def migrate(self) -> tuple[int, int]:
        """Apply the dialect's migrations not yet applied; (version before, version after)."""
        with self.transaction() as connection:
            self.dialect.lock_schema(connection)
            connection.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            found = connection.execute("SELECT max(version) AS version FROM schema_version").fetchone()
            current = found["version"] or 0
            for version, script in enumerate(self.dialect.migrations[current:], start=current + 1):
                for statement in script.split(";"):
                    if statement.strip():
                        connection.execute(statement)
                connection.execute(self.dialect.sql("INSERT INTO schema_version (version) VALUES (?)"), (version,))
            return current, len(self.dialect.migrations)

    @property
    def schema_version(self) -> int:
        found = self.row("SELECT max(version) AS version FROM schema_version")
        return int(found["version"]) if found and found["version"] is not None else 0
