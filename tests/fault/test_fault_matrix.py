"""The fault matrix of issue 12, each fault caused for real against real peers: a PACS that is
slow, aborts mid-series or drops idle associations (a delaying TCP proxy in front of the
real embedded PACS, ``tests/proxy.py``: no ``tc`` here), ``mdm register`` SIGKILLed
mid-batch, ports taken, a full cache disk (a 1 MiB tmpfs), a corrupt cache file and the
catalog locked by another connection. Each gives a clear error or
recovers, and loses nothing: every byte served is the catalog's (size and adler32), every
cataloged image has its key.

The rows other suites cover are listed in README (Tests, fault matrix): PACS down, a cache of
pinned files, SIGKILL of ``mdm serve`` while staging (tests/server/test_faults.py); 1 and 2
key servers down, a wrong share (tests/keystore); tampered ciphertext (tests/test_client.py);
idle key server connections (tests/keystore, tests/test_listen.py, tests/server/test_faults.py);
the catalog database unreachable (tests/server/test_catalog_unavailable.py).

CI runs the rows marked smoke; ``MDM_FAULT_FULL=1 pytest tests/fault -q`` runs them all.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import time
import zlib
from pathlib import Path

import pytest
from proxy import FaultyProxy

import clients
from clients import Credential
from peers import Peer
from sites import mdm, write_site_config
from srm_dicom.cache import TALLY
from srm_dicom.catalog import Catalog, Entry, open_catalog
from srm_dicom.config import load_config
from srm_dicom.entry_key import key_name
from srm_dicom.keystore.client import KeystoreClient
from srm_dicom.register import BATCH
from srm_dicom.synthetic import make_series
from storage import register, start_storage_element

# The long rows run only in the full matrix (MDM_FAULT_FULL=1); otherwise tests/conftest.py
# deselects them, so that a short run never reports them as skipped.
full_only = pytest.mark.fault_full


def through(peer: Peer, proxy: FaultyProxy) -> Peer:
    """The same PACS, reached through the proxy."""
    return Peer(peer.name, peer.aet, "127.0.0.1", proxy.port, peer.client_aet, peer.client_port, peer.storage,
                lambda: None)


def entries(catalog: Catalog) -> list[Entry]:
    namespace = catalog.namespace
    found = []
    for study in namespace.list_dir("/grid/demo/mdm").directories:
        for series in namespace.list_dir(study).directories:
            found += namespace.list_dir(series).entries
    return found


def true_to_catalog(entry: Entry, data: bytes) -> bool:
    return (len(data), f"{zlib.adler32(data):08x}") == (entry.size, entry.adler32)


def curl_get(url: str, pki: Path, out: Path) -> tuple[int, str, bytes]:
    """(HTTP status, body text if an error, bytes written) of one GET as bob."""
    result = clients.curl(url, Credential.of_user(pki, "bob"), "-s", "-o", str(out), "-w", "%{http_code}")
    data = out.read_bytes() if out.exists() else b""
    return int(result.stdout or 0), data.decode("utf-8", "replace") if result.stdout != "200" else "", data


def test_a_slow_pacs_still_serves_true_bytes(embedded_pacs, key_servers, tmp_path):
    """PACS slow: every packet from it delayed 20 ms."""
    with FaultyProxy(("127.0.0.1", embedded_pacs.port), delay=0.02) as proxy:
        config_path = write_site_config(tmp_path / "site", through(embedded_pacs, proxy), key_servers)
        register(config_path, make_series(slices=4, size=16, seed="slow pacs"))
        se = start_storage_element(config_path)
        try:
            volume = next(e for e in entries(se.catalog) if e.kind == "volume")
            status, problem, data = curl_get(se.url + volume.lfn, key_servers.pki, tmp_path / "v")
            assert status == 200, problem
            assert true_to_catalog(se.catalog.namespace.lookup(volume.lfn), data)
        finally:
            se.stop()


def test_a_pacs_aborting_mid_series_is_a_clean_503_then_the_series_is_served(embedded_pacs, key_servers, tmp_path):
    """PACS aborting mid-series: the connection reset after 40 kB of a 3D's retrieve."""
    with FaultyProxy(("127.0.0.1", embedded_pacs.port)) as proxy:
        config_path = write_site_config(tmp_path / "site", through(embedded_pacs, proxy), key_servers)
        register(config_path, make_series(slices=8, size=64, seed="aborting pacs"))
        se = start_storage_element(config_path)
        try:
            volume = next(e for e in entries(se.catalog) if e.kind == "volume")
            proxy.abort_after = 40_000
            status, problem, _ = curl_get(se.url + volume.lfn, key_servers.pki, tmp_path / "v")
            assert status == 503, (status, problem)
            detail = json.loads(problem)["detail"]
            assert "PACS" in detail and "\n" not in detail and "Traceback" not in detail
            cache = se.config.path(se.config.cache.dir)
            assert [p.name for p in cache.iterdir() if p.name != TALLY] == []  # nothing half written
            proxy.abort_after = None
            status, problem, data = curl_get(se.url + volume.lfn, key_servers.pki, tmp_path / "v")
            assert status == 200, problem
            assert true_to_catalog(se.catalog.namespace.lookup(volume.lfn), data)
        finally:
            se.stop()


