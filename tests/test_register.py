import json
import os
import posixpath
import urllib.request
import zlib
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ImplicitVRLittleEndian, SecondaryCaptureImageStorage

import srm_dicom.pacs.client as client_module
from catalogs import count_series_reads
from conftest import require_program
from peers import free_port
from sites import require_vendor_data, write_site_config
from srm_dicom.anonymization_options import AnonymizationOptions
from srm_dicom.anonymize import recorded_options, rules_version
from srm_dicom.catalog import Outcome, open_catalog
from srm_dicom.config import load_config
from srm_dicom.crypto.container import check_key, read_header
from srm_dicom.entry_key import key_name
from srm_dicom.errors import InvalidInput
from srm_dicom.keystore.client import KeystoreClient
from srm_dicom.pacs.client import DCMTK_FROM, PacsClient
from srm_dicom.pacs.dcmtk import STORESCU, _stored
from srm_dicom.prepare import read_dicom
from srm_dicom.protect import protect_image
from srm_dicom.register import BATCH, Registrar, Summary, iter_files
from srm_dicom.synthetic import make_series
from srm_dicom.uids import deidentify_uid


def write_series(directory: Path, slices: int = 3, seed: str = "reg") -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, ds in enumerate(make_series(slices=slices, size=16, seed=seed)):
        path = directory / f"{i:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def test_each_pacs_receives_the_images_and_the_catalog_names_them(any_pacs, tmp_path, key_servers):
    config = load_config(write_site_config(tmp_path / "site", any_pacs, key_servers))
    files = write_series(tmp_path / "in")
    catalog = open_catalog(config)
    with PacsClient(config.pacs) as pacs:
        registrar = Registrar(config, catalog, pacs, KeystoreClient.from_config(config))
        outcomes = [registrar.register(read_dicom(f), store_in_pacs=True) for f in files]
        assert outcomes == [Outcome.ADDED] * 3
        first = pydicom.dcmread(files[0])
        in_pacs = pacs.find_instances(first.StudyInstanceUID, first.SeriesInstanceUID)
    assert sorted(in_pacs) == sorted(pydicom.dcmread(f).SOPInstanceUID for f in files)
    secret = config.site.secret_bytes
    study, series = (deidentify_uid(secret, first.StudyInstanceUID), deidentify_uid(secret, first.SeriesInstanceUID))
    listing = catalog.namespace.list_dir(f"/grid/demo/mdm/{study}/{series}")
    names = sorted(e.sop_uid for e in listing.entries)
    sops = [deidentify_uid(secret, pydicom.dcmread(f).SOPInstanceUID) for f in files]
    assert names == sorted([*sops, "3D", "3D.json"])
    slice_entry = next(e for e in listing.entries if e.kind == "slice")
    assert slice_entry.pfn.startswith(f"dicom://{any_pacs.aet}@127.0.0.1:{any_pacs.port}/{first.StudyInstanceUID}/")
    assert slice_entry.owner == config.site.registrar and slice_entry.mode == 0o750
    catalog.close()


def test_original_uids_mode_keeps_the_pacs_names(embedded_pacs, tmp_path, key_servers):
    config = load_config(write_site_config(tmp_path / "site", embedded_pacs, key_servers, uids="original"))
    ds = make_series(slices=1, size=8)[0]
    catalog = open_catalog(config)
    with PacsClient(config.pacs) as pacs:
        Registrar(config, catalog, pacs, KeystoreClient.from_config(config)).register(ds, store_in_pacs=True)
    lfn = f"/grid/demo/mdm/{ds.StudyInstanceUID}/{ds.SeriesInstanceUID}/{ds.SOPInstanceUID}"
    assert catalog.namespace.lookup(lfn) is not None
    catalog.close()


