"""The disk cache on a real directory: quota, LRU eviction, pins, versions, crash leftovers,
one quota for every front end on the directory (README, "Several front ends"), the verified
signature and the scrub."""

from __future__ import annotations

import fcntl
import os
import re
import socket
import subprocess
import sys
import time
import uuid
import zlib
from dataclasses import replace

import pytest
from test_stager import make_site, wait_final

from srm_dicom.cache import TALLY, CacheFull, DiskCache, intact, published, scrub
from srm_dicom.catalog import COMPLETED, StageFile, StageRequest, open_catalog
from srm_dicom.config import parse_config
from srm_dicom.stager import StageFailed, Stager

A, B, C, D = (str(uuid.uuid4()) for _ in range(4))


def files(directory):
    """The cache's files, published or being written (not its tally)."""
    return sorted(p.name for p in directory.iterdir() if p.name != TALLY)


def test_published_file_is_found_by_guid_and_version_only(tmp_path):
    cache = DiskCache(tmp_path, 1000)
    cache.open()
    path = cache.publish(A, 1, b"x" * 10, set())
    assert path.read_bytes() == b"x" * 10 and cache.path(A, 1) == path
    assert cache.path(A, 2) is None and cache.path(B, 1) is None
    assert files(tmp_path) == [path.name]  # no temporary left behind


def test_a_new_version_retires_the_old_bytes(tmp_path):
    cache = DiskCache(tmp_path, 1000)
    cache.open()
    old = cache.publish(A, 1, b"old", set())
    new = cache.publish(A, 2, b"new", set())
    assert not old.exists() and cache.path(A, 1) is None
    assert cache.path(A, 2) == new and cache.used == 3


def test_least_recently_used_unpinned_files_make_room(tmp_path):
    cache = DiskCache(tmp_path, 300)
    cache.open()
    for guid in (A, B, C):
        cache.publish(guid, 1, b"." * 100, set())
        time.sleep(0.01)
    assert cache.path(A, 1) is not None  # A is now the most recently used
    cache.publish(D, 1, b"." * 100, set())
    assert cache.path(B, 1, touch=False) is None  # B was the least recently used
    assert {g for g in (A, C, D) if cache.path(g, 1, touch=False)} == {A, C, D}
    assert cache.used == 300


def test_pinned_files_are_never_evicted_and_a_full_cache_says_so(tmp_path):
    cache = DiskCache(tmp_path, 200)
    cache.open()
    cache.publish(A, 1, b"." * 100, set())
    cache.publish(B, 1, b"." * 100, set())
    with pytest.raises(CacheFull, match="cache full: 100 bytes needed, 200 of the 200-byte quota held by pinned"):
        cache.publish(C, 1, b"." * 100, {A, B})
    assert cache.path(A, 1) and cache.path(B, 1) and cache.path(C, 1) is None
    assert files(tmp_path) == sorted([f"{A}.1", f"{B}.1"])
    cache.publish(C, 1, b"." * 100, {B})  # A is no longer pinned: it goes
    assert cache.path(A, 1) is None and cache.used == 200
    with pytest.raises(CacheFull, match="larger than the whole quota"):
        cache.publish(D, 1, b"." * 201, set())


def test_reopening_removes_leftovers_and_keeps_the_recency_order(tmp_path):
    cache = DiskCache(tmp_path, 200)
    cache.open()
    cache.publish(A, 1, b"." * 100, set())
    cache.publish(B, 1, b"." * 100, set())
    old = time.time() - 100
    os.utime(tmp_path / f"{B}.1", (old, old))  # B used long ago
    leftover = tmp_path / f".{C}.1.0123abcd.part"
    leftover.write_bytes(b"half a file")
    reopened = DiskCache(tmp_path, 200)
    assert reopened.open() == 1
    assert not leftover.exists() and reopened.path(C, 1) is None
    assert reopened.used == 200
    reopened.publish(C, 1, b"." * 100, set())
    assert reopened.path(B, 1) is None and reopened.path(A, 1) is not None


def test_front_ends_sharing_a_directory_find_each_others_files_and_keep_each_others_temporaries(tmp_path):
    first, second = DiskCache(tmp_path, 1000), DiskCache(tmp_path, 1000)
    first.open()
    second.open()
    path = first.publish(A, 1, b"staged by the first", set())
    assert second.path(A, 1) == path and second.used == len(b"staged by the first")
    host = socket.gethostname().split(".")[0].replace("-", "_")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    writing = tmp_path / f".{B}.1.{host}-{os.getpid()}.0a1b.part"  # a live writer's
    left = tmp_path / f".{C}.1.{host}-{dead.pid}.0a1b.part"  # a writer that is gone
    other_host = tmp_path / f".{D}.1.elsewhere-1.0a1b.part"  # another host's, fresh
    for partial in (writing, left, other_host):
        partial.write_bytes(b"half")
    assert DiskCache(tmp_path, 1000).open() == 1
    assert writing.exists() and other_host.exists() and not left.exists()
    os.utime(other_host, (time.time() - 7200, time.time() - 7200))
    assert DiskCache(tmp_path, 1000).open() == 1 and not other_host.exists()


