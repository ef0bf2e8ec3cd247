"""PostgreSQL catalog backend on the SQL core: several front ends share one database.

psycopg 3 with a psycopg_pool connection pool. A database that is down or restarting
raises ``CatalogUnavailable`` (the HTTP front ends answer 503 with Retry-After); the pool
reconnects by itself, so the service recovers without a restart.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any
from uuid import uuid4

import psycopg
from psycopg.rows import dict_row, tuple_row
from psycopg_pool import ConnectionPool, PoolTimeout

from mdm_catalog_postgresql.schema import MIGRATIONS
from mdm_catalog_sql import Dialect, SqlBackend
from srm_dicom.catalog import CatalogConflict
from srm_dicom.config import Config
from srm_dicom.errors import CatalogUnavailable, ConfigError

# Seconds a caller waits for a connection before the catalog counts as unavailable.
CONNECT_TIMEOUT = 5.0
# The planner's cost of a page read out of order, for this catalog's sessions: a catalog is
# read from memory or SSD, where PostgreSQL's default of 4 (a spinning disk) makes it count
# QIDO-RS studies by a sequential scan, a hash table and a sort rather than from the
# entries_rights index alone (3x slower at 10^5 images; README, "QIDO-RS at scale").
RANDOM_PAGE_COST = 1.1


@functools.lru_cache(maxsize=1024)
def _paramstyle(text: str) -> str:
    return text.replace("%", "%%").replace("?", "%s")


class PostgresDialect(Dialect):
    name = "postgresql"
    migrations = MIGRATIONS
    clock = "CAST(extract(epoch FROM clock_timestamp()) AS DOUBLE PRECISION)"
    skip_locked = " FOR UPDATE SKIP LOCKED"

    def __init__(self, url: str, max_connections: int = 16) -> None:
        if not url.startswith(("postgresql://", "postgres://")):
            raise ConfigError(f"config: [catalog] url must be postgresql://USER@HOST:PORT/DB, not {url!r}")
        self.url = url
        self.pool = ConnectionPool(
            url, min_size=1, max_size=max_connections, timeout=CONNECT_TIMEOUT, open=False,
            # Autocommit: a read is one round trip (no COMMIT after it); writes and streamed
            # reads open a transaction of their own (``_connection(transaction=True)``).
            kwargs={"row_factory": dict_row, "connect_timeout": int(CONNECT_TIMEOUT), "autocommit": True,
                    "options": f"-c random_page_cost={RANDOM_PAGE_COST}"},
            name="mdm-catalog",
        )
        self.pool.open(wait=False)

    def sql(self, text: str) -> str:
        return _paramstyle(text)

    def aggregate(self, expression: str, separator: str) -> str:
        return f"string_agg({expression}, {separator})"

    def fold(self, expression: str) -> str:
        return f'lower(CAST({expression} AS TEXT) COLLATE "C")'  # the C collation folds ASCII only

    def any_of(self, expression: str, values: Sequence[object]) -> tuple[str, list[object]]:
        # One array parameter: psycopg parses a statement of 500 placeholders on every call
        # (it caches only short ones), a third of the sample lookup of a QIDO /studies answer.
        return f"{expression} = ANY(?)", [list(values)]

    def number(self, expression: str) -> str:
        return f"mdm_number(CAST({expression} AS TEXT))"

    @contextmanager
    def _connection(self, transaction: bool) -> Iterator[Any]:
        try:
            with self.pool.connection() as connection:
                if transaction:
                    with connection.transaction():
                        yield connection
                else:
                    yield connection
        except PoolTimeout:
            raise unavailable(self.url) from None
        except psycopg.errors.UniqueViolation as exc:
            raise CatalogConflict(f"another writer got there first ({exc.diag.constraint_name}); try again") from None
        except psycopg.OperationalError as exc:
            raise unavailable(self.url, exc) from None

    def transaction(self) -> Any:
        return self._connection(transaction=True)

    def reading(self) -> Any:
        return self._connection(transaction=False)

    def streaming(self) -> Any:
        return self._connection(transaction=True)  # a named (server-side) cursor lives in a transaction

    def stream_cursor(self, connection: Any) -> Any:
        return connection.cursor(name=f"mdm_search_{uuid4().hex}")

    def tuple_cursor(self, connection: Any) -> Any:
        return connection.cursor(row_factory=tuple_row)

    def lock_schema(self, connection: Any) -> None:
        connection.execute("SELECT pg_advisory_xact_lock(hashtext('srm-dicom catalog schema'))")

    def close(self) -> None:
        self.pool.close()


def unavailable(url: str, error: psycopg.OperationalError | None = None) -> CatalogUnavailable:
    """Why the catalog cannot be used now; the caller may try again shortly.

    SQLSTATE class 40 (a deadlock, a serialization failure): the server is up and answered,
    the transaction lost to another writer's. Anything else: the server is down, restarting
    or out of reach."""
    if error is not None and error.sqlstate is not None and error.sqlstate.startswith("40"):
        return CatalogUnavailable(
            f"the catalog database rolled back a transaction that met another writer's"
            f" ({error.sqlstate} {type(error).__name__}); try again shortly"
        )
    where = url.split("@")[-1]  # no user name in messages
    return CatalogUnavailable(f"the catalog database at {where} does not answer; try again shortly")


class PostgresCatalog(SqlBackend):
    def __init__(self, url: str, migrate: bool = True) -> None:
        self.dialect = PostgresDialect(url)
        try:
            super().__init__(self.dialect, migrate)
        except BaseException:
            self.dialect.close()
            raise

    @classmethod
    def from_config(cls, config: Config, migrate: bool = True) -> PostgresCatalog:
        return cls(config.catalog.url, migrate)
