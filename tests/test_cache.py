"""The disk cache on a real directory: quota, LRU eviction, pins, versions, crash leftovers, the
verified signature and the scrub."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
import zlib

import pytest

from srm_dicom.cache import CacheFull, DiskCache, intact, published, scrub

A, B, C, D = (str(uuid.uuid4()) for _ in range(4))


def test_published_file_is_found_by_guid_and_version_only(tmp_path):
    cache = DiskCache(tmp_path, 1000)
    cache.open()
    path = cache.publish(A, 1, b"x" * 10, set())
    assert path.read_bytes() == b"x" * 10 and cache.path(A, 1) == path
    assert cache.path(A, 2) is None and cache.path(B, 1) is None
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary left behind


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
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f"{A}.1", f"{B}.1"])
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
