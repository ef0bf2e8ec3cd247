"""Catalog on either backend: registration rate, and lookup latency at 10^3 and 10^6 entries.

Run: python tests/bench/bench_catalog.py [--studies 10000] [--lookups 10000] [--backend sqlite|postgresql]

Four catalogs of the backend (SQLite files in a temporary directory under /tmp, or
PostgreSQL databases of their own on ``--postgres``, dropped at the end), opened with
``open_catalog`` from a parsed config, holding studies x series x slices images with one
patient per study (default 10^4 x 10 x 10 = 10^6 slices, plus one ``3D`` entry per series):

- honest: ``Catalog.register_image`` for ``--honest`` slices, timed: the rate a
  registration gets from the catalog alone (no DICOM, no PACS).
- small (``--small-studies``, 10^3 slices) and large (``--studies``): filled straight into
  the schema (``executemany`` on SQLite, ``COPY`` on PostgreSQL), in the rows
  ``register_image`` writes for the same images (entries and their directories, patient,
  image, medical, dicom, protocol; the volume's content version counts its slices as the
  bumps would). Before any lookup, one series of the large catalog is compared with the
  same series registered by ``register_image`` into a reference catalog of the same
  backend: every table, every column but the two timestamps, must be equal. Both catalogs
  are filled the same way so their B-trees compare.

The peer is the same lookup on the 1000x smaller catalog in the same run: an indexed
lookup stays flat (ratio ~1); a scan grows with the entries (ratio ~1000). Listing the
VO root returns one directory per study, so it grows with the studies by design: its
per-item figure is the one that must stay flat.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import posixpath
import random
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path
from typing import Any

# The tree this script lives in, ahead of whatever the shared interpreter has installed in
# editable mode (a CI run elsewhere re-points it).
ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "plugins")]

import srm_dicom  # noqa: E402
from srm_dicom.catalog import Catalog, Entry, open_catalog  # noqa: E402
from srm_dicom.config import Config, parse_config  # noqa: E402
from srm_dicom.metadata_schema import ImageMetadata  # noqa: E402
from srm_dicom.names import VOLUME, UidTriple, pfn, vo_root  # noqa: E402
from srm_dicom.rights import parse_mode  # noqa: E402
from srm_dicom.uids import deidentify_uid, patient_key  # noqa: E402

SERIES, SLICES = 10, 10
ORIGINAL_ROOT = "1.2.826.0.1.3680043.8.498"  # pydicom's root: original UIDs look like a PACS's
TIMESTAMPS = {"created", "modified"}


@dataclass(frozen=True)
class Image:
    """One slice as a registration hands it to the catalog, with its series volume."""

    entry: Entry
    metadata: ImageMetadata
    volume: Entry
    original: UidTriple


class Images:
    """Deterministic images: image (i, j, k) is slice k of series j of study i, the same in every catalog."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.secret = config.site.secret_bytes
        self.mode = parse_mode(config.site.file_mode)
        self.root = vo_root(config.site.vo)
        # Study and series UIDs repeat over their slices: hash each once (the fill is CPU-bound).
        self._deidentify = lru_cache(maxsize=1 << 16)(partial(deidentify_uid, self.secret))
        self.volume = lru_cache(maxsize=1 << 10)(self._volume)

    def original(self, i: int, j: int, k: int | None = None) -> UidTriple:
        study = f"{ORIGINAL_ROOT}.{i + 1}"
        series = f"{study}.{j + 1}"
        return UidTriple(study, series, VOLUME if k is None else f"{series}.{k + 1}")

    def names(self, original: UidTriple) -> UidTriple:
        sop = original.sop if original.is_volume else deidentify_uid(self.secret, original.sop)
        return UidTriple(self._deidentify(original.study), self._deidentify(original.series), sop)

    @staticmethod
    def guid(i: int, j: int, k: int | None) -> str:
        return str(uuid.UUID(bytes=hashlib.md5(f"{i}/{j}/{k}".encode()).digest(), version=4))

    def _entry(self, original: UidTriple, names: UidTriple, guid: str, kind: str, **extra: object) -> Entry:
        site, pacs = self.config.site, self.config.pacs
        sop = None if original.is_volume else original.sop
        return Entry(
            lfn=names.lfn(site.vo), guid=guid,
            pfn=pfn(pacs.aet, pacs.host, pacs.port, original.study, original.series, sop),
            kind=kind, study_uid=names.study, series_uid=names.series, sop_uid=names.sop,
            owner=site.registrar, vo=site.vo, mode=self.mode, metadata_mode=site.metadata_mode,
            **extra,  # type: ignore[arg-type]
        )

    def image(self, i: int, j: int, k: int) -> Image:
        original = self.original(i, j, k)
        names = self.names(original)
        digest = hashlib.sha256(original.sop.encode()).hexdigest()
        entry = self._entry(
            original, names, self.guid(i, j, k), "slice", size=133_000 + k, adler32=digest[:8], source_digest=digest
        )
        patient_id = f"PAT{i:07d}"
        metadata = ImageMetadata(
            patient_key=patient_key(self.secret, patient_id),
            patient={
                "name": f"DOE^PATIENT{i}", "patient_id": patient_id, "issuer": None, "birth_date": "19700101",
                "sex": "O", "age": "056Y", "weight": 70.0, "size": 1.75,
            },
            image={
                "rows": 512, "columns": 512, "bits_allocated": 16, "bits_stored": 12, "samples_per_pixel": 1,
                "photometric": "MONOCHROME2", "number_of_frames": None, "pixel_spacing": "0.7\\0.7",
                "slice_thickness": 1.0, "image_position": f"-180\\-180\\{k}", "image_orientation": "1\\0\\0\\0\\1\\0",
                "instance_number": k + 1,
            },
            medical={
                "modality": "CT", "study_date": "20260101", "series_date": "20260101", "acquisition_date": "20260101",
                "body_part": "HEAD", "institution": "Bench Hospital", "referring_physician": "DOE^REFERRER",
                "performing_physician": None, "study_description": f"study {i}", "series_description": f"series {j}",
                "manufacturer": "srm-dicom", "model": "bench",
            },
            dicom={
                "study_uid": original.study, "series_uid": original.series, "sop_uid": original.sop,
                "deid_study_uid": names.study, "deid_series_uid": names.series, "deid_sop_uid": names.sop,
                "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2", "transfer_syntax_uid": "1.2.840.10008.1.2.1",
            },
            protocols=("head-routine",),
        )
        return Image(entry, metadata, self.volume(i, j), original)

    def _volume(self, i: int, j: int) -> Entry:
        original = self.original(i, j)
        return self._entry(original, self.names(original), self.guid(i, j, None), "volume")

    def all(self, studies: int) -> Iterator[Image]:
        for i in range(studies):
            for j in range(SERIES):
                for k in range(SLICES):
                    yield self.image(i, j, k)


