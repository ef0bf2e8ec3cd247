"""The stage store in SQL: stage requests (SRM prepareToGet / WLCG Tape REST), their
per-file states and pins, and the site's staging jobs.

A job is claimed in one write transaction: the oldest claimable row and the claimable rows
of its batch are selected with the dialect's row locks (PostgreSQL: FOR UPDATE SKIP LOCKED,
so two front ends claiming at once take different batches and never the same row; SQLite:
the transaction already holds the database's one write lock), then marked with the
holder and its lease. Only a lapsed lease makes a running job claimable again.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from mdm_catalog_sql.database import Database, Row
from srm_dicom.catalog import COMPLETED, FINAL_STATES, StageFile, StageJob, StageRequest
from srm_dicom.names import normalize_lfn

_JOB_COLUMNS = "guid, batch, attempt, state, holder, lease_expires, error"


def _job(row: Row) -> StageJob:
    return StageJob(row["guid"], row["batch"], row["attempt"], row["state"], row["holder"], row["lease_expires"],
                    row["error"])


def _marks(values: Sequence[object]) -> str:
    return ", ".join("?" * len(values))


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

    def reopen_stage_files(self, request_id: str, guids: Sequence[str]) -> None:
        if guids:
            self._db.write(
                "UPDATE stage_files SET state = 'SUBMITTED', started_at = NULL, finished_at = NULL,"
                f" pin_expires = NULL WHERE request_id = ? AND state = 'COMPLETED' AND guid IN ({_marks(guids)})",
                (request_id, *guids),
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

    def protected_guids(self, now: int) -> set[str]:
        rows = self._db.rows(
            "SELECT guid FROM stage_files WHERE state = 'COMPLETED' AND released = 0 AND pin_expires > ?"
            " UNION SELECT guid FROM stage_jobs WHERE state = 'STARTED'",
            (now,),
        )
        return {r["guid"] for r in rows}

    # -- staging jobs ---------------------------------------------------------------

    def _claimable(self) -> str:
        return f"(state = 'SUBMITTED' OR (state = 'STARTED' AND lease_expires < {self._db.dialect.clock}))"

    def enqueue_jobs(self, batches: Mapping[str, str]) -> dict[str, int]:
        if not batches:
            return {}
        # Rows are written in GUID order, whatever the caller's: two front ends queueing one series
        # at once (a slice, then its series read ahead, each in its own order) lock the rows in
        # one order on PostgreSQL, so neither waits on the other in a deadlock. seq keeps the
        # caller's order, counted on from the last; two transactions queueing at the same
        # instant may tie, and then the GUID decides, fair enough for an order of work.
        with self._db.transaction():
            base = self._db.tuples("SELECT coalesce(max(seq), 0) FROM stage_jobs")[0][0]
            rows = sorted((guid, batch, base + 1 + position) for position, (guid, batch) in enumerate(batches.items()))
            self._db.write_many(
                "INSERT INTO stage_jobs (guid, batch, attempt, state, seq) VALUES (?, ?, 1, 'SUBMITTED', ?)"
                " ON CONFLICT (guid) DO UPDATE SET batch = excluded.batch, attempt = stage_jobs.attempt + 1,"
                " state = 'SUBMITTED', holder = NULL, lease_expires = NULL, error = NULL,"
                " seq = excluded.seq, finished_at = NULL"
                " WHERE stage_jobs.state IN ('COMPLETED', 'FAILED')",
                rows,
            )
            return {job.guid: job.attempt for job in self.jobs(list(batches)).values()}

    def claim_jobs(self, holder: str, lease: float, limit: int) -> list[StageJob]:
        claimable, lock = self._claimable(), self._db.dialect.skip_locked
        # A look first, outside any write transaction: idle front ends poll this.
        if self._db.row(f"SELECT 1 AS found FROM stage_jobs WHERE {claimable} LIMIT 1") is None:
            return []
        with self._db.transaction():
            first = self._db.row(
                f"SELECT batch FROM stage_jobs WHERE {claimable} ORDER BY seq, guid LIMIT 1{lock}"
            )
            if first is None:
                return []
            rows = self._db.rows(
                f"SELECT guid FROM stage_jobs WHERE batch = ? AND {claimable} ORDER BY seq, guid LIMIT ?{lock}",
                (first["batch"], limit),
            )
            guids = [r["guid"] for r in rows]
            self._db.write(
                f"UPDATE stage_jobs SET state = 'STARTED', holder = ?, lease_expires = {self._db.dialect.clock} + ?"
                f" WHERE guid IN ({_marks(guids)})",
                (holder, lease, *guids),
            )
            found = self.jobs(guids)
            return [found[guid] for guid in guids]

    def renew_jobs(self, holder: str, guids: Sequence[str], lease: float) -> int:
        if not guids:
            return 0
        return self._db.write(
            f"UPDATE stage_jobs SET lease_expires = {self._db.dialect.clock} + ?"
            f" WHERE holder = ? AND state = 'STARTED' AND guid IN ({_marks(guids)})",
            (lease, holder, *guids),
        )

    def finish_jobs(self, holder: str, outcomes: Mapping[str, tuple[str, str | None]], at: int) -> None:
        # The jobs first: their rows locked, a request queueing one of them meanwhile waits for
        # this end and queues it again; the files then include every request written before.
        # In GUID order, as enqueue_jobs locks them, so the two never deadlock.
        outcomes = dict(sorted(outcomes.items()))
        with self._db.transaction():
            self._db.write_many(
                f"UPDATE stage_jobs SET state = ?, error = ?, holder = NULL, lease_expires = NULL,"
                f" finished_at = {self._db.dialect.clock} WHERE guid = ? AND holder = ? AND state = 'STARTED'",
                [(state, error, guid, holder) for guid, (state, error) in outcomes.items()],
            )
            self.set_stage_states(outcomes, at)

    def release_jobs(self, holder: str, guids: Sequence[str]) -> None:
        if guids:
            self._db.write(
                "UPDATE stage_jobs SET state = 'SUBMITTED', holder = NULL, lease_expires = NULL"
                f" WHERE holder = ? AND state = 'STARTED' AND guid IN ({_marks(guids)})",
                (holder, *guids),
            )

    def jobs(self, guids: Sequence[str]) -> dict[str, StageJob]:
        found: dict[str, StageJob] = {}
        unique = list(dict.fromkeys(guids))
        for start in range(0, len(unique), 500):  # a waiter may watch thousands: statements of 500
            part = unique[start:start + 500]
            for row in self._db.rows(f"SELECT {_JOB_COLUMNS} FROM stage_jobs WHERE guid IN ({_marks(part)})", part):
                found[row["guid"]] = _job(row)
        return found
