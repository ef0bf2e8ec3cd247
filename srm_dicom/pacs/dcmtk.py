"""The DCMTK engine: C-GET by DCMTK's ``getscu`` into a private spool directory, and C-STORE
of files by its ``storescu`` (``storescu_store``).

pynetdicom receives a C-GET several times slower than DCMTK (a 100-slice series: 1.1 s
against getscu's 0.14 s on the benchmark machine, README "Benchmarks"), because every PDU
and every data element passes through Python. DCMTK is the toolkit the gLite MDM itself
used; Debian's ``dcmtk`` package installs ``/usr/bin/getscu``. The images land in a
directory only this process can read (``tempfile`` makes it 0700), are read back with
pydicom (by the stager's workers, each as soon as getscu has written it, ``getscu_stream``;
or here, ``getscu_get``) and the directory is removed: they are the PACS's originals, PHI
included.

getscu exits 0 whatever the C-GET's status, so its stderr is read: any error or warning
(a failure status, failed sub-operations, a SOP class or transfer syntax getscu did not
propose) raises ``GetscuIncomplete``, and the caller asks again with pynetdicom, which
offers every storage class and reports the PACS's own status. A clean run that brought
fewer images than asked means the PACS has no more: the caller tells which are missing.
"""

from __future__ import annotations

import ctypes
import os
import selectors
import struct
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import pydicom
from pydicom import Dataset

from srm_dicom.config import GETSCU, PacsConfig
from srm_dicom.errors import PacsError
from srm_dicom.names import is_uid

MAX_PDU = 131072  # the largest getscu accepts


def getscu_get(
    config: PacsConfig, name: str, study: str, series: str, sops: Sequence[str] | str | None
) -> Iterator[Dataset]:
    """C-GET an instance, a UID list or a whole series with getscu; the datasets, each with
    the file meta getscu wrote (transfer syntax as received). getscu has finished before the
    first is yielded (so a ``GetscuIncomplete`` comes before any); they are then read from
    the spool one at a time as the caller iterates, so that a series is never in memory
    whole (a 1 GiB volume), and the spool is removed when the iteration ends."""
    with tempfile.TemporaryDirectory(prefix="mdm-getscu-") as spool:
        for _, path in getscu_files(config, name, study, series, sops, Path(spool)):
            yield pydicom.dcmread(path)


def getscu_files(
    config: PacsConfig, name: str, study: str, series: str, sops: Sequence[str] | str | None, spool: Path
) -> list[tuple[str, Path]]:
    """``getscu_stream`` to its end: every image once getscu has finished (a ``GetscuIncomplete``
    comes before any)."""
    return list(getscu_stream(config, name, study, series, sops, spool))