def make_config(directory: Path, name: str, url: str | None = None, sqlite: dict[str, int] | None = None) -> Config:
    """A site of the bench: its catalog an SQLite file ``name``.db (``sqlite``: its [catalog]
    cache_mib and mmap_mib, if not the defaults), or the PostgreSQL database at ``url``."""
    catalog = {"backend": "postgresql", "url": url} if url else {"backend": "sqlite", "url": f"{name}.db",
                                                                  **(sqlite or {})}
    return parse_config(
        {"site": {"vo": "biomed", "secret": "bench site secret, not for production"}, "catalog": catalog}, directory
    )


@contextlib.contextmanager
def postgres_database(server: str, name: str) -> Iterator[str]:
    """The URL of a new database on ``server`` (a database with the right to create others),
    dropped afterwards."""
    import psycopg

    database = f"mdm_bench_{name}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(server, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{database}"')
        try:
            yield f"{server.rsplit('/', 1)[0]}/{database}"
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')


def site(stack: contextlib.ExitStack, directory: Path, name: str, backend: str, server: str,
         sqlite: dict[str, int] | None = None) -> Config:
    """A bench site on ``backend`` whose catalog lives as long as ``stack``."""
    url = stack.enter_context(postgres_database(server, name)) if backend == "postgresql" else None
    return make_config(directory, name, url, sqlite)


