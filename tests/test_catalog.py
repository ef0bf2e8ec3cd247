"""The catalog's contract (srm_dicom/catalog.py), run over every installed backend: the
core's domain rules and each store, with real registrations (real key servers)."""

import contextlib
import io
from dataclasses import replace

import pytest
from pydicom import dcmread

import postgres
from catalogs import original_spec, register_series, series_dir
from sites import keystore_section
from srm_dicom.anonymization_options import AnonymizationOptions
from srm_dicom.catalog import (
    COMPLETED,
    FAILED,
    LOOKUP_CHUNK,
    STARTED,
    SUBMITTED,
    AclEntry,
    Outcome,
    RightsFacts,
    StageFile,
    StageRequest,
    find_entry,
    open_catalog,
)
from srm_dicom.config import parse_config
from srm_dicom.crypto.container import encrypted_size
from srm_dicom.errors import NotFound
from srm_dicom.keystore.client import KeystoreClient
from srm_dicom.query import ATTRIBUTES, equals_any, parse
from srm_dicom.register import Registrar
from srm_dicom.synthetic import FakePatient, make_series
from srm_dicom.volume import plan_volume


@pytest.fixture
def config(tmp_path, key_servers, catalog_section):
    sections = {
        "site": {"secret": "catalog test secret"}, "keystore": keystore_section(key_servers),
        "catalog": catalog_section,
    }
    return parse_config(sections, tmp_path)


@pytest.fixture
def catalog(config):
    catalog = open_catalog(config)
    yield catalog
    catalog.close()


def test_the_configured_backend_is_the_one_opened(config, catalog):
    assert type(catalog.backend).__module__ == f"mdm_catalog_{config.catalog.backend}"
    assert catalog.backend.schema_version == len(catalog.backend.dialect.migrations)


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


@contextlib.contextmanager
def catalog_before(config, catalog, tmp_path, version):
    """A second catalog on the backend of ``catalog``, at schema ``version``, holding a copy of
    its rows (the columns that schema has): a site filled before a migration, not yet migrated.
    Filled by copy, not by registering: today's code writes columns an old schema lacks."""
    with contextlib.ExitStack() as stack:
        if config.catalog.backend == "postgresql":
            section = {"backend": "postgresql", "url": stack.enter_context(postgres.database())}
        else:
            section = {"backend": "sqlite", "url": "before.db"}
        old = open_catalog(parse_config({"catalog": section}, tmp_path), migrate=False)
        stack.callback(old.close)
        old.backend.dialect.migrations = catalog.backend.dialect.migrations[:version]
        assert old.backend.migrate() == (0, version)
        catalog.backend.copy_to(old.backend, lambda table, rows: None)
        del old.backend.dialect.migrations  # the class's: every migration
        yield old


def test_a_site_upgraded_in_place_finds_its_entries_by_original_uids(config, catalog, tmp_path):
    """An existing catalog, filled at the schema before the original-UID index holds the GUID,
    migrated: what it held is found by the PACS's UIDs as before, through the new index."""
    series, _ = register_series(config, catalog)
    migrations = catalog.backend.dialect.migrations
    before = next(n for n, script in enumerate(migrations) if "dicom_original_guid" in script)
    with catalog_before(config, catalog, tmp_path, before) as old:
        assert old.backend.migrate() == (before, len(migrations))
        for ds in series:
            found = find_entry(old, original_spec(ds))
            assert found.sop_uid != ds.SOPInstanceUID and found == find_entry(old, found.lfn)
        volume = find_entry(old, f"{series[0].StudyInstanceUID},{series[0].SeriesInstanceUID},3D")
        assert volume.lfn == f"{series_dir(old)}/3D"


