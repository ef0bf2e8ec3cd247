"""SQLite catalog backend: the embedded default, one file, WAL mode.

Lookups go through indexes only (LFN, GUID, parent directory, UID triples), so the
catalog stays fast at 10^6 entries. Directories are rows of their own, made when the
first entry below them is added and removed with the last one, so listing a directory
never scans entries.
"""

from __future__ import annotations

import posixpath
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from mdm_catalog_sqlite import search as metadata_search
from mdm_catalog_sqlite.schema import MIGRATIONS
from srm_dicom.catalog import (
    COMPLETED,
    FINAL_STATES,
    AclEntry,
    CatalogConflict,
    Entry,
    Listing,
    Outcome,
    StageFile,
    StageRequest,
)
from srm_dicom.config import Config
from srm_dicom.errors import NotFound
from srm_dicom.metadata import IMAGE_FIELDS, MEDICAL_FIELDS, PATIENT_FIELDS, ImageMetadata
from srm_dicom.names import UidTriple, normalize_lfn
from srm_dicom.private_files import private_file
from srm_dicom.query import Attribute, Match, Query

_ENTRY_COLUMNS = (
    "lfn", "guid", "pfn", "kind", "study_uid", "series_uid", "sop_uid", "owner", "vo", "mode",
    "metadata_mode", "size", "adler32", "content_version", "source_digest", "created", "modified",
    "protection",
)
_DICOM_COLUMNS = (
    "study_uid", "series_uid", "sop_uid", "deid_study_uid", "deid_series_uid", "deid_sop_uid",
    "sop_class_uid", "transfer_syntax_uid",
)