def kept_site(keep: Path, name: str, backend: str, server: str, sqlite: dict[str, int] | None,
              entries: int) -> tuple[Config, bool]:
    """A bench site of ``--keep``: the SQLite file ``name``.db in ``keep``, or the PostgreSQL
    database named after ``keep`` and ``name``, never removed; and whether it already holds the
    ``entries`` a fill leaves (else it is emptied, to be filled again)."""
    url = None
    if backend == "postgresql":
        import psycopg

        database = f"mdm_bench_keep_{keep.name}_{name}".replace("-", "_").lower()
        url = f"{server.rsplit('/', 1)[0]}/{database}"
        with psycopg.connect(server, autocommit=True) as admin:
            if not admin.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,)).fetchone():
                admin.execute(f'CREATE DATABASE "{database}"')
    config = make_config(keep, name, url, sqlite)
    filled = False
    with contextlib.suppress(Exception), contextlib.closing(Reader(config)) as reader:  # no file, no schema yet
        filled = reader.rows("SELECT count(*) FROM entries")[0][0] == entries
    if not filled:
        if url:
            with contextlib.closing(Reader(config)) as reader:
                for table in reader.tables():
                    reader.db.execute(f"DROP TABLE {table} CASCADE")
        else:
            for suffix in ("", "-wal", "-shm"):
                Path(f"{config.path(config.catalog.url)}{suffix}").unlink(missing_ok=True)
    return config, filled


# -- filling --------------------------------------------------------------------------


def register_honestly(catalog: Catalog, images: Iterator[Image]) -> tuple[int, float]:
    """register_image for each image; returns (count, seconds)."""
    count, start = 0, time.perf_counter()
    for image in images:
        catalog.register_image(image.entry, image.metadata, image.volume)
        count += 1
    return count, time.perf_counter() - start


class BulkWriter:
    """The rows register_image writes, for many images at once (see the module docstring)."""

    def __init__(self, columns: dict[str, list[str]]) -> None:
        self.columns = columns  # by column name: the schema grows by migrations
        self.entry_columns = self.columns["entries"]
        self.rows: dict[str, list[tuple[object, ...]]] = {}
        self.directories: set[str] = set()
        self.patients: dict[str, tuple[object, ...]] = {}  # register_image replaces a patient's row per image

    def _add(self, table: str, row: tuple[object, ...]) -> None:
        self.rows.setdefault(table, []).append(row)

    def _entry(self, entry: Entry, now: float, content_version: int, modality: str | None = None) -> None:
        parent, name = posixpath.split(entry.lfn)
        values = {"parent": parent, "name": name, "created": now, "modified": now, "content_version": content_version,
                  "modality": modality}  # a slice's entry holds its Modality too (mdm_catalog_sql.index.HELD)
        self._add("entries", tuple(values[c] if c in values else getattr(entry, c) for c in self.entry_columns))
        while parent != "/" and parent not in self.directories:
            self.directories.add(parent)
            self._add("directories", (parent, posixpath.dirname(parent)))
            parent = posixpath.dirname(parent)

    def add(self, image: Image, now: float) -> None:
        self._entry(image.entry, now, 1, image.metadata.medical["modality"])
        if image.original.sop.endswith(f".{SLICES}"):  # the series' last slice: its volume, bumped per slice
            self._entry(image.volume, now, SLICES)
        meta, guid = image.metadata, image.entry.guid
        patient = {"patient_key": meta.patient_key, **meta.patient}
        self.patients[meta.patient_key] = tuple(patient.get(c) for c in self.columns["patient"])
        for table, values in (
            ("image", {"patient_key": meta.patient_key, **meta.image}), ("medical", meta.medical), ("dicom", meta.dicom)
        ):
            row = {"guid": guid, **values}
            self._add(table, tuple(row.get(c) for c in self.columns[table]))
        for protocol in meta.protocols:
            self._add("protocol", tuple({"name": protocol, "guid": guid}[c] for c in self.columns["protocol"]))

    def take(self) -> dict[str, list[tuple[object, ...]]]:
        """The rows gathered since the last call, table by table (parents first), patients last."""
        rows = {**self.rows, "patient": list(self.patients.values())}
        self.rows, self.patients = {}, {}
        return rows


FILLED = ("entries", "directories", "image", "medical", "dicom", "protocol", "patient")


def table_columns(connection: Any, table: str) -> list[str]:
    """A table's columns in order (sqlite3 and psycopg alike)."""
    cursor = connection.cursor()
    cursor.execute(f"SELECT * FROM {table} WHERE 1 = 0")
    return [d[0] for d in cursor.description]


