"""Protection in worker processes: anonymize and encrypt beside the interpreter, not under it.

Anonymizing a slice walks its data set in Python and ``dcmwrite`` encodes it again in
Python: about 1.5 ms of one core per 256² slice, all of it under the GIL. Run in the
threads of ``mdm serve`` it serializes with receiving, HTTP and the catalog, so both
registration and staging hand it to a process pool sized to the cores instead (README
"Benchmarks"; issue 9). Encryption (``cryptography``'s AES-GCM) releases the GIL, but is
done in the same task: the ciphertext is then written where the caller asked, and only its
size and checksums travel back.

A task and its result are plain picklable values (bytes, str, frozen dataclasses, a
pydicom ``Dataset``), so they cross the process boundary as they are. The workers are
started by a fork server that has imported this module (pydicom, the anonymizer and its
tables) once: a new worker is a fork of it, never a fresh interpreter, and none is a fork
of the many-threaded server (a fork of a process whose other threads hold locks may
deadlock).

Use::

    from srm_dicom import workers
    future = workers.submit(workers.protect, workers.ProtectTask(part10_bytes, secret, options, key, guid, version))
    result = future.result()   # workers.Protected: payload (or None), size, adler32, sha256, erased

A worker that dies (killed, out of memory) breaks the pool: its futures raise
``concurrent.futures.process.BrokenProcessPool`` and the next ``submit`` starts a new pool.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import threading
import uuid
import zlib
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from pydicom import Dataset, dcmread

from srm_dicom.anonymization_options import AnonymizationOptions
from srm_dicom.anonymize import ErasedValue, anonymize, to_bytes
from srm_dicom.crypto.container import encrypt_bytes
from srm_dicom.errors import MdmError, PacsError
from srm_dicom.events import KeyServerCall, subscribe
from srm_dicom.keystore.client import KeystoreClient

if TYPE_CHECKING:
    from srm_dicom.prepare import Job, Prepared

T = TypeVar("T")

# What the fork server imports once, so that every worker it forks has them: this module (the
# staging tasks), registration's (``prepare``), and srm_dicom.worker_start, which protects a
# sample image there once so that no worker's first task pays for the first protection.
PRELOAD = [__name__, "srm_dicom.prepare", "srm_dicom.worker_start"]

_lock = threading.Lock()
_pool: ProcessPoolExecutor | None = None


@dataclass(frozen=True)
class ProtectTask:
    """One image to protect, as registration or staging hands it to a worker.

    ``source`` is a Part-10 file's bytes (what registration reads or receives), a pydicom
    ``Dataset`` with its ``file_meta`` (it pickles as it is), or the path of a Part-10 file
    (what a retrieve spooled: the worker reads it, so the server decodes no image and pickles
    no data set). ``expected`` are the Study, Series and SOP Instance UIDs the image must
    have (a spooled file is known by its name only): another image fails the task.
    With ``output``, the ciphertext is written to that path (fsynced unless ``sync`` is
    False: a caller that fsyncs many files at once from threads lets the file system commit
    them together) and not sent back: a staged slice goes to its cache file without
    crossing the pipe twice.
    """

    source: bytes | Dataset | Path
    secret: bytes
    options: AnonymizationOptions
    key: bytes
    guid: str
    version: int
    output: str | None = None
    sync: bool = True
    expected: tuple[str, str, str] | None = None


@dataclass(frozen=True)
class Protected:
    """What a worker made of a ``ProtectTask``: the grid client's bytes (None when written to
    ``output``), their true size and checksums, and what anonymization erased (for the
    metadata store only)."""

    payload: bytes | None
    size: int
    adler32: str  # 8 hex digits, as the catalog records it
    sha256: str
    erased: tuple[ErasedValue, ...]


def protect(task: ProtectTask) -> Protected:
    """Anonymize and encrypt one image (runs in a worker; also callable in process)."""
    ds = read_image(task.source)
    if task.expected is not None:
        check_uids(ds, task.expected)
    result = anonymize(ds, task.secret, task.options)
    payload = encrypt_bytes(task.key, uuid.UUID(task.guid).bytes, task.version, to_bytes(result))
    checksums = (len(payload), f"{zlib.adler32(payload):08x}", hashlib.sha256(payload).hexdigest())
    if task.output is None:
        return Protected(bytes(payload), *checksums, tuple(result.erased))
    fd = os.open(task.output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(payload)
        if task.sync:
            out.flush()
            os.fsync(out.fileno())
    return Protected(None, *checksums, tuple(result.erased))


@dataclass(frozen=True)
class KeyServers:
    """Where a worker fetches keys from: a ``KeystoreClient``'s arguments."""

    urls: tuple[str, ...]
    k: int
    ca: Path
    cert: Path
    key: Path
    timeout: float