class SQLiteCatalog:
    def __init__(self, path: Path) -> None:
        private_file(path)  # metadata and erased values: PHI
        self._path = path
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._lock = threading.RLock()
        self._migrate()

    @classmethod
    def from_config(cls, config: Config) -> SQLiteCatalog:
        return cls(config.path(config.catalog.url))

    # -- schema ---------------------------------------------------------------

    def _migrate(self) -> None:
        with self._transaction() as db:
            db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = db.execute("SELECT max(version) FROM schema_version").fetchone()
            current = row[0] or 0
            for version, script in enumerate(MIGRATIONS[current:], start=current + 1):
                for statement in script.split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute("INSERT INTO schema_version (version) VALUES (?)", (version,))

    @property
    def schema_version(self) -> int:
        return self._db.execute("SELECT max(version) FROM schema_version").fetchone()[0]

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # -- writes ---------------------------------------------------------------

    def register_image(self, entry: Entry, metadata: ImageMetadata, volume: Entry) -> Outcome:
        with self._transaction() as db:
            old = db.execute(
                "SELECT guid, content_version, source_digest, protection FROM entries WHERE lfn = ?",
                (entry.lfn,),
            ).fetchone()
            if old and (old["source_digest"], old["protection"]) == (entry.source_digest, entry.protection):
                return Outcome.UNCHANGED
            now = time.time()
            if old:
                guid = old["guid"]
                if (guid, old["content_version"] + 1) != (entry.guid, entry.content_version):
                    raise CatalogConflict(f"{entry.lfn} changed while it was being registered; register it again")
                db.execute(
                    "UPDATE entries SET pfn = ?, size = ?, adler32 = ?, source_digest = ?,"
                    " content_version = ?, protection = ?, modified = ? WHERE guid = ?",
                    (entry.pfn, entry.size, entry.adler32, entry.source_digest, entry.content_version,
                     entry.protection, now, guid),
                )
                self._delete_metadata(db, guid)
            else:
                guid = entry.guid
                self._insert_entry(db, entry, now)
            self._insert_metadata(db, guid, metadata)
            self._upsert_volume(db, volume, now)
            return Outcome.UPDATED if old else Outcome.ADDED

    def _insert_entry(self, db: sqlite3.Connection, entry: Entry, now: float) -> None:
        lfn = normalize_lfn(entry.lfn)
        values = {c: getattr(entry, c) for c in _ENTRY_COLUMNS}
        values.update(lfn=lfn, created=now, modified=now)
        parent, name = posixpath.split(lfn)
        db.execute(
            f"INSERT INTO entries ({', '.join(values)}, parent, name)"
            f" VALUES ({', '.join('?' * (len(values) + 2))})",
            (*values.values(), parent, name),
        )
        db.executemany(
            "INSERT INTO acl (guid, dn, perms, metadata) VALUES (?, ?, ?, ?)",
            [(entry.guid, a.dn, a.perms, a.metadata) for a in entry.acl],
        )
        while parent != "/":
            grandparent = posixpath.dirname(parent)
            inserted = db.execute(
                "INSERT OR IGNORE INTO directories (path, parent) VALUES (?, ?)",
                (parent, grandparent),
            ).rowcount
            if not inserted:
                break
            parent = grandparent

    def _upsert_volume(self, db: sqlite3.Connection, volume: Entry, now: float) -> None:
        bumped = db.execute(
            "UPDATE entries SET content_version = content_version + 1, size = ?,"
            " adler32 = NULL, modified = ? WHERE lfn = ?",
            (volume.size, now, volume.lfn),
        ).rowcount
        if not bumped:
            self._insert_entry(db, volume, now)

    def _insert_metadata(self, db: sqlite3.Connection, guid: str, metadata: ImageMetadata) -> None:
        patient = {"patient_key": metadata.patient_key, **metadata.patient}
        db.execute(
            f"INSERT OR REPLACE INTO patient ({', '.join(patient)})"
            f" VALUES ({', '.join('?' * len(patient))})",
            tuple(patient.values()),
        )
        for table, row in (
            ("image", {"patient_key": metadata.patient_key, **metadata.image}),
            ("medical", metadata.medical),
            ("dicom", metadata.dicom),
        ):
            row = {"guid": guid, **row}
            db.execute(
                f"INSERT INTO {table} ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                tuple(row.values()),
            )
        db.executemany(
            "INSERT INTO protocol (name, guid) VALUES (?, ?)",
            [(name, guid) for name in metadata.protocols],
        )
        db.executemany(
            "INSERT INTO erased (guid, path, keyword, value) VALUES (?, ?, ?, ?)",
            [(guid, *erased) for erased in metadata.erased],
        )

    def _delete_metadata(self, db: sqlite3.Connection, guid: str) -> None:
        row = db.execute("SELECT patient_key FROM image WHERE guid = ?", (guid,)).fetchone()
        for table in ("image", "medical", "dicom", "protocol", "erased"):
            db.execute(f"DELETE FROM {table} WHERE guid = ?", (guid,))
        if row:
            # The Patient table holds the most sensitive data: no row outlives its last image.
            db.execute(
                "DELETE FROM patient WHERE patient_key = ? AND NOT EXISTS"
                " (SELECT 1 FROM image WHERE patient_key = ?)",
                (row["patient_key"], row["patient_key"]),
            )

    def delete(self, lfn: str) -> Entry | None:
        with self._transaction() as db:
            entry = self._entry_where(db, "lfn = ?", normalize_lfn(lfn))
            if entry is None:
                return None
            self._delete_metadata(db, entry.guid)
            db.execute("DELETE FROM entries WHERE guid = ?", (entry.guid,))
            if entry.kind == "slice":
                volume_lfn = posixpath.join(posixpath.dirname(entry.lfn), "3D")
                remaining = db.execute(
                    "SELECT 1 FROM entries WHERE parent = ? AND kind = 'slice' LIMIT 1",
                    (posixpath.dirname(entry.lfn),),
                ).fetchone()
                if remaining:
                    db.execute(
                        "UPDATE entries SET content_version = content_version + 1, size = NULL,"
                        " adler32 = NULL, modified = ? WHERE lfn = ?",
                        (time.time(), volume_lfn),
                    )
                else:
                    db.execute("DELETE FROM entries WHERE lfn = ?", (volume_lfn,))
            self._prune_directories(db, posixpath.dirname(entry.lfn))
            return entry

    def set_rights(
        self, guids: Sequence[str], mode: int | None, metadata_mode: str | None, acl_entries: Sequence[AclEntry]
    ) -> None:
        with self._transaction() as db:
            for guid in guids:
                changed = db.execute(
                    "UPDATE entries SET mode = coalesce(?, mode), metadata_mode = coalesce(?, metadata_mode)"
                    " WHERE guid = ?",
                    (mode, metadata_mode, guid),
                ).rowcount
                if not changed:
                    raise NotFound(f"guid:{guid} is no longer in the catalog; rights not changed")
                db.executemany(
                    "INSERT OR REPLACE INTO acl (guid, dn, perms, metadata) VALUES (?, ?, ?, ?)",
                    [(guid, a.dn, a.perms, a.metadata) for a in acl_entries],
                )

    def _prune_directories(self, db: sqlite3.Connection, path: str) -> None:
        while path != "/" and not (
            db.execute("SELECT 1 FROM entries WHERE parent = ? LIMIT 1", (path,)).fetchone()
            or db.execute("SELECT 1 FROM directories WHERE parent = ? LIMIT 1", (path,)).fetchone()
        ):
            db.execute("DELETE FROM directories WHERE path = ?", (path,))
            path = posixpath.dirname(path)

    # -- reads ----------------------------------------------------------------

    def _entry_where(self, db: sqlite3.Connection, where: str, *params: object) -> Entry | None:
        row = db.execute(
            f"SELECT {', '.join(_ENTRY_COLUMNS)} FROM entries WHERE {where}", params
        ).fetchone()
        return self._entry(db, row) if row else None

    def _entry(self, db: sqlite3.Connection, row: sqlite3.Row) -> Entry:
        acl = tuple(
            AclEntry(a["dn"], a["perms"], a["metadata"])
            for a in db.execute(
                "SELECT dn, perms, metadata FROM acl WHERE guid = ? ORDER BY dn", (row["guid"],)
            )
        )
        return Entry(**dict(row), acl=acl)

    def lookup(self, lfn: str) -> Entry | None:
        with self._lock:
            return self._entry_where(self._db, "lfn = ?", normalize_lfn(lfn))

    def lookup_guid(self, guid: str) -> Entry | None:
        with self._lock:
            return self._entry_where(self._db, "guid = ?", guid.removeprefix("guid:"))

    def lookup_uids(self, triple: UidTriple) -> Entry | None:
        with self._lock:
            found = self._entry_where(
                self._db,
                "study_uid = ? AND series_uid = ? AND sop_uid = ?",
                triple.study, triple.series, triple.sop,
            )
            if found:
                return found
            if triple.is_volume:
                row = self._db.execute(
                    "SELECT e.lfn FROM dicom d JOIN entries e ON e.guid = d.guid"
                    " WHERE d.study_uid = ? AND d.series_uid = ? LIMIT 1",
                    (triple.study, triple.series),
                ).fetchone()
                lfn = posixpath.join(posixpath.dirname(row["lfn"]), "3D") if row else None
                return self._entry_where(self._db, "lfn = ?", lfn) if lfn else None
            return self._entry_where(
                self._db,
                "guid = (SELECT guid FROM dicom WHERE sop_uid = ? AND series_uid = ?"
                " AND study_uid = ?)",
                triple.sop, triple.series, triple.study,
            )

    def list_dir(self, path: str) -> Listing | None:
        path = normalize_lfn(path)
        with self._lock:
            directories = [
                r["path"]
                for r in self._db.execute(
                    "SELECT path FROM directories WHERE parent = ? ORDER BY path", (path,)
                )
            ]
            entries = [
                self._entry(self._db, r)
                for r in self._db.execute(
                    f"SELECT {', '.join(_ENTRY_COLUMNS)} FROM entries WHERE parent = ?"
                    " ORDER BY name",
                    (path,),
                )
            ]
            if not directories and not entries and not self._directory_exists(path):
                return None
            return Listing(directories, entries)

    def series_images(self, directory: str) -> dict[str, dict]:
        with self._lock:
            rows = self._db.execute(
                "SELECT i.* FROM entries e JOIN image i ON i.guid = e.guid WHERE e.parent = ? AND e.kind = 'slice'",
                (normalize_lfn(directory),),
            )
            return {row["guid"]: {c: row[c] for c in IMAGE_FIELDS} for row in rows}

    def _directory_exists(self, path: str) -> bool:
        return bool(
            self._db.execute("SELECT 1 FROM directories WHERE path = ?", (path,)).fetchone()
        )

    def metadata(self, guid: str) -> ImageMetadata | None:
        with self._lock:
            image = self._db.execute("SELECT * FROM image WHERE guid = ?", (guid,)).fetchone()
            if image is None:
                return None
            key = image["patient_key"]
            patient = self._db.execute(
                "SELECT * FROM patient WHERE patient_key = ?", (key,)
            ).fetchone()
            medical = self._db.execute("SELECT * FROM medical WHERE guid = ?", (guid,)).fetchone()
            dicom = self._db.execute("SELECT * FROM dicom WHERE guid = ?", (guid,)).fetchone()
            protocols = self._db.execute(
                "SELECT name FROM protocol WHERE guid = ? ORDER BY name", (guid,)
            ).fetchall()
            erased = self._db.execute(
                "SELECT path, keyword, value FROM erased WHERE guid = ? ORDER BY path", (guid,)
            ).fetchall()
            return ImageMetadata(
                patient_key=key,
                patient={c: patient[c] for c in PATIENT_FIELDS},
                image={c: image[c] for c in IMAGE_FIELDS},
                medical={c: medical[c] for c in MEDICAL_FIELDS},
                dicom={c: dicom[c] for c in _DICOM_COLUMNS},
                protocols=tuple(p["name"] for p in protocols),
                erased=tuple(tuple(row) for row in erased),
            )

    def search(self, query: Query, attributes: Sequence[Attribute], limit: int | None = None) -> Iterator[Match]:
        return metadata_search.search(self._path, _ENTRY_COLUMNS, query, attributes, limit)

    def count(self) -> int:
        with self._lock:
            return self._db.execute("SELECT count(*) FROM entries").fetchone()[0]

    def set_checksum(self, guid: str, version: int, size: int, adler32: str) -> bool:
        with self._transaction() as db:
            return bool(
                db.execute(
                    "UPDATE entries SET size = ?, adler32 = ? WHERE guid = ? AND content_version = ?"
                    " AND adler32 IS NULL",
                    (size, adler32, guid, version),
                ).rowcount
            )

    # -- stage requests ---------------------------------------------------------

    def add_stage_request(self, request: StageRequest) -> None:
        with self._transaction() as db:
            db.execute(
                "INSERT INTO stage_requests (id, requester, created_at, pin_lifetime) VALUES (?, ?, ?, ?)",
                (request.id, request.requester, request.created_at, request.pin_lifetime),
            )
            db.executemany(
                "INSERT INTO stage_files (request_id, position, lfn, guid, state, error, started_at,"
                " finished_at, pin_expires, released) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (request.id, i, f.lfn, f.guid, f.state, f.error, f.started_at, f.finished_at,
                     f.pin_expires, int(f.released))
                    for i, f in enumerate(request.files)
                ],
            )

    def stage_request(self, request_id: str) -> StageRequest | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM stage_requests WHERE id = ?", (request_id,)).fetchone()
            if row is None:
                return None
            files = self._db.execute(
                "SELECT lfn, guid, state, error, started_at, finished_at, pin_expires, released"
                " FROM stage_files WHERE request_id = ? ORDER BY position",
                (request_id,),
            ).fetchall()
        return StageRequest(
            id=row["id"],
            requester=row["requester"],
            created_at=row["created_at"],
            pin_lifetime=row["pin_lifetime"],
            files=tuple(StageFile(**{**dict(f), "released": bool(f["released"])}) for f in files),
        )

    def set_stage_state(self, guid: str, state: str, at: int, error: str | None = None) -> None:
        final = state in FINAL_STATES
        with self._transaction() as db:
            db.execute(
                "UPDATE stage_files SET state = ?, error = ?,"
                " started_at = coalesce(started_at, ?),"
                " finished_at = CASE WHEN ? THEN ? END,"
                " pin_expires = CASE WHEN ? THEN ? + (SELECT pin_lifetime FROM stage_requests"
                "   WHERE id = request_id) END"
                " WHERE guid = ? AND state IN ('SUBMITTED', 'STARTED')",
                (state, error, at, final, at, state == COMPLETED, at, guid),
            )

    def cancel_stage_files(self, request_id: str, lfns: list[str], at: int) -> None:
        with self._transaction() as db:
            db.executemany(
                "UPDATE stage_files SET state = 'CANCELLED', finished_at = ?, released = 1"
                " WHERE request_id = ? AND lfn = ? AND state IN ('SUBMITTED', 'STARTED')",
                [(at, request_id, normalize_lfn(lfn)) for lfn in lfns],
            )

    def release_stage_files(self, request_id: str | None, lfns: list[str] | None) -> None:
        where, params = [], []
        if request_id is not None:
            where.append("request_id = ?")
            params.append(request_id)
        if lfns is not None:
            where.append(f"lfn IN ({', '.join('?' * len(lfns))})")
            params.extend(normalize_lfn(lfn) for lfn in lfns)
        with self._transaction() as db:
            db.execute(f"UPDATE stage_files SET released = 1 WHERE {' AND '.join(where) or '1'}", params)

    def delete_stage_request(self, request_id: str) -> bool:
        with self._transaction() as db:
            return bool(db.execute("DELETE FROM stage_requests WHERE id = ?", (request_id,)).rowcount)

    def staging_guids(self) -> list[str]:
        with self._lock:
            rows = self._db.execute(
                "SELECT f.guid FROM stage_files f JOIN stage_requests r ON r.id = f.request_id"
                " WHERE f.state IN ('SUBMITTED', 'STARTED')"
                " GROUP BY f.guid ORDER BY min(r.created_at), min(f.position)"
            ).fetchall()
        return [r["guid"] for r in rows]

    def pinned_guids(self, now: int) -> set[str]:
        with self._lock:
            rows = self._db.execute(
                "SELECT DISTINCT guid FROM stage_files"
                " WHERE state = 'COMPLETED' AND released = 0 AND pin_expires > ?",
                (now,),
            ).fetchall()
        return {r["guid"] for r in rows}

    def close(self) -> None:
        with self._lock:
            self._db.close()