def test_idle_pacs_associations_dropped_meanwhile_are_reopened(embedded_pacs, key_servers, tmp_path):
    """Idle connections to the PACS: the kept association cut (as a PACS or firewall idle
    timeout does) between two GETs."""
    with FaultyProxy(("127.0.0.1", embedded_pacs.port)) as proxy:
        config_path = write_site_config(tmp_path / "site", through(embedded_pacs, proxy), key_servers)
        register(config_path, make_series(slices=3, size=16, seed="idle pacs"))
        se = start_storage_element(config_path)
        try:
            first, second, third = [e for e in entries(se.catalog) if e.kind == "slice"]
            for entry in (first, second, third):
                status, problem, data = curl_get(se.url + entry.lfn, key_servers.pki, tmp_path / "s")
                assert status == 200, problem
                assert true_to_catalog(entry, data)
                proxy.cut()  # every open association goes, silently, as after an idle timeout
                time.sleep(0.5)
        finally:
            se.stop()


@full_only
def test_register_sigkilled_mid_batch_loses_nothing_when_run_again(embedded_pacs, key_servers, tmp_path):
    config_path = write_site_config(tmp_path / "site", embedded_pacs, key_servers)
    count = 3 * BATCH
    folder = tmp_path / "batch"
    folder.mkdir()
    # Several of the registrar's batches (srm_dicom.register.BATCH), so the kill lands between two.
    for i, ds in enumerate(make_series(slices=count, size=32, seed="killed batch")):
        ds.save_as(folder / f"{i:03}.dcm", enforce_file_format=True)
    catalog_db = tmp_path / "site" / "catalog.db"
    process = subprocess.Popen([shutil.which("mdm") or "mdm", "register", str(folder)],
                               env={**os.environ, "MDM_CONFIG": str(config_path)},
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if catalog_db.exists():
            with sqlite3.connect(catalog_db, timeout=30) as db:
                tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
                if "entries" in tables and db.execute("SELECT count(*) FROM entries").fetchone()[0] >= 10:
                    break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait(10)
    catalog = open_catalog(load_config(config_path))
    killed_at = len([e for e in entries(catalog) if e.kind == "slice"])
    catalog.close()
    assert 0 < killed_at < count, killed_at
    again = mdm("register", str(folder), config=config_path, timeout=300)
    assert again.returncode == 0, again.stderr
    assert f"{count - killed_at} registered, 0 updated, {killed_at} already registered, 0 failed" in again.stdout
    config = load_config(config_path)
    catalog = open_catalog(config)
    try:
        found = entries(catalog)
        slices = [e for e in found if e.kind == "slice"]
        assert len(slices) == count and [e.kind for e in found].count("volume") == 2  # 3D and 3D.json
        keystore = KeystoreClient.from_config(config)
        for entry in slices:  # every cataloged image has its key on the key servers
            assert len(keystore.fetch_key(key_name(entry.guid, entry.content_version), lambda k: True)) == 32
    finally:
        catalog.close()


def _port_taken_line(*args: str, config: Path) -> subprocess.CompletedProcess[str]:
    return mdm(*args, config=config, timeout=60)


def test_a_port_taken_is_one_line_and_a_usage_exit_code(embedded_pacs, key_servers, tmp_path):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        config_path = write_site_config(tmp_path / "site", embedded_pacs, key_servers, listen_port=port)
        text = config_path.read_text().replace("[server]\nport = 0", f"[server]\nport = {port}")
        text += f'\n[embedded_pacs]\nport = {port}\nstorage = "pacs"\n'
        config_path.write_text(text)
        for command in (["serve"], ["listen"], ["pacs", "serve"]):
            result = _port_taken_line(*command, config=config_path)
            assert result.returncode != 0 and "Traceback" not in result.stderr, (command, result.stderr)
            (line,) = result.stderr.strip().splitlines()
            assert str(port) in line and ("in use" in line or "cannot listen" in line), (command, line)


@pytest.fixture
def small_disk(tmp_path):  # type: ignore[no-untyped-def]
    """A 1 MiB tmpfs: a cache disk that really fills up."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@full_only
def test_a_full_cache_disk_is_a_clean_error_and_leaves_no_partial_file(embedded_pacs, key_servers, tmp_path,
                                                                      small_disk):
    config_path = write_site_config(tmp_path / "site", embedded_pacs, key_servers)
    config_path.write_text(config_path.read_text().replace('dir = "cache"', f'dir = "{small_disk}"'))
    register(config_path, make_series(slices=40, size=128, seed="full disk"))  # a 3D of 1.3 MB
    (small_disk / "ballast").write_bytes(b"\0" * 600_000)
    se = start_storage_element(config_path)
    try:
        volume = next(e for e in entries(se.catalog) if e.kind == "volume")
        status, problem, _ = curl_get(se.url + volume.lfn, key_servers.pki, tmp_path / "v")
        assert status == 507, (status, problem)
        detail = json.loads(problem)["detail"]
        assert "\n" not in detail and "Traceback" not in detail
        assert sorted(p.name for p in small_disk.iterdir() if p.name != TALLY) == ["ballast"]  # no partial file left
        slice_entry = next(e for e in entries(se.catalog) if e.kind == "slice")
        status, problem, data = curl_get(se.url + slice_entry.lfn, key_servers.pki, tmp_path / "s")
        assert status == 200 and true_to_catalog(slice_entry, data), problem  # small files still fit
    finally:
        se.stop()


def test_a_corrupt_cache_file_is_never_served_it_is_staged_again(embedded_pacs, key_servers, tmp_path, caplog):
    """A corrupt cache file: a byte flipped, then a file truncated, in the cache of a running
    storage element; then one corrupted while the PACS is down."""
    with FaultyProxy(("127.0.0.1", embedded_pacs.port)) as proxy:
        config_path = write_site_config(tmp_path / "site", through(embedded_pacs, proxy), key_servers)
        register(config_path, make_series(slices=2, size=16, seed="corrupt cache"))
        se = start_storage_element(config_path)
        try:
            first, second = [e for e in entries(se.catalog) if e.kind == "slice"]
            cache = se.config.path(se.config.cache.dir)
            for entry in (first, second):
                assert curl_get(se.url + entry.lfn, key_servers.pki, tmp_path / "warm")[0] == 200
            flipped = cache / f"{first.guid}.{first.content_version}"
            data = bytearray(flipped.read_bytes())
            data[len(data) // 2] ^= 0x01  # same size: only the adler32 tells
            flipped.write_bytes(bytes(data))
            truncated = cache / f"{second.guid}.{second.content_version}"
            truncated.write_bytes(truncated.read_bytes()[:-1])
            for entry, path in ((first, flipped), (second, truncated)):
                status, problem, served = curl_get(se.url + entry.lfn, key_servers.pki, tmp_path / "again")
                assert status == 200, problem
                assert true_to_catalog(entry, served)
                assert true_to_catalog(entry, path.read_bytes())  # the cache holds the true bytes again
            assert sum("differs from the catalog" in r.getMessage() for r in caplog.records) == 2

            proxy.stop()  # the PACS is gone: the corrupt file cannot be staged again
            flipped.write_bytes(bytes(data))
            result = clients.curl(se.url + first.lfn, Credential.of_user(key_servers.pki, "bob"), "-s", "-i")
            head, _, body = result.stdout.replace("\r\n", "\n").partition("\n\n")
            assert head.startswith("HTTP/1.1 503") and "retry-after:" in head.lower(), head
            assert "application/problem+json" in head
            detail = json.loads(body)["detail"]
            assert "corrupt in the cache" in detail and "PACS" in detail and "\n" not in detail, detail
            assert not flipped.exists()  # removed, never served
        finally:
            se.stop()


def _locked_site(embedded_pacs, key_servers, tmp_path: Path) -> Path:  # type: ignore[no-untyped-def]
    """A site whose catalog waits 1 s (not the default 30 s) for a write lock."""
    config_path = write_site_config(tmp_path / "site", embedded_pacs, key_servers)
    config_path.write_text(config_path.read_text().replace('url = "catalog.db"',
                                                           'url = "catalog.db"\nbusy_timeout = 1'))
    return config_path


def _hold_write_lock(database: Path) -> sqlite3.Connection:
    """Another process's connection holding SQLite's one write lock (as a long ``mdm register`` does)."""
    holder = sqlite3.connect(database, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    holder.execute("CREATE TABLE IF NOT EXISTS held (x)")
    return holder


def test_a_locked_catalog_is_one_line_and_exit_code_7_then_nothing_is_lost(embedded_pacs, key_servers, tmp_path):
    """The database locked, for ``mdm register``: a real write lock held by another connection."""
    config_path = _locked_site(embedded_pacs, key_servers, tmp_path)
    folder = tmp_path / "images"
    folder.mkdir()
    for i, ds in enumerate(make_series(slices=2, size=8, seed="locked catalog")):
        ds.save_as(folder / f"{i}.dcm", enforce_file_format=True)
    assert mdm("register", str(folder), config=config_path).returncode == 0  # the catalog exists
    more = make_series(slices=3, size=8, seed="locked catalog")[2]
    more.save_as(folder / "2.dcm", enforce_file_format=True)
    holder = _hold_write_lock(tmp_path / "site" / "catalog.db")
    try:
        locked = mdm("register", str(folder), config=config_path)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert locked.returncode == 7 and "Traceback" not in locked.stderr, locked.stderr
    (line,) = locked.stderr.strip().splitlines()
    assert line.startswith("mdm register: the catalog database is locked by another process"), line
    again = mdm("register", str(folder), config=config_path)
    assert again.returncode == 0, again.stderr
    assert "1 registered, 0 updated, 2 already registered, 0 failed" in again.stdout, again.stdout


def test_a_locked_catalog_is_a_503_with_retry_after_then_served(embedded_pacs, key_servers, tmp_path):
    """The database locked, for ``mdm serve``: a write (a Tape REST stage request) while another
    connection holds the lock is a 503 problem with Retry-After; reads go on (WAL); then it works."""
    config_path = _locked_site(embedded_pacs, key_servers, tmp_path)
    register(config_path, make_series(slices=1, size=8, seed="locked server"))
    se = start_storage_element(config_path)
    bob = Credential.of_user(key_servers.pki, "bob")
    try:
        (image,) = [e for e in entries(se.catalog) if e.kind == "slice"]
        body = json.dumps({"files": [{"path": image.lfn}]})
        stage = ("-s", "-i", "-X", "POST", "-H", "Content-Type: application/json", "--data", body)
        holder = _hold_write_lock(tmp_path / "site" / "catalog.db")
        try:
            result = clients.curl(se.url + "/api/v1/tape/stage", bob, *stage)
            listed = clients.curl(se.url + image.lfn.rpartition("/")[0] + "/", bob, "-s", "-X", "PROPFIND",
                                  "-H", "Depth: 1", "-o", "/dev/null", "-w", "%{http_code}")
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        head, _, problem = result.stdout.replace("\r\n", "\n").partition("\n\n")
        assert head.startswith("HTTP/1.1 503") and "retry-after: 5" in head.lower(), head
        assert "application/problem+json" in head.lower()
        assert "the catalog database is locked" in json.loads(problem)["detail"]
        assert listed.stdout == "207"
        again = clients.curl(se.url + "/api/v1/tape/stage", bob, *stage[:1], "-o", "/dev/null", "-w",
                             "%{http_code}", *stage[2:])
        assert again.stdout == "201", again.stdout
    finally:
        se.stop()
