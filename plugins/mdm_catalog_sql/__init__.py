"""One SQL core for the catalog backends: the namespace, the metadata index and the stage
store written once in SQL, over a small dialect per backend (``mdm_catalog_sqlite``,
``mdm_catalog_postgresql``). The domain rules that span the stores are the core's
(``srm_dicom.catalog.Catalog``), not a backend's."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

from mdm_catalog_sql import copy
from mdm_catalog_sql.database import Database, Dialect
from mdm_catalog_sql.index import SqlMetadataIndex
from mdm_catalog_sql.namespace import SqlNamespace
from mdm_catalog_sql.stages import SqlStageStore


class SqlBackend:
    """A catalog backend (``srm_dicom.catalog.Backend``) on one dialect's database."""

    def __init__(self, dialect: Dialect, migrate: bool = True) -> None:
        self.db = Database(dialect)
        if migrate:
            self.db.migrate()
        self.namespace = SqlNamespace(self.db)
        self.index = SqlMetadataIndex(self.db)
        self.stages = SqlStageStore(self.db)

    def transaction(self) -> AbstractContextManager[Any]:
        return self.db.transaction()

    @property
    def schema_version(self) -> int:
        return self.db.schema_version

    @property
    def latest_version(self) -> int:
        return len(self.db.dialect.migrations)

    def migrate(self) -> tuple[int, int]:
        return self.db.migrate()

    def table_counts(self) -> dict[str, int]:
        return copy.counts(self.db)

    def copy_to(self, target: SqlBackend, progress: Callable[[str, int], None]) -> dict[str, int]:
        """Every row into the empty ``target`` (any SQL backend); the target's counts after."""
        return copy.copy(self.db, target.db, progress)

    def close(self) -> None:
        self.db.dialect.close()


__all__ = ["Database", "Dialect", "SqlBackend"]