def test_bulk_lookup_finds_every_existing_name_across_chunks_with_its_rights(config, catalog):
    register_series(config, catalog, slices=3)
    entries = catalog.namespace.list_dir(series_dir(catalog)).entries
    catalog.namespace.set_rights([entries[0].guid], None, None, [AclEntry("/CN=bob", 0o5, "all")])
    missing = [f"/grid/demo/mdm/1.2.3/1.2.4/{n}" for n in range(2 * LOOKUP_CHUNK + 10)]
    # Existing names in every chunk, one unnormalized and one repeated: each found once, by its LFN.
    names = [*missing[:5], entries[0].lfn, *missing[5:LOOKUP_CHUNK + 5], "/" + entries[1].lfn + "/",
             *missing[LOOKUP_CHUNK + 5:], *(e.lfn for e in entries), entries[2].lfn]
    found = catalog.namespace.lookup_many(names)
    assert found == {e.lfn: catalog.namespace.lookup(e.lfn) for e in entries}
    assert found[entries[0].lfn].acl == (AclEntry("/CN=bob", 0o5, "all"),)
    assert catalog.namespace.lookup_many(missing) == {} and catalog.namespace.lookup_many([]) == {}


def test_metadata_rows_go_to_their_tables_keyed_without_the_patient_id(config, catalog):
    series, _ = register_series(config, catalog)
    entry = find_entry(catalog, original_spec(series[0]))
    metadata = catalog.index.metadata(entry.guid)
    assert metadata.patient["name"] == FakePatient().name
    assert FakePatient().patient_id not in metadata.patient_key
    assert metadata.image["rows"] == 8 and metadata.medical["modality"] == "CT"
    assert metadata.dicom["sop_uid"] == series[0].SOPInstanceUID
    assert metadata.dicom["deid_sop_uid"] == entry.sop_uid
    assert metadata.protocols == ()  # the served file replaces the protocol name: the anonymous level has none
    assert ("(0018,1030)", "ProtocolName", "demo-phantom") in metadata.erased  # for "all" rights


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


def test_delete_bumps_the_volume_and_removes_it_with_the_last_slice(config, catalog):
    register_series(config, catalog, slices=2)
    directory = series_dir(catalog)
    slices = [e for e in catalog.namespace.list_dir(directory).entries if e.kind == "slice"]
    assert catalog.delete(slices[0].lfn) == slices[0]
    assert catalog.namespace.lookup(slices[0].lfn) is None and catalog.index.metadata(slices[0].guid) is None
    volume = catalog.namespace.lookup(directory + "/3D")
    assert volume.content_version == 3 and volume.size is None  # unknown until the next assembly
    assert catalog.delete(slices[0].lfn) is None  # already gone: nothing to do
    catalog.delete(slices[1].lfn)
    assert catalog.namespace.lookup(directory + "/3D") is None
    assert catalog.namespace.count() == 0
    assert catalog.namespace.list_dir("/grid/demo/mdm") is None  # directories go with their last entry


def test_rights_change_all_guids_or_none(config, catalog):
    register_series(config, catalog, slices=2)
    entries = [e for e in catalog.namespace.list_dir(series_dir(catalog)).entries if e.kind == "slice"]
    guids = [e.guid for e in entries]
    dn = AclEntry("/CN=bob", 0o5, "all")
    with pytest.raises(NotFound):
        catalog.namespace.set_rights([*guids, "00000000-0000-4000-8000-000000000000"], 0o700, "private", [dn])
    assert [catalog.namespace.lookup_guid(g).mode for g in guids] == [e.mode for e in entries]
    catalog.namespace.set_rights(guids, 0o700, None, [dn])
    catalog.namespace.set_rights(guids[:1], None, "public", [AclEntry("/CN=bob", 0o4, "none")])
    first, second = (catalog.namespace.lookup_guid(g) for g in guids)
    assert (first.mode, first.metadata_mode, first.acl) == (0o700, "public", (AclEntry("/CN=bob", 0o4, "none"),))
    assert (second.mode, second.metadata_mode, second.acl) == (0o700, entries[1].metadata_mode, (dn,))


def test_a_volume_checksum_is_recorded_once_per_content_version(config, catalog):
    register_series(config, catalog, slices=2)
    volume = catalog.namespace.lookup(series_dir(catalog) + "/3D")
    assert not catalog.namespace.set_checksum(volume.guid, volume.content_version - 1, 10, "00000001")
    assert catalog.namespace.set_checksum(volume.guid, volume.content_version, 10, "00000001")
    assert not catalog.namespace.set_checksum(volume.guid, volume.content_version, 11, "00000002")
    assert (catalog.namespace.lookup(volume.lfn).size, catalog.namespace.lookup(volume.lfn).adler32) == (10, "00000001")


