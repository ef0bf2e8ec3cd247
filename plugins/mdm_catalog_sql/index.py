"""The metadata index in SQL: the paper's Patient, Image, Medical, DICOM and Protocol
tables and the erased header values, and metadata search compiled into one SELECT.

Where each DICOM keyword of ``srm_dicom.query.ATTRIBUTES`` lives is known here only
(``COLUMNS``); every value the user typed is a bound parameter. Search rows stream from a
connection of the search's own, a batch at a time, so a caller that filters rows by
rights stops reading as soon as it has enough. There is no ORDER BY: with one, SQLite
(no statistics) picks the filter's index and sorts every match before the first row,
1.5 s for a broad query at 10^5 images (tests/bench/bench_query.py); rows come in the
order of the index that answers the query, the same for the same catalog.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from mdm_catalog_sql.database import Database, Row
from mdm_catalog_sql.namespace import ENTRY_COLUMNS, acls_of, entry_of
from srm_dicom.catalog import LOOKUP_CHUNK, AclEntry, Group, RightsFacts
from srm_dicom.metadata_schema import IMAGE_COLUMNS, MEDICAL_FIELDS, PATIENT_FIELDS, ImageMetadata
from srm_dicom.names import normalize_lfn
from srm_dicom.query import ATTRIBUTES, Attribute, Boolean, Comparison, Expr, Match, Query

DICOM_FIELDS = (
    "study_uid", "series_uid", "sop_uid", "deid_study_uid", "deid_series_uid", "deid_sop_uid",
    "sop_class_uid", "transfer_syntax_uid",
)

# Where each searchable keyword is kept (table alias of FROM, column); ProtocolName is many
# rows of the protocol table per image.
COLUMNS: dict[str, str] = {
    "PatientName": "p.name", "PatientID": "p.patient_id", "IssuerOfPatientID": "p.issuer",
    "PatientBirthDate": "p.birth_date", "PatientSex": "p.sex", "PatientAge": "p.age",
    "PatientWeight": "p.weight", "PatientSize": "p.size",
    "Rows": "i.rows", "Columns": "i.columns", "BitsAllocated": "i.bits_allocated", "BitsStored": "i.bits_stored",
    "SamplesPerPixel": "i.samples_per_pixel", "PhotometricInterpretation": "i.photometric",
    "NumberOfFrames": "i.number_of_frames", "PixelSpacing": "i.pixel_spacing", "SliceThickness": "i.slice_thickness",
    "ImagePositionPatient": "i.image_position", "ImageOrientationPatient": "i.image_orientation",
    "InstanceNumber": "i.instance_number",
    "Modality": "m.modality", "BodyPartExamined": "m.body_part", "Manufacturer": "m.manufacturer",
    "ManufacturerModelName": "m.model", "StudyDate": "m.study_date", "SeriesDate": "m.series_date",
    "AcquisitionDate": "m.acquisition_date", "InstitutionName": "m.institution",
    "ReferringPhysicianName": "m.referring_physician", "PerformingPhysicianName": "m.performing_physician",
    "StudyDescription": "m.study_description", "SeriesDescription": "m.series_description",
    "StudyInstanceUID": "d.deid_study_uid", "SeriesInstanceUID": "d.deid_series_uid",
    "SOPInstanceUID": "d.deid_sop_uid", "SOPClassUID": "d.sop_class_uid",
    "TransferSyntaxUID": "d.transfer_syntax_uid", "OriginalStudyInstanceUID": "d.study_uid",
    "OriginalSeriesInstanceUID": "d.series_uid", "OriginalSOPInstanceUID": "d.sop_uid",
    "ProtocolName": "pr.name",
}
assert COLUMNS.keys() == ATTRIBUTES.keys(), "every searchable keyword has a column"

FROM = (
    "entries e JOIN image i ON i.guid = e.guid JOIN medical m ON m.guid = e.guid"
    " JOIN dicom d ON d.guid = e.guid LEFT JOIN patient p ON p.patient_key = i.patient_key"
)
# The joins of FROM by alias, for statements that join only the tables their attributes
# name: SQLite joins row by row, and an unfiltered aggregate at 10^5 images spent 3/4 of its
# time in joins it did not need (tests/bench/bench_query.py).
JOINS = {
    "i": " JOIN image i ON i.guid = e.guid", "m": " JOIN medical m ON m.guid = e.guid",
    "d": " JOIN dicom d ON d.guid = e.guid", "p": " LEFT JOIN patient p ON p.patient_key = i.patient_key",
}
TABLES = {"i": "image i", "m": "medical m", "d": "dicom d"}
# Attributes a slice's entry holds too (column of entries), in the entries_rights index right
# after the rights columns: an aggregate groups on them from that index alone, where probing
# each group's sample in the Medical table was 2/3 of QIDO-RS /studies at 10^5 images (10^4
# probes; README, "QIDO-RS at scale"). Searches read them where COLUMNS says; ``add`` copies them.
HELD = {"Modality": "modality"}
# The columns every rights key starts with, as entries_rights has them after the directory.
_BASE_KEY = ("e.mode", "e.metadata_mode", "e.vo", "e.owner")
_SQL_OPS = {"=": "=", "!=": "!=", "<": "<", "<=": "<=", ">": ">", ">=": ">="}


class SqlMetadataIndex:
    def __init__(self, db: Database) -> None:
        self._db = db

    # -- writes ---------------------------------------------------------------

    def add(self, guid: str, metadata: ImageMetadata) -> None:
        patient = {"patient_key": metadata.patient_key, **metadata.patient}
        updates = ", ".join(f"{c} = excluded.{c}" for c in metadata.patient)
        with self._db.transaction():
            self._db.write(
                f"INSERT INTO patient ({', '.join(patient)}) VALUES ({', '.join('?' * len(patient))})"
                f" ON CONFLICT (patient_key) DO UPDATE SET {updates}",
                tuple(patient.values()),
            )
            for table, values in (
                ("image", {"patient_key": metadata.patient_key, **metadata.image}),
                ("medical", metadata.medical),
                ("dicom", metadata.dicom),
            ):
                row = {"guid": guid, **values}
                self._db.write(
                    f"INSERT INTO {table} ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})", tuple(row.values())
                )
            self._db.write(
                f"UPDATE entries SET {', '.join(f'{c} = ?' for c in HELD.values())} WHERE guid = ?",
                (*(metadata.medical.get(c) for c in HELD.values()), guid),
            )
            self._db.write_many(
                "INSERT INTO protocol (name, guid) VALUES (?, ?)", [(name, guid) for name in metadata.protocols]
            )
            self._db.write_many(
                "INSERT INTO erased (guid, path, keyword, value) VALUES (?, ?, ?, ?)",
                [(guid, *erased) for erased in metadata.erased],
            )

    def remove(self, guid: str) -> None:
        with self._db.transaction():
            row = self._db.row("SELECT patient_key FROM image WHERE guid = ?", (guid,))
            for table in ("image", "medical", "dicom", "protocol", "erased"):
                self._db.write(f"DELETE FROM {table} WHERE guid = ?", (guid,))
            if row:
                # The Patient table holds the most sensitive data: no row outlives its last image.
                self._db.write(
                    "DELETE FROM patient WHERE patient_key = ? AND NOT EXISTS"
                    " (SELECT 1 FROM image WHERE patient_key = ?)",
                    (row["patient_key"], row["patient_key"]),
                )

    # -- reads ----------------------------------------------------------------

    def metadata(self, guid: str) -> ImageMetadata | None:
        with self._db.reading():
            image = self._db.row(f"SELECT patient_key, {', '.join(IMAGE_COLUMNS)} FROM image WHERE guid = ?", (guid,))
            if image is None:
                return None
            key = image["patient_key"]
            patient = self._db.row(f"SELECT {', '.join(PATIENT_FIELDS)} FROM patient WHERE patient_key = ?", (key,))
            medical = self._db.row(f"SELECT {', '.join(MEDICAL_FIELDS)} FROM medical WHERE guid = ?", (guid,))
            dicom = self._db.row(f"SELECT {', '.join(DICOM_FIELDS)} FROM dicom WHERE guid = ?", (guid,))
            protocols = self._db.rows("SELECT name FROM protocol WHERE guid = ? ORDER BY name", (guid,))
            erased = self._db.rows("SELECT path, keyword, value FROM erased WHERE guid = ? ORDER BY path", (guid,))
        return ImageMetadata(
            patient_key=key,
            patient=_numbers(patient, PATIENT_FIELDS),
            image=_numbers(image, IMAGE_COLUMNS),
            medical={c: medical[c] for c in MEDICAL_FIELDS} if medical else dict.fromkeys(MEDICAL_FIELDS),
            dicom={c: dicom[c] for c in DICOM_FIELDS} if dicom else dict.fromkeys(DICOM_FIELDS),
            protocols=tuple(p["name"] for p in protocols),
            erased=tuple((e["path"], e["keyword"], e["value"]) for e in erased),
        )

    def series_images(self, directory: str) -> dict[str, dict]:
        rows = self._db.rows(
            f"SELECT i.guid, {', '.join(f'i.{c}' for c in IMAGE_COLUMNS)}"
            " FROM entries e JOIN image i ON i.guid = e.guid WHERE e.parent = ? AND e.kind = 'slice'",
            (normalize_lfn(directory),),
        )
        return {row["guid"]: _numbers(row, IMAGE_COLUMNS) for row in rows}

    def sop_classes(self, guids: Sequence[str]) -> dict[str, str]:
        found: dict[str, str] = {}
        with self._db.reading():
            for start in range(0, len(guids), 500):  # within every backend's bound-parameter limit
                chunk = list(guids[start:start + 500])
                rows = self._db.rows(
                    f"SELECT guid, sop_class_uid FROM dicom WHERE guid IN ({', '.join('?' * len(chunk))})", chunk
                )
                found.update((row["guid"], row["sop_class_uid"]) for row in rows if row["sop_class_uid"])
        return found

    def original_guid(self, study: str, series: str, sop: str | None) -> str | None:
        if sop is None:
            row = self._db.row("SELECT guid FROM dicom WHERE study_uid = ? AND series_uid = ? LIMIT 1", (study, series))
        else:
            row = self._db.row(
                "SELECT guid FROM dicom WHERE sop_uid = ? AND series_uid = ? AND study_uid = ?", (sop, series, study)
            )
        return row["guid"] if row else None

    # -- search ---------------------------------------------------------------

    def column(self, attribute: Attribute, guid: str = "e.guid") -> str:
        """SQL of an attribute's value for the entry whose GUID is ``guid`` (the FROM's by default)."""
        if attribute.multi:
            joined = self._db.dialect.aggregate(COLUMNS[attribute.keyword], "'\\'")
            return f"(SELECT {joined} FROM protocol pr WHERE pr.guid = {guid})"
        return COLUMNS[attribute.keyword]

    def where(self, node: Expr, params: list[object]) -> str:
        if isinstance(node, Boolean):
            return "(" + f" {node.op.upper()} ".join(self.where(t, params) for t in node.terms) + ")"
        return self._comparison(node, params)

    def _comparison(self, node: Comparison, params: list[object]) -> str:
        column = COLUMNS[node.attribute.keyword]
        if node.op == "like":
            params.append(node.like_pattern())
            test = f"{self._db.dialect.fold(column)} LIKE ? ESCAPE '\\'"
        else:
            params.append(node.value)
            if node.attribute.numeric:
                column = self._db.dialect.number(column)
            test = f"{column} {_SQL_OPS['=' if node.attribute.multi and node.op == '!=' else node.op]} ?"
        if node.attribute.multi:
            exists = "NOT EXISTS" if node.op == "!=" else "EXISTS"
            return f"{exists} (SELECT 1 FROM protocol pr WHERE pr.guid = e.guid AND {test})"
        return test

    def search(
        self, query: Query, attributes: Sequence[Attribute], limit: int | None = None, batch: int = 500
    ) -> Iterator[Match]:
        wanted = {a.keyword: a for a in (*attributes, *query.attributes)}
        select = [f"e.{c}" for c in ENTRY_COLUMNS] + [
            f"{self.column(a)} AS a{n}" for n, a in enumerate(wanted.values())
        ]
        params: list[object] = []
        condition = self.where(query.where, params) if query.where is not None else "TRUE"
        sql = f"SELECT {', '.join(select)} FROM {FROM} WHERE {condition}"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(limit)
        dialect = self._db.dialect
        with dialect.streaming() as connection:
            rows = dialect.stream_cursor(connection)
            rows.execute(dialect.sql(sql), params)
            acl_cursor = connection.cursor()
            while chunk := rows.fetchmany(batch):
                acls = acls_of(dialect, acl_cursor, [r["guid"] for r in chunk])
                for row in chunk:
                    yield _match(row, wanted, acls)

    def matches(self, guids: Sequence[str], attributes: Sequence[Attribute]) -> dict[str, Match]:
        wanted = {a.keyword: a for a in attributes}
        select = [f"e.{c}" for c in ENTRY_COLUMNS] + [
            f"{self.column(a)} AS a{n}" for n, a in enumerate(wanted.values())
        ]
        found: dict[str, Match] = {}
        with self._db.reading() as connection:
            cursor = connection.cursor()
            for start in range(0, len(guids), LOOKUP_CHUNK):
                chunk = list(guids[start:start + LOOKUP_CHUNK])
                test, params = self._db.dialect.any_of("e.guid", chunk)
                rows = self._db.rows(
                    f"SELECT {', '.join(select)} FROM {_joined(wanted.values())} WHERE e.kind = 'slice' AND {test}",
                    params,
                )
                acls = acls_of(self._db.dialect, cursor, [r["guid"] for r in rows])
                found.update((r["guid"], _match(r, wanted, acls)) for r in rows)
        return found

    # -- aggregates ---------------------------------------------------------------

    def _rights_key(self, facts: RightsFacts) -> tuple[list[str], list[object], str, list[object]]:
        """SQL of an entry's rights class for ``facts``: the key's expressions and their
        parameters, and the join (with its parameters) that brings the caller's per-DN entry.
        Owner and VO are keyed as they are, not as "is the caller's": a few more classes (one
        per registrar), and groups come in the order of the entries_rights index, unsorted."""
        keys, params = list(_BASE_KEY), list[object]()
        join, join_params = "", list[object]()
        if facts.dn is not None and self._db.row("SELECT 1 FROM acl WHERE dn = ? LIMIT 1", (facts.dn,)):
            join, join_params = " LEFT JOIN acl a ON a.guid = e.guid AND a.dn = ?", [facts.dn]
            keys += ["coalesce(a.perms, -1)", "coalesce(a.metadata, '')"]
        for base in facts.paths:  # srm_dicom.identity.covers: the path itself or below it, component-wise
            if base != "/":
                keys.append("CASE WHEN e.lfn = ? OR substr(e.lfn, 1, ?) = ? THEN 1 ELSE 0 END")
                params += [base, len(base) + 1, base + "/"]
        return keys, params, join, join_params

    def _sample_value(self, attribute: Attribute) -> str:
        """SQL of a group's sample's value of ``attribute``: one indexed probe of its table, in the
        groups' order (a join of the groups with the tables made PostgreSQL sort them by GUID, and
        compute them again in each parallel worker)."""
        if attribute.multi:
            return self.column(attribute, "g.sample")
        alias = COLUMNS[attribute.keyword].split(".")[0]
        if alias == "p":  # the patient is found through the image
            return f"(SELECT {COLUMNS[attribute.keyword]} FROM image i{JOINS['p']} WHERE i.guid = g.sample)"
        return f"(SELECT {COLUMNS[attribute.keyword]} FROM {TABLES[alias]} WHERE {alias}.guid = g.sample)"

    def aggregate(
        self, query: Query, facts: RightsFacts, flags: Sequence[Query] = (), attributes: Sequence[Attribute] = (),
        per_study: bool = False,
    ) -> list[Group]:
        """Groups per directory, rights class and flags, and per value of each HELD attribute asked
        for (the slices of a group share it, so it is also their sample's); the other attributes
        are the sample's, probed per group. Per study, the series groups are folded again in
        the same statement: 10^3 rows for 10^5 images where Python folded 10^4 (README,
        "QIDO-RS at scale")."""
        keys, key_params, join, join_params = self._rights_key(facts)
        tests, test_params = [], list[object]()
        for flag in flags:
            assert flag.where is not None, "a flag is a condition"
            tests.append(f"CASE WHEN {self.where(flag.where, test_params)} THEN 1 ELSE 0 END")
        condition_params: list[object] = []
        condition = self.where(query.where, condition_params) if query.where is not None else "TRUE"
        wanted = {a.keyword: a for a in attributes}
        held = [k for k in wanted if k in HELD]
        probed = [a for k, a in wanted.items() if k not in HELD]
        split = [f"{k} AS k{n}" for n, k in enumerate(keys)] + [f"{t} AS x{n}" for n, t in enumerate(tests)]
        split += [f"e.{HELD[k]} AS h{n}" for n, k in enumerate(held)]
        # Grouped and ordered as the entries_rights index is (directory, the mode, owner and VO
        # columns every key starts with, then the held attributes): PostgreSQL and SQLite count
        # from that index alone, in its order, without a sort or a hash table.
        base = len(_BASE_KEY)
        names = [f"k{n}" for n in range(base)] + [f"h{n}" for n in range(len(held))]
        names += [f"k{n}" for n in range(base, len(keys))] + [f"x{n}" for n in range(len(tests))]
        columns = [f"k{n}" for n in range(len(keys))] + [f"x{n}" for n in range(len(tests))]
        columns += [f"h{n}" for n in range(len(held))]  # how rows are read below
        values = "".join(f", {self._sample_value(a)} AS a{n}" for n, a in enumerate(probed))
        filtered = [*query.attributes, *(a for flag in flags for a in flag.attributes)]
        series = (
            f"SELECT e.parent AS directory, {', '.join(split)}, count(*) AS n, min(e.guid) AS sample"
            f" FROM {_joined(filtered)}{join} WHERE e.kind = 'slice' AND {condition}"
            f" GROUP BY e.parent, {', '.join(names)}"
        )
        order = ", ".join(f"g.{n}" for n in names)
        kept = ", ".join(f"g.{c}" for c in columns)
        if per_study:
            # A series directory ends in its Series Instance UID (digits and dots, names.parse_lfn):
            # trimmed of it and of its slash, it is its study's. The groups of one series are apart
            # (each rights class, flag, Modality): a study's group counts each of its series once.
            # Which series, only where the study has other groups, as the core must not count a
            # series of two groups twice.
            listed = self._db.dialect.aggregate("g.directory", "'|'")
            studies = (
                f"SELECT rtrim(rtrim(g.directory, '0123456789.'), '/') AS study, {kept}, sum(g.n) AS n,"
                f" min(g.sample) AS sample, count(*) AS series, {listed} AS listed"
                f" FROM ({series}) g GROUP BY study, {kept}"
            )
            sql = (
                f"SELECT g.study, {kept}, g.n, g.sample, g.series,"
                f" CASE WHEN count(*) OVER (PARTITION BY g.study) > 1 THEN g.listed END{values}"
                f" FROM ({studies}) g ORDER BY g.study, {order}"
            )
        else:
            sql = (f"SELECT g.directory, {kept}, g.n, g.sample, 1, NULL{values} FROM ({series}) g"
                   f" ORDER BY g.directory, {order}")
        rows = self._db.tuples(sql, [*key_params, *test_params, *join_params, *condition_params])
        # Each row: directory, keys, flags, held values, count, sample, series, the series
        # listed (or NULL), probed values.
        flagged = len(keys) + 1
        held_at = flagged + len(tests)
        count_at = held_at + len(held)
        keywords = [*held, *(a.keyword for a in probed)]
        numeric = [k for k, a in wanted.items() if a.numeric]
        groups = []
        for r in rows:  # by position, no per-row mapping: 10^4 rows for 10^5 images
            found = Group(r[0], r[1:flagged], tuple(bool(x) for x in r[flagged:held_at]), int(r[count_at]),
                          r[count_at + 1], dict(zip(keywords, r[held_at:count_at] + r[count_at + 4:], strict=True)),
                          series=int(r[count_at + 2]),
                          series_directories=tuple(r[count_at + 3].split("|")) if r[count_at + 3] else ())
            for k in numeric:
                found.values[k] = as_number(found.values[k])
            groups.append(found)
        return groups


# Header values kept as numbers: a backend may store them as text (PostgreSQL keeps DS and IS
# as TEXT, so that a value breaking its VR is kept, as SQLite keeps it); they read back as
# numbers where they are numbers, as the text that was written otherwise.
NUMERIC_FIELDS = frozenset({
    "weight", "size", "rows", "columns", "bits_allocated", "bits_stored", "samples_per_pixel", "slice_thickness",
    "instance_number", "pixel_representation", "rescale_slope", "rescale_intercept",
})


def _joined(attributes: Iterable[Attribute], entries: str = "entries e") -> str:
    """``entries`` joined with only the tables ``attributes`` live in (ProtocolName is a
    subquery of its own)."""
    aliases = {COLUMNS[a.keyword].split(".")[0] for a in attributes if not a.multi}
    if "p" in aliases:
        aliases.add("i")  # the patient is found through the image
    return entries + "".join(join for alias, join in JOINS.items() if alias in aliases)


def _values(row: Row, wanted: Mapping[str, Attribute]) -> dict[str, Any]:
    """The attribute values of a row that selected ``wanted`` as a0, a1, …"""
    return {k: as_number(row[f"a{n}"]) if a.numeric else row[f"a{n}"] for n, (k, a) in enumerate(wanted.items())}


def _match(row: Row, wanted: Mapping[str, Attribute], acls: Mapping[str, tuple[AclEntry, ...]]) -> Match:
    return Match(entry_of(row, acls.get(row["guid"], ())), _values(row, wanted))


def as_number(value: object) -> object:
    if not isinstance(value, str):
        return value
    try:
        return int(value)
    except ValueError:
        try:
            return float(value)
        except ValueError:
            return value


def _numbers(row: Row | None, fields: Iterable[str]) -> dict[str, Any]:
    if row is None:
        return dict.fromkeys(fields)
    return {c: as_number(row[c]) if c in NUMERIC_FIELDS else row[c] for c in fields}