_clients: dict[KeyServers, KeystoreClient] = {}  # one per worker process, its connections kept


def fetch_keys(servers: KeyServers, names: list[str]) -> tuple[dict[str, bytes | MdmError], list[KeyServerCall]]:
    """``KeystoreClient.fetch_keys`` of ``names``, each key the first combination of its shares
    (the stager checks the protected bytes against the catalog afterwards), and the key-server
    calls it made: the server's listeners (metrics, ``/readyz``) live in the server process, so
    the stager emits them there. In a worker, because combining shares is pure Python
    (pycryptodome's GF(2^128) arithmetic, about 1 ms a key): in the server it held the GIL 1.1 s
    for a batch of 1000 (py-spy), against every other thread."""
    client = _clients.get(servers)
    if client is None:
        client = _clients[servers] = KeystoreClient(list(servers.urls), servers.k, ca=servers.ca, cert=servers.cert,
                                                    key=servers.key, timeout=servers.timeout)
    calls: list[KeyServerCall] = []
    stop = subscribe(lambda event: calls.append(event) if isinstance(event, KeyServerCall) else None)
    try:
        return client.fetch_keys(names, lambda _name, _key: True), calls
    finally:
        stop()


def prepare(job: Job) -> Prepared | MdmError:
    """Registration's task, ``srm_dicom.prepare.prepare``: named here so that the registrar
    submits it without importing pydicom and the anonymizer itself (the workers have them,
    from ``PRELOAD``)."""
    from srm_dicom.prepare import prepare as prepare_image

    return prepare_image(job)


def read_image(source: bytes | Dataset | Path) -> Dataset:
    """A task's image as a data set."""
    if isinstance(source, Dataset):
        return source
    return dcmread(BytesIO(source) if isinstance(source, bytes) else source)


def check_uids(ds: Dataset, expected: tuple[str, str, str]) -> None:
    """Refuse an image whose Study, Series or SOP Instance UID is not ``expected`` (a PACS
    that sent another image under a name it was asked for)."""
    try:
        found = tuple(str(ds.get(k, "") or "").strip() for k in ("StudyInstanceUID", "SeriesInstanceUID",
                                                                  "SOPInstanceUID"))
    except Exception:  # pydicom decodes lazily: a malformed UID element raises here
        found = ()
    if found != expected:
        raise PacsError("the PACS sent another image than the one asked for")


def size() -> int:
    """How many workers: the cores this process may run on."""
    return len(os.sched_getaffinity(0))


def pool() -> ProcessPoolExecutor:
    """The shared pool, started on first use (or again after a worker died)."""
    global _pool
    with _lock:
        if _pool is None or getattr(_pool, "_broken", False):
            if _pool is not None:
                _pool.shutdown(wait=False, cancel_futures=True)
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload(PRELOAD)
            _pool = ProcessPoolExecutor(size(), mp_context=context)
        return _pool


def submit(fn: Callable[..., T], *args: Any) -> Future[T]:
    """``fn(*args)`` in a worker; a pool broken by a dead worker is replaced once."""
    try:
        return pool().submit(fn, *args)
    except BrokenProcessPool:
        return pool().submit(fn, *args)


def warm() -> None:
    """Start every worker now (a server does it before it says it is ready), so that the
    first request does not wait for the fork server and its imports."""
    for future in [submit(os.getpid) for _ in range(size())]:
        future.result()


def shutdown() -> None:
    """Stop the workers (tests; the interpreter also does it at exit)."""
    global _pool
    with _lock:
        pool_, _pool = _pool, None
    if pool_ is not None:
        pool_.shutdown(wait=True, cancel_futures=True)
