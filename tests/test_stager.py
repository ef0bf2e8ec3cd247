"""The stager against real PACS peers, real key servers and a real SQLite catalog."""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import threading
import time
import uuid
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pydicom
import pytest

from sites import write_site_config
from srm_dicom import stager as stager_module
from srm_dicom import workers
from srm_dicom.anonymization_options import AnonymizationOptions
from srm_dicom.cache import TALLY, DiskCache
from srm_dicom.catalog import Catalog, Entry, StageRequest, open_catalog
from srm_dicom.config import Config, EmbeddedPacsConfig, load_config
from srm_dicom.crypto.container import check_key, decrypt_bytes, read_header
from srm_dicom.entry_key import key_name
from srm_dicom.keystore.client import KeystoreClient
from srm_dicom.names import UidTriple
from srm_dicom.pacs.client import PacsClient
from srm_dicom.pacs.server import EmbeddedPacs
from srm_dicom.register import Registrar
from srm_dicom.stager import StageFailed, Stager, StagingPending
from srm_dicom.synthetic import make_series
from srm_dicom.uids import deidentify_uid
from srm_dicom.volume import assemble


def assert_cached_true_to_catalog(stager: Stager, entries: list[Entry]) -> None:
    """Every entry's cached file holds the catalog's bytes: its size and adler32."""
    for entry in entries:
        path = stager.cached_path(entry)
        assert path is not None, entry.lfn
        data = path.read_bytes()
        assert len(data) == entry.size and f"{zlib.adler32(data):08x}" == entry.adler32, entry.lfn


@dataclass
class Site:
    config: Config
    catalog: Catalog
    series: list[pydicom.Dataset]
    slices: list[Entry]  # in the series' order
    volume: Entry
    keystore: KeystoreClient

    def stager(self) -> Stager:
        return Stager(self.config, self.catalog, self.keystore)

    def refresh(self, entry: Entry) -> Entry:
        found = self.catalog.namespace.lookup_guid(entry.guid)
        assert found is not None
        return found


