"""``mdm catalog migrate`` and ``mdm catalog copy``: a site moved from SQLite to PostgreSQL
keeps every entry, metadata row, stage request and staging job, and the counts are checked."""

import psycopg

import postgres
from mdm_catalog_postgresql.schema import MIGRATIONS
from sites import keystore_section, mdm
from srm_dicom.catalog import StageFile, StageRequest, catalog_config, find_entry, open_catalog
from srm_dicom.config import parse_config
from srm_dicom.keystore.client import KeystoreClient
from srm_dicom.register import Registrar
from srm_dicom.synthetic import make_series


def test_migrate_brings_a_new_database_up_to_date_and_again_changes_nothing():
    with postgres.database() as url:
        first = mdm("catalog", "migrate", "--url", url)
        assert first.returncode == 0, first.stderr
        assert first.stdout.strip().endswith(f"schema version 0 -> {len(MIGRATIONS)}")
        again = mdm("catalog", "migrate", "--url", url)
        assert again.returncode == 0 and again.stdout.strip().endswith(f"schema version {len(MIGRATIONS)}, up to date")
        with psycopg.connect(url) as db:
            assert db.execute("SELECT max(version) FROM schema_version").fetchone() == (len(MIGRATIONS),)


def test_copy_moves_a_sqlite_site_to_postgresql_and_checks_counts(tmp_path, key_servers):
    config = parse_config(
        {"site": {"secret": "catalog copy secret"}, "keystore": keystore_section(key_servers)}, tmp_path
    )
    catalog = open_catalog(config)
    series = make_series(slices=3, size=8, seed="copy")
    registrar = Registrar(config, catalog, None, KeystoreClient.from_config(config))
    for ds in series:
        registrar.register(ds, store_in_pacs=False)
    slice_entry = find_entry(catalog, [series[1].StudyInstanceUID, series[1].SeriesInstanceUID,
                                       series[1].SOPInstanceUID])
    catalog.stages.add_stage_request(StageRequest("r1", "/CN=bob", 100, 60, (StageFile(slice_entry.lfn,
                                                                                         slice_entry.guid),)))
    others = [e for e in catalog.namespace.list_dir(slice_entry.lfn.rpartition("/")[0]).entries
              if e.guid != slice_entry.guid]
    catalog.stages.enqueue_jobs({slice_entry.guid: "series"})  # pending: the new site must stage it
    catalog.stages.enqueue_jobs({others[0].guid: "other"})
    # The oldest, slice_entry's, held by a front end killed long enough ago for its lease to have lapsed.
    held = catalog.stages.claim_jobs("killed front end", lease=-1, limit=10)
    metadata = catalog.index.metadata(slice_entry.guid)
    catalog.close()
    source = str(tmp_path / "catalog.db")

    with postgres.database() as url:
        copied = mdm("catalog", "copy", "--from", source, "--to", url)
        assert copied.returncode == 0, copied.stderr
        assert "entries                    5 ok" in copied.stdout and "counts equal" in copied.stdout
        assert "stage_jobs                 2 ok" in copied.stdout
        moved = open_catalog(parse_config({"catalog": {"backend": "postgresql", "url": url}}, tmp_path))
        try:
            assert moved.backend.__class__.__name__ == "PostgresCatalog"
            assert moved.namespace.lookup_guid(slice_entry.guid) == slice_entry
            assert moved.index.metadata(slice_entry.guid) == metadata
            assert moved.lookup_uids(slice_entry.triple) == slice_entry
            assert moved.stages.stage_request("r1").files[0].guid == slice_entry.guid
            assert [j.guid for j in held] == [slice_entry.guid]
            assert moved.stages.jobs([slice_entry.guid]) == {slice_entry.guid: held[0]}  # held, lease and all
            (taken,) = moved.stages.claim_jobs("new site", 30, 10)  # taken over, in its place in the queue
            assert (taken.guid, taken.holder, taken.attempt) == (slice_entry.guid, "new site", 1)
            assert [j.guid for j in moved.stages.claim_jobs("new site", 30, 10)] == [others[0].guid]
            assert moved.stages.claim_jobs("new site", 30, 10) == []
        finally:
            moved.close()
        refused = mdm("catalog", "copy", "--from", source, "--to", url)
        assert refused.returncode == 2 and refused.stderr.count("\n") == 1 and "not empty" in refused.stderr
    assert catalog_config(source).backend == "sqlite" and catalog_config(url).backend == "postgresql"
