"""Copying a whole catalog between two SQL backends (``mdm catalog copy``): table by table,
in an order the foreign keys accept, in batches, then counts compared table by table.

Staging jobs move with the site as they are, so a stage request still pending is staged by the
new site's front ends in its place in the queue, its attempts counted on. A job that a front end
of the old site still held (killed, not stopped: a clean stop gives its claims back) keeps its
lease, on the epoch-seconds clock both backends share, and is taken over once it lapses."""

from __future__ import annotations

from collections.abc import Callable

from mdm_catalog_sql.database import Database

# Parents before children (foreign keys); schema_version is the target's own.
TABLES = (
    "entries", "directories", "acl", "patient", "image", "medical", "dicom", "protocol", "erased",
    "stage_requests", "stage_files", "stage_jobs",
)
BATCH = 2000


def counts(db: Database) -> dict[str, int]:
    return {table: int(db.row(f"SELECT count(*) AS n FROM {table}")["n"]) for table in TABLES}  # type: ignore[index]


def copy(source: Database, target: Database, progress: Callable[[str, int], None]) -> dict[str, int]:
    """Every row of ``source`` into the empty ``target``, in one transaction of the target;
    the rows copied per table. ``progress(table, rows)`` after each batch."""
    with target.transaction() as connection:
        for table in TABLES:
            columns = [c for c in _columns(target, table) if c in set(_columns(source, table))]
            insert = target.dialect.sql(
                f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"
            )
            done = 0
            with source.dialect.streaming() as reader:
                rows = source.dialect.stream_cursor(reader)
                rows.execute(f"SELECT {', '.join(columns)} FROM {table}")
                while chunk := rows.fetchmany(BATCH):
                    connection.cursor().executemany(insert, [tuple(r[c] for c in columns) for r in chunk])
                    done += len(chunk)
                    progress(table, done)
    return counts(target)


def _columns(db: Database, table: str) -> list[str]:
    with db.dialect.streaming() as connection:
        cursor = connection.cursor()
        cursor.execute(f"SELECT * FROM {table} WHERE 1 = 0")
        return [d[0] for d in cursor.description]