def on_disk(directory):
    """Bytes in the directory's published files and in the room its writers reserved, counted
    under the front ends' lock, as one more front end would see them."""
    fd = os.open(directory / TALLY, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        total = 0
        for path in directory.iterdir():
            reserved = re.search(r"\.[0-9a-f]+\.([0-9]+)\.part$", path.name)
            try:
                total += 0 if path.name == TALLY else max(path.stat().st_size, int(reserved[1]) if reserved else 0)
            except FileNotFoundError:  # renamed meanwhile by a writer that takes no lock
                continue
        return total
    finally:
        os.close(fd)


def test_front_ends_on_one_directory_keep_one_quota_and_evict_the_sites_least_recently_used(tmp_path):
    first, second = DiskCache(tmp_path, 300), DiskCache(tmp_path, 300)
    first.open()
    second.open()
    for guid in (A, B):
        first.publish(guid, 1, b"." * 100, set())
        time.sleep(0.01)
    second.publish(C, 1, b"." * 100, set())
    assert first.used == second.used == on_disk(tmp_path) == 300
    second.publish(D, 1, b"." * 100, set())  # room from the site's least recently used: the other's A
    assert files(tmp_path) == sorted(f"{g}.1" for g in (B, C, D)) and on_disk(tmp_path) == 300
    assert first.path(A, 1) is None and first.used == 300


def test_a_reservation_holds_its_room_for_every_front_end(tmp_path):
    first, second = DiskCache(tmp_path, 250), DiskCache(tmp_path, 250)
    first.open()
    second.open()
    partial = first.reserve(A, 1, 150, set())  # being written by the first front end
    with pytest.raises(CacheFull, match="cache full: 150 bytes needed, 150 of the 250-byte quota"):
        second.publish(B, 1, b"." * 150, set())
    assert files(tmp_path) == [partial.name]  # nothing half published, the writer's file kept
    first.cancel(partial)
    second.publish(B, 1, b"." * 150, set())
    assert files(tmp_path) == [f"{B}.1"] and first.used == 150


def test_no_front_end_evicts_what_a_stage_request_pins_or_a_running_job_publishes(tmp_path, catalog_section):
    config = parse_config({"catalog": catalog_section}, tmp_path)
    catalogs = [open_catalog(config), open_catalog(config)]  # two front ends' connections
    now = int(time.time())
    first, second = (DiskCache(tmp_path / "cache", 300, lambda c=c: c.stages.protected_guids(int(time.time())))
                     for c in catalogs)
    try:
        first.open()
        second.open()
        catalogs[0].stages.add_stage_request(StageRequest("r1", "bob", now, 600, (
            StageFile("/grid/demo/a", A, COMPLETED, None, now, now, now + 600),)))
        catalogs[0].stages.enqueue_jobs({B: "series"})
        assert [j.guid for j in catalogs[0].stages.claim_jobs("first", 30, 10)] == [B]
        for age, guid in ((300, A), (200, B), (100, C)):  # A pinned, B published by its running batch
            first.publish(guid, 1, b"." * 100, set())
            os.utime(tmp_path / "cache" / f"{guid}.1", (now - age, now - age))
        second.publish(D, 1, b"." * 100, set())
        assert files(tmp_path / "cache") == sorted(f"{g}.1" for g in (A, B, D))
        catalogs[0].stages.finish_jobs("first", {B: (COMPLETED, None)}, now)  # done, no request pins it
        second.publish(C, 1, b"." * 100, set())
        assert files(tmp_path / "cache") == sorted(f"{g}.1" for g in (A, C, D))
        catalogs[1].stages.add_stage_request(StageRequest("r2", "alice", now, 600, tuple(
            StageFile(f"/grid/demo/{g}", g, COMPLETED, None, now, now, now + 600) for g in (C, D))))
        with pytest.raises(CacheFull, match="cache full: 100 bytes needed, 300 of the 300-byte quota held by pinned"):
            first.publish(B, 1, b"." * 100, set())
        assert files(tmp_path / "cache") == sorted(f"{g}.1" for g in (A, C, D)) and on_disk(tmp_path / "cache") == 300
    finally:
        for catalog in catalogs:
            catalog.close()


def test_the_tally_heals_from_the_directory_after_a_dead_writer_or_a_hand(tmp_path):
    cache = DiskCache(tmp_path, 300)
    cache.open()
    dying = "import os, sys; from pathlib import Path; from srm_dicom.cache import DiskCache\n" \
            "c = DiskCache(Path(sys.argv[1]), 300); c.open(); c.reserve(sys.argv[2], 1, 250, set()); os._exit(0)"
    subprocess.run([sys.executable, "-c", dying, str(tmp_path), A], check=True)
    assert cache.used == 250  # its room is held until a count finds its writer gone
    cache.publish(B, 1, b"." * 100, set())
    assert files(tmp_path) == [f"{B}.1"] and cache.used == 100
    (tmp_path / TALLY).write_text("not a number")
    assert cache.used == 100
    (tmp_path / TALLY).unlink()
    cache.publish(C, 1, b"." * 150, set())
    assert cache.used == on_disk(tmp_path) == 250
    (tmp_path / f"{B}.1").unlink()  # by hand: the tally counts it until the next count
    cache.publish(D, 1, b"." * 150, set())
    assert files(tmp_path) == sorted([f"{C}.1", f"{D}.1"]) and cache.used == 300


WRITER = """
import random, sys, uuid
from pathlib import Path
from srm_dicom.cache import DiskCache
cache = DiskCache(Path(sys.argv[1]), int(sys.argv[2]))
cache.open()
sizes = random.Random(sys.argv[3])
for _ in range(int(sys.argv[4])):
    cache.publish(str(uuid.uuid4()), 1, b"." * sizes.randrange(10, 200), set())
"""


def test_front_end_processes_writing_at_once_never_exceed_the_quota_together(tmp_path):
    quota = 1000
    DiskCache(tmp_path, quota).open()
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), str(quota), str(seed), "150"])
               for seed in range(4)]
    seen = []
    while any(w.poll() is None for w in writers):
        seen.append(on_disk(tmp_path))
        time.sleep(0.002)
    assert [w.returncode for w in writers] == [0] * 4
    assert len(seen) > 10 and max(seen) <= quota, max(seen)
    assert int((tmp_path / TALLY).read_text()) == on_disk(tmp_path) <= quota
    assert not [name for name in files(tmp_path) if name.endswith(".part")]