def bulk_fill(config: Config, images: Images, studies: int) -> float:
    """Fill the catalog of ``config`` (schema already made by the backend), with executemany on
    SQLite and COPY on PostgreSQL, 100 studies a transaction; returns seconds. A study's patient
    is in one batch only, so PostgreSQL's COPY needs no upsert."""
    postgres = config.catalog.backend == "postgresql"
    if postgres:
        import psycopg

        db: Any = psycopg.connect(config.catalog.url, autocommit=True)  # each batch in a transaction of its own
        db.execute("SET synchronous_commit = off")
    else:
        db = sqlite3.connect(config.path(config.catalog.url), isolation_level=None)
        db.execute("PRAGMA synchronous=OFF")
        db.execute("PRAGMA cache_size=-1048576")  # 1 GiB: random B-tree inserts stay in memory
    writer = BulkWriter({table: table_columns(db, table) for table in FILLED})
    start, now = time.perf_counter(), time.time()
    for i in range(studies):
        for j in range(SERIES):
            for k in range(SLICES):
                writer.add(images.image(i, j, k), now)
        if i % 100 == 99 or i == studies - 1:
            batch = writer.take()
            if postgres:
                with db.transaction():
                    for table, rows in batch.items():
                        with db.cursor().copy(f"COPY {table} ({', '.join(writer.columns[table])}) FROM STDIN") as copy:
                            for row in rows:
                                copy.write_row(postgres_text(row))
            else:
                db.execute("BEGIN")
                for table, rows in batch.items():
                    verb = "INSERT OR REPLACE" if table == "patient" else "INSERT"
                    db.executemany(f"{verb} INTO {table} VALUES ({', '.join('?' * len(rows[0]))})", rows)
                db.execute("COMMIT")
    if postgres:
        # Fresh statistics and the visibility map, as autovacuum leaves them after a bulk load:
        # without the map PostgreSQL cannot count from an index alone (index-only scans).
        db.execute("VACUUM ANALYZE")
    else:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # no ANALYZE: the backend never runs it, plans stay its own
    db.close()
    return time.perf_counter() - start


def postgres_text(row: tuple[object, ...]) -> tuple[object, ...]:
    """Values as an INSERT of register_image stores them: PostgreSQL keeps DS and IS header values
    as TEXT, where a bound float 70.0 is cast to '70' (COPY would write Python's '70.0')."""
    return tuple(repr(v).removesuffix(".0") if isinstance(v, float) else v for v in row)


# -- checking the bulk rows against register_image ------------------------------------


class Reader:
    """Reads of either backend's database: sqlite3 or psycopg, ``?`` placeholders."""

    def __init__(self, config: Config) -> None:
        self.postgres = config.catalog.backend == "postgresql"
        if self.postgres:
            import psycopg

            self.db: Any = psycopg.connect(config.catalog.url, autocommit=True)
        else:
            self.db = sqlite3.connect(f"{config.path(config.catalog.url).as_uri()}?mode=rw", uri=True)

    def close(self) -> None:
        self.db.close()

    def rows(self, sql: str, params: Sequence[object] = ()) -> list[tuple[object, ...]]:
        cursor = self.db.cursor()
        cursor.execute(sql.replace("?", "%s") if self.postgres else sql, params)
        return [tuple(r) for r in cursor.fetchall()]

    def tables(self) -> list[str]:
        if self.postgres:
            return [r[0] for r in self.rows("SELECT table_name FROM information_schema.tables"
                                            " WHERE table_schema = 'public'")]
        return [r[0] for r in self.rows("SELECT name FROM sqlite_master WHERE type = 'table'"
                                        " AND name NOT LIKE 'sqlite_%'")]