def test_size_and_adler32_describe_the_served_bytes(embedded_pacs, tmp_path, key_servers):
    config = load_config(write_site_config(tmp_path / "site", embedded_pacs, key_servers))
    ds = make_series(slices=1, size=8)[0]
    catalog = open_catalog(config)
    with PacsClient(config.pacs) as pacs:
        Registrar(config, catalog, pacs, KeystoreClient.from_config(config)).register(ds, store_in_pacs=True)
    namespace = catalog.namespace
    series = namespace.list_dir(namespace.list_dir("/grid/demo/mdm").directories[0]).directories[0]
    (entry,) = [e for e in namespace.list_dir(series).entries if e.kind == "slice"]
    # Restaging (anonymize + encrypt again with the key from the key servers) gives the same bytes.
    key = KeystoreClient.from_config(config).fetch_key(key_name(entry.guid, 1), lambda k: len(k) == 32)
    again = protect_image(ds, config.site.secret_bytes, config.anonymization, key, entry.guid, 1)
    assert check_key(read_header(again.payload), key)
    assert entry.size == again.size and entry.adler32 == again.adler32 == f"{zlib.adler32(again.payload):08x}"
    catalog.close()


def test_bad_files_get_a_reason_each(tmp_path):
    good = write_series(tmp_path, slices=1)[0]
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "cut.dcm").write_bytes(good.read_bytes()[:-100])
    (tmp_path / "head.dcm").write_bytes(good.read_bytes()[:700])
    no_uid = pydicom.dcmread(good)
    del no_uid.SeriesInstanceUID
    no_uid.save_as(tmp_path / "nouid.dcm")
    (tmp_path / "zeros.dcm").write_bytes(b"\0" * 64)
    os.symlink(tmp_path / "gone.dcm", tmp_path / "dangling.dcm")
    summary = Summary()
    reasons = {}
    for path in iter_files([tmp_path, tmp_path / "missing"], summary):
        try:
            read_dicom(path)
        except InvalidInput as exc:
            reasons[path.name] = str(exc)
    assert reasons["notes.txt"] == "not a DICOM file"
    assert reasons["cut.dcm"].startswith("truncated")
    assert reasons["head.dcm"].startswith("truncated")
    assert reasons["zeros.dcm"] == "not a DICOM file"
    assert "cannot read" in reasons["dangling.dcm"]
    assert "nouid.dcm" not in reasons  # readable: refused at registration, see below
    assert summary.failures == [(str(tmp_path / "missing"), "no such file or directory")]


@pytest.mark.parametrize("where", ["inside", "last"])
def test_an_empty_element_of_unknown_vr_is_one_reason(tmp_path, where):
    """Found by the push fuzz: pydicom decodes an empty element (its raw value is None) when it
    is looked up, and an unknown VR then raised NotImplementedError from read_dicom, before its
    decoding was guarded (a traceback in mdm register, 0xC211 for a push)."""
    ds = make_series(slices=1, size=8)[0]
    ds.BodyPartExamined = ""
    path = tmp_path / "empty-zz.dcm"
    ds.save_as(path, enforce_file_format=True)
    data = path.read_bytes()
    empty = b"\x18\x00\x15\x00CS\x00\x00"  # (0018,0015), explicit VR little endian, no value
    assert data.count(empty) == 1
    if where == "inside":
        path.write_bytes(data.replace(empty, empty[:4] + b"ZZ\x00\x00"))
    else:
        path.write_bytes(data + b"\xfc\xff\xfc\xffZZ\x00\x00")  # (FFFC,FFFC) after the pixel data
    with pytest.raises(InvalidInput, match=r"corrupt DICOM element .*\(NotImplementedError\)"):
        read_dicom(path)


@pytest.mark.parametrize("vr", [b"ZZ", b"FD"])
def test_a_file_meta_value_that_cannot_be_decoded_is_one_reason(tmp_path, vr):
    """The file meta is decoded lazily as well: Media Storage SOP Class UID with an unknown VR
    or as FD raised NotImplementedError or BytesLengthException from read_dicom."""
    path = write_series(tmp_path, slices=1)[0]
    data = bytearray(path.read_bytes())
    at = data.index(b"\x02\x00\x02\x00UI")  # (0002,0002), explicit VR little endian
    data[at + 4: at + 6] = vr
    path.write_bytes(bytes(data))
    with pytest.raises(InvalidInput, match=r"corrupt DICOM element .*\((NotImplementedError|BytesLengthException)\)"):
        read_dicom(path)