def done(catalog, entry, timeout=20):
    """Wait for the end of the job of ``entry`` (a GET is answered once its file is published,
    before its batch ends)."""
    deadline = time.monotonic() + timeout
    while catalog.stages.jobs([entry.guid])[entry.guid].state == "STARTED":
        assert time.monotonic() < deadline, f"the job of {entry.lfn} did not end"
        time.sleep(0.02)


def test_two_stagers_on_one_catalog_and_cache_keep_one_quota_and_each_others_pins(embedded_pacs, tmp_path,
                                                                                  key_servers, catalog_section):
    """Two front ends as two ``mdm serve`` run them (their own catalog connections, one cache
    directory): what one pins the other never evicts, and together they stay within the quota."""
    site = make_site(tmp_path / "site", embedded_pacs, key_servers, slices=5, seed="quota", catalog=catalog_section,
                     readahead="none")  # a GET stages its file alone
    largest = max(e.size for e in site.slices)
    quota = 3 * largest + largest // 2  # room for three slices
    site.config = replace(site.config, cache=replace(site.config.cache, quota_bytes=quota))
    cache_dir = site.config.path(site.config.cache.dir)
    other_catalog = open_catalog(site.config)
    first, second = site.stager(), Stager(site.config, other_catalog, site.keystore)
    for stager in (first, second):
        stager.start()
    try:
        pins = first.submit(site.slices[:2], pin_lifetime=600, requester="bob")
        wait_final(first, pins)
        for entry in site.slices[2:]:  # the other front end stages the rest, one after the other
            assert second.fetch(entry, 20).is_file()
            assert on_disk(cache_dir) <= quota
            done(other_catalog, entry)  # its batch ended: no longer protected as being published
        assert [second.locality(e) for e in site.slices] == ["DISK_AND_TAPE"] * 2 + ["TAPE"] * 2 + ["DISK_AND_TAPE"]
        second.submit([site.slices[4]], pin_lifetime=600, requester="alice")  # on disk: pinned at once
        with pytest.raises(StageFailed, match="cache full: .* held by pinned"):
            first.fetch(site.slices[2], 20)
        assert files(cache_dir) == sorted(f"{e.guid}.1" for e in (*site.slices[:2], site.slices[4]))
        first.release(pins, [site.slices[0].lfn])
        assert first.fetch(site.slices[2], 20).is_file() and second.locality(site.slices[0]) == "TAPE"
    finally:
        for stager in (first, second):
            stager.stop()
        other_catalog.close()
        site.catalog.close()


