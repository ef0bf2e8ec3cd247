import io
import sqlite3
from pathlib import Path

import pytest
from pydicom import dcmread

from mdm_catalog_sqlite import SQLiteCatalog
from mdm_catalog_sqlite.schema import MIGRATIONS
from sites import keystore_section
from srm_dicom.catalog import Outcome, find_entry, open_catalog
from srm_dicom.config import parse_config
from srm_dicom.crypto.container import encrypted_size
from srm_dicom.errors import NotFound
from srm_dicom.keystore.client import KeystoreClient
from srm_dicom.register import Registrar
from srm_dicom.synthetic import FakePatient, make_series
from srm_dicom.volume import plan_volume


@pytest.fixture
def config(tmp_path, key_servers):
    sections = {"site": {"secret": "catalog test secret"}, "keystore": keystore_section(key_servers)}
    return parse_config(sections, tmp_path)


@pytest.fixture
def catalog(config):
    catalog = open_catalog(config)
    yield catalog
    catalog.close()


def register_series(config, catalog, slices=4, seed="s"):
    series = make_series(slices=slices, size=8, seed=seed)
    registrar = Registrar(config, catalog, None, KeystoreClient.from_config(config))
    return series, [registrar.register(ds, store_in_pacs=False) for ds in series]


def original_spec(ds):
    return f"{ds.StudyInstanceUID},{ds.SeriesInstanceUID},{ds.SOPInstanceUID}"


def series_dir(catalog, vo="demo"):
    (study,) = catalog.namespace.list_dir(f"/grid/{vo}/mdm").directories
    (series,) = catalog.namespace.list_dir(study).directories
    return series


def test_backend_is_found_through_its_entry_point(catalog):
    assert isinstance(catalog.backend, SQLiteCatalog)
    assert catalog.backend.schema_version == len(MIGRATIONS)


def test_series_registers_slices_and_one_volume_with_directories(config, catalog):
    _, outcomes = register_series(config, catalog)
    assert outcomes == [Outcome.ADDED] * 4
    listing = catalog.namespace.list_dir(series_dir(catalog))
    kinds = sorted(e.kind for e in listing.entries)
    assert kinds == ["slice"] * 4 + ["volume"] * 2  # 3D and its sidecar 3D.json
    volume = next(e for e in listing.entries if e.sop_uid == "3D")
    assert volume.lfn.endswith("/3D") and volume.adler32 is None
    plain = plan_volume(list(catalog.index.series_images(series_dir(catalog)).values())).file_size("nifti")
    assert volume.size == encrypted_size(plain)  # known before the first assembly
    assert catalog.namespace.count() == 6


def test_registering_again_adds_nothing_and_a_change_bumps_the_version(config, catalog):
    series, _ = register_series(config, catalog)
    registrar = Registrar(config, catalog, None, KeystoreClient.from_config(config))
    assert [registrar.register(ds, store_in_pacs=False) for ds in series] == [Outcome.UNCHANGED] * 4
    assert catalog.namespace.count() == 6
    series[1].SeriesDescription = "re-reconstructed"
    assert registrar.register(series[1], store_in_pacs=False) is Outcome.UPDATED
    entry = find_entry(catalog, original_spec(series[1]))
    assert entry.content_version == 2
    assert catalog.index.metadata(entry.guid).medical["series_description"] == "re-reconstructed"
    volume = catalog.namespace.lookup(entry.lfn.rsplit("/", 1)[0] + "/3D")
    assert volume.content_version == 5  # created with the first slice, bumped by 3 more and one change


def test_lookup_by_lfn_guid_names_uids_and_original_uids(config, catalog):
    series, _ = register_series(config, catalog)
    ds = series[2]
    by_original = find_entry(catalog, f"/{ds.StudyInstanceUID}/{ds.SeriesInstanceUID}/{ds.SOPInstanceUID}")
    assert find_entry(catalog, by_original.lfn) == by_original
    assert find_entry(catalog, f"guid:{by_original.guid}") == by_original
    assert find_entry(catalog, f"/guid/{by_original.guid}") == by_original
    assert find_entry(catalog, [by_original.study_uid, by_original.series_uid, by_original.sop_uid]) == by_original
    volume = find_entry(catalog, f"{ds.StudyInstanceUID},{ds.SeriesInstanceUID},3D")
    assert volume.kind == "volume" and volume.study_uid == by_original.study_uid
    with pytest.raises(NotFound):
        find_entry(catalog, "1.2.3,1.2.4,1.2.5")


def test_metadata_rows_go_to_their_tables_keyed_without_the_patient_id(config, catalog):
    series, _ = register_series(config, catalog)
    entry = find_entry(catalog, original_spec(series[0]))
    metadata = catalog.index.metadata(entry.guid)
    assert metadata.patient["name"] == FakePatient().name
    assert FakePatient().patient_id not in metadata.patient_key
    assert metadata.image["rows"] == 8 and metadata.medical["modality"] == "CT"
    assert metadata.dicom["sop_uid"] == series[0].SOPInstanceUID
    assert metadata.dicom["deid_sop_uid"] == entry.sop_uid
    assert metadata.protocols == ("demo-phantom",)


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
    # A real SQLite failure in the last statement of the transaction (the Protocol table).
    db = catalog.backend.dialect._db
    db.execute("CREATE TRIGGER fail BEFORE INSERT ON protocol BEGIN SELECT RAISE(ABORT, 'disk full'); END")
    with pytest.raises(sqlite3.DatabaseError, match="disk full"):
        Registrar(config, catalog, None, KeystoreClient.from_config(config)).register(broken, store_in_pacs=False)
    assert catalog.namespace.count() == 3  # the first slice, its volume and the volume's sidecar only
    for table in ("image", "medical", "dicom", "patient"):
        assert db.execute(f"SELECT count(*) FROM {table}").fetchone()[0] == 1, table
    assert db.execute("SELECT count(*) FROM directories").fetchone()[0] == 5  # /grid … series


def test_a_header_value_that_breaks_its_vr_is_kept_as_text_not_a_crash(config, catalog):
    ds = make_series(slices=1, size=8)[0]
    ds.PatientWeight = "71.25"
    raw = io.BytesIO()
    ds.save_as(raw, enforce_file_format=True)
    ds = dcmread(io.BytesIO(raw.getvalue().replace(b"71.25 ", b"heavy ")))
    registrar = Registrar(config, catalog, None, KeystoreClient.from_config(config))
    assert registrar.register(ds, store_in_pacs=False) is Outcome.ADDED
    entry = next(e for e in catalog.namespace.list_dir(series_dir(catalog)).entries if e.kind == "slice")
    assert catalog.index.metadata(entry.guid).patient["weight"] == "heavy"


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


def test_reopening_an_existing_catalog_keeps_data_and_schema(config, catalog):
    register_series(config, catalog, slices=1)
    catalog.close()
    again = SQLiteCatalog(Path(config.path(config.catalog.url)))
    assert again.namespace.count() == 3 and again.schema_version == len(MIGRATIONS)
    again.close()