def test_search_like_ignores_ascii_case_and_numbers_compare_as_numbers(config, catalog):
    # clean_descriptors keeps the protocol name, minus the words of the patient's name ("DEMO").
    register_series(replace(config, anonymization=AnonymizationOptions(clean_descriptors=True)), catalog, slices=3)
    name = ATTRIBUTES["PatientName"]

    def found(text):
        return [m.values["PatientName"] for m in catalog.index.search(parse(text), [name])]

    assert found("PatientName like 'demo^*'") == [FakePatient().name] * 3
    assert found("PatientName like 'DEMO?synth*'") == [FakePatient().name] * 3
    assert found("PatientName = 'demo^synthetic'") == []  # = is exact
    assert len(found("InstanceNumber >= 2")) == 2 and len(found("InstanceNumber > 10")) == 0
    assert len(found("ProtocolName like '-PHANT*'")) == 3 and found("ProtocolName != '-phantom'") == []
    assert len(list(catalog.index.search(parse(""), [name], limit=2))) == 2


def test_aggregates_count_per_directory_rights_class_and_flag(config, catalog):
    register_series(config, catalog, slices=3, seed="a")
    register_series(config, catalog, slices=2, seed="b")
    slices = sorted((m.entry for m in catalog.index.search(parse(""), [])), key=lambda e: e.guid)
    directories = sorted({e.lfn.rsplit("/", 1)[0] for e in slices}, key=lambda d: -sum(d in e.lfn for e in slices))
    three = [e for e in slices if e.lfn.startswith(directories[0] + "/")]  # directories[0]: the series of 3
    catalog.namespace.set_rights([three[1].guid], None, None, [AclEntry("/CN=bob", 0o5, "all")])
    modality = ATTRIBUTES["Modality"]

    def groups(facts, flags=()):
        return [(g.directory, g.count, g.sample, g.flags, g.values) for g in
                catalog.index.aggregate(parse(""), facts, flags, [modality])]

    everyone = groups(RightsFacts(None, "demo"))  # nobody's per-DN entries: one class per directory
    assert [(d, n) for d, n, *_ in everyone] == sorted([(directories[0], 3), (directories[1], 2)])
    assert all(values == {"Modality": "CT"} for *_, values in everyone)
    assert {sample for _, _, sample, *_ in everyone} == {min(e.guid for e in slices if e.lfn.startswith(d + "/"))
                                                         for d in directories}
    bob = groups(RightsFacts("/CN=bob", "demo"))  # bob's entry on one slice puts it in a class of its own
    assert sorted((d, n) for d, n, *_ in bob) == sorted([(directories[0], 2), (directories[0], 1), (directories[1], 2)])
    assert (directories[0], 1, three[1].guid) in [(d, n, s) for d, n, s, *_ in bob]
    under = groups(RightsFacts(None, None, (three[0].lfn, directories[1])))  # token scopes or macaroon paths
    assert sorted((d, n) for d, n, *_ in under) == sorted([(directories[0], 1), (directories[0], 2),
                                                            (directories[1], 2)])
    flag = equals_any(ATTRIBUTES["SOPInstanceUID"], [three[2].sop_uid])
    flagged = groups(RightsFacts(None, "demo"), [flag])
    assert sorted((d, n, f) for d, n, _, f, _ in flagged) == sorted(
        [(directories[0], 1, (True,)), (directories[0], 2, (False,)), (directories[1], 2, (False,))])
    assert catalog.index.aggregate(parse("PatientName = 'nobody'"), RightsFacts(), [], [modality]) == []