# -- verified once, trusted while the signature holds (issue 9; README "What reading does") ----

DATA = bytes(range(256)) * 64


def _adler(data: bytes) -> str:
    return f"{zlib.adler32(data):08x}"


def _intact(path, data: bytes = DATA) -> bool:
    with path.open("rb") as source:
        return intact(source, len(data), _adler(data))


def _rot(path) -> None:
    """A bit flipped in place, the mtime kept: what bit rot (or a careful hand) leaves."""
    before = path.stat()
    with path.open("r+b") as out:
        out.seek(100)
        out.write(bytes([DATA[100] ^ 0x10]))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


def test_a_published_file_is_trusted_by_its_signature_by_every_front_end(tmp_path):
    path = DiskCache(tmp_path, 1 << 20).publish(A, 1, DATA, set())
    other = DiskCache(tmp_path, 1 << 20)  # another front end on the same directory
    other.open()
    assert other.path(A, 1) == path  # its use (an atime touch) keeps the signature
    _rot(path)
    assert _intact(path)  # not read again: the signature is the one recorded at publishing


def test_an_overwrite_a_truncation_or_a_replacement_is_read_again_and_refused(tmp_path):
    cache = DiskCache(tmp_path, 1 << 20)
    cache.open()
    overwritten = cache.publish(A, 1, DATA, set())
    overwritten.write_bytes(DATA[:100] + b"\0" + DATA[101:])  # same size: only the adler32 tells
    truncated = cache.publish(B, 1, DATA, set())
    with truncated.open("r+b") as out:
        out.truncate(len(DATA) - 1)
    replaced = cache.publish(C, 1, DATA, set())
    forged = tmp_path / "forged"
    forged.write_bytes(DATA[:100] + b"\0" + DATA[101:])
    os.utime(forged, ns=(replaced.stat().st_atime_ns, replaced.stat().st_mtime_ns))  # the same mtime, even
    os.replace(forged, replaced)
    assert not _intact(overwritten) and not _intact(truncated) and not _intact(replaced)


def test_a_file_whose_signature_changed_but_bytes_did_not_is_trusted_again_once_read(tmp_path):
    path = DiskCache(tmp_path, 1 << 20).publish(A, 1, DATA, set())
    os.utime(path)  # touched by some tool: read whole, found right, its new signature recorded
    assert _intact(path)
    _rot(path)
    assert _intact(path)


def test_the_scrub_finds_bit_rot_the_signature_cannot_and_removes_the_file(tmp_path):
    cache = DiskCache(tmp_path, 1 << 20)
    cache.open()
    rotten, sound = cache.publish(A, 1, DATA, set()), cache.publish(B, 1, DATA, set())
    _rot(rotten)
    used_before = sound.stat().st_atime_ns
    assert scrub(sound, len(DATA), _adler(DATA)) is None and sound.exists()
    assert sound.stat().st_atime_ns == used_before  # scrubbing is no use: the eviction order stays
    found = _adler(rotten.read_bytes())
    assert scrub(rotten, len(DATA), _adler(DATA)) == f"has adler32 {found}, the catalog {_adler(DATA)}: removed"
    assert not rotten.exists() and cache.path(A, 1) is None  # staged again at its next request
    short = cache.publish(C, 1, DATA[:-1], set())
    assert scrub(short, len(DATA), _adler(DATA)) == f"holds {len(DATA) - 1} bytes, the catalog {len(DATA)}: removed"
    assert published(tmp_path) == [(B, 1, sound)]


def test_without_user_extended_attributes_every_hit_reads_the_whole_file(tmp_path, caplog):
    """ramfs keeps no user xattrs (an old NFS neither): the check of every hit, as before issue 9."""
    mount = tmp_path / "ramfs"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "ramfs", "ramfs", str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.fail(f"cannot mount a ramfs here: {done.stderr.strip()}")
    try:
        path = DiskCache(mount, 1 << 20).publish(A, 1, DATA, set())
        assert _intact(path)
        _rot(path)
        assert not _intact(path)
        warnings = [r.getMessage() for r in caplog.records if "cannot record" in r.getMessage()]
        assert len(warnings) == 1 and "every cache hit reads the whole file" in warnings[0]
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)
