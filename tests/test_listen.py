import os
import re
import shutil
import signal
import subprocess
import time

import pydicom
import pytest

from catalogs import count_series_reads
from conftest import require_program
from peers import free_port
from sites import write_site_config
from srm_dicom.catalog import open_catalog
from srm_dicom.config import load_config
from srm_dicom.pacs.client import PacsClient
from srm_dicom.synthetic import make_series


def start_listener(config_path):
    proc = subprocess.Popen([shutil.which("mdm"), "listen"], env={**os.environ, "MDM_CONFIG": str(config_path)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    line = proc.stdout.readline()
    assert line.startswith("listening as MDM_PUSH@127.0.0.1:"), line + proc.stderr.read()
    return proc


def stop_listener(proc):
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    return out


def push(files, port, *options):
    storescu = require_program("/usr/bin/storescu")
    return subprocess.run([storescu, *options, "-aec", "MDM_PUSH", "127.0.0.1", str(port), *map(str, files)],
                          capture_output=True, text=True, timeout=60, env={**os.environ, "TCP_NODELAY": "1"})


def write_files(tmp_path, seed, slices=3):
    files = []
    for i, ds in enumerate(make_series(slices=slices, size=16, seed=seed)):
        files.append(tmp_path / f"{seed}-{i}.dcm")
        ds.save_as(files[-1], enforce_file_format=True)
    return files


@pytest.mark.parametrize("store_to_pacs", [True, False])
def test_pushed_images_are_registered_and_stored_into_the_pacs_when_asked(
    embedded_pacs, tmp_path, store_to_pacs, key_servers
):
    port = free_port()
    config_path = write_site_config(
        tmp_path / "site", embedded_pacs, key_servers, store_to_pacs=store_to_pacs, listen_port=port
    )
    files = write_files(tmp_path, "push")
    proc = start_listener(config_path)
    try:
        result = push(files, port)
        assert result.returncode == 0, result.stderr
    finally:
        out = stop_listener(proc)
    assert "3 registered, 0 updated, 0 already registered, 0 failed" in out
    config = load_config(config_path)
    catalog = open_catalog(config)
    assert catalog.namespace.count() == 5  # three slices, 3D and 3D.json
    catalog.close()
    first = make_series(slices=1, size=16, seed="push")[0]
    with PacsClient(config.pacs) as pacs:
        in_pacs = pacs.find_instances(first.StudyInstanceUID, first.SeriesInstanceUID)
    assert len(in_pacs) == (3 if store_to_pacs else 0)


def test_a_push_the_catalog_cannot_name_is_refused_and_the_rest_goes_on(embedded_pacs, tmp_path, key_servers):
    port = free_port()
    config_path = write_site_config(
        tmp_path / "site", embedded_pacs, key_servers, store_to_pacs=False, listen_port=port
    )
    good, bad = write_files(tmp_path, "mixed", slices=2)
    ds = pydicom.dcmread(bad)
    ds.SeriesInstanceUID = "not.a.uid"
    ds.save_as(bad)
    proc = start_listener(config_path)
    try:
        result = push([bad, good], port, "--no-halt", "-v")
    finally:
        out = stop_listener(proc)
    responses = [line for line in result.stderr.splitlines() if "Received Store Response" in line]
    assert len(responses) == 2 and sum("(Success)" in line for line in responses) == 1, responses
    assert "1 registered" in out and "1 failed" in out and "SeriesInstanceUID is not a valid UID" in out


def test_the_first_push_after_a_pause_longer_than_the_key_servers_idle_timeout_is_registered(
    embedded_pacs, pki, tmp_path
):
    """Issue 12, finding 7: the key servers had closed the kept-alive connections, the first
    push after the pause failed to store its key and the modality got 0xC000."""
    from srm_dicom.keystore.local import LocalKeyServers

    port = free_port()
    with LocalKeyServers(pki, tmp_path / "keystores", idle_timeout=0.3) as impatient:
        config_path = write_site_config(tmp_path / "site", embedded_pacs, impatient, listen_port=port)
        first, second, third = write_files(tmp_path, "pause")
        proc = start_listener(config_path)
        try:
            for file in (first, second, third):
                result = push([file], port)
                assert result.returncode == 0 and "0xc000" not in result.stderr.lower(), result.stderr
                time.sleep(1.5)  # longer than the idle timeout: the servers close the connections
        finally:
            out = stop_listener(proc)
    assert "3 registered, 0 updated, 0 already registered, 0 failed" in out


def test_a_push_while_another_process_holds_the_catalog_lock_is_refused_with_a_reason_then_taken(
    embedded_pacs, tmp_path, key_servers
):
    """The catalog locked (a real write lock of another connection, past [catalog] busy_timeout):
    the push is refused with 0xA700, one reason in the log and no traceback; sent again, taken."""
    import sqlite3

    port = free_port()
    config_path = write_site_config(tmp_path / "site", embedded_pacs, key_servers, store_to_pacs=False,
                                    listen_port=port)
    text = config_path.read_text().replace('url = "catalog.db"', 'url = "catalog.db"\nbusy_timeout = 1')
    config_path.write_text(text)
    (image,) = write_files(tmp_path, "locked", slices=1)
    proc = start_listener(config_path)
    holder = sqlite3.connect(tmp_path / "site" / "catalog.db", isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")
        locked = push([image], port, "-v")
        holder.execute("ROLLBACK")
        again = push([image], port)
    finally:
        holder.close()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    assert "Received Store Response (Refused: OutOfResources)" in locked.stderr, locked.stderr  # 0xA700
    assert again.returncode == 0 and "0xa700" not in again.stderr.lower(), again.stderr
    assert "the catalog database is locked" in err and "Traceback" not in err, err
    assert "1 registered" in out and "1 failed" in out, out


def test_a_pushed_series_is_planned_once_when_the_pushes_pause_with_the_sizes_registering_files_gives(
    embedded_pacs, tmp_path, key_servers, monkeypatch
):
    """Issue 9: each push used to read the whole series again to plan its volume (n(n-1)/2 rows
    for an n-image series). Pushes now go through the registrar's batches; the volume is planned
    once the pushes pause, with the sizes `mdm register` of the same files gives."""
    from srm_dicom.keystore.client import KeystoreClient
    from srm_dicom.listen import PushListener
    from srm_dicom.register import Registrar

    files = write_files(tmp_path, "planned", slices=6)
    sizes = {}
    for mode in ("push", "files"):
        port = free_port()
        config = load_config(write_site_config(tmp_path / mode, embedded_pacs, key_servers, store_to_pacs=False,
                                               listen_port=port))
        catalog = open_catalog(config)
        reads = count_series_reads(monkeypatch, catalog)
        if mode == "push":
            with PushListener(config, catalog) as listener:
                result = push(files, port)
                assert result.returncode == 0 and "0xc000" not in result.stderr.lower(), result.stderr
            assert listener.summary.line().startswith("6 registered, 0 updated"), listener.summary.line()
        else:
            registrar = Registrar(config, catalog, None, KeystoreClient.from_config(config))
            assert len(list(registrar.register_many(files, store_in_pacs=False))) == 6
        assert len(reads) == 1, reads  # once for the series, not once per image
        monkeypatch.undo()
        namespace = catalog.namespace
        directory = namespace.list_dir(namespace.list_dir("/grid/demo/mdm").directories[0]).directories[0]
        sizes[mode] = {e.sop_uid: e.size for e in namespace.list_dir(directory).entries if e.kind == "volume"}
        catalog.close()
    assert sizes["push"] == sizes["files"] and None not in sizes["push"].values()


def test_a_bug_while_registering_a_push_is_logged_with_its_class_and_code_path_but_not_its_message(
    embedded_pacs, tmp_path, key_servers, monkeypatch, caplog
):
    """Issue 12: pynetdicom's logger is quiet, so a bug in the push handler left nothing in the
    log, only 0xC211 at the modality. It is logged now, without the message, which may quote a
    value of the pushed data set."""
    from srm_dicom.listen import PushListener
    from srm_dicom.register import Registrar

    def broken(self, sources, store_in_pacs):
        raise KeyError("DOE^JANE")  # a bug whose message quotes patient data
        yield

    port = free_port()
    config = load_config(write_site_config(tmp_path / "site", embedded_pacs, key_servers, store_to_pacs=False,
                                           listen_port=port))
    catalog = open_catalog(config)
    monkeypatch.setattr(Registrar, "register_many", broken)
    with caplog.at_level("INFO"), PushListener(config, catalog):
        result = push(write_files(tmp_path, "bug", slices=1), port, "-v")
    catalog.close()
    assert "Received Store Response (Error: CannotUnderstand)" in result.stderr, result.stderr  # 0xC211
    lines = [r.getMessage() for r in caplog.records if "bug" in r.getMessage()]
    assert len(lines) == 1, lines
    path = r"KeyError at test_listen\.py:\d+ broken < srm_dicom/listen\.py:\d+ _register$"
    assert re.search(path, lines[0]), lines[0]
    assert all("DOE^JANE" not in r.getMessage() for r in caplog.records)