def series_rows(config: Config, study_uid: str, series_uid: str) -> dict[str, list[tuple[object, ...]]]:
    """Every table's rows belonging to one series (by its entries' GUIDs, its patient, its directories)."""
    reader = Reader(config)
    try:
        guids = [r[0] for r in reader.rows(
            "SELECT guid FROM entries WHERE study_uid = ? AND series_uid = ?", (study_uid, series_uid))]
        marks = ", ".join("?" * len(guids))
        out = {}
        for table in reader.tables():
            columns = table_columns(reader.db, table)
            if "guid" in columns and table != "stage_jobs":
                where, params = f"guid IN ({marks})", guids
            elif table == "patient":
                where, params = "patient_key IN (SELECT patient_key FROM image WHERE guid IN (" + marks + "))", guids
            elif table == "directories":
                where, params = "path IN (SELECT parent FROM entries WHERE guid IN (" + marks + "))", guids
            elif table in ("schema_version", "stage_requests", "stage_jobs"):
                where, params = "1 = 1", []
            else:
                raise SystemExit(f"bench does not know which rows of table {table} belong to a series: update it")
            keep = [c for c in columns if c not in TIMESTAMPS]
            out[table] = sorted(reader.rows(f"SELECT {', '.join(keep)} FROM {table} WHERE {where}", params), key=repr)
        return out
    finally:
        reader.close()


def check_bulk_matches(reference: Config, images: Images, large: Config) -> None:
    """One series registered by register_image into the empty ``reference`` catalog (same backend)
    has the rows the bulk fill wrote for it into ``large``."""
    catalog = open_catalog(reference)
    register_honestly(catalog, (images.image(0, 3, k) for k in range(SLICES)))
    catalog.close()
    names = images.names(images.original(0, 3))
    expected = series_rows(reference, names.study, names.series)
    found = series_rows(large, names.study, names.series)
    for table, rows in expected.items():
        if found.get(table) != rows:
            raise SystemExit(f"bulk rows of table {table} differ from register_image's:\n{rows}\n{found.get(table)}")


# -- lookups --------------------------------------------------------------------------


@dataclass
class Timing:
    calls: int
    median_us: float
    p99_us: float
    items: float  # mean entries + directories returned
    round_medians_us: list[float]  # one per pass over the keys


def timed_pass(calls: dict[str, list[Callable[[], object]]], deadline: int) -> tuple[dict[str, list[int]], list[int]]:
    """One pass over the keys, the catalogs' calls taken in turn (one of each, then the next,
    the order swapped every call) so that both see the same load of the shared machine and
    neither always runs right after the other; stops at ``deadline`` (a scan at 10^6 entries
    would take the whole run). Returns each catalog's latencies (ns) and items found."""
    names = list(calls)
    times: dict[str, list[int]] = {name: [] for name in names}
    items = dict.fromkeys(names, 0)
    for index, round_calls in enumerate(zip(*calls.values(), strict=True)):
        order = list(zip(names, round_calls, strict=True))
        for name, call in order if index % 2 == 0 else reversed(order):
            start = time.perf_counter_ns()
            result = call()
            times[name].append(time.perf_counter_ns() - start)
            if result is None:
                raise SystemExit("a lookup of an existing entry found nothing")
            items[name] += (len(result.directories) + len(result.entries)) if hasattr(result, "entries") else 1
        if time.perf_counter_ns() > deadline:
            break
    return times, [items[name] for name in names]


def summary(passes: list[list[int]], items: int) -> Timing:
    """Median and p99 over every call of ``passes``, and each pass's median (the spread)."""
    found = sorted(t for one in passes for t in one)
    p99 = found[min(len(found) - 1, int(len(found) * 0.99))]
    rounds = [statistics.median(one) / 1e3 for one in passes]
    return Timing(len(found), statistics.median(found) / 1e3, p99 / 1e3, items / len(found), rounds)


def timed(calls: dict[str, list[Callable[[], object]]], rounds: int, budget: float) -> dict[str, tuple[Timing, Timing]]:
    """(cold, warm) timings of each catalog: the first pass over the keys, the same for both
    catalogs, is the cold one (whatever the fill left in the caches); then ``rounds`` more
    passes over the same keys, warm for both alike. ``budget`` seconds at most per pass."""
    passes: dict[str, list[list[int]]] = {name: [] for name in calls}
    items: dict[str, list[int]] = {name: [] for name in calls}
    for _ in range(1 + rounds):
        times, found = timed_pass(calls, time.perf_counter_ns() + int(budget * 1e9))
        for (name, one), count in zip(times.items(), found, strict=True):
            passes[name].append(one)
            items[name].append(count)
        calls = {name: found_calls[: len(times[name])] for name, found_calls in calls.items()}  # the keys pass 0 did
    return {
        name: (summary(passes[name][:1], items[name][0]), summary(passes[name][1:], sum(items[name][1:])))
        for name in calls
    }