@pytest.mark.parametrize("keyword", [
    "SeriesInstanceUID",
    "SOPClassUID",  # the push fuzz's finding: its tag mutated to (0001,0016), answered 0xC211
])
def test_a_header_without_a_valid_uid_is_refused_with_its_reason_before_anything_is_stored(
        embedded_pacs, tmp_path, key_servers, keyword):
    config = load_config(write_site_config(tmp_path, embedded_pacs, key_servers))
    ds = make_series(slices=1, size=8)[0]
    delattr(ds, keyword)
    catalog = open_catalog(config)
    with pytest.raises(InvalidInput, match=f"missing {keyword}"):
        Registrar(config, catalog, None, KeystoreClient.from_config(config)).register(ds, store_in_pacs=True)
    setattr(ds, keyword, "1.2.abc")
    with pytest.raises(InvalidInput, match=f"{keyword} is not a valid UID"):
        Registrar(config, catalog, None, KeystoreClient.from_config(config)).register(ds, store_in_pacs=True)
    assert catalog.namespace.count() == 0
    catalog.close()


@pytest.mark.parametrize(("tag", "vr", "what"), [
    (0x00000016, "UI", r"command-set elements \(group 0000\)"),  # pydicom cannot write it back
    (0x00020013, "SH", r"file meta elements \(group 0002\)"),  # recorded twice as erased, with the meta's
])
def test_a_data_set_holding_command_set_or_file_meta_elements_is_refused_with_its_reason(
        embedded_pacs, tmp_path, key_servers, tag, vr, what):
    """Found by the push fuzz: a tag mutated into group 0000 (0xC211 from dcmwrite's ValueError),
    and one into group 0002 (0xC211 from the catalog's unique erased path)."""
    config = load_config(write_site_config(tmp_path, embedded_pacs, key_servers))
    ds = make_series(slices=1, size=8)[0]
    ds.file_meta.ImplementationVersionName = "MDM_TEST"
    ds.add_new(tag, vr, ds.SOPClassUID if vr == "UI" else "PYDICOM 3.0.2")
    catalog = open_catalog(config)
    with pytest.raises(InvalidInput, match=what):
        Registrar(config, catalog, None, KeystoreClient.from_config(config)).register(ds, store_in_pacs=False)
    assert catalog.namespace.count() == 0
    catalog.close()


def test_every_vendor_series_is_readable_and_named(tmp_path):
    vendor = require_vendor_data()
    summary = Summary()
    readable = []
    for path in iter_files([vendor], summary):
        try:
            readable.append(read_dicom(path))
        except InvalidInput as exc:
            assert path.suffix in ("", ".gz") or path.name == "LICENSE", (path, exc)
    assert len(readable) == 70  # 12 series; the compressed variants share their 4 SOP UIDs
    assert len({ds.SeriesInstanceUID for ds in readable}) == 12