def test_aggregates_per_study_fold_the_series_groups_and_name_the_series_of_a_split_study(config, catalog):
    """Per study, each group is the sum of its study's series groups of the same class, flags and
    Modality; a study split into several groups names the series of each, so that the core
    counts a series in two groups once (QIDO-RS NumberOfStudyRelatedSeries)."""
    two, _ = register_series(config, catalog, slices=3, seed="a")
    other = make_series(slices=2, size=8, seed="b")
    registrar = Registrar(config, catalog, None, KeystoreClient.from_config(config))
    for ds in other:
        ds.StudyInstanceUID = two[0].StudyInstanceUID  # a second series of study "a"
        registrar.register(ds, store_in_pacs=False)
    other[1].Modality = "MR"
    registrar.register(other[1], store_in_pacs=False)
    register_series(config, catalog, slices=2, seed="c")  # a study of one series
    slices = sorted((m.entry for m in catalog.index.search(parse(""), [])), key=lambda e: e.guid)
    catalog.namespace.set_rights([slices[0].guid], None, None, [AclEntry("/CN=bob", 0o5, "all")])
    modality = ATTRIBUTES["Modality"]
    flag = equals_any(ATTRIBUTES["SOPInstanceUID"], [slices[1].sop_uid])
    for facts, flags in ((RightsFacts(None, "demo"), []), (RightsFacts("/CN=bob", "demo"), [flag]),
                         (RightsFacts(None, None, (slices[2].lfn,)), [])):
        series = catalog.index.aggregate(parse(""), facts, flags, [modality])
        studies = catalog.index.aggregate(parse(""), facts, flags, [modality], per_study=True)
        folded: dict = {}  # (study, class, flags, Modality) → count, series directories, least GUID
        for g in series:
            key = (g.directory.rsplit("/", 1)[0], g.rights, g.flags, g.values["Modality"])
            count, directories, sample = folded.get(key, (0, set(), g.sample))
            folded[key] = (count + g.count, directories | {g.directory}, min(sample, g.sample))
        found = {(g.directory, g.rights, g.flags, g.values["Modality"]): g for g in studies}
        assert {key: (g.count, g.series, g.sample) for key, g in found.items()} == {
            key: (count, len(directories), sample) for key, (count, directories, sample) in folded.items()}, facts
        for key, g in found.items():
            split = sum(study == key[0] for study, *_ in found) > 1
            assert set(g.series_directories) == (folded[key][1] if split else set()), facts
    everyone = catalog.index.aggregate(parse(""), RightsFacts(None, "demo"), [], [modality], per_study=True)
    assert sorted((len(g.series_directories), g.series, g.count) for g in everyone) == [(0, 1, 2), (1, 1, 1), (2, 2, 4)]


def test_aggregates_split_a_series_by_modality_as_registered_last(config, catalog):
    """Each part holds one Modality, the one of its sample, and a slice registered again with
    another Modality moves to that part: QIDO-RS ModalitiesInStudy lists every one seen."""
    series = make_series(slices=3, size=8, seed="mixed")
    series[1].Modality = "MR"
    registrar = Registrar(config, catalog, None, KeystoreClient.from_config(config))
    for ds in series:
        registrar.register(ds, store_in_pacs=False)
    modality = ATTRIBUTES["Modality"]

    def parts():
        found = catalog.index.aggregate(parse(""), RightsFacts(None, "demo"), [], [modality])
        return sorted((g.values["Modality"], g.count, g.sample) for g in found)

    def samples():
        slices = [(m.values["Modality"], m.entry.guid) for m in catalog.index.search(parse(""), [modality])]
        return sorted((value, sum(v == value for v, _ in slices), min(g for v, g in slices if v == value))
                      for value in {v for v, _ in slices})

    assert [(value, n) for value, n, _ in parts()] == [("CT", 2), ("MR", 1)]
    assert parts() == samples()
    series[1].Modality = "CT"
    assert registrar.register(series[1], store_in_pacs=False) is Outcome.UPDATED
    assert [(value, n) for value, n, _ in parts()] == [("CT", 3)]
    assert parts() == samples()