def make_site(workdir: Path, peer, key_servers, slices: int = 3, workers: int = 2, seed: str = "stage",  # type: ignore[no-untyped-def]
              drop: tuple[int, ...] = (), engine: str = "pynetdicom", lease: float = 20.0,
              catalog: dict[str, str] | None = None, size: int = 16, readahead: str = "series") -> Site:
    """A site with a synthetic series registered (and stored in ``peer``), but for the ``drop``
    slices; its catalog an SQLite file unless ``catalog`` gives another [catalog] section."""
    path = write_site_config(workdir, peer, key_servers, workers=workers, engine=engine, lease=lease,
                             readahead=readahead)
    if catalog is not None:
        section = "".join(f'{key} = "{value}"\n' for key, value in catalog.items())
        path.write_text(path.read_text().replace('[catalog]\nurl = "catalog.db"\n', f"[catalog]\n{section}"))
    config = load_config(path)
    catalog = open_catalog(config)
    keystore = KeystoreClient.from_config(config)
    series = [ds for i, ds in enumerate(make_series(slices=slices, size=size, seed=seed)) if i not in drop]
    with PacsClient(config.pacs) as pacs:
        registrar = Registrar(config, catalog, pacs, keystore)
        for ds in series:
            registrar.register(ds, store_in_pacs=True)
    secret = config.site.secret_bytes
    slices_ = []
    for ds in series:
        uids = (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
        found = catalog.namespace.lookup("/grid/demo/mdm/" + "/".join(deidentify_uid(secret, u) for u in uids))
        assert found is not None
        slices_.append(found)
    volume = catalog.namespace.lookup(slices_[0].lfn.rsplit("/", 1)[0] + "/3D")
    assert volume is not None
    return Site(config, catalog, series, slices_, volume, keystore)


@pytest.fixture
def site(embedded_pacs, tmp_path, key_servers) -> Iterator[Site]:  # type: ignore[no-untyped-def]
    made = make_site(tmp_path / "site", embedded_pacs, key_servers)
    yield made
    made.catalog.close()


@pytest.fixture
def running(site: Site) -> Iterator[Stager]:
    stager = site.stager()
    stager.start()
    yield stager
    stager.stop()


def wait_final(stager: Stager, request_id: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = stager.request(request_id)
        assert found is not None
        if found.completed_at is not None:
            return
        time.sleep(0.02)
    raise AssertionError(f"request {request_id} not final after {timeout} s: {stager.request(request_id)}")


def test_a_fetched_slice_is_the_registered_bytes_and_decrypts_to_the_anonymized_image(site, running, caplog):
    caplog.set_level(logging.DEBUG)
    entry = site.slices[1]
    assert running.locality(entry) == "TAPE" and running.cached_path(entry) is None
    path = running.fetch(entry, timeout=20)
    data = path.read_bytes()
    assert len(data) == entry.size and f"{zlib.adler32(data):08x}" == entry.adler32
    assert running.locality(entry) == "DISK_AND_TAPE" and running.cached_path(entry) == path
    key = site.keystore.fetch_key(key_name(entry.guid, entry.content_version), lambda k: True)
    assert read_header(data).version == entry.content_version
    served = pydicom.dcmread(pydicom.filebase.DicomBytesIO(bytes(decrypt_bytes(key, data))))
    original = site.series[1]
    assert served.SOPInstanceUID == entry.sop_uid != original.SOPInstanceUID
    assert "PatientName" not in served or str(served.PatientName) != str(original.PatientName)
    assert np.array_equal(served.pixel_array, original.pixel_array)
    assert entry.lfn in caplog.text  # logged by its de-identified name, never by the PACS's UIDs
    for phi in (original.StudyInstanceUID, original.SOPInstanceUID, str(original.PatientName), entry.pfn):
        assert phi not in caplog.text


def test_a_completed_file_is_on_disk_while_its_cache_file_is_and_its_name_still_names_it(site, running, monkeypatch):
    first, second, _ = site.slices
    request_id = running.submit([first, second], pin_lifetime=600, requester="bob")
    wait_final(running, request_id)
    assert [f.on_disk for f in running.request(request_id).files] == [True, True]
    cached = running.cached_path(first)
    assert cached is not None
    cached.unlink()  # evicted (or removed by hand) since
    assert [f.on_disk for f in running.request(request_id).files] == [False, True]
    # A name that now names another file: the request's file is looked for by its GUID.
    looked_up = site.catalog.namespace.lookup_many
    monkeypatch.setattr(site.catalog.namespace, "lookup_many", lambda lfns: {
        lfn: replace(entry, guid=str(uuid.uuid4())) for lfn, entry in looked_up(lfns).items()})
    assert [f.on_disk for f in running.request(request_id).files] == [False, True]


def test_a_file_evicted_before_its_new_pin_is_written_is_staged_again_for_the_request(site, running, monkeypatch):
    """submit() finds a file on disk, then writes the request that pins it: an eviction in
    between (here: the file removed just before the write) must not leave the request's file
    COMPLETED and off disk, which FTS would read as staged and fail to copy."""
    first, second, _ = site.slices
    wait_final(running, running.submit([first, second], pin_lifetime=0, requester="bob"))
    cached = running.cached_path(first)
    assert cached is not None and running.cached_path(second) is not None
    add_stage_request = site.catalog.stages.add_stage_request

    def evicted_meanwhile(request: StageRequest) -> None:
        cached.unlink()
        add_stage_request(request)

    monkeypatch.setattr(site.catalog.stages, "add_stage_request", evicted_meanwhile)
    request_id = running.submit([first, second], pin_lifetime=600, requester="bob")
    wait_final(running, request_id)
    found = running.request(request_id)
    assert [(f.state, f.on_disk) for f in found.files] == [("COMPLETED", True), ("COMPLETED", True)]
    assert site.catalog.stages.pinned_guids(int(time.time())) == {first.guid, second.guid}
    assert all(f.pin_expires >= f.finished_at + 600 for f in found.files)


def test_stage_request_states_cancel_release_and_delete(site, running):
    first, second, third = site.slices
    request_id = running.submit([first, second], pin_lifetime=600, requester="/C=XX/O=srm-dicom/CN=bob")
    wait_final(running, request_id)
    found = running.request(request_id)
    assert [f.lfn for f in found.files] == [first.lfn, second.lfn]
    assert all(f.state == "COMPLETED" and f.on_disk and f.error is None for f in found.files)
    assert found.requester == "/C=XX/O=srm-dicom/CN=bob"
    assert found.created_at <= found.started_at <= found.completed_at <= int(time.time())
    assert all(f.pin_expires >= f.finished_at + 600 for f in found.files)
    assert site.catalog.stages.pinned_guids(int(time.time())) == {first.guid, second.guid}

    running.release(request_id, [first.lfn])
    assert site.catalog.stages.pinned_guids(int(time.time())) == {second.guid}
    with pytest.raises(Exception, match="not in stage request"):
        running.release(request_id, [third.lfn])

    # A cancelled file stays cancelled even when its staging finishes.
    other = running.submit([third], pin_lifetime=None, requester="bob")
    running.cancel(other, [third.lfn])
    wait_final(running, other)
    (cancelled,) = running.request(other).files
    assert cancelled.state == "CANCELLED"

    running.release_paths([second.lfn])
    assert site.catalog.stages.pinned_guids(int(time.time())) == set()
    unpinned = running.submit([first], pin_lifetime=0, requester="bob")  # on disk already: pin over at once
    assert running.request(unpinned).files[0].state == "COMPLETED"
    assert site.catalog.stages.pinned_guids(int(time.time())) == set()
    running.delete(request_id)
    assert running.request(request_id) is None
    with pytest.raises(Exception, match="no such stage request"):
        running.delete(request_id)


def test_concurrent_fetches_of_one_file_make_one_retrieval_that_reads_its_series_ahead(site, monkeypatch):
    retrievals: list[str] = []
    associations: list[str] = []

    class CountingPacs(PacsClient):
        def retrieve_files(self, study, series, sops, sop_classes, spool, partial=None):  # type: ignore[no-untyped-def]
            retrievals.append(sops or series)
            return super().retrieve_files(study, series, sops, sop_classes, spool, partial)

        def _open(self, plan):  # type: ignore[no-untyped-def]
            associations.append(threading.current_thread().name)
            return super()._open(plan)

    monkeypatch.setattr(stager_module, "PacsClient", CountingPacs)
    stager = site.stager()
    stager.start()
    try:
        entry = site.slices[0]
        paths: list[Path] = []
        threads = [threading.Thread(target=lambda: paths.append(stager.fetch(entry, 20))) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(paths) == 8 and len(set(paths)) == 1
        # [cache] readahead = "series": the slice's series came in the same retrieval, asked
        # for as a series since the batch held all of its slices.
        assert retrievals == [site.series[0].SeriesInstanceUID]
        deadline = time.monotonic() + 20
        while any(stager.locality(e) == "TAPE" for e in site.slices) and time.monotonic() < deadline:
            time.sleep(0.02)
        # The other slices are on disk, and the volume is one more retrieval: a worker opens
        # its association once (then once more to add the storage contexts C-GET needs) and
        # keeps it for all its jobs.
        for entry in [*site.slices[1:], site.volume]:
            stager.fetch(entry, 20)
        assert len(retrievals) == 2
        assert len(set(associations)) <= site.config.cache.workers
        assert max(Counter(associations).values()) <= 2
    finally:
        stager.stop()


def test_pacs_down_is_a_clear_failure_then_staging_recovers(embedded_pacs, tmp_path, key_servers):
    site = make_site(tmp_path / "site", embedded_pacs, key_servers, slices=1)
    pacs_storage = embedded_pacs.storage
    embedded_pacs.stop()
    stager = site.stager()
    stager.start()
    try:
        named = f"PACS {embedded_pacs.aet}@127.0.0.1:{embedded_pacs.port}: cannot connect"
        with pytest.raises(StageFailed, match=named):
            stager.fetch(site.slices[0], timeout=20)
        settings = EmbeddedPacsConfig(aet=embedded_pacs.aet, host="127.0.0.1", port=embedded_pacs.port,
                                      calling_aets=[embedded_pacs.client_aet])
        back = EmbeddedPacs(settings, pacs_storage)
        back.start()
        try:
            path = stager.fetch(site.slices[0], timeout=20)
            assert len(path.read_bytes()) == site.slices[0].size
        finally:
            back.stop()
    finally:
        stager.stop()
        site.catalog.close()


def test_fetch_times_out_as_pending_while_staging_goes_on(site, monkeypatch):
    release = threading.Event()

    class SlowPacs(PacsClient):
        def retrieve_files(self, study, series, sops, sop_classes, spool, partial=None):  # type: ignore[no-untyped-def]
            release.wait(10)
            return super().retrieve_files(study, series, sops, sop_classes, spool, partial)

    monkeypatch.setattr(stager_module, "PacsClient", SlowPacs)
    stager = site.stager()
    stager.start()
    try:
        with pytest.raises(StagingPending):
            stager.fetch(site.slices[0], timeout=0.2)
        release.set()
        assert stager.fetch(site.slices[0], timeout=20).is_file()
    finally:
        release.set()
        stager.stop()


def test_requests_and_pins_survive_a_restart(site):
    stager = site.stager()
    stager.start()
    request_id = stager.submit(site.slices[:2], pin_lifetime=600, requester="bob")
    wait_final(stager, request_id)
    before = stager.request(request_id)
    stager.stop()
    site.catalog.close()

    site.catalog = open_catalog(site.config)
    again = site.stager()
    again.start()
    try:
        after = again.request(request_id)
        assert after == before and all(f.on_disk for f in after.files)
        assert site.catalog.stages.pinned_guids(int(time.time())) == {e.guid for e in site.slices[:2]}
        assert again.locality(site.slices[0]) == "DISK_AND_TAPE" and again.locality(site.slices[2]) == "TAPE"
    finally:
        again.stop()


def test_stopped_mid_retrieve_nothing_is_published_and_the_request_resumes(site, monkeypatch):
    inside, release = threading.Event(), threading.Event()

    class BlockedPacs(PacsClient):
        def retrieve_files(self, study, series, sops, sop_classes, spool, partial=None):  # type: ignore[no-untyped-def]
            inside.set()
            release.wait(10)
            return super().retrieve_files(study, series, sops, sop_classes, spool, partial)

    monkeypatch.setattr(stager_module, "PacsClient", BlockedPacs)
    stager = site.stager()
    stager.start()
    request_id = stager.submit(site.slices, pin_lifetime=600, requester="bob")
    assert inside.wait(10)
    stopping = threading.Thread(target=stager.stop)
    stopping.start()
    time.sleep(0.1)
    release.set()  # the retrievals under way finish, but the stager is stopping
    stopping.join(20)
    states = {f.state for f in stager.request(request_id).files}
    assert states <= {"SUBMITTED", "STARTED"} and "STARTED" in states
    cache_dir = site.config.path(site.config.cache.dir)
    assert [p for p in cache_dir.iterdir() if p.name != TALLY] == []

    monkeypatch.setattr(stager_module, "PacsClient", PacsClient)
    again = site.stager()
    again.start()
    try:
        wait_final(again, request_id)
        assert all(f.state == "COMPLETED" and f.on_disk for f in again.request(request_id).files)
    finally:
        again.stop()


def test_leftovers_of_interrupted_staging_are_removed_and_never_served(site):
    entry = site.slices[0]
    cache_dir = site.config.path(site.config.cache.dir)
    cache_dir.mkdir(parents=True)
    leftover = cache_dir / f".{entry.guid}.{entry.content_version}.deadbeef.part"
    leftover.write_bytes(b"MDMENC half written")
    stager = site.stager()
    stager.start()
    try:
        assert not leftover.exists()
        assert stager.locality(entry) == "TAPE" and stager.cached_path(entry) is None
        data = stager.fetch(entry, 20).read_bytes()
        assert f"{zlib.adler32(data):08x}" == entry.adler32
    finally:
        stager.stop()


def test_a_cache_full_of_pinned_files_fails_clearly_and_corrupts_nothing(site):
    quota = 2 * site.slices[0].size + site.slices[0].size // 2  # room for two slices
    site.config = replace(site.config, cache=replace(site.config.cache, quota_bytes=quota))
    stager = site.stager()
    stager.start()
    try:
        request_id = stager.submit(site.slices[:2], pin_lifetime=600, requester="bob")
        wait_final(stager, request_id)
        with pytest.raises(StageFailed, match="cache full: .* held by pinned"):
            stager.fetch(site.slices[2], 20)
        cache_dir = site.config.path(site.config.cache.dir)
        found = sorted(p.name for p in cache_dir.iterdir() if p.name != TALLY)
        assert found == sorted(f"{e.guid}.1" for e in site.slices[:2])
        for entry in site.slices[:2]:
            assert f"{zlib.adler32((cache_dir / f'{entry.guid}.1').read_bytes()):08x}" == entry.adler32
        third = stager.submit([site.slices[2]], 600, "bob")
        wait_final(stager, third)
        (failed,) = stager.request(third).files
        assert failed.state == "FAILED" and failed.error.startswith("cache full") and not failed.on_disk
        stager.release(request_id, [site.slices[0].lfn])
        assert stager.fetch(site.slices[2], 20).is_file()
        assert stager.locality(site.slices[0]) == "TAPE" and stager.locality(site.slices[1]) == "DISK_AND_TAPE"
    finally:
        stager.stop()


def test_content_changed_in_the_pacs_is_refused(site, running):
    changed = site.series[0].copy()
    changed.PixelData = bytes(len(changed.PixelData))
    with PacsClient(site.config.pacs) as pacs:
        pacs.store(changed)
    with pytest.raises(StageFailed, match="the PACS returned different content than was registered"):
        running.fetch(site.slices[0], 20)
    assert running.locality(site.slices[0]) == "TAPE"


def test_a_volume_is_assembled_once_per_version_and_restaged_identically(site, running):
    volume = site.volume
    assert volume.adler32 is None
    data = running.fetch(volume, 20).read_bytes()
    recorded = site.refresh(volume)
    assert recorded.size == len(data) and recorded.adler32 == f"{zlib.adler32(data):08x}"
    header = read_header(data)
    key = site.keystore.fetch_key(key_name(volume.guid, volume.content_version), lambda k: check_key(header, k))
    assert bytes(decrypt_bytes(key, data)) == assemble(site.series, site.config.volume.format)

    # The cached copy gone, a restage of the same version reuses the key: identical bytes.
    running.stop()
    running.cached_path(recorded).unlink()
    again = site.stager()
    again.start()
    try:
        assert again.fetch(recorded, 20).read_bytes() == data
        # A slice added to the series: a new version, a new key, the old copy retired.
        with PacsClient(site.config.pacs) as pacs:
            extra = make_series(slices=4, size=16, seed="stage")[3]
            Registrar(site.config, site.catalog, pacs, site.keystore).register(extra, store_in_pacs=True)
        bumped = site.refresh(volume)
        assert bumped.content_version == recorded.content_version + 1 and bumped.adler32 is None
        assert not site.catalog.namespace.set_checksum(volume.guid, recorded.content_version, 1, "00000001")
        assert again.locality(bumped) == "TAPE"
        newer = again.fetch(bumped, 20)
        assert site.refresh(volume).adler32 == f"{zlib.adler32(newer.read_bytes()):08x}"
        cache_dir = site.config.path(site.config.cache.dir)
        assert f"{volume.guid}.{recorded.content_version}" not in {p.name for p in cache_dir.iterdir()}
    finally:
        again.stop()


def test_a_series_that_is_not_one_volume_fails_with_the_reason(embedded_pacs, tmp_path, key_servers):
    site = make_site(tmp_path / "site", embedded_pacs, key_servers, slices=5, seed="gap", drop=(2,))
    stager = site.stager()
    stager.start()
    try:
        with pytest.raises(StageFailed, match="^not a volume: .+") as failed:
            stager.fetch(site.volume, 20)
        assert "\n" not in failed.value.reason
        assert site.refresh(site.volume).adler32 is None
    finally:
        stager.stop()
        site.catalog.close()


def test_a_volume_whose_slice_the_pacs_lost_fails_naming_how_many_it_sent(embedded_pacs, tmp_path, key_servers):
    site = make_site(tmp_path / "site", embedded_pacs, key_servers, slices=5, seed="lost")
    extra = make_series(slices=6, size=16, seed="lost")[5]  # the next slice: still one volume
    Registrar(site.config, site.catalog, None, site.keystore).register(extra, store_in_pacs=False)
    stager = site.stager()
    stager.start()
    try:
        with pytest.raises(StageFailed, match=r"^PACS .+ sent 5 of the 6 slices of the series$"):
            stager.fetch(site.refresh(site.volume), 20)
        cache_dir = site.config.path(site.config.cache.dir)
        assert [p.name for p in cache_dir.iterdir()] == [TALLY]  # neither the plain volume nor a partial file stays
        assert site.refresh(site.volume).adler32 is None
    finally:
        stager.stop()
        site.catalog.close()


STAGER_PROCESS = """
import sys, time
from srm_dicom.catalog import open_catalog
from srm_dicom.config import load_config
from srm_dicom.keystore.client import KeystoreClient
from srm_dicom.names import UidTriple
from srm_dicom.stager import Stager

config = load_config(sys.argv[1])
catalog = open_catalog(config)
stager = Stager(config, catalog, KeystoreClient.from_config(config))
stager.start()
print(stager.submit([catalog.namespace.lookup(lfn) for lfn in sys.argv[2:]], 600, "bob"), flush=True)
time.sleep(120)
"""


def test_a_server_killed_while_staging_serves_no_partial_file_and_resumes(embedded_pacs, tmp_path, key_servers):
    # A short lease: the killed process's claim lapses soon, and the next stager takes the batch over.
    site = make_site(tmp_path / "site", embedded_pacs, key_servers, slices=40, seed="kill", workers=1, lease=2.0,
                     size=192)
    config_file = site.config.base_dir / "mdm.toml"
    lfns = [e.lfn for e in site.slices]
    process = subprocess.Popen([sys.executable, "-c", STAGER_PROCESS, str(config_file), *lfns],
                               stdout=subprocess.PIPE, text=True)
    cache_dir = site.config.path(site.config.cache.dir)

    def published() -> list[Path]:
        return [p for p in cache_dir.iterdir() if not p.name.startswith(".")] if cache_dir.is_dir() else []

    try:
        request_id = process.stdout.readline().strip()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not published():
            time.sleep(0.002)
        process.send_signal(signal.SIGKILL)
        process.wait(10)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    # Killed in the middle of the one batch of the series: files published, the batch's outcome
    # not yet written to the catalog. The batch's slices are published within milliseconds of
    # each other once the PACS has sent them all, so on a loaded machine all may be out first.
    states = [f.state for f in site.catalog.stages.stage_request(request_id).files]
    assert set(states) == {"STARTED"} and 0 < len(published()) <= len(lfns), (states, len(published()))

    stager = site.stager()
    stager.start()
    try:
        assert not [p for p in cache_dir.iterdir() if p.name.endswith(".part")]
        wait_final(stager, request_id)
        assert all(f.state == "COMPLETED" and f.on_disk for f in stager.request(request_id).files)
        assert_cached_true_to_catalog(stager, site.slices)
    finally:
        stager.stop()
        site.catalog.close()


def test_a_changed_anonymization_config_leaves_older_entries_restaging_byte_identical(site):
    changed = replace(site.config, anonymization=AnonymizationOptions(
        retain_longitudinal_modified_dates=True, retain_patient_characteristics=True, clean_descriptors=True))
    stager = Stager(changed, site.catalog, site.keystore)
    stager.start()
    try:
        for entry in site.slices:
            data = stager.fetch(entry, timeout=20).read_bytes()
            assert len(data) == entry.size and f"{zlib.adler32(data):08x}" == entry.adler32
    finally:
        stager.stop()


def test_an_entry_protected_with_other_packaged_rules_says_how_to_reissue_it(site, running):
    entry = site.slices[0]
    record = json.loads(entry.protection)
    record["rules"] = "000000000000"
    stale = replace(entry, protection=json.dumps(record))
    site.catalog.register_image(  # the same image, recorded as protected with older rules
        replace(stale, content_version=2), site.catalog.index.metadata(entry.guid), site.volume)
    with pytest.raises(StageFailed, match="mdm register --reprotect"):
        running.fetch(site.refresh(entry), timeout=20)


class CountingPacs(PacsClient):
    """Counts what the stager asks the PACS: retrieves (with what they name) and C-FINDs."""

    retrieves: list[object] = []
    finds: list[str] = []

    def retrieve_files(self, study, series, sops, sop_classes, spool, partial=None):  # type: ignore[no-untyped-def]
        CountingPacs.retrieves.append(list(sops) if sops else series)
        return super().retrieve_files(study, series, sops, sop_classes, spool, partial)

    def find(self, level, query):  # type: ignore[no-untyped-def]
        CountingPacs.finds.append(level)
        return super().find(level, query)


@pytest.fixture
def counting(monkeypatch) -> type[CountingPacs]:  # type: ignore[no-untyped-def]
    CountingPacs.retrieves, CountingPacs.finds = [], []
    monkeypatch.setattr(stager_module, "PacsClient", CountingPacs)
    return CountingPacs


def test_a_stage_request_is_one_retrieve_of_the_series_or_naming_its_sop_uids(any_pacs, tmp_path, key_servers, counting,
                                                                              monkeypatch):
    site = make_site(tmp_path / "site", any_pacs, key_servers, slices=6, seed=f"bulk-{any_pacs.name}")
    fetches: list[int] = []  # keys fetched by each protection worker (one request per key server each)
    submit = workers.submit

    def counted(fn, *args):  # type: ignore[no-untyped-def]
        if fn is workers.fetch_keys:
            fetches.append(len(args[1]))
        return submit(fn, *args)

    monkeypatch.setattr(workers, "submit", counted)
    stager = site.stager()
    stager.start()
    try:
        # Part of the series: one retrieve naming the SOP UIDs of the batch.
        request_id = stager.submit(site.slices[:4], pin_lifetime=600, requester="bob")
        wait_final(stager, request_id)
        assert all(f.state == "COMPLETED" and f.on_disk for f in stager.request(request_id).files)
        sops = [ds.SOPInstanceUID for ds in site.series]
        assert counting.retrieves == [sops[:4]] and sum(fetches) == 4 and len(fetches) == min(4, workers.size())
        # The catalog's SOP classes spare a C-FIND per slice: one C-FIND of one instance, once
        # per association's client, tells whether the PACS omits SOP Class UID in its answers
        # (dcmqrscp does, and then gets the catch-all contexts).
        assert counting.finds == ["IMAGE"]
        # Every slice of the series (the cache emptied): one retrieve of the series, much
        # faster than naming its UIDs.
        for entry in site.slices[:4]:
            stager.cached_path(entry).unlink()
        request_id = stager.submit(site.slices, pin_lifetime=600, requester="bob")
        wait_final(stager, request_id)
        assert all(f.state == "COMPLETED" and f.on_disk for f in stager.request(request_id).files)
        assert counting.retrieves == [sops[:4], site.series[0].SeriesInstanceUID] and sum(fetches) == 10
        assert_cached_true_to_catalog(stager, site.slices)
    finally:
        stager.stop()
        site.catalog.close()


def test_a_series_staged_with_its_volume_is_retrieved_once_for_both(site, counting):
    stager = site.stager()
    stager.start()
    try:
        request_id = stager.submit([site.volume, *site.slices], pin_lifetime=600, requester="bob")
        wait_final(stager, request_id)
        assert all(f.state == "COMPLETED" for f in stager.request(request_id).files)
        assert counting.retrieves == [site.series[0].SeriesInstanceUID]
        data = stager.cached_path(site.refresh(site.volume)).read_bytes()
        assert f"{zlib.adler32(data):08x}" == site.refresh(site.volume).adler32
    finally:
        stager.stop()


def test_images_the_pacs_does_not_have_fail_alone_with_their_reason(any_pacs, tmp_path, key_servers):
    site = make_site(tmp_path / "site", any_pacs, key_servers, slices=5, seed=f"gone-{any_pacs.name}")
    # Two more slices of the series registered but never stored into the PACS.
    extra = make_series(slices=8, size=16, seed=f"gone-{any_pacs.name}")[5:7]
    registrar = Registrar(site.config, site.catalog, None, site.keystore)
    for ds in extra:
        registrar.register(ds, store_in_pacs=False)
    secret = site.config.site.secret_bytes
    absent = [site.catalog.lookup_uids(UidTriple(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID))
              for ds in extra]
    assert all(absent)
    entries = [*site.slices[:2], absent[0], *site.slices[2:], absent[1]]
    stager = site.stager()
    stager.start()
    try:
        request_id = stager.submit(entries, pin_lifetime=600, requester="bob")  # type: ignore[arg-type]
        wait_final(stager, request_id)
        files = {f.lfn: f for f in stager.request(request_id).files}
        for entry in site.slices:
            assert files[entry.lfn].state == "COMPLETED" and files[entry.lfn].on_disk
        pacs = f"PACS {any_pacs.aet}@{any_pacs.host}:{any_pacs.port}"
        for entry in absent:
            failed = files[entry.lfn]  # type: ignore[union-attr]
            assert failed.state == "FAILED" and not failed.on_disk
            assert failed.error and failed.error.startswith(pacs) and "\n" not in failed.error
            assert deidentify_uid(secret, extra[0].PatientID) not in failed.error
    finally:
        stager.stop()
        site.catalog.close()


def test_the_dcmtk_engine_stages_slices_and_volume_identical_to_the_catalog(any_pacs, tmp_path, key_servers):
    site = make_site(tmp_path / "site", any_pacs, key_servers, slices=5, seed=f"dcmtk-{any_pacs.name}",
                     engine="dcmtk")
    stager = site.stager()
    stager.start()
    try:
        request_id = stager.submit(site.slices[:3], pin_lifetime=600, requester="bob")
        wait_final(stager, request_id)
        assert all(f.state == "COMPLETED" for f in stager.request(request_id).files)
        for entry in [*site.slices, site.volume]:  # the rest singly: a slice, a series for the volume
            data = stager.fetch(entry, 20).read_bytes()
            recorded = site.refresh(entry)
            assert len(data) == recorded.size and f"{zlib.adler32(data):08x}" == recorded.adler32
    finally:
        stager.stop()
        site.catalog.close()


def test_two_front_ends_on_one_catalog_and_cache_stage_each_file_once(embedded_pacs, tmp_path, key_servers,
                                                                       catalog_section, monkeypatch):
    """Two stagers as two ``mdm serve`` would run them: their own catalog connections to one
    database, one cache directory; GETs and a stage request at both at once."""
    site = make_site(tmp_path / "site", embedded_pacs, key_servers, slices=6, seed="two", catalog=catalog_section)
    published: list[str] = []
    commit = DiskCache.commit

    def counted(self, guid, version, partial, sync=True):  # type: ignore[no-untyped-def]
        published.append(guid)
        return commit(self, guid, version, partial, sync)

    monkeypatch.setattr(DiskCache, "commit", counted)
    other_catalog = open_catalog(site.config)
    front_ends = [site.stager(), Stager(site.config, other_catalog, site.keystore)]
    for stager in front_ends:
        stager.start()
    try:
        request_id = front_ends[0].submit(site.slices[3:], pin_lifetime=600, requester="bob")
        paths: list[Path] = []
        threads = [threading.Thread(target=lambda s=stager, e=entry: paths.append(s.fetch(e, 30)))
                   for stager in front_ends for entry in site.slices for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        wait_final(front_ends[1], request_id)  # the other front end reads the request's end
        assert len(paths) == 4 * len(site.slices) and len(set(paths)) == len(site.slices)
        assert Counter(published) == Counter(entry.guid for entry in site.slices)
        assert all(f.state == "COMPLETED" and f.on_disk for f in front_ends[1].request(request_id).files)
        assert_cached_true_to_catalog(front_ends[1], site.slices)
    finally:
        for stager in front_ends:
            stager.stop()
        other_catalog.close()
        site.catalog.close()


def test_a_get_of_a_slice_is_answered_once_it_is_published_while_its_series_is_read_ahead(
        embedded_pacs, tmp_path, key_servers, monkeypatch):
    site = make_site(tmp_path / "site", embedded_pacs, key_servers, slices=5, seed="ahead")
    asked = site.slices[2]
    others = threading.Event()
    fsync = stager_module._fsync

    def held(path: Path) -> None:  # the other slices' files wait until the asked one was answered
        if asked.guid not in path.name:
            others.wait(20)
        fsync(path)

    monkeypatch.setattr(stager_module, "_fsync", held)
    stager = site.stager()
    stager.start()
    try:
        path = stager.fetch(asked, 20)
        assert len(path.read_bytes()) == asked.size
        assert [stager.locality(e) for e in site.slices if e is not asked] == ["TAPE"] * 4
        others.set()
        deadline = time.monotonic() + 20
        while any(stager.locality(e) == "TAPE" for e in site.slices) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert_cached_true_to_catalog(stager, site.slices)  # read ahead: the same bytes as the catalog's
    finally:
        others.set()
        stager.stop()
        site.catalog.close()


def test_readahead_none_stages_the_slice_alone(embedded_pacs, tmp_path, key_servers, counting):
    site = make_site(tmp_path / "site", embedded_pacs, key_servers, slices=3, seed="alone", readahead="none")
    stager = site.stager()
    stager.start()
    try:
        stager.fetch(site.slices[1], 20)
        assert counting.retrieves == [[site.series[1].SOPInstanceUID]]
        assert [stager.locality(e) for e in site.slices] == ["TAPE", "DISK_AND_TAPE", "TAPE"]
    finally:
        stager.stop()
        site.catalog.close()


def test_a_series_retrieved_whole_publishes_only_the_images_of_the_batch(any_pacs, tmp_path, key_servers, counting):
    """The PACS holds an image of the series the catalog does not know: it comes with the series
    and is left out."""
    site = make_site(tmp_path / "site", any_pacs, key_servers, slices=4, seed=f"whole-{any_pacs.name}")
    stray = make_series(slices=5, size=16, seed=f"whole-{any_pacs.name}")[4]
    with PacsClient(site.config.pacs) as pacs:
        pacs.store(stray)
    stager = site.stager()
    stager.start()
    try:
        request_id = stager.submit(site.slices, pin_lifetime=600, requester="bob")
        wait_final(stager, request_id)
        assert all(f.state == "COMPLETED" for f in stager.request(request_id).files)
        assert counting.retrieves == [site.series[0].SeriesInstanceUID]
        cache_dir = site.config.path(site.config.cache.dir)
        assert sorted(p.name for p in cache_dir.iterdir() if p.name != TALLY) == sorted(f"{e.guid}.{e.content_version}"
                                                                     for e in site.slices)
        assert_cached_true_to_catalog(stager, site.slices)
    finally:
        stager.stop()
        site.catalog.close()


def _padded(ds: pydicom.Dataset, path: Path) -> Path:
    """``ds`` written with the values registration reads padded as pydicom would never write
    them (it decodes b" CT " as "CT" and writes it so): kept as read, they are the PACS's bytes."""
    ds.save_as(path, enforce_file_format=True)
    padded = pydicom.dcmread(path)
    sop_class = str(ds.SOPClassUID)
    values = {"Modality": b" CT ", "ImageType": b"ORIGINAL \\PRIMARY\\AXIAL ", "BurnedInAnnotation": b"NO  ",
              "SOPClassUID": sop_class.encode() + (b" " if len(sop_class) % 2 else b"  ")}
    for keyword, value in values.items():
        tag = pydicom.tag.Tag(keyword)
        vr = pydicom.datadict.dictionary_VR(tag)
        padded._dict[tag] = pydicom.dataelem.RawDataElement(tag, vr, len(value), value, 0, False, True)
    padded.save_as(path)
    assert b" CT " in path.read_bytes()
    return path


def test_values_stored_with_odd_padding_restage_to_the_registered_bytes(site, running, tmp_path):
    # Registration reads Modality, ImageType, BurnedInAnnotation and the SOP Class UID; staging
    # does not: read in place, they would be re-encoded in the registered bytes only.
    files = [_padded(ds, tmp_path / f"{i}.dcm") for i, ds in enumerate(make_series(slices=2, size=16, seed="pad"))]
    with PacsClient(site.config.pacs) as pacs:
        results = list(Registrar(site.config, site.catalog, pacs, site.keystore).register_many(files, True))
    assert [r.error for r in results] == [None, None]
    secret = site.config.site.secret_bytes
    entries = []
    for path in files:
        ds = pydicom.dcmread(path)
        uids = (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
        found = site.catalog.namespace.lookup("/grid/demo/mdm/" + "/".join(deidentify_uid(secret, u) for u in uids))
        assert found is not None and running.locality(found) == "TAPE"
        entries.append(found)
    for entry in entries:
        data = running.fetch(entry, timeout=20).read_bytes()
        assert len(data) == entry.size and f"{zlib.adler32(data):08x}" == entry.adler32, entry.lfn
    assert_cached_true_to_catalog(running, entries)
