"""SQLite catalog backend: the embedded default, one file, WAL mode, on the SQL core.

One connection writes, under a lock (SQLite has one writer at a time anyway); a search
reads from a read-only connection of its own, which WAL lets run beside the writer
without blocking it or seeing its uncommitted rows.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mdm_catalog_sql import Dialect, SqlBackend
from mdm_catalog_sqlite.schema import MIGRATIONS
from srm_dicom.config import Config
from srm_dicom.private_files import private_file


class SQLiteDialect(Dialect):
    name = "sqlite"
    migrations = MIGRATIONS
    clock = "((julianday('now') - 2440587.5) * 86400.0)"

    def __init__(self, path: Path, busy_timeout: float = 30.0, cache_mib: int = 64, mmap_mib: int = 2047) -> None:
        self.path = private_file(path)  # metadata and erased values: PHI
        self.cache_mib, self.mmap_mib = cache_mib, mmap_mib
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=busy_timeout)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._size(self._db)
        self._lock = threading.RLock()

    def _size(self, db: sqlite3.Connection) -> None:
        """The page cache and mmap window of ``[catalog] cache_mib`` and ``mmap_mib`` (README,
        "Catalog at scale"): a negative cache_size is KiB, mmap_size is bytes."""
        db.execute(f"PRAGMA cache_size=-{self.cache_mib * 1024:d}")
        db.execute(f"PRAGMA mmap_size={self.mmap_mib * 1024 * 1024:d}")

    def aggregate(self, expression: str, separator: str) -> str:
        return f"group_concat({expression}, {separator})"

    def fold(self, expression: str) -> str:
        return f"lower(CAST({expression} AS TEXT))"  # SQLite's lower() folds ASCII only

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    @contextmanager
    def reading(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            yield self._db

    @contextmanager
    def streaming(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(f"{self.path.as_uri()}?mode=ro", uri=True)
        db.row_factory = sqlite3.Row
        self._size(db)
        try:
            yield db
        finally:
            db.close()

    def lock_schema(self, connection: sqlite3.Connection) -> None:
        """Nothing to do: BEGIN IMMEDIATE already holds SQLite's one write lock."""

    def stream_cursor(self, connection: sqlite3.Connection) -> sqlite3.Cursor:
        return connection.cursor()

    def tuple_cursor(self, connection: sqlite3.Connection) -> sqlite3.Cursor:
        cursor = connection.cursor()
        cursor.row_factory = None
        return cursor

    def close(self) -> None:
        with self._lock:
            self._db.close()


class SQLiteCatalog(SqlBackend):
    def __init__(
        self, path: Path, migrate: bool = True, busy_timeout: float = 30.0, cache_mib: int = 64, mmap_mib: int = 2047
    ) -> None:
        self.dialect = SQLiteDialect(path, busy_timeout, cache_mib, mmap_mib)
        super().__init__(self.dialect, migrate)

    @classmethod
    def from_config(cls, config: Config, migrate: bool = True) -> SQLiteCatalog:
        catalog = config.catalog
        return cls(config.path(catalog.url), migrate, catalog.busy_timeout, catalog.cache_mib, catalog.mmap_mib)