def getscu_stream(
    config: PacsConfig, name: str, study: str, series: str, sops: Sequence[str] | str | None, spool: Path
) -> Iterator[tuple[str, Path]]:
    """C-GET with getscu into ``spool``, a private directory of the caller's (the files are the
    PACS's originals, PHI included); (SOP Instance UID, file) of each image as soon as getscu
    has written it, the UID as getscu named the file (``MODALITY.UID``).

    getscu receives a whole data set before it writes its file, and closes the file before
    it answers the C-STORE: the kernel's word that a file was closed after writing (inotify
    ``IN_CLOSE_WRITE``) is the word that it is complete, so the stager's workers protect the
    first images while the PACS still sends the others (a 100-slice series took getscu's
    whole run plus the protection of all its slices one after the other). Where inotify
    cannot be had, the images come when getscu has finished. A ``GetscuIncomplete`` comes
    at the end, after the images written: the caller asks again for what it still lacks.
    Nothing is read here: the staging workers read each file (``srm_dicom/workers.py``), so
    that no image is decoded in the server, and check that its UIDs are the ones its name
    says. A file whose name is not a UID is left out."""
    if not os.access(GETSCU, os.X_OK):
        raise PacsError(f"{name}: [pacs] engine = \"dcmtk\" needs DCMTK's {GETSCU} (Debian package dcmtk)")
    uids = [sops] if isinstance(sops, str) else list(sops or ())
    keys = [f"QueryRetrieveLevel={'IMAGE' if uids else 'SERIES'}", f"StudyInstanceUID={study}",
            f"SeriesInstanceUID={series}"]
    if uids:
        keys.append("SOPInstanceUID=" + "\\".join(uids))
    timeout = str(max(1, round(config.timeout)))
    command = [GETSCU, "-S", "-aet", config.calling_aet, "-aec", config.aet, "-to", timeout, "-ta", timeout,
               "-td", timeout, "-pdu", str(MAX_PDU), *(arg for key in keys for arg in ("-k", key)),
               "-od", str(spool), config.host, str(config.port)]
    limit = config.timeout * 4 + 60
    deadline = time.monotonic() + limit
    written = _Written(spool)
    sent: set[str] = set()
    errors: list[bytes] = []
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               env={**os.environ, "TCP_NODELAY": "1"})
    assert process.stderr is not None
    try:
        with selectors.DefaultSelector() as selector:
            selector.register(process.stderr, selectors.EVENT_READ)
            if written.fd >= 0:
                selector.register(written.fd, selectors.EVENT_READ)
            running = True
            while running:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise PacsError(f"{name}: getscu did not finish within {limit:g} s")
                for ready, _ in selector.select(left):
                    if ready.fileobj is process.stderr:
                        chunk = os.read(process.stderr.fileno(), 65536)
                        errors.append(chunk)
                        running = running and bool(chunk)
                    else:
                        yield from _new_images(spool, written.names(), sent)
        try:
            process.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise PacsError(f"{name}: getscu did not finish within {limit:g} s") from None
        yield from _new_images(spool, written.names(), sent)
        text = b"".join(errors).decode(errors="replace")
        complaints = [line[3:].strip() for line in text.splitlines() if line.startswith(("E: ", "F: ", "W: "))]
        if process.returncode != 0 or complaints:
            raise GetscuIncomplete(f"{name}: getscu: {complaints[-1] if complaints else f'exit {process.returncode}'}")
        # Those the kernel did not report (no inotify here, or its queue overflowed).
        yield from _new_images(spool, sorted(path.name for path in spool.iterdir()), sent)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stderr.close()
        written.close()


def _new_images(spool: Path, names: Iterable[str], sent: set[str]) -> Iterator[tuple[str, Path]]:
    for file_name in names:
        uid = file_name.partition(".")[2]
        if file_name not in sent and is_uid(uid):
            sent.add(file_name)
            yield uid, spool / file_name


_IN_CLOSE_WRITE, _IN_MOVED_TO = 0x8, 0x80  # <sys/inotify.h>
_EVENT = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len; then the name


class _Written:
    """The names of the files of a directory closed after writing (or moved in), as Linux's
    inotify reports them; ``fd`` is -1 where it cannot be had (another kernel, no instance
    left under fs.inotify.max_user_instances)."""

    def __init__(self, directory: Path) -> None:
        self.fd = -1
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        except (OSError, AttributeError):
            return
        if fd < 0:
            return
        if libc.inotify_add_watch(fd, os.fsencode(directory), _IN_CLOSE_WRITE | _IN_MOVED_TO) < 0:
            os.close(fd)
            return
        self.fd = fd

    def names(self) -> list[str]:
        """The names reported since the last call."""
        found: list[str] = []
        while self.fd >= 0:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                break
            offset = 0
            while offset + _EVENT.size <= len(data):
                length = _EVENT.unpack_from(data, offset)[3]
                name = data[offset + _EVENT.size:offset + _EVENT.size + length].rstrip(b"\0")
                offset += _EVENT.size + length
                if name:
                    found.append(os.fsdecode(name))
        return found

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class GetscuIncomplete(PacsError):
    """getscu reported an error or a warning: its images may not be all the PACS sent."""


