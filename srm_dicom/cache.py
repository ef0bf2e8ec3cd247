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

Several front ends may share one cache directory (README, "Several front ends"): a file
another one published is found on disk, and a temporary file is named after its writer
(host and process), so that a front end removes only the leftovers of writers that are
gone, never a file another live front end is writing.

The quota is the site's, kept by evicting the least recently used files that nobody needs.
What is used is the directory's own truth, the same for every front end on it whatever the
catalog backend: the published files, plus the room each live writer reserved, written in
its temporary file's name. A small tally file in the directory (``.usage``) holds their sum,
and every reservation, publication, cancel and eviction changes it under an exclusive
``flock`` of that file, which all front ends on the directory take (NFS implements it as a
lock of the whole file, seen by every client): reserving room is a few system calls, never a
catalog round trip or a scan. The tally is a summary only: when it says a file does not fit,
or cannot be read, the directory is counted again (the leftovers of dead writers removed), so
a crash, a file removed by hand or a corrupt file discarded heal at the next count. (Not in
the catalog: the directory is what fills, whoever fills it, and a second truth kept in step
with it would cost a write per staged slice.) Recency is the file's atime, set on every use
(the mtime is the signature's), so the order is the site's and survives a restart.

What must not be evicted is the catalog's, asked (``protected``) once per eviction under the
lock: the files that stage requests pin, and those of the jobs some front end is staging now
(its batch publishes them one by one before marking them done), so no front end evicts what
another has pinned or is publishing. A file being served is open: evicting it cannot take
its bytes from the transfer under way.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import logging
import os
import re
import secrets
import socket
import stat
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from srm_dicom.errors import MdmError
from srm_dicom.events import CacheEvicted, CacheUsage, emit

log = logging.getLogger(__name__)

_PUBLISHED = re.compile(r"^([0-9a-f-]{36})\.([0-9]+)$")
PARTIAL_SUFFIX = ".part"
# .GUID.VERSION.WRITER.RANDOM.RESERVED.part, WRITER being HOST-PID and RESERVED the room in
# bytes its writer holds (older versions of mdm wrote no RESERVED: their file's size counts).
_PARTIAL = re.compile(
    r"^\.[0-9a-f-]{36}\.[0-9]+\.(?P<host>[^.]+)-(?P<pid>[0-9]+)\.[0-9a-f]+(?:\.(?P<reserved>[0-9]+))?\.part$"
)
TALLY = ".usage"  # the site's bytes in use, in decimal; lock file of every change of them
# An eviction reuses the recency order of the directory's last count for this long before
# counting again: a cache kept full evicts for every file it stages, and counting 10^5 files
# took 3 s here at load 33.
LRU_REUSE = 30.0
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
    """No room: within the quota everything that could make room is pinned, or the cache disk
    itself is full. 507 Insufficient Storage (RFC 4918), as dCache's and StoRM's doors answer."""

    http_status = 507


def write_failure(directory: Path, exc: OSError, doing: str = "write") -> CacheError:
    """The error for a failed write into the cache directory: a full disk or quota is "cache
    full" (507, retry later), anything else a cache fault (503)."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return CacheFull(f"cache full: no space left on the cache disk {directory} ({exc.strerror})")
    return CacheError(f"cache: cannot {doing} a staged file in {directory} ({exc.strerror})")


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


def _reserved(name: str, size: int) -> int:
    """The room a live writer's temporary file ``name`` holds: what it reserved, or what it wrote if more."""
    found = _PARTIAL.match(name)
    return max(size, int(found["reserved"])) if found and found["reserved"] else size


@dataclass
class _Count:
    """The directory counted: bytes in use and the published files, least recently used first."""

    used: int
    lru: list[tuple[float, str, int]] = field(default_factory=list)  # (atime, name, size)
    removed: int = 0


class _Tally:
    """The tally file, open and locked: the site's bytes in use, or None when it cannot be trusted."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def read(self) -> int | None:
        try:
            return int(os.pread(self._fd, 32, 0))
        except ValueError:  # new (empty), or not written by mdm
            return None

    def write(self, used: int) -> None:
        data = f"{used}\n".encode()
        os.pwrite(self._fd, data, 0)
        os.ftruncate(self._fd, len(data))


def _nothing() -> set[str]:
    return set()


class DiskCache:
    """A directory of published files with a size quota for every front end on it. Thread-safe.

    ``protected`` gives the GUIDs no eviction may remove (the catalog's pins and running jobs).
    """

    def __init__(self, directory: Path, quota_bytes: int, protected: Callable[[], set[str]] = _nothing) -> None:
        self.directory = directory
        self.quota = quota_bytes
        self._protected = protected
        self._lock = threading.Lock()
        self._writing: dict[Path, int] = {}  # room reserved by this cache's temporary files
        self._lru: list[tuple[float, str, int]] | None = None  # the last count's recency order
        self._lru_at = 0.0

    @staticmethod
    def name(guid: str, version: int) -> str:
        return f"{guid}.{version}"

    def open(self) -> int:
        """Count the directory and remove leftovers of interrupted staging; returns how many."""
        self.directory.mkdir(parents=True, exist_ok=True)
        with self._site() as tally:
            count = self._count(tally)
        emit(CacheUsage(count.used, self.quota))
        if count.removed:
            log.info("cache: removed %d leftovers of interrupted staging", count.removed)
        return count.removed

    @property
    def used(self) -> int:
        """Bytes in use in the directory, by every front end on it."""
        with self._site() as tally:
            used = tally.read()
            return self._count(tally).used if used is None else used

    def path(self, guid: str, version: int, touch: bool = True) -> Path | None:
        """The published file of this version (whichever front end published it), marked
        recently used; None if not cached."""
        path = self.directory / self.name(guid, version)
        try:
            if touch:
                _touch(path)
            elif not stat.S_ISREG(os.stat(path).st_mode):
                return None
        except OSError:
            return None
        return path

    def published(self, files: Iterable[tuple[str, int]]) -> set[str]:
        """The GUIDs of these (GUID, version) files that are published now, looked at under the
        directory's lock: no eviction is midway, and one that starts later asks the catalog for
        what is protected anew, so a pin written before this call keeps what it found."""
        with self._site():
            return {guid for guid, version in files if self.path(guid, version, touch=False) is not None}

    def publish(self, guid: str, version: int, data: bytes | bytearray, pinned: set[str]) -> Path:
        """Store ``data`` as this version: make room, write, fsync, rename; retire older versions.

        ``pinned`` are GUIDs whose files must not be evicted to make room, beside ``protected``'s.
        """
        partial = self.reserve(guid, version, len(data), pinned)
        try:
            with open(partial, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
        except OSError as exc:
            self.cancel(partial)
            raise write_failure(self.directory, exc) from None
        return self.commit(guid, version, partial)

    def reserve(self, guid: str, version: int, size: int, pinned: set[str]) -> Path:
        """Make room for ``size`` bytes of this version and hold it; the temporary path to
        write them to (a worker process may), then ``commit`` or ``cancel`` it.

        The room is reserved at once, in the tally and in the name of the temporary file,
        created now: no other writer, here or in another front end, counts the same room.
        """
        writer = f"{_host()}-{os.getpid()}.{secrets.token_hex(4)}.{size}"  # what counts and open() read
        partial = self.directory / f".{self.name(guid, version)}.{writer}{PARTIAL_SUFFIX}"
        with self._site() as tally:
            used = self._make_room(tally, size, pinned | {guid})
            try:
                os.close(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
            except OSError as exc:
                raise write_failure(self.directory, exc) from None
            tally.write(used + size)
            self._writing[partial] = size
        return partial

    def commit(self, guid: str, version: int, partial: Path, sync: bool = True) -> Path:
        """Publish the complete, fsynced ``partial`` of a ``reserve``, checked against the catalog
        by its writer (its signature recorded as verified), by an atomic rename and
        retire older versions. ``sync=False`` leaves the directory's fsync to one ``sync()``
        after a batch of commits (a crash before it loses the rename, never a file's bytes)."""
        final = self.directory / self.name(guid, version)
        with self._site() as tally:
            try:
                size = _stamp(partial)
                replaced = _size(final) or 0
                os.replace(partial, final)
            except OSError as exc:
                self._give_back(tally, partial)
                raise write_failure(self.directory, exc, "publish") from None
            change = size - self._writing.pop(partial, 0) - replaced - self._retire(guid, version)
            if (used := tally.read()) is not None:
                used += change
                tally.write(used)
        if sync:
            self.sync()
        if used is not None:
            emit(CacheUsage(used, self.quota))
        return final

    def cancel(self, partial: Path) -> None:
        """Give up a ``reserve``: remove what was written and free its room."""
        with self._site() as tally:
            self._give_back(tally, partial)

    def _give_back(self, tally: _Tally, partial: Path) -> None:
        partial.unlink(missing_ok=True)
        reserved = self._writing.pop(partial, None)
        if reserved is not None and (used := tally.read()) is not None:
            tally.write(max(0, used - reserved))

    def sync(self) -> None:
        """fsync the directory: the renames of ``commit`` survive a crash."""
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    @contextmanager
    def _site(self) -> Iterator[_Tally]:
        """The directory's tally, locked against every other front end and thread."""
        path = self.directory / TALLY
        with self._lock:
            while True:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX)
                    if os.fstat(fd).st_ino == os.stat(path).st_ino:
                        break
                except FileNotFoundError:
                    pass
                except BaseException:
                    os.close(fd)
                    raise
                os.close(fd)  # removed (by hand) while we waited: lock the one there now
            try:
                yield _Tally(fd)
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)  # explicitly: a forked worker holds a copy of the fd
                os.close(fd)

    def _count(self, tally: _Tally) -> _Count:
        """Count the directory (under the lock) into the tally, removing dead writers' leftovers."""
        count = _Count(0)
        with os.scandir(self.directory) as entries:
            for entry in entries:
                try:
                    info = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if not stat.S_ISREG(info.st_mode):
                    continue
                if _PUBLISHED.match(entry.name):
                    count.used += info.st_size
                    count.lru.append((info.st_atime, entry.name, info.st_size))
                elif entry.name.endswith(PARTIAL_SUFFIX):
                    if _writer_gone(entry.name, info.st_mtime):
                        Path(entry.path).unlink(missing_ok=True)
                        count.removed += 1
                    else:
                        count.used += _reserved(entry.name, info.st_size)
        count.lru.sort()
        tally.write(count.used)
        self._lru, self._lru_at = count.lru, time.monotonic()
        return count

    def _make_room(self, tally: _Tally, size: int, keep: set[str]) -> int:
        """Evict unprotected files, least recently used first, until ``size`` more bytes fit;
        the bytes then in use. Nothing is evicted unless enough can be."""
        if size > self.quota:
            raise CacheFull(f"cache full: a file of {size} bytes is larger than the whole quota ({self.quota} bytes)")
        used = tally.read()
        if used is not None and used + size <= self.quota:
            return used
        protected: set[str] | None = None
        while True:
            fresh = used is None or self._lru is None or time.monotonic() - self._lru_at > LRU_REUSE
            if fresh:
                used = self._count(tally).used
                if used + size <= self.quota:
                    return used
            assert used is not None and self._lru is not None
            if protected is None:  # the catalog's word, once: a pin written before now is kept
                protected = keep | self._protected()
            victims, freeable = self._victims(used + size - self.quota, protected)
            if victims:
                break
            if fresh:
                raise CacheFull(
                    f"cache full: {size} bytes needed, {used - freeable} of the {self.quota}-byte quota"
                    " held by pinned or in-use files; release pins or raise [cache] quota_bytes"
                )
            used = None  # the order reused may be stale: count again before refusing
        for name, victim_size in victims:
            (self.directory / name).unlink(missing_ok=True)
            used -= victim_size
        self._lru = [f for f in self._lru if f[1] not in {name for name, _ in victims}]
        tally.write(used)
        emit(CacheEvicted(len(victims), sum(s for _, s in victims)))
        return used

    def _victims(self, needed: int, protected: set[str]) -> tuple[list[tuple[str, int]], int]:
        """The least recently used files, not protected, whose sizes make ``needed`` bytes (as
        they are on disk now: a file gone or used since the count is passed over); none if
        they cannot, with how many bytes could be freed."""
        assert self._lru is not None
        victims: list[tuple[str, int]] = []
        freed = 0
        for used, name, size in self._lru:
            if name[:36] in protected:
                continue
            try:
                if os.stat(self.directory / name).st_atime != used:
                    continue  # used since: no longer the least recent
            except FileNotFoundError:
                continue
            victims.append((name, size))
            freed += size
            if freed >= needed:
                return victims, freed
        return [], freed

    def _retire(self, guid: str, current: int) -> int:
        """Remove the cached versions of ``guid`` older than ``current`` (under the lock): they
        are never served again. The bytes freed."""
        freed = 0
        for version in range(1, current):
            old = self.directory / self.name(guid, version)
            if (size := _size(old)) is not None:
                old.unlink(missing_ok=True)
                freed += size
        return freed


def _size(path: Path) -> int | None:
    """The size of a file that may not exist."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return None