def operations(
    catalog: Catalog, images: Images, studies: int, count: int, root_count: int
) -> dict[str, list[Callable[[], object]]]:
    """The lookups timed, each ``count`` times on random images of the catalog's ``studies``."""
    rng = random.Random(42)
    picks = [(rng.randrange(studies), rng.randrange(SERIES), rng.randrange(SLICES)) for _ in range(count)]
    sample = [images.image(*p) for p in picks]
    series_dirs = [posixpath.dirname(s.entry.lfn) for s in sample]
    mdm_root = images.root
    return {
        "lookup(lfn)": [lambda s=s: catalog.namespace.lookup(s.entry.lfn) for s in sample],
        "lookup_guid": [lambda s=s: catalog.namespace.lookup_guid(f"guid:{s.entry.guid}") for s in sample],
        "lookup_uids (names' UIDs)": [lambda s=s: catalog.lookup_uids(s.entry.triple) for s in sample],
        "lookup_uids (original UIDs)": [lambda s=s: catalog.lookup_uids(s.original) for s in sample],
        "lookup_uids (original, 3D)": [
            lambda s=s: catalog.lookup_uids(UidTriple(s.original.study, s.original.series, VOLUME)) for s in sample
        ],
        "metadata(guid)": [lambda s=s: catalog.index.metadata(s.entry.guid) for s in sample],
        "list_dir(series)": [lambda d=d: catalog.namespace.list_dir(d) for d in series_dirs],
        f"list_dir({mdm_root}) x{root_count}": [lambda: catalog.namespace.list_dir(mdm_root)] * root_count,
    }


def lookups(catalogs: dict[str, tuple[Catalog, int]], images: Images, count: int, root_count: int,
            rounds: int, budget: float) -> dict[str, dict[str, tuple[Timing, Timing]]]:
    """Each operation's (cold, warm) timings per catalog (name → (catalog, its studies))."""
    calls = {name: operations(catalog, images, studies, count, root_count) for name, (catalog, studies) in
             catalogs.items()}
    out: dict[str, dict[str, tuple[Timing, Timing]]] = {name: {} for name in catalogs}
    for operation in next(iter(calls.values())):
        for name, timing in timed({name: found[operation] for name, found in calls.items()}, rounds, budget).items():
            out[name][operation] = timing
    return out


