"""Faults of a running storage element, caused for real: the PACS down then back, a cache
full of pinned files, ``mdm serve`` SIGKILLed in the middle of a Tape REST stage request.
Whatever happens, every byte served must be the catalog's (size and adler32)."""

from __future__ import annotations

import http.client
import json
import shutil
import signal
import ssl
import subprocess
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import clients
import peers
from clients import Credential
from sites import write_site_config
from srm_dicom.cache import TALLY
from srm_dicom.catalog import Catalog, Entry, open_catalog
from srm_dicom.config import EmbeddedPacsConfig, load_config
from srm_dicom.pacs.server import EmbeddedPacs
from srm_dicom.synthetic import make_series
from storage import register, start_storage_element

STAGE = "/api/v1/tape/stage"


class Https:
    """One keep-alive HTTPS connection of a demo user to the storage element."""

    def __init__(self, pki: Path, port: int, user: str = "bob") -> None:
        context = ssl.create_default_context(cafile=str(pki / "ca.pem"))
        context.load_cert_chain(str(pki / "users" / user / "cert.pem"), str(pki / "users" / user / "key.pem"))
        self._connection = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=30)

    def request(self, method: str, path: str, body: object = None) -> tuple[int, http.client.HTTPResponse, bytes]:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if data else {}
        self._connection.request(method, path, body=data, headers=headers)
        response = self._connection.getresponse()
        return response.status, response, response.read()

    def json(self, method: str, path: str, body: object = None, expect: int = 200) -> dict:
        status, _, data = self.request(method, path, body)
        assert status == expect, data
        return json.loads(data)

    def close(self) -> None:
        self._connection.close()


def assert_true_to_catalog(entry: Entry, data: bytes) -> None:
    assert (len(data), f"{zlib.adler32(data):08x}") == (entry.size, entry.adler32), entry.lfn


def slice_entries(catalog: Catalog) -> list[Entry]:
    """The registered slices (one series per site here)."""
    (study,) = catalog.namespace.list_dir("/grid/demo/mdm").directories
    (series,) = catalog.namespace.list_dir(study).directories
    return [e for e in catalog.namespace.list_dir(series).entries if e.kind == "slice"]


