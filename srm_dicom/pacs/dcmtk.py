"""The DCMTK engine: C-GET by DCMTK's ``getscu`` into a private spool directory, and C-STORE
of files by its ``storescu`` (``storescu_store``).

pynetdicom receives a C-GET several times slower than DCMTK (a 100-slice series: 1.1 s
against getscu's 0.14 s on the benchmark machine, README "Benchmarks"), because every PDU
and every data element passes through Python. DCMTK is the toolkit the gLite MDM itself
used; Debian's ``dcmtk`` package installs ``/usr/bin/getscu``. The images land in a
directory only this process can read (``tempfile`` makes it 0700), are read back with
pydicom (by the stager's workers, ``getscu_files``; or here, ``getscu_get``) and the
directory is removed: they are the PACS's originals, PHI included.

getscu exits 0 whatever the C-GET's status, so its stderr is read: any error or warning
(a failure status, failed sub-operations, a SOP class or transfer syntax getscu did not
propose) raises ``GetscuIncomplete``, and the caller asks again with pynetdicom, which
offers every storage class and reports the PACS's own status. A clean run that brought
fewer images than asked means the PACS has no more: the caller tells which are missing.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
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
    """C-GET with getscu into ``spool``, a private directory of the caller's (the files are the
    PACS's originals, PHI included); (SOP Instance UID, file) of each image, the UID as getscu
    named the file (``MODALITY.UID``). Nothing is read here: the staging workers read each file
    (``srm_dicom/workers.py``), so that no image is decoded in the server, and check that its
    UIDs are the ones its name says. A file whose name is not a UID is left out."""
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
    try:
        done = subprocess.run(command, capture_output=True, text=True, errors="replace",
                              env={**os.environ, "TCP_NODELAY": "1"}, timeout=config.timeout * 4 + 60)
    except subprocess.TimeoutExpired:
        raise PacsError(f"{name}: getscu did not finish within {config.timeout * 4 + 60:g} s") from None
    complaints = [line[3:].strip() for line in done.stderr.splitlines() if line.startswith(("E: ", "F: ", "W: "))]
    if done.returncode != 0 or complaints:
        raise GetscuIncomplete(f"{name}: getscu: {complaints[-1] if complaints else f'exit {done.returncode}'}")
    found = ((path.name.partition(".")[2], path) for path in sorted(spool.iterdir()))
    return [(uid, path) for uid, path in found if is_uid(uid)]


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