def report(small: dict[str, tuple[Timing, Timing]], large: dict[str, tuple[Timing, Timing]],
           small_n: int, large_n: int) -> None:
    print(f"\nlookup latency, microseconds: median and p99 at {small_n:,} and {large_n:,} slices; ratio large/small."
          "\ncold: the first pass over the keys, for both catalogs; warm: the further passes over the same keys,"
          "\nfor both; 'rounds' is the warm median ratio of each pass (the spread).")
    header = (
        f"{'operation':34s} {'pass':4s} {'calls':>11s} {'items':>11s} | {'small med':>9s} {'p99':>8s}"
        f" | {'large med':>9s} {'p99':>8s} | {'ratio med':>9s} {'p99':>6s} {'per item':>8s}  rounds"
    )
    print(header)
    print("-" * len(header))
    for name, timings in small.items():
        for label, s, g in (("cold", timings[0], large[name][0]), ("warm", timings[1], large[name][1])):
            items = f"{s.items:.0f}->{g.items:.0f}"
            calls = f"{s.calls}/{g.calls}"
            per_item = (g.median_us / g.items) / (s.median_us / s.items)
            rounds = " ".join(f"{gr / sr:.2f}" for sr, gr in zip(s.round_medians_us, g.round_medians_us, strict=True))
            print(
                f"{name if label == 'cold' else '':34s} {label:4s} {calls:>11s} {items:>11s}"
                f" | {s.median_us:9.1f} {s.p99_us:8.1f} | {g.median_us:9.1f} {g.p99_us:8.1f}"
                f" | {g.median_us / s.median_us:9.2f} {g.p99_us / s.p99_us:6.2f} {per_item:8.2f}"
                f"  {rounds if label == 'warm' else ''}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--studies", type=int, default=10_000, help=f"large catalog: studies of {SERIES}x{SLICES}")
    parser.add_argument("--small-studies", type=int, default=10, help="small catalog: studies")
    parser.add_argument("--honest", type=int, default=20_000, help="slices registered through register_image")
    parser.add_argument("--lookups", type=int, default=10_000, help="random lookups per operation")
    parser.add_argument("--root-lookups", type=int, default=20, help="listings of the VO root")
    parser.add_argument("--rounds", type=int, default=3, help="warm passes over the keys after the cold one")
    parser.add_argument("--budget", type=float, default=30.0, help="seconds at most per pass of an operation")
    parser.add_argument("--backend", choices=("sqlite", "postgresql"), default="sqlite",
                        help="catalog filled and timed: postgresql in databases of their own on --postgres"
                             " (dropped after)")
    parser.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432/postgres",
                        help="PostgreSQL server (a database with admin rights to create and drop others)")
    parser.add_argument("--cache-mib", type=int, help="SQLite: [catalog] cache_mib of the timed catalogs")
    parser.add_argument("--mmap-mib", type=int, help="SQLite: [catalog] mmap_mib of the timed catalogs")
    parser.add_argument("--keep", type=Path,
                        help="keep the small and large catalogs (SQLite files in this directory, PostgreSQL"
                             " databases named after it) for a later run with the same sizes, which times them"
                             " without filling them again (migrated to the code's schema first)")
    args = parser.parse_args()
    sizes = {k: v for k, v in (("cache_mib", args.cache_mib), ("mmap_mib", args.mmap_mib)) if v is not None}
    per_study = SERIES * SLICES
    print(f"code under test: {Path(srm_dicom.__file__).parent}")
    with tempfile.TemporaryDirectory(prefix="bench-catalog-", dir="/tmp") as tmp, contextlib.ExitStack() as stack:
        directory = Path(tmp)

        config = site(stack, directory, "honest", args.backend, args.postgres)
        images = Images(config)
        catalog = open_catalog(config)
        count, seconds = register_honestly(catalog, images.all(-(-args.honest // per_study)))
        catalog.close()
        print(f"register_image: {count:,} slices (+{count // SLICES:,} volumes) in {seconds:.1f} s:"
              f" {count / seconds:,.0f} slices/s")

        catalogs = {}
        for name, studies in (("small", args.small_studies), ("large", args.studies)):
            slices = studies * per_study
            if args.keep:
                args.keep.mkdir(parents=True, exist_ok=True)
                config, filled = kept_site(args.keep.resolve(), f"{name}-{studies}", args.backend, args.postgres,
                                           sizes, slices + studies * SERIES)
            else:
                config, filled = site(stack, directory, name, args.backend, args.postgres, sizes), False
            if filled:
                print(f"{name}: kept from an earlier run ({config.catalog.url})")
                catalogs[name] = (open_catalog(config), studies)
                stack.callback(catalogs[name][0].close)
                continue
            open_catalog(config).close()  # the backend makes the schema
            seconds = bulk_fill(config, images, studies)
            print(f"{name}: bulk fill of {slices:,} slices in {seconds:.1f} s ({slices / seconds:,.0f} slices/s)")
            if name == "large":
                check_bulk_matches(site(stack, directory, "reference", args.backend, args.postgres), images, config)
                print("large: one series' rows equal register_image's (all tables, timestamps aside)")
            catalog = open_catalog(config)
            stack.callback(catalog.close)
            if catalog.namespace.count() != slices + studies * SERIES:
                raise SystemExit(f"{name}: {catalog.namespace.count()} entries, expected {slices + studies * SERIES}")
            catalogs[name] = (catalog, studies)
        start = time.perf_counter()
        timings = lookups(catalogs, images, args.lookups, args.root_lookups, args.rounds, args.budget)
        print(f"lookups in {time.perf_counter() - start:.1f} s")
        print(f"backend: {args.backend}" + (f", [catalog] cache_mib={config.catalog.cache_mib}"
              f" mmap_mib={config.catalog.mmap_mib}" if args.backend == "sqlite" else ""))
        report(timings["small"], timings["large"], args.small_studies * per_study, args.studies * per_study)


if __name__ == "__main__":
    main()
