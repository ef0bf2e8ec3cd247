import sqlite3
from pathlib import Path

import pytest

from catalogs import register_series, series_dir
from mdm_catalog_sqlite import SQLiteCatalog
from mdm_catalog_sqlite.schema import MIGRATIONS
from sites import keystore_section
from srm_dicom.catalog import open_catalog
from srm_dicom.config import parse_config
from srm_dicom.keystore.client import KeystoreClient
from srm_dicom.register import Registrar
from srm_dicom.synthetic import make_series


@pytest.fixture
def config(tmp_path, key_servers):
    sections = {"site": {"secret": "catalog test secret"}, "keystore": keystore_section(key_servers)}
    return parse_config(sections, tmp_path)


@pytest.fixture
def catalog(config):
    catalog = open_catalog(config)
    yield catalog
    catalog.close()


def test_backend_is_found_through_its_entry_point(catalog):
    assert isinstance(catalog.backend, SQLiteCatalog)
    assert catalog.backend.schema_version == len(MIGRATIONS)


def test_delete_removes_entry_metadata_and_patient_row_with_the_last_image(config, catalog, tmp_path):
    register_series(config, catalog, slices=2)
    directory = series_dir(catalog)
    slices = [e for e in catalog.namespace.list_dir(directory).entries if e.kind == "slice"]
    catalog.delete(slices[0].lfn)
    assert catalog.namespace.lookup(slices[0].lfn) is None and catalog.index.metadata(slices[0].guid) is None
    assert catalog.namespace.lookup(directory + "/3D").content_version == 3
    catalog.delete(slices[1].lfn)
    top = catalog.namespace.list_dir("/grid/demo/mdm")
    assert top is None or top.directories == []
    db = sqlite3.connect(config.path(config.catalog.url))
    assert db.execute("SELECT count(*) FROM patient").fetchone()[0] == 0
    assert db.execute("SELECT count(*) FROM entries").fetchone()[0] == 0
    assert db.execute("SELECT count(*) FROM directories").fetchone()[0] == 0


def test_a_failed_registration_leaves_no_half_entry(config, catalog):
    register_series(config, catalog, slices=1)
    broken = make_series(slices=1, size=8, seed="other")[0]
    # A real SQLite failure in the last statement of the transaction (the erased values).
    db = catalog.backend.dialect._db
    db.execute("CREATE TRIGGER fail BEFORE INSERT ON erased BEGIN SELECT RAISE(ABORT, 'disk full'); END")
    with pytest.raises(sqlite3.DatabaseError, match="disk full"):
        Registrar(config, catalog, None, KeystoreClient.from_config(config)).register(broken, store_in_pacs=False)
    assert catalog.namespace.count() == 3  # the first slice, its volume and the volume's sidecar only
    for table in ("image", "medical", "dicom", "patient"):
        assert db.execute(f"SELECT count(*) FROM {table}").fetchone()[0] == 1, table
    assert db.execute("SELECT count(*) FROM directories").fetchone()[0] == 5  # /grid … series


@pytest.mark.parametrize(
    "query",
    [
        "SELECT * FROM entries WHERE lfn = 'x'",
        "SELECT * FROM entries WHERE guid = 'x'",
        "SELECT * FROM entries WHERE parent = 'x' ORDER BY name",
        "SELECT * FROM directories WHERE parent = 'x' ORDER BY path",
        "SELECT * FROM entries WHERE study_uid = 'a' AND series_uid = 'b' AND sop_uid = 'c'",
        "SELECT guid FROM dicom WHERE sop_uid = 'a' AND series_uid = 'b' AND study_uid = 'c'",
        "SELECT * FROM image WHERE patient_key = 'x'",
        "SELECT name FROM protocol WHERE guid = 'x' ORDER BY name",
    ],
)
def test_lookups_use_indexes_never_a_full_scan(catalog, query):
    plan = " ".join(row[-1] for row in catalog.backend.dialect._db.execute(f"EXPLAIN QUERY PLAN {query}"))
    assert "SCAN" not in plan.replace("USING COVERING INDEX", "").split("USING INDEX")[0] or "INDEX" in plan, plan
    assert not any(f"SCAN {table}" in plan for table in ("entries", "dicom", "directories", "protocol", "image")), plan


@pytest.mark.parametrize(
    "query",
    [
        "SELECT guid FROM dicom WHERE sop_uid = 'a' AND series_uid = 'b' AND study_uid = 'c'",
        "SELECT guid FROM dicom WHERE study_uid = 'a' AND series_uid = 'b' LIMIT 1",
    ],
)
def test_an_entry_by_original_uids_is_found_from_one_index_alone(catalog, query):
    plan = " ".join(row[-1] for row in catalog.backend.dialect._db.execute(f"EXPLAIN QUERY PLAN {query}"))
    assert plan == "SEARCH dicom USING COVERING INDEX dicom_original_guid (study_uid=? AND series_uid=?" + (
        " AND sop_uid=?)" if "sop_uid" in query else ")"), plan


def test_reopening_an_existing_catalog_keeps_data_and_schema(config, catalog):
    register_series(config, catalog, slices=1)
    catalog.close()
    again = SQLiteCatalog(Path(config.path(config.catalog.url)))
    assert again.namespace.count() == 3 and again.schema_version == len(MIGRATIONS)
    again.close()


def test_page_cache_and_mmap_follow_the_config(tmp_path):
    """A sysadmin sizes SQLite's memory for a large catalog in [catalog]: the writer's connection
    and a search's read-only one both get it (defaults: 64 MiB cache, a map of 2047 MiB)."""
    default = SQLiteCatalog.from_config(parse_config({}, tmp_path / "a"))
    sized = SQLiteCatalog.from_config(parse_config({"catalog": {"cache_mib": 8, "mmap_mib": 0}}, tmp_path / "b"))
    try:
        for catalog, cache_kib, mmap_bytes in ((default, 64 * 1024, 2047 << 20), (sized, 8 * 1024, 0)):
            with catalog.dialect.reading() as writer, catalog.dialect.streaming() as reader:
                for db in (writer, reader):
                    assert db.execute("PRAGMA cache_size").fetchone()[0] == -cache_kib
                    assert db.execute("PRAGMA mmap_size").fetchone()[0] == mmap_bytes
    finally:
        default.close()
        sized.close()