def test_a_catalog_of_the_schema_before_modality_on_entries_migrates_to_the_same_aggregates(config, catalog,
                                                                                            tmp_path):
    """A site upgraded past the migration that copied Modality onto the entries (SQLite 14,
    PostgreSQL 9) counts its studies as one registered since: its slices have theirs."""
    register_series(config, catalog, slices=3, seed="a")
    register_series(config, catalog, slices=2, seed="b")
    migrations = catalog.backend.dialect.migrations
    before = next(n for n, script in enumerate(migrations) if "ADD COLUMN modality" in script)

    def groups(index):
        found = index.aggregate(parse(""), RightsFacts(None, "demo"), [], [ATTRIBUTES["Modality"]])
        return [(g.directory, g.rights, g.count, g.sample, g.values) for g in found]

    with catalog_before(config, catalog, tmp_path, before) as old:
        assert old.backend.migrate() == (before, len(migrations))
        assert groups(old.index) == groups(catalog.index) and len(groups(old.index)) == 2
        assert all(values == {"Modality": "CT"} for *_, values in groups(old.index))


def request_of(request_id, entries, created_at, lifetime=60):
    files = tuple(StageFile(e.lfn, e.guid) for e in entries)
    return StageRequest(request_id, "/CN=bob", created_at, lifetime, files)


def test_stage_requests_states_pins_and_release(config, catalog):
    register_series(config, catalog, slices=3)
    a, b, c = (e for e in catalog.namespace.list_dir(series_dir(catalog)).entries if e.kind == "slice")
    stages = catalog.stages
    stages.add_stage_request(request_of("r1", [a, b], 100))
    stages.add_stage_request(request_of("r2", [c, a], 200))
    assert stages.stage_request("nope") is None
    assert stages.staging_guids() == [a.guid, b.guid, c.guid]  # oldest request first
    stages.set_stage_state(a.guid, STARTED, 300)
    stages.set_stage_state(a.guid, COMPLETED, 310)  # in both requests
    stages.set_stage_state(b.guid, FAILED, 320, "PACS said no")
    r1 = stages.stage_request("r1")
    assert [(f.state, f.error) for f in r1.files] == [(COMPLETED, None), (FAILED, "PACS said no")]
    assert r1.files[0].started_at == 300 and r1.files[0].pin_expires == 370 and r1.completed_at == 320
    assert stages.staging_guids() == [c.guid]
    assert stages.pinned_guids(now=369) == {a.guid} and stages.pinned_guids(now=371) == set()
    stages.cancel_stage_files("r2", [c.lfn], 330)
    assert [f.state for f in stages.stage_request("r2").files] == ["CANCELLED", COMPLETED]
    stages.release_stage_files("r1", [a.lfn])
    assert stages.pinned_guids(now=330) == {a.guid}  # still pinned by r2
    stages.release_stage_files(None, [a.lfn])
    assert stages.pinned_guids(now=330) == set()
    assert stages.delete_stage_request("r1") and not stages.delete_stage_request("r1")
    assert stages.stage_request("r1") is None and [f.state for f in stages.stage_request("r2").files][1] == COMPLETED
    assert SUBMITTED not in {f.state for f in stages.stage_request("r2").files}


def test_a_reopened_file_waits_unpinned_for_its_next_staging_and_only_in_its_request(config, catalog):
    register_series(config, catalog, slices=2)
    a, b = (e for e in catalog.namespace.list_dir(series_dir(catalog)).entries if e.kind == "slice")
    stages = catalog.stages
    on_disk = StageFile(a.lfn, a.guid, COMPLETED, None, 100, 100, 160)
    stages.add_stage_request(StageRequest("r1", "/CN=bob", 100, 60, (on_disk, StageFile(b.lfn, b.guid))))
    stages.add_stage_request(StageRequest("r2", "/CN=bob", 100, 60, (on_disk,)))
    stages.reopen_stage_files("r1", [a.guid, b.guid])  # b is not COMPLETED: left as it is
    reopened, waiting = stages.stage_request("r1").files
    assert reopened.state == SUBMITTED
    assert (reopened.started_at, reopened.finished_at, reopened.pin_expires) == (None, None, None)
    assert waiting.state == SUBMITTED and stages.stage_request("r2").files[0] == on_disk
    assert stages.pinned_guids(now=150) == {a.guid}  # r2's pin
    stages.set_stage_state(a.guid, COMPLETED, 200)
    assert stages.stage_request("r1").files[0].pin_expires == 260 and stages.stage_request("r2").files[0] == on_disk
