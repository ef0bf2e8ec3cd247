"""``mdm cache verify`` on the cache of a running storage element (real embedded PACS, key
servers, curl). A file corrupted with its mtime kept, as bit rot leaves it, keeps the stat
signature a GET trusts (srm_dicom/cache.py): the scrub is what finds it. The fault matrix
(tests/fault) covers corruption that changes the signature, which every GET finds."""

from __future__ import annotations

import os
import uuid
import zlib
from pathlib import Path

import clients
from clients import Credential
from sites import mdm, write_site_config
from srm_dicom.catalog import Entry
from srm_dicom.synthetic import make_series
from storage import register, start_storage_element


def _get(url: str, pki: Path, out: Path) -> bytes:
    result = clients.curl(url, Credential.of_user(pki, "bob"), "-s", "-o", str(out), "-w", "%{http_code}")
    assert result.stdout == "200", (result.stdout, out.read_bytes()[:300] if out.exists() else b"")
    return out.read_bytes()


def _true(entry: Entry, data: bytes) -> bool:
    return (len(data), f"{zlib.adler32(data):08x}") == (entry.size, entry.adler32)


def test_verify_finds_bit_rot_removes_the_file_and_the_next_get_stages_the_true_bytes(embedded_pacs, key_servers,
                                                                                       tmp_path):
    config_path = write_site_config(tmp_path / "site", embedded_pacs, key_servers)
    register(config_path, make_series(slices=3, size=16, seed="bit rot"))
    se = start_storage_element(config_path)
    try:
        series = se.catalog.namespace.list_dir(se.catalog.namespace.list_dir(
            se.catalog.namespace.list_dir("/grid/demo/mdm").directories[0]).directories[0])
        assert series is not None
        slices = [e for e in series.entries if e.kind == "slice"]
        for entry in slices:
            assert _true(entry, _get(se.url + entry.lfn, key_servers.pki, tmp_path / "first"))
        cache = se.config.path(se.config.cache.dir)
        rotten = cache / f"{slices[0].guid}.{slices[0].content_version}"
        kept = rotten.stat()
        data = bytearray(rotten.read_bytes())
        data[len(data) // 2] ^= 0x04
        with rotten.open("r+b") as out:
            out.write(data)
        os.utime(rotten, ns=(kept.st_atime_ns, kept.st_mtime_ns))
        orphan = cache / f"{uuid.uuid4()}.1"  # of an entry deleted meanwhile
        orphan.write_bytes(b"never served")

        done = mdm("cache", "verify", config=config_path)
        assert done.returncode == 1, done.stdout + done.stderr
        *problems, summary = done.stdout.splitlines()
        assert sorted(problems) == sorted([
            f"{slices[0].lfn} ({rotten.name}): has adler32 {zlib.adler32(data):08x}, the catalog "
            f"{slices[0].adler32}: removed",
            f"{orphan.name}: no longer served (not the catalog's current version): removed",
        ])
        assert summary == "3 cached files verified: 2 intact, 1 corrupt or unreadable; 1 no longer served"
        assert not rotten.exists() and not orphan.exists() and done.stderr == ""

        assert _true(slices[0], _get(se.url + slices[0].lfn, key_servers.pki, tmp_path / "again"))
        assert _true(slices[0], rotten.read_bytes())  # staged again from the PACS
        again = mdm("cache", "verify", config=config_path)
        assert again.returncode == 0, again.stdout + again.stderr
        assert again.stdout == "3 cached files verified: 3 intact, 0 corrupt or unreadable; 0 no longer served\n"
    finally:
        se.stop()


def test_verify_without_a_cache_directory_is_one_line_and_a_config_exit_code(embedded_pacs, key_servers, tmp_path):
    config_path = write_site_config(tmp_path / "site", embedded_pacs, key_servers)
    done = mdm("cache", "verify", config=config_path)
    assert done.returncode == 2 and done.stdout == "", done.stdout + done.stderr
    assert done.stderr.startswith("mdm cache: no cache directory at ") and done.stderr.count("\n") == 1
