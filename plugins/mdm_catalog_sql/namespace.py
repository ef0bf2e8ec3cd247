"""The namespace in SQL: entries, per-DN rights, and directories as rows of their own.

Lookups go through indexes only (LFN, GUID, parent directory, UID triples), so the
catalog stays fast at 10^6 entries. Directories are made when the first entry below them
is added and removed with the last one, so listing a directory never scans entries.
"""

from __future__ import annotations

import posixpath
from collections.abc import Sequence
from typing import Any

from mdm_catalog_sql.database import Database, Dialect, Row
from srm_dicom.catalog import LOOKUP_CHUNK, AclEntry, Entry, Listing
from srm_dicom.errors import NotFound
from srm_dicom.names import UidTriple, normalize_lfn

ENTRY_COLUMNS = (
    "lfn", "guid", "pfn", "kind", "study_uid", "series_uid", "sop_uid", "owner", "vo", "mode",
    "metadata_mode", "size", "adler32", "content_version", "source_digest", "created", "modified", "sha256",
    "protection",
)
_SELECT = f"SELECT {', '.join(ENTRY_COLUMNS)} FROM entries"
_UPSERT_ACL = (
    "INSERT INTO acl (guid, dn, perms, metadata) VALUES (?, ?, ?, ?)"
    " ON CONFLICT (guid, dn) DO UPDATE SET perms = excluded.perms, metadata = excluded.metadata"
)


def entry_of(row: Row, acl: tuple[AclEntry, ...]) -> Entry:
    return Entry(**{c: row[c] for c in ENTRY_COLUMNS}, acl=acl)


def acls_of(dialect: Dialect, cursor: Any, guids: list[str]) -> dict[str, tuple[AclEntry, ...]]:
    """The per-DN rights of many entries (GUID → entries in DN order), in one query on ``cursor``."""
    if not guids:
        return {}
    found: dict[str, list[AclEntry]] = {}
    test, params = dialect.any_of("guid", guids)
    cursor.execute(dialect.sql(f"SELECT guid, dn, perms, metadata FROM acl WHERE {test} ORDER BY dn"), params)
    for row in cursor.fetchall():
        found.setdefault(row["guid"], []).append(AclEntry(row["dn"], row["perms"], row["metadata"]))
    return {guid: tuple(acl) for guid, acl in found.items()}


