"""The disk cache of staged files: what grid clients download, anonymized and encrypted.

A file is named after its entry's GUID and content version, so a new version can never
be served with the old bytes; publishing a version retires the older ones. Files are
written under a temporary name, fsynced and published by an atomic rename, so a crash
leaves only a temporary file, which ``open`` removes and no lookup ever returns.

A cached file must hold the catalog's bytes when it is served (``intact``): a hand that
overwrote, truncated or replaced a file must not reach a grid client, which could only tell
later, if at all (curl does not decrypt). Reading the whole file again on every hit doubled
the server's CPU per GET (issue 9), so a file is checked fully (size and adler32) once, when
it is published, and again only when its stat signature changed: inode, size and mtime,
recorded when it was last verified in the file's own extended attribute ``user.mdm.verified``.
An overwrite or truncation sets the mtime, a replacement brings another inode (without the
attribute). The record is the file's, so every front end sharing the directory trusts what
another verified, and a file copied or restored from elsewhere is verified again; the catalog
would need a write per verification and would outlive the file. ctime is not in it: our own
recency touch and the attribute itself change it. A filesystem without user extended
attributes (an old NFS) gets a full check on every hit, as before. Bit rot keeps the
signature: ``mdm cache verify`` (``scrub``) reads every file against the catalog.

The quota is kept by evicting the least recently used files that nobody has pinned.
Recency is the file's atime, set on every use (the mtime is the signature's), so the order
survives a restart.

Several front ends may share one cache directory (README, "Several front ends"): a file
another one published is found on disk and adopted, and a temporary file is named after
its writer (host and process), so that a front end starting removes only the leftovers of
writers that are gone, never a file another live front end is writing.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import secrets
import socket
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
# .GUID.VERSION.WRITER.RANDOM.part, WRITER being HOST-PID
_PARTIAL = re.compile(r"^\.[0-9a-f-]{36}\.[0-9]+\.(?P<host>[^.]+)-(?P<pid>[0-9]+)\.[0-9a-f]+\.part$")
# A temporary file is written and renamed within seconds: one of another host this old is a leftover.
FOREIGN_LEFTOVER_AGE = 3600.0


def _host() -> str:
    return socket.gethostname().split(".")[0].replace("-", "_") or "host"


def _writer_gone(name: str, mtime: float) -> bool:
    """Whether the temporary file ``name`` is a leftover: its writer process no longer runs."""
    found = _PARTIAL.match(name)
    if found is None:
        return True  # not named after a writer: an older version's, or no writer's at all
    if found["host"] != _host():
        return time.time() - mtime > FOREIGN_LEFTOVER_AGE
    try:
        os.kill(int(found["pid"]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # a process of another user: alive
        return False
    return False
_BLOCK = 1 << 20


def _touch(path: Path) -> None:
    """Mark a file used: its atime only; its mtime is part of the signature (module docstring).
    os.utime cannot leave one time as it is (UTIME_OMIT), so the mtime is written back as read:
    a write landing between the two would go unseen by the signature, as bit rot does, and
    ``mdm cache verify`` is what finds both."""
    mtime = os.stat(path).st_mtime_ns
    os.utime(path, ns=(time.time_ns(), mtime))


def _stamp(partial: Path) -> int:
    """Record that ``partial``, just checked against the catalog by its writer, holds the
    catalog's bytes; its size. Its mtime is set to now first, from a clock finer than the
    filesystem's timestamps, so that no later write can leave the signature as it was."""
    now = time.time_ns()
    os.utime(partial, ns=(now, now))
    stat = partial.stat()
    _record(partial, stat)
    return stat.st_size


class CacheError(MdmError):
    """The cache directory cannot take a file (disk full, permissions)."""

    http_status = 503


class CacheFull(CacheError):
    """No room within the quota: everything that could make room is pinned."""


# The stat signature of a cached file when it was last verified against the catalog (module docstring).
VERIFIED = "user.mdm.verified"


def _signature(stat: os.stat_result) -> bytes:
    """What overwriting, truncating or replacing a file changes."""
    return f"{stat.st_ino}:{stat.st_size}:{stat.st_mtime_ns}".encode()


def _unchanged(before: os.stat_result, after: os.stat_result) -> bool:
    """Nothing touched the file between two fstats (ctime too: it moves on any change)."""
    return (before.st_ino, before.st_size, before.st_mtime_ns, before.st_ctime_ns) == (
        after.st_ino, after.st_size, after.st_mtime_ns, after.st_ctime_ns)


def _recorded(fd: int) -> bytes | None:
    try:
        return os.getxattr(fd, VERIFIED)
    except OSError:  # never verified here, or a filesystem without user extended attributes
        return None


def _record(target: int | Path, stat: os.stat_result) -> None:
    try:
        os.setxattr(target, VERIFIED, _signature(stat))
    except OSError as exc:
        _cannot_record(exc.strerror or str(exc))


@functools.cache  # once per reason, not once per GET
def _cannot_record(why: str) -> None:
    log.warning("cache: cannot record that a file was verified (%s): every cache hit reads the whole file", why)


def _adler32(source: BinaryIO) -> str:
    value = 1
    source.seek(0)
    while block := source.read(_BLOCK):
        value = zlib.adler32(block, value)
    source.seek(0)
    return f"{value:08x}"


