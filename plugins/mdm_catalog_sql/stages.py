"""The stage store in SQL: stage requests (SRM prepareToGet / WLCG Tape REST), their
per-file states and pins."""

from __future__ import annotations

from collections.abc import Mapping

from mdm_catalog_sql.database import Database
from srm_dicom.catalog import COMPLETED, FINAL_STATES, StageFile, StageRequest
from srm_dicom.names import normalize_lfn


class SqlStageStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    def add_stage_request(self, request: StageRequest) -> None:
        with self._db.transaction():
            self._db.write(
                "INSERT INTO stage_requests (id, requester, created_at, pin_lifetime) VALUES (?, ?, ?, ?)",
                (request.id, request.requester, request.created_at, request.pin_lifetime),
            )
            self._db.write_many(
                "INSERT INTO stage_files (request_id, position, lfn, guid, state, error, started_at,"
                " finished_at, pin_expires, released) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (request.id, i, f.lfn, f.guid, f.state, f.error, f.started_at, f.finished_at,
                     f.pin_expires, int(f.released))
                    for i, f in enumerate(request.files)
                ],
            )

    def stage_request(self, request_id: str) -> StageRequest | None:
        with self._db.reading():
            row = self._db.row(
                "SELECT id, requester, created_at, pin_lifetime FROM stage_requests WHERE id = ?", (request_id,)
            )
            if row is None:
                return None
            files = self._db.rows(
                "SELECT lfn, guid, state, error, started_at, finished_at, pin_expires, released"
                " FROM stage_files WHERE request_id = ? ORDER BY position",
                (request_id,),
            )
        return StageRequest(
            id=row["id"],
            requester=row["requester"],
            created_at=row["created_at"],
            pin_lifetime=row["pin_lifetime"],
            files=tuple(
                StageFile(
                    lfn=f["lfn"], guid=f["guid"], state=f["state"], error=f["error"], started_at=f["started_at"],
                    finished_at=f["finished_at"], pin_expires=f["pin_expires"], released=bool(f["released"]),
                )
                for f in files
            ),
        )

    def set_stage_state(self, guid: str, state: str, at: int, error: str | None = None) -> None:
        self.set_stage_states({guid: (state, error)}, at)

    def set_stage_states(self, states: Mapping[str, tuple[str, str | None]], at: int) -> None:
        self._db.write_many(
            "UPDATE stage_files SET state = ?, error = ?,"
            " started_at = coalesce(started_at, ?),"
            " finished_at = CASE WHEN ? THEN ? END,"
            " pin_expires = CASE WHEN ? THEN ? + (SELECT pin_lifetime FROM stage_requests"
            "   WHERE id = request_id) END"
            " WHERE guid = ? AND state IN ('SUBMITTED', 'STARTED')",
            [
                (state, error, at, state in FINAL_STATES, at, state == COMPLETED, at, guid)
                for guid, (state, error) in states.items()
            ],
        )

    def cancel_stage_files(self, request_id: str, lfns: list[str], at: int) -> None:
        self._db.write_many(
            "UPDATE stage_files SET state = 'CANCELLED', finished_at = ?, released = 1"
            " WHERE request_id = ? AND lfn = ? AND state IN ('SUBMITTED', 'STARTED')",
            [(at, request_id, normalize_lfn(lfn)) for lfn in lfns],
        )

    def release_stage_files(self, request_id: str | None, lfns: list[str] | None) -> None:
        where: list[str] = []
        params: list[object] = []
        if request_id is not None:
            where.append("request_id = ?")
            params.append(request_id)
        if lfns is not None:
            if not lfns:
                return
            where.append(f"lfn IN ({', '.join('?' * len(lfns))})")
            params.extend(normalize_lfn(lfn) for lfn in lfns)
        self._db.write(f"UPDATE stage_files SET released = 1 WHERE {' AND '.join(where) or 'TRUE'}", params)

    def delete_stage_request(self, request_id: str) -> bool:
        return bool(self._db.write("DELETE FROM stage_requests WHERE id = ?", (request_id,)))

    def staging_guids(self) -> list[str]:
        rows = self._db.rows(
            "SELECT f.guid FROM stage_files f JOIN stage_requests r ON r.id = f.request_id"
            " WHERE f.state IN ('SUBMITTED', 'STARTED')"
            " GROUP BY f.guid ORDER BY min(r.created_at), min(f.position)"
        )
        return [r["guid"] for r in rows]

    def pinned_guids(self, now: int) -> set[str]:
        rows = self._db.rows(
            "SELECT DISTINCT guid FROM stage_files WHERE state = 'COMPLETED' AND released = 0 AND pin_expires > ?",
            (now,),
        )
        return {r["guid"] for r in rows}