class SqlNamespace:
    def __init__(self, db: Database) -> None:
        self._db = db

    # -- reads ----------------------------------------------------------------

    def _entry_where(self, where: str, *params: object) -> Entry | None:
        with self._db.reading():
            row = self._db.row(f"{_SELECT} WHERE {where}", params)
            return self._entry(row) if row else None

    def _entry(self, row: Row) -> Entry:
        acl = tuple(
            AclEntry(a["dn"], a["perms"], a["metadata"])
            for a in self._db.rows("SELECT dn, perms, metadata FROM acl WHERE guid = ? ORDER BY dn", (row["guid"],))
        )
        return entry_of(row, acl)

    def lookup(self, lfn: str) -> Entry | None:
        return self._entry_where("lfn = ?", normalize_lfn(lfn))

    def lookup_many(self, lfns: Sequence[str]) -> dict[str, Entry]:
        wanted = list(dict.fromkeys(normalize_lfn(lfn) for lfn in lfns))
        found: dict[str, Entry] = {}
        with self._db.reading() as connection:  # one connection for every chunk
            cursor = connection.cursor()
            for start in range(0, len(wanted), LOOKUP_CHUNK):
                chunk = wanted[start:start + LOOKUP_CHUNK]
                test, params = self._db.dialect.any_of("lfn", chunk)
                rows = self._db.rows(f"{_SELECT} WHERE {test}", params)
                acls = acls_of(self._db.dialect, cursor, [r["guid"] for r in rows])
                found.update((r["lfn"], entry_of(r, acls.get(r["guid"], ()))) for r in rows)
        return found

    def lookup_guid(self, guid: str) -> Entry | None:
        return self._entry_where("guid = ?", guid.removeprefix("guid:"))

    def lookup_uids(self, triple: UidTriple) -> Entry | None:
        return self._entry_where(
            "study_uid = ? AND series_uid = ? AND sop_uid = ?", triple.study, triple.series, triple.sop
        )

    def list_dir(self, path: str) -> Listing | None:
        path = normalize_lfn(path)
        with self._db.reading():  # one connection: directories and entries agree
            directories = [
                r["path"] for r in self._db.rows("SELECT path FROM directories WHERE parent = ? ORDER BY path", (path,))
            ]
            entries = [self._entry(r) for r in self._db.rows(f"{_SELECT} WHERE parent = ? ORDER BY name", (path,))]
            if not (directories or entries or self._db.row("SELECT 1 FROM directories WHERE path = ?", (path,))):
                return None
        return Listing(directories, entries)

    def count(self) -> int:
        found = self._db.row("SELECT count(*) AS n FROM entries")
        return int(found["n"]) if found else 0

    def has_slices(self, directory: str) -> bool:
        found = self._db.row(
            "SELECT 1 FROM entries WHERE parent = ? AND kind = 'slice' LIMIT 1", (normalize_lfn(directory),)
        )
        return found is not None

    # -- writes ---------------------------------------------------------------

    def insert(self, entry: Entry, now: float) -> None:
        lfn = normalize_lfn(entry.lfn)
        values = {c: getattr(entry, c) for c in ENTRY_COLUMNS}
        values.update(lfn=lfn, created=now, modified=now)
        parent, name = posixpath.split(lfn)
        with self._db.transaction():
            self._db.write(
                f"INSERT INTO entries ({', '.join(values)}, parent, name)"
                f" VALUES ({', '.join('?' * (len(values) + 2))})",
                (*values.values(), parent, name),
            )
            self._db.write_many(_UPSERT_ACL, [(entry.guid, a.dn, a.perms, a.metadata) for a in entry.acl])
            while parent != "/":
                grandparent = posixpath.dirname(parent)
                inserted = self._db.write(
                    "INSERT INTO directories (path, parent) VALUES (?, ?) ON CONFLICT DO NOTHING", (parent, grandparent)
                )
                if not inserted:
                    break
                parent = grandparent

    def replace_content(self, entry: Entry, now: float) -> None:
        self._db.write(
            "UPDATE entries SET pfn = ?, size = ?, adler32 = ?, sha256 = ?, source_digest = ?, content_version = ?,"
            " protection = ?, modified = ? WHERE lfn = ?",
            (entry.pfn, entry.size, entry.adler32, entry.sha256, entry.source_digest, entry.content_version,
             entry.protection, now, normalize_lfn(entry.lfn)),
        )

    def bump_volume(self, lfn: str, size: int | None, now: float) -> bool:
        return bool(
            self._db.write(
                "UPDATE entries SET content_version = content_version + 1, size = ?, adler32 = NULL, sha256 = NULL,"
                " modified = ?"
                " WHERE lfn = ?",
                (size, now, normalize_lfn(lfn)),
            )
        )

    def remove(self, guid: str) -> None:
        with self._db.transaction():
            found = self._db.row("SELECT parent FROM entries WHERE guid = ?", (guid,))
            if found is None:
                return
            self._db.write("DELETE FROM entries WHERE guid = ?", (guid,))
            path = found["parent"]
            while path != "/" and not (
                self._db.row("SELECT 1 FROM entries WHERE parent = ? LIMIT 1", (path,))
                or self._db.row("SELECT 1 FROM directories WHERE parent = ? LIMIT 1", (path,))
            ):
                self._db.write("DELETE FROM directories WHERE path = ?", (path,))
                path = posixpath.dirname(path)

    def set_rights(
        self, guids: Sequence[str], mode: int | None, metadata_mode: str | None, acl_entries: Sequence[AclEntry]
    ) -> None:
        with self._db.transaction():
            for guid in guids:
                changed = self._db.write(
                    "UPDATE entries SET mode = coalesce(?, mode), metadata_mode = coalesce(?, metadata_mode)"
                    " WHERE guid = ?",
                    (mode, metadata_mode, guid),
                )
                if not changed:
                    raise NotFound(f"guid:{guid} is no longer in the catalog; rights not changed")
                self._db.write_many(_UPSERT_ACL, [(guid, a.dn, a.perms, a.metadata) for a in acl_entries])

    def set_checksum(self, guid: str, version: int, size: int, adler32: str, sha256: str | None = None) -> bool:
        return bool(
            self._db.write(
                "UPDATE entries SET size = ?, adler32 = ?, sha256 = ? WHERE guid = ? AND content_version = ?"
                " AND adler32 IS NULL",
                (size, adler32, sha256, guid, version),
            )
        )