def _slice_entry(catalog, config, ds):
    secret = config.site.secret_bytes
    uids = (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    return catalog.namespace.lookup("/grid/demo/mdm/" + "/".join(deidentify_uid(secret, u) for u in uids))


def test_each_entry_records_its_protection_and_reprotect_reissues_it(embedded_pacs, tmp_path, key_servers):
    config = load_config(write_site_config(tmp_path / "site", embedded_pacs, key_servers))
    ds = make_series(slices=1, size=8)[0]
    catalog = open_catalog(config)
    keystore = KeystoreClient.from_config(config)
    changed = replace(config, anonymization=AnonymizationOptions(retain_patient_characteristics=True))
    with PacsClient(config.pacs) as pacs:
        assert Registrar(config, catalog, pacs, keystore).register(ds, store_in_pacs=True) == Outcome.ADDED
        first = _slice_entry(catalog, config, ds)
        assert recorded_options(first.protection) == (config.anonymization, rules_version())
        registrar = Registrar(changed, catalog, pacs, keystore)
        assert registrar.register(ds, store_in_pacs=False) == Outcome.UNCHANGED  # new config: new images only
        assert registrar.register(ds, store_in_pacs=False, reprotect=True) == Outcome.UPDATED
        assert registrar.register(ds, store_in_pacs=False, reprotect=True) == Outcome.UNCHANGED
    again = _slice_entry(catalog, config, ds)
    assert again.guid == first.guid and again.content_version == 2
    assert recorded_options(again.protection)[0] == changed.anonymization
    key = keystore.fetch_key(key_name(again.guid, 2), lambda k: len(k) == 32)
    served = protect_image(ds, config.site.secret_bytes, changed.anonymization, key, again.guid, 2)
    assert (served.size, served.adler32) == (again.size, again.adler32)
    codes = [item.CodeValue for item in served.served.DeidentificationMethodCodeSequence]
    assert codes == ["113100", "113108"] and served.served.PatientIdentityRemoved == "YES"
    assert rules_version() in served.served.DeidentificationMethod
    catalog.close()


def test_burned_in_images_are_refused_with_one_reason_or_kept_private(embedded_pacs, tmp_path, key_servers):
    config = load_config(write_site_config(tmp_path / "site", embedded_pacs, key_servers))
    annotated, capture, screen = make_series(slices=3, size=8, seed="burned")
    annotated.BurnedInAnnotation = "YES"
    capture.SOPClassUID = capture.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    screen.ImageType = ["DERIVED", "SECONDARY", "SCREEN SAVE"]
    catalog = open_catalog(config)
    keystore = KeystoreClient.from_config(config)
    with PacsClient(config.pacs) as pacs:
        registrar = Registrar(config, catalog, pacs, keystore)
        for ds, reason in ((annotated, "BurnedInAnnotation is YES"), (capture, "a secondary capture"),
                           (screen, "ImageType SCREEN SAVE")):
            with pytest.raises(InvalidInput, match=reason):
                registrar.register(ds, store_in_pacs=True)
        assert catalog.namespace.count() == 0  # nothing half-registered
        assert pacs.find_instances(annotated.StudyInstanceUID, annotated.SeriesInstanceUID) == []
        private = replace(config, anonymization=AnonymizationOptions(burned_in="private"))
        assert Registrar(private, catalog, pacs, keystore).register(annotated, store_in_pacs=True) == Outcome.ADDED
    entry = _slice_entry(catalog, config, annotated)
    assert (entry.mode, entry.metadata_mode) == (0o700, "private")
    catalog.close()


def test_a_batch_plans_each_series_volume_once_with_the_size_one_by_one_gives(embedded_pacs, tmp_path, key_servers,
                                                                              monkeypatch):
    series = make_series(slices=6, size=16, seed="batch")
    sizes = {}
    for mode in ("one by one", "batch"):
        config = load_config(write_site_config(tmp_path / mode.replace(" ", "-"), embedded_pacs, key_servers))
        catalog = open_catalog(config)
        reads = count_series_reads(monkeypatch, catalog)
        registrar = Registrar(config, catalog, None, KeystoreClient.from_config(config))
        if mode == "batch":
            with registrar.batch():
                assert [registrar.register(ds, store_in_pacs=False) for ds in series] == [Outcome.ADDED] * 6
                volume = next(e for e in catalog.namespace.list_dir(
                    catalog.namespace.list_dir(catalog.namespace.list_dir("/grid/demo/mdm").directories[0])
                    .directories[0]).entries if e.sop_uid == "3D")
                assert volume.size is None  # planned when the batch ends
            assert len(reads) == 1  # not once per image
        else:
            for ds in series:
                registrar.register(ds, store_in_pacs=False)
            assert len(reads) == 6
        monkeypatch.undo()
        namespace = catalog.namespace
        directory = namespace.list_dir(namespace.list_dir("/grid/demo/mdm").directories[0]).directories[0]
        series_files = {e.sop_uid: e.size for e in namespace.list_dir(directory).entries if e.kind == "volume"}
        sizes[mode] = series_files  # the volume and its sidecar 3D.json
        catalog.close()
    assert sizes["batch"] == sizes["one by one"] and None not in sizes["batch"].values()
    assert sorted(sizes["batch"]) == ["3D", "3D.json"]


class Calls:
    """Counts what the pipeline asks of its real peers: associations opened, requests per
    key-server path, catalog transactions, series read whole."""

    def __init__(self, monkeypatch, catalog) -> None:  # type: ignore[no-untyped-def]
        self.associations = 0
        self.key_requests: list[str] = []
        self.transactions = 0
        self.series_reads = 0
        self._spy(monkeypatch, PacsClient, "_open", "associations")
        self._count_outermost_transactions(monkeypatch, type(catalog.backend))
        self._spy(monkeypatch, type(catalog.index), "series_images", "series_reads")
        request = KeystoreClient._request

        def counted(client, method, url, resource, body):  # type: ignore[no-untyped-def]
            self.key_requests.append(f"{method} {resource}")
            return request(client, method, url, resource, body)

        monkeypatch.setattr(KeystoreClient, "_request", counted)

    def _count_outermost_transactions(self, monkeypatch, cls):  # type: ignore[no-untyped-def]
        original, depth = cls.transaction, [0]

        @contextmanager
        def counted(backend):  # type: ignore[no-untyped-def]
            self.transactions += depth[0] == 0
            depth[0] += 1
            try:
                with original(backend):
                    yield
            finally:
                depth[0] -= 1

        monkeypatch.setattr(cls, "transaction", counted)

    def _spy(self, monkeypatch, cls, name, counter):  # type: ignore[no-untyped-def]
        original = getattr(cls, name)

        def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
            setattr(self, counter, getattr(self, counter) + 1)
            return original(*args, **kwargs)

        monkeypatch.setattr(cls, name, counted)


def test_a_series_is_one_association_one_bulk_put_per_server_and_one_transaction_per_batch(
    orthanc, tmp_path, key_servers, monkeypatch
):
    config = load_config(write_site_config(tmp_path / "site", orthanc, key_servers))
    files = write_series(tmp_path / "in", slices=BATCH + 6, seed="pipeline")
    catalog = open_catalog(config)
    calls = Calls(monkeypatch, catalog)
    with PacsClient(config.pacs) as pacs:
        registrar = Registrar(config, catalog, pacs, KeystoreClient.from_config(config))
        results = list(registrar.register_many(files, store_in_pacs=True))
        assert [r.source for r in results] == files and {r.outcome for r in results} == {Outcome.ADDED}
        first = pydicom.dcmread(files[0])
        assert len(pacs.find_instances(first.StudyInstanceUID, first.SeriesInstanceUID)) == len(files)
    assert calls.associations == 1
    # Two batches: one bulk put per key server each; no per-image key request.
    assert sorted(calls.key_requests) == ["POST /bulk/put"] * 2 * len(key_servers.urls)
    # The series is read whole once, when the run ends, to plan its volume: not at each image.
    assert calls.series_reads == 1
    assert calls.transactions == 2 + 1  # one per batch, one for the volume's planning when the run ends
    entries = catalog.namespace.list_dir(posixpath.dirname(results[0].lfn)).entries
    assert sorted(e.kind for e in entries) == ["slice"] * len(files) + ["volume"] * 2
    assert all(e.size for e in entries)  # the volume and its sidecar planned at the end
    again = list(registrar.register_many(files, store_in_pacs=True))
    assert {r.outcome for r in again} == {Outcome.UNCHANGED}
    catalog.close()


def test_the_worker_processes_give_the_bytes_registering_in_process_gives(embedded_pacs, tmp_path, key_servers):
    series = make_series(slices=5, size=16, seed="pool")
    described = {}
    for pool in (False, True):
        config = load_config(write_site_config(tmp_path / f"pool-{pool}", embedded_pacs, key_servers))
        catalog = open_catalog(config)
        keystore = KeystoreClient.from_config(config)
        registrar = Registrar(config, catalog, None, keystore, pool=pool)
        results = list(registrar.register_many(series, store_in_pacs=False))
        assert [r.outcome for r in results] == [Outcome.ADDED] * 5
        entries = [catalog.namespace.lookup(r.lfn) for r in results]
        for ds, entry in zip(series, entries, strict=True):  # restaging gives the very bytes described
            key = keystore.fetch_key(key_name(entry.guid, 1), lambda k: len(k) == 32)
            again = protect_image(ds, config.site.secret_bytes, config.anonymization, key, entry.guid, 1)
            assert (entry.size, entry.adler32, entry.sha256) == (again.size, again.adler32, again.sha256)
        described[pool] = [(r.lfn, catalog.index.metadata(e.guid).erased)
                           for r, e in zip(results, entries, strict=True)]
        catalog.close()
    assert described[True] == described[False]


def test_a_batch_whose_keys_cannot_be_stored_catalogs_nothing_and_says_why_for_each(embedded_pacs, tmp_path,
                                                                                    key_servers):
    config = load_config(write_site_config(tmp_path / "site", embedded_pacs, key_servers))
    down = replace(config.keystore, urls=[f"https://127.0.0.1:{free_port()}" for _ in config.keystore.urls])
    config = replace(config, keystore=down)
    files = write_series(tmp_path / "in", slices=3, seed="no keys")
    catalog = open_catalog(config)
    with PacsClient(config.pacs) as pacs:
        registrar = Registrar(config, catalog, pacs, KeystoreClient.from_config(config))
        results = list(registrar.register_many([*files, tmp_path / "missing.dcm"], store_in_pacs=True))
    assert [r.source for r in results] == [*files, tmp_path / "missing.dcm"]
    assert all(r.outcome is None and "unreachable" in str(r.error) for r in results[:3])
    assert "cannot read" in str(results[3].error)
    assert catalog.namespace.count() == 0  # nothing half registered: no row without its key
    catalog.close()


def test_an_image_met_twice_in_a_run_is_registered_then_updated(embedded_pacs, tmp_path, key_servers):
    config = load_config(write_site_config(tmp_path / "site", embedded_pacs, key_servers))
    ds = make_series(slices=1, size=8, seed="twice")[0]
    changed = make_series(slices=1, size=8, seed="twice")[0]
    changed.SeriesDescription = "re-reconstructed"
    catalog = open_catalog(config)
    registrar = Registrar(config, catalog, None, KeystoreClient.from_config(config))
    outcomes = [r.outcome for r in registrar.register_many([ds, ds, changed], store_in_pacs=False)]
    assert outcomes == [Outcome.ADDED, Outcome.UNCHANGED, Outcome.UPDATED]
    entry = _slice_entry(catalog, config, ds)
    assert entry.content_version == 2
    assert catalog.index.metadata(entry.guid).medical["series_description"] == "re-reconstructed"
    catalog.close()


def test_the_dcmtk_engine_has_storescu_send_a_batch_each_image_in_its_own_syntax(orthanc, tmp_path, key_servers,
                                                                                 monkeypatch):
    require_program(STORESCU)
    config = load_config(write_site_config(tmp_path / "site", orthanc, key_servers, engine="dcmtk"))
    files = write_series(tmp_path / "in", slices=DCMTK_FROM + 2, seed="storescu")
    implicit = pydicom.dcmread(files[0])
    implicit.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    implicit.save_as(files[0], implicit_vr=True, little_endian=True, enforce_file_format=True)
    sent: list[set] = []
    original = client_module.storescu_store

    def spied(*args):  # type: ignore[no-untyped-def]
        sent.append(original(*args))
        return sent[-1]

    monkeypatch.setattr(client_module, "storescu_store", spied)
    catalog = open_catalog(config)
    with PacsClient(config.pacs) as pacs:
        registrar = Registrar(config, catalog, pacs, KeystoreClient.from_config(config))
        assert {r.outcome for r in registrar.register_many(files, store_in_pacs=True)} == {Outcome.ADDED}
    assert sent == [set(files)]  # storescu took the whole batch: none went over pynetdicom
    for path in (files[0], files[1]):  # in Orthanc as sent: no transcoding
        ds = pydicom.dcmread(path)
        with urllib.request.urlopen(f"http://127.0.0.1:{orthanc.http_port}/tools/lookup",
                                    data=ds.SOPInstanceUID.encode()) as answer:
            (found,) = json.load(answer)
        with urllib.request.urlopen(f"http://127.0.0.1:{orthanc.http_port}/instances/{found['ID']}/metadata"
                                    "/TransferSyntax") as answer:
            assert answer.read().decode() == ds.file_meta.TransferSyntaxUID
    catalog.close()


def test_storescus_log_tells_which_files_the_pacs_took_unconverted():
    log = "\n".join([
        "I: Sending file: /a.dcm", "I: Converting transfer syntax: Little Endian Explicit -> Little Endian Explicit",
        "I: Sending Store Request (MsgID 1, CT)", "I: Received Store Response (Success)",
        "I: Sending file: /b.dcm", "I: Received Store Response (Warning: Coercion of Data Elements)",
        "I: Sending file: /c.dcm", "I: Converting transfer syntax: JPEG 2000 -> Little Endian Explicit",
        "I: Received Store Response (Success)",
        "I: Sending file: /d.dcm", "E: Store Failed, file: /d.dcm:", "I: Received Store Response (Error: Failed)",
        "I: Sending file: /e.dcm",  # no answer: the association broke
    ])
    assert _stored(log) == {Path("/a.dcm"), Path("/b.dcm")}
