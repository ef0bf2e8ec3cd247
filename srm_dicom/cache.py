"""The disk cache of staged files: what grid clients download, anonymized and encrypted.

A file is named after its entry's GUID and content version, so a new version can never
be served with the old bytes; publishing a version retires the older ones. Files are
written under a temporary name, fsynced and published by an atomic rename, so a crash
leaves only a temporary file, which ``open`` removes and no lookup ever returns.

A cached file is checked against the catalog (size, then adler32) before it is served
(``intact``): a disk that flipped a bit, or a hand that truncated a file, must not reach a
grid client, which could only tell later, if at all (curl does not decrypt).

The quota is kept by evicting the least recently used files that nobody has pinned.
Recency is the file's mtime, touched on every use, so the order survives a restart.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from srm_dicom.errors import MdmError
from srm_dicom.events import CacheEvicted, CacheUsage, emit

log = logging.getLogger(__name__)

_PUBLISHED = re.compile(r"^([0-9a-f-]{36})\.([0-9]+)$")
PARTIAL_SUFFIX = ".part"
_BLOCK = 1 << 20


class CacheError(MdmError):
    """The cache directory cannot take a file (disk full, permissions)."""

    http_status = 503


class CacheFull(CacheError):
    """No room within the quota: everything that could make room is pinned."""


def intact(source: BinaryIO, size: int, adler32: str | None) -> bool:
    """Whether an open cached file still holds the bytes the catalog recorded: its size (one
    fstat), then its adler32 (zlib's, about a millisecond a megabyte). Leaves the file at 0."""
    if os.fstat(source.fileno()).st_size != size:
        return False
    if adler32 is None:
        return True
    value = 1
    source.seek(0)
    while block := source.read(_BLOCK):
        value = zlib.adler32(block, value)
    source.seek(0)
    return f"{value:08x}" == adler32


def discard(path: Path) -> None:
    """Remove a cached file found corrupt; the cache forgets it at its next lookup, so the
    next fetch stages it again from the PACS."""
    log.warning("cache: %s differs from the catalog (size or adler32); removed, to be staged again", path.name)
    path.unlink(missing_ok=True)


@dataclass
class _Cached:
    size: int
    used: float


class DiskCache:
    """A directory of published files with a size quota. Thread-safe."""

    def __init__(self, directory: Path, quota_bytes: int) -> None:
        self.directory = directory
        self.quota = quota_bytes
        self._lock = threading.Lock()
        self._files: dict[tuple[str, int], _Cached] = {}  # published
        self._writing: dict[tuple[str, int], int] = {}  # sizes of files being written

    @staticmethod
    def name(guid: str, version: int) -> str:
        return f"{guid}.{version}"

    def open(self) -> int:
        """Index the published files and remove leftovers of interrupted staging; returns how many."""
        self.directory.mkdir(parents=True, exist_ok=True)
        removed = 0
        files: dict[tuple[str, int], _Cached] = {}
        for path in self.directory.iterdir():
            found = _PUBLISHED.match(path.name)
            if found and path.is_file():
                stat = path.stat()
                files[(found.group(1), int(found.group(2)))] = _Cached(stat.st_size, stat.st_mtime)
            elif path.name.endswith(PARTIAL_SUFFIX):
                path.unlink(missing_ok=True)
                removed += 1
        with self._lock:
            self._files = files
        emit(CacheUsage(self.used, self.quota))
        if removed:
            log.info("cache: removed %d leftovers of interrupted staging", removed)
        return removed

    @property
    def used(self) -> int:
        with self._lock:
            return sum(f.size for f in self._files.values()) + sum(self._writing.values())

    def path(self, guid: str, version: int, touch: bool = True) -> Path | None:
        """The published file of this version, marked recently used; None if not cached."""
        with self._lock:
            cached = self._files.get((guid, version))
            if cached is None:
                return None
            path = self.directory / self.name(guid, version)
            if touch:
                cached.used = time.time()
                try:
                    os.utime(path)
                except FileNotFoundError:
                    del self._files[(guid, version)]
                    return None
            return path

    def publish(self, guid: str, version: int, data: bytes | bytearray, pinned: set[str]) -> Path:
        """Store ``data`` as this version: make room, write, fsync, rename; retire older versions.

        ``pinned`` are the GUIDs whose files must not be evicted to make room.
        """
        key = (guid, version)
        with self._lock:
            self._make_room(len(data), pinned | {guid})
            # Reserved at once so that concurrent publishers do not count the same room.
            self._writing[key] = len(data)
        final = self.directory / self.name(guid, version)
        partial = self.directory / f".{self.name(guid, version)}.{secrets.token_hex(4)}{PARTIAL_SUFFIX}"
        try:
            with open(partial, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.replace(partial, final)
            self._fsync_directory()
        except OSError as exc:
            partial.unlink(missing_ok=True)
            raise CacheError(f"cache: cannot write a staged file in {self.directory} ({exc.strerror})") from None
        finally:
            with self._lock:
                del self._writing[key]
        with self._lock:
            self._files[key] = _Cached(len(data), time.time())
        self.retire(guid, version)
        emit(CacheUsage(self.used, self.quota))
        return final

    def _make_room(self, size: int, keep: set[str]) -> None:
        """Evict unpinned files, least recently used first, until ``size`` more bytes fit."""
        if size > self.quota:
            raise CacheFull(f"cache: a file of {size} bytes is larger than the whole quota ({self.quota} bytes)")
        used = sum(f.size for f in self._files.values()) + sum(self._writing.values())
        if used + size <= self.quota:
            return
        candidates = sorted((f.used, k) for k, f in self._files.items() if k[0] not in keep)
        freeable = sum(self._files[k].size for _, k in candidates)
        if used - freeable + size > self.quota:
            raise CacheFull(
                f"cache full: {size} bytes needed, {used - freeable} of the {self.quota}-byte quota"
                " held by pinned or in-use files; release pins or raise [cache] quota_bytes"
            )
        freed: list[int] = []
        for _, victim in candidates:
            if used + size <= self.quota:
                break
            freed.append(self._files.pop(victim).size)
            used -= freed[-1]
            (self.directory / self.name(*victim)).unlink(missing_ok=True)
        emit(CacheEvicted(len(freed), sum(freed)))

    def retire(self, guid: str, current: int) -> None:
        """Remove the cached versions of ``guid`` older than ``current``: they are never served again."""
        with self._lock:
            old = [k for k in self._files if k[0] == guid and k[1] < current]
            for key in old:
                del self._files[key]
                (self.directory / self.name(*key)).unlink(missing_ok=True)

    def _fsync_directory(self) -> None:
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