def wait_completed(client: Https, request_id: str, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.json("GET", f"{STAGE}/{request_id}")
        if "completedAt" in status:
            return status
        time.sleep(0.05)
    raise AssertionError(f"stage request {request_id} not completed after {timeout} s")


def test_pacs_down_is_a_clean_503_naming_the_pacs_then_staging_recovers(embedded_pacs, key_servers, tmp_path):
    config_path = write_site_config(tmp_path / "site", embedded_pacs, key_servers)
    register(config_path, make_series(slices=2, size=16, seed="pacs down"))
    se = start_storage_element(config_path)
    try:
        entry = slice_entries(se.catalog)[0]
        embedded_pacs.stop()
        bob = Credential.of_user(key_servers.pki, "bob")
        down = clients.curl(se.url + entry.lfn, bob, "-D", "-")
        head, _, body = down.stdout.partition("\n\n")  # text mode: CRLF read as LF
        headers = head.lower()
        assert headers.startswith("http/1.1 503") and "\nretry-after: 1\n" in headers, head
        assert "content-type: application/problem+json" in headers
        problem = json.loads(body)
        assert problem["status"] == 503 and problem["title"] == "Service Unavailable"
        assert f"PACS {embedded_pacs.aet}@127.0.0.1:{embedded_pacs.port}: cannot connect" in problem["detail"]

        # The same PACS back on its port, with its storage: the next GET stages and serves.
        back = EmbeddedPacs(EmbeddedPacsConfig(aet=embedded_pacs.aet, host="127.0.0.1", port=embedded_pacs.port,
                                            calling_aets=[embedded_pacs.client_aet]),
                            embedded_pacs.storage)
        back.start()
        try:
            out = tmp_path / "slice.enc"
            recovered = clients.curl(se.url + entry.lfn, bob, "-f", "-o", str(out))
            assert recovered.returncode == 0, recovered.stderr
            assert_true_to_catalog(entry, out.read_bytes())
        finally:
            back.stop()
    finally:
        se.stop()


def test_a_cache_full_of_pinned_files_refuses_clearly_and_corrupts_nothing(embedded_pacs, key_servers, tmp_path):
    series = make_series(slices=3, size=16, seed="pinned full")
    probe = write_site_config(tmp_path / "probe", embedded_pacs, key_servers)
    register(probe, series[:1])
    catalog = open_catalog(load_config(probe))
    size = slice_entries(catalog)[0].size
    catalog.close()
    config_path = write_site_config(tmp_path / "site", embedded_pacs, key_servers, quota_bytes=size * 5 // 2)
    register(config_path, series)
    se = start_storage_element(config_path)
    client = Https(key_servers.pki, int(se.url.rsplit(":", 1)[1]))
    try:
        pinned, other = (entries := slice_entries(se.catalog))[:2], entries[2]
        files = [{"path": e.lfn, "diskLifetime": 86400} for e in pinned]
        request_id = client.json("POST", STAGE, {"files": files}, expect=201)["requestId"]
        assert all(f["state"] == "COMPLETED" for f in wait_completed(client, request_id)["files"])

        status, response, body = client.request("GET", other.lfn)
        assert status == 507 and response.getheader("Content-Type") == "application/problem+json", body
        detail = json.loads(body)["detail"]
        assert "cache full" in detail and "pinned" in detail and "\n" not in detail

        cache = se.config.path(se.config.cache.dir)
        found = sorted(p.name for p in cache.iterdir() if p.name != TALLY)
        assert found == sorted(f"{e.guid}.{e.content_version}" for e in pinned)
        for entry in pinned:
            assert_true_to_catalog(entry, (cache / f"{entry.guid}.{entry.content_version}").read_bytes())
            status, _, data = client.request("GET", entry.lfn)
            assert status == 200
            assert_true_to_catalog(entry, data)

        client.json("POST", f"/api/v1/tape/release/{request_id}", {"paths": [pinned[0].lfn]})
        status, _, data = client.request("GET", other.lfn)
        assert status == 200
        assert_true_to_catalog(other, data)
    finally:
        client.close()
        se.stop()


@contextmanager
def serving(config_path: Path, log: Path) -> Iterator[subprocess.Popen[str]]:
    """``mdm serve`` as a process, once it says it is serving."""
    with log.open("a") as errors:
        process = subprocess.Popen([shutil.which("mdm") or "mdm", "--config", str(config_path), "serve"],
                                   stdout=subprocess.PIPE, stderr=errors, text=True)
    try:
        line = process.stdout.readline()  # type: ignore[union-attr]
        assert line.startswith("serving https://"), log.read_text()
        yield process
    finally:
        if process.poll() is None:
            process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_a_server_killed_while_staging_serves_no_partial_file_and_the_request_resumes(
        embedded_pacs, key_servers, tmp_path):
    port = peers.free_port()
    config_path = write_site_config(tmp_path / "site", embedded_pacs, key_servers)
    text = config_path.read_text().replace("[server]\nport = 0", f"[server]\nport = {port}")
    config_path.write_text(text.replace("workers = 2", "workers = 1"))
    register(config_path, make_series(slices=16, size=64, seed="killed"))
    config = load_config(config_path)
    catalog = open_catalog(config)
    entries = slice_entries(catalog)
    log = tmp_path / "serve.log"
    pki = key_servers.pki

    cache = config.path(config.cache.dir)

    def published() -> list[Path]:
        return [p for p in cache.iterdir() if not p.name.startswith(".")] if cache.is_dir() else []

    with serving(config_path, log) as server:
        client = Https(pki, port)
        request_id = client.json("POST", STAGE, {"files": [{"path": e.lfn} for e in entries]}, expect=201)["requestId"]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not published():
            time.sleep(0.002)
        server.send_signal(signal.SIGKILL)
        client.close()
    # Killed in the middle of the series' one staging batch: files published, the batch's outcome
    # not yet in the catalog. The batch's slices are published within milliseconds of each other
    # once the PACS has sent them all, so on a loaded machine all may be out first.
    states = [f.state for f in catalog.stages.stage_request(request_id).files]
    assert set(states) == {"STARTED"} and 0 < len(published()) <= len(entries), (states, len(published()))

    in_flight = [p for p in cache.iterdir() if p.name.startswith(".") and p.name != TALLY]  # what the kill interrupted
    with serving(config_path, log):
        assert not [p.name for p in in_flight if p.exists()], "leftovers of interrupted staging remain"
        client = Https(pki, port)
        try:
            for entry in entries:  # no partial file: every GET, staged or not yet, is the whole file
                status, _, data = client.request("GET", entry.lfn)
                assert status == 200
                assert_true_to_catalog(entry, data)
            files = wait_completed(client, request_id)["files"]
            assert all(f["state"] == "COMPLETED" and f["onDisk"] for f in files), files
        finally:
            client.close()
    catalog.close()


def test_the_first_volume_get_after_the_key_servers_closed_idle_connections_is_served(
        embedded_pacs, pki, tmp_path):
    """Issue 12, finding 7: a first 3D GET after an idle time answered 503, its key's shares
    sent over kept-alive connections the key servers had closed meanwhile."""
    from srm_dicom.keystore.local import LocalKeyServers

    with LocalKeyServers(pki, tmp_path / "keystores", idle_timeout=0.3) as impatient:
        config_path = write_site_config(tmp_path / "site", embedded_pacs, impatient)
        register(config_path, make_series(slices=3, size=16, seed="idle volume"))
        se = start_storage_element(config_path)
        try:
            bob = Credential.of_user(pki, "bob")
            first = slice_entries(se.catalog)[0]
            warm = clients.curl(se.url + first.lfn, bob, "-f", "-o", str(tmp_path / "slice.enc"))
            assert warm.returncode == 0, warm.stderr  # the stager now keeps connections to the key servers
            time.sleep(1.5)
            volume = se.catalog.namespace.lookup(first.lfn.rsplit("/", 1)[0] + "/3D")
            assert volume is not None
            out = tmp_path / "volume.enc"
            got = clients.curl(se.url + volume.lfn, bob, "-f", "-o", str(out))
            assert got.returncode == 0, got.stderr
            assert_true_to_catalog(se.catalog.namespace.lookup(volume.lfn), out.read_bytes())
            time.sleep(1.5)
            again = clients.curl(se.url + first.lfn, bob, "-f", "-o", str(tmp_path / "again.enc"))
            assert again.returncode == 0, again.stderr
        finally:
            se.stop()