def intact(source: BinaryIO, size: int, adler32: str | None) -> bool:
    """Whether an open cached file still holds the bytes the catalog recorded: its size (one
    fstat), then, unless its stat signature is the one recorded when it was last verified,
    its adler32 (zlib's, about a millisecond a megabyte), and the signature is recorded
    again if it matches. Leaves the file at 0."""
    fd = source.fileno()
    before = os.fstat(fd)
    if before.st_size != size:
        return False
    if adler32 is None or _recorded(fd) == _signature(before):
        return True
    if _adler32(source) != adler32:
        return False
    if _unchanged(before, os.fstat(fd)):  # what was read is what the signature describes
        _record(fd, before)
    return True


def scrub(path: Path, size: int, adler32: str | None) -> str | None:
    """Read a cached file whole against the catalog's size and adler32, whatever its signature
    says (bit rot keeps it): None if it holds them, else what is wrong, and a file that differs
    or cannot be read to the end is removed, to be staged again. Read without touching its
    atime, so a scrub leaves the eviction order as it was."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOATIME)
    except PermissionError:  # O_NOATIME is for the file's owner only
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            return f"cannot be read ({exc.strerror})"
    except FileNotFoundError:  # evicted or retired meanwhile: nothing left to serve
        return None
    except OSError as exc:
        return f"cannot be read ({exc.strerror})"
    with open(fd, "rb") as source:
        before = os.fstat(fd)
        problem = None
        if before.st_size != size:
            problem = f"holds {before.st_size} bytes, the catalog {size}"
        elif adler32 is not None:
            try:
                found = _adler32(source)
            except OSError as exc:
                found, problem = "", f"cannot be read ({exc.strerror})"
            if problem is None and found != adler32:
                problem = f"has adler32 {found}, the catalog {adler32}"
        if problem is None:
            if _recorded(fd) != _signature(before) and _unchanged(before, os.fstat(fd)):
                _record(fd, before)
            return None
    try:
        if os.stat(path).st_ino == before.st_ino:  # not a good file published over it meanwhile
            path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        return f"{problem}; cannot be removed ({exc.strerror})"
    return f"{problem}: removed"


def published(directory: Path) -> list[tuple[str, int, Path]]:
    """The published files of a cache directory: GUID, version, path."""
    found = []
    for path in sorted(directory.iterdir()):
        if (match := _PUBLISHED.match(path.name)) and path.is_file():
            found.append((match.group(1), int(match.group(2)), path))
    return found


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
        self._writing: dict[Path, int] = {}  # room reserved by the temporary files being written

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
                files[(found.group(1), int(found.group(2)))] = _Cached(stat.st_size, stat.st_atime)
            elif path.name.endswith(PARTIAL_SUFFIX) and _writer_gone(path.name, path.stat().st_mtime):
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
            cached = self._files.get((guid, version)) or self._adopt(guid, version)
            if cached is None:
                return None
            path = self.directory / self.name(guid, version)
            if touch:
                cached.used = time.time()
                try:
                    _touch(path)
                except FileNotFoundError:
                    del self._files[(guid, version)]
                    return None
            return path

    def _adopt(self, guid: str, version: int) -> _Cached | None:
        """A file another front end on this directory published: indexed here too (under the lock)."""
        try:
            stat = (self.directory / self.name(guid, version)).stat()
        except OSError:
            return None
        cached = self._files[(guid, version)] = _Cached(stat.st_size, stat.st_atime)
        return cached

    def publish(self, guid: str, version: int, data: bytes | bytearray, pinned: set[str]) -> Path:
        """Store ``data`` as this version: make room, write, fsync, rename; retire older versions.

        ``pinned`` are the GUIDs whose files must not be evicted to make room.
        """
        partial = self.reserve(guid, version, len(data), pinned)
        try:
            with open(partial, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
        except OSError as exc:
            self.cancel(partial)
            raise CacheError(f"cache: cannot write a staged file in {self.directory} ({exc.strerror})") from None
        return self.commit(guid, version, partial)

    def reserve(self, guid: str, version: int, size: int, pinned: set[str]) -> Path:
        """Make room for ``size`` bytes of this version and hold it; the temporary path to
        write them to (a worker process may), then ``commit`` or ``cancel`` it.

        The room is reserved at once so that concurrent writers do not count the same room.
        """
        writer = f"{_host()}-{os.getpid()}.{secrets.token_hex(4)}"  # what open() tells leftovers by
        partial = self.directory / f".{self.name(guid, version)}.{writer}{PARTIAL_SUFFIX}"
        with self._lock:
            self._make_room(size, pinned | {guid})
            self._writing[partial] = size
        return partial

    def commit(self, guid: str, version: int, partial: Path, sync: bool = True) -> Path:
        """Publish the complete, fsynced ``partial`` of a ``reserve``, checked against the catalog
        by its writer (its signature recorded as verified), by an atomic rename and
        retire older versions. ``sync=False`` leaves the directory's fsync to one ``sync()``
        after a batch of commits (a crash before it loses the rename, never a file's bytes)."""
        key = (guid, version)
        final = self.directory / self.name(guid, version)
        try:
            size = _stamp(partial)
            os.replace(partial, final)
            if sync:
                self.sync()
        except OSError as exc:
            self.cancel(partial)
            raise CacheError(f"cache: cannot publish a staged file in {self.directory} ({exc.strerror})") from None
        with self._lock:
            self._writing.pop(partial, None)
            self._files[key] = _Cached(size, time.time())
        self.retire(guid, version)
        emit(CacheUsage(self.used, self.quota))
        return final

    def cancel(self, partial: Path) -> None:
        """Give up a ``reserve``: remove what was written and free its room."""
        partial.unlink(missing_ok=True)
        with self._lock:
            self._writing.pop(partial, None)

    def sync(self) -> None:
        """fsync the directory: the renames of ``commit`` survive a crash."""
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

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