STORESCU = "/usr/bin/storescu"  # DCMTK's (the storescu on PATH may be pynetdicom's app)
# The lines of storescu's verbose log (-v) that say what happened to each file.
_SENDING = "I: Sending file: "
_CONVERTING = "I: Converting transfer syntax: "
_RESPONSE = "I: Received Store Response ("


def storescu_store(config: PacsConfig, name: str, files: Sequence[tuple[Path, str, str]]) -> set[Path]:
    """C-STORE files with storescu over one association; the files the PACS took, in their own
    transfer syntax. The caller sends the others with pynetdicom, which reports why each fails.

    ``files`` are (path, SOP class, transfer syntax). storescu proposes exactly one context per
    pair (a ``-xf`` configuration written here, as ``PacsClient`` proposes them), goes on after
    a failure (``-nh``), and logs a line per file sent and per answer: a file counts as stored
    when the answer is Success or Warning and storescu did not convert it to another syntax
    (it would, were the file's own context refused: that one is sent again, as it is).
    pynetdicom's C-STORE costs three times storescu's per image (README, "Benchmarks")."""
    if not os.access(STORESCU, os.X_OK):
        raise PacsError(f"{name}: [pacs] engine = \"dcmtk\" needs DCMTK's {STORESCU} (Debian package dcmtk)")
    sendable = [(path, sop_class, ts) for path, sop_class, ts in files if "\n" not in str(path)]
    if not sendable:
        return set()
    timeout = str(max(1, round(config.timeout)))
    with tempfile.TemporaryDirectory(prefix="mdm-storescu-") as folder:
        profile = Path(folder) / "storescu.cfg"
        profile.write_text(_storescu_profile({(sop_class, ts) for _, sop_class, ts in sendable}))
        command = [STORESCU, "-v", "-nh", "-xf", str(profile), "mdm", "-aet", config.calling_aet, "-aec", config.aet,
                   "-to", timeout, "-ta", timeout, "-td", timeout, config.host, str(config.port),
                   *(str(path) for path, _, _ in sendable)]
        try:
            done = subprocess.run(command, capture_output=True, text=True, errors="replace",
                                  env={**os.environ, "TCP_NODELAY": "1"}, timeout=config.timeout * 4 + 60)
            log = done.stderr
        except subprocess.TimeoutExpired as exc:  # what it sent before counts; the rest is retried
            log = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else exc.stderr or ""
    return _stored(log)


def _storescu_profile(contexts: set[tuple[str, str]]) -> str:
    """A storescu association profile proposing each (SOP class, transfer syntax) pair alone."""
    syntaxes = sorted({ts for _, ts in contexts})
    lines = ["[[TransferSyntaxes]]"]
    for number, ts in enumerate(syntaxes, 1):
        lines += [f"[TS{number}]", f"TransferSyntax1 = {ts}"]
    lines += ["[[PresentationContexts]]", "[Contexts]"]
    for number, (sop_class, ts) in enumerate(sorted(contexts), 1):
        lines.append(f"PresentationContext{number} = {sop_class}\\TS{syntaxes.index(ts) + 1}")
    lines += ["[[Profiles]]", "[mdm]", "PresentationContexts = Contexts", ""]
    return "\n".join(lines)


def _stored(log: str) -> set[Path]:
    """The files storescu's verbose log says the PACS took, unconverted."""
    stored: set[Path] = set()
    current: str | None = None
    converted = False
    for line in log.splitlines():
        if line.startswith(_SENDING):
            current, converted = line[len(_SENDING):], False
        elif line.startswith(_CONVERTING):
            source, _, target = line[len(_CONVERTING):].partition(" -> ")
            converted = source != target
        elif line.startswith(_RESPONSE) and current is not None:
            if line[len(_RESPONSE):].startswith(("Success", "Warning")) and not converted:
                stored.add(Path(current))
            current = None
    return stored
