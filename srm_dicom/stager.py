"""The stager: SRM prepareToGet over a PACS playing the role of tape.

Staging a file means retrieving its images from the PACS over DICOM, protecting them
exactly as registration did (so the bytes match the catalog's size and adler32, which
is checked before anything is published) and publishing them in the disk cache. Every
request for a file not yet on disk, a GET or a stage request, joins one job per GUID
(single flight), run by a bounded pool of workers that each keep one PACS association.

Like a nearline storage's bulk interface (dCache's), the workers take the queue in
batches: the queued files of one series are fetched in one C-GET (or C-MOVE) naming
their SOP Instance UIDs and offering the SOP classes the catalog recorded, their keys in
one request per key server, their states in one catalog transaction. A batch holding
the series' ``3D`` retrieves the whole series once and serves its slices from the same
images. A PACS that refuses a request as a whole (Orthanc does when one UID of a list is
unknown) has the batch split in halves until the refused files stand alone, each failing
with its reason while the rest completes.

A batch's slices are protected in the process pool (``srm_dicom/workers.py``) as the PACS
delivers them, their keys fetched meanwhile: each worker writes its slice's cache file and
sends back only its size and checksums, which must be the catalog's before the file is
fsynced (many at once) and published by a rename. A slice whose bytes differ under the
first combination of key shares is protected again with each combination in turn, in
process, to tell a wrong share from content that changed in the PACS.

Stage requests, their per-file states and their pins live in the catalog, so they
survive a restart: on start, leftovers of interrupted staging are removed from the
cache and every file some request still waits for is staged again.

The jobs live in the catalog too, one per GUID for the whole site, so that several front
ends on one catalog and one cache directory retrieve each file once (README, "Several
front ends"). A worker claims a batch there under a lease ([cache] lease, renewed every
third of it while the batch runs); a front end that dies leaves its batches to the others
once their leases lapse. A front end waiting for a job another one runs learns of its end
by polling the catalog every [cache] poll_interval (on PostgreSQL too: one query a poll for
all the jobs it waits for, no connection held open per waiter).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import queue
import socket
import tempfile
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any, BinaryIO, cast

import pydicom
from pydicom import Dataset

from srm_dicom import workers
from srm_dicom.anonymization_options import AnonymizationOptions
from srm_dicom.anonymize import recorded_options, rules_version
from srm_dicom.cache import DiskCache, write_failure
from srm_dicom.catalog import (
    COMPLETED,
    FAILED,
    STARTED,
    SUBMITTED,
    Catalog,
    Entry,
    StageFile,
    StageJob,
    StageRequest,
)
from srm_dicom.config import Config
from srm_dicom.crypto.container import encrypt_bytes, encrypt_stream, encrypted_size, new_file_key
from srm_dicom.entry_key import key_acl, key_name
from srm_dicom.errors import InvalidInput, MdmError, NotFound
from srm_dicom.events import StageFinished, StageQueueChanged, emit
from srm_dicom.keystore import KeystoreError
from srm_dicom.keystore.client import KeystoreClient
from srm_dicom.names import COMPRESSED_VOLUME, VOLUME, normalize_lfn, parse_pfn
from srm_dicom.pacs.client import PacsClient, RetrieveRefused
from srm_dicom.protect import protect_image
from srm_dicom.sidecar import series_file
from srm_dicom.volume import NotAVolume, VolumeWriter, plan_volume

log = logging.getLogger(__name__)

DISK_AND_TAPE, TAPE = "DISK_AND_TAPE", "TAPE"
CONTENT_DIFFERS = "the PACS returned different content than was registered"
MAX_BATCH = 1000  # files of one series a worker takes at once (the key servers' bulk limit is 2000)
MAX_UIDS_PER_RETRIEVE = 500  # a UID list of ~32 KiB in one C-GET identifier
# Cache files fsynced at once: ext4 commits concurrent fsyncs together (100 slices of 256²,
# one after the other: 90-240 ms; from 16 threads: 30-50 ms).
SYNC_THREADS = 16


class StageFailed(MdmError):
    """Staging a file failed; ``reason`` is one line for a person (and for a 5xx body)."""

    http_status = 503

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class StagingPending(MdmError):
    """The file is still being staged after the caller's wait: ask again later."""

    http_status = 503


class _Abandoned(Exception):
    """The stager is stopping: its claim goes back to the queue, for another front end or the next start."""


@dataclass(eq=False)
class _Job:
    """One staging of one GUID, shared by everyone here waiting for it; ``attempt`` is the
    catalog job's run it waits for (None until the catalog said)."""

    guid: str
    attempt: int | None = None
    done: threading.Event = field(default_factory=threading.Event)
    path: Path | None = None
    error: StageFailed | None = None


@dataclass
class _Produced:
    """What protecting one retrieved slice with each candidate key gave (for the reason when none matches)."""

    tries: int = 0
    payloads: dict[bytes, bytes] = field(default_factory=dict)


@dataclass(eq=False)
class _Slice:
    """One slice of a batch on its way through the protection pool into its cache file."""

    job: _Job
    entry: Entry
    name: str  # its key's name on the key servers
    options: AnonymizationOptions  # as registered
    uids: tuple[str, str, str]  # its Study, Series and SOP Instance UIDs in the PACS
    source: Path | None = None  # the retrieved image in the batch's spool
    partial: Path | None = None  # the cache file a worker writes
    future: Future[workers.Protected] | None = None
    failure: StageFailed | None = None


@dataclass(eq=False)
class _VolumeBuild:
    """A series volume being written into a temporary file of the cache as its images arrive."""

    job: _Job
    entry: Entry
    writer: VolumeWriter
    plain: Path  # the unencrypted volume file, removed once encrypted
    fd: int
    sources: dict[str, int]  # the PACS's SOP Instance UID → its row in the plan
    key: Future[dict[str, bytes | MdmError]] | None  # a restage's key, fetched meanwhile

    def add(self, ds: Dataset) -> None:
        source = self.sources.get(str(ds.SOPInstanceUID))
        if source is not None:
            try:
                self.writer.add(source, ds)
            except OSError as exc:
                raise write_failure(self.plain.parent, exc) from None

    def close(self, cache: DiskCache) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        cache.cancel(self.plain)


class _Sums:
    """A file being written and the size, adler32 (and sha256) of what was written to it."""

    def __init__(self, out: BinaryIO, sha256: Any) -> None:
        self._out, self._adler, self._sha256, self.size = out, 1, sha256, 0

    def write(self, data: bytes | memoryview) -> int:
        self._adler = zlib.adler32(data, self._adler)
        if self._sha256 is not None:
            self._sha256.update(data)
        self.size += len(data)
        return self._out.write(data)

    @property
    def adler32(self) -> str:
        return f"{self._adler:08x}"

    @property
    def sha256(self) -> str | None:
        return None if self._sha256 is None else self._sha256.hexdigest()


def _now() -> int:
    return int(time.time())


def _first_key(_name: str, _key: bytes) -> bool:
    """Take the first combination of shares: the protected bytes are checked against the
    catalog afterwards, and only a mismatch tries the other combinations (``_verify_each_key``)."""
    return True


def _adler32(data: bytes | bytearray) -> str:
    return f"{zlib.adler32(data):08x}"


class Stager:
    """Stages catalog entries into the disk cache; see the module docstring."""

    def __init__(self, config: Config, catalog: Catalog, keystore: KeystoreClient) -> None:
        self._config = config
        self._catalog = catalog
        self._keystore = keystore
        self._secret = config.site.secret_bytes
        section = config.keystore
        self._key_servers = workers.KeyServers(tuple(section.urls), section.k, config.path(section.ca),
                                               config.path(section.cert), config.path(section.key), section.timeout)
        self._cache = DiskCache(config.path(config.cache.dir), config.cache.quota_bytes,
                                lambda: catalog.stages.protected_guids(_now()))
        self._lock = threading.Lock()
        self._jobs: dict[str, _Job] = {}  # GUIDs someone here waits for
        self._held: set[str] = set()  # GUIDs whose catalog jobs this front end's workers hold
        # Who holds a claim, in the catalog: the host and process, for a person reading it.
        self._holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._wake = threading.Event()  # set when a job was queued here: an idle worker looks at once
        self._pool: ThreadPoolExecutor | None = None
        self._keys: ThreadPoolExecutor | None = None  # key fetches, while the PACS sends the images
        self._syncs: ThreadPoolExecutor | None = None  # fsyncs of the cache files a batch wrote
        self._stopping = threading.Event()
        self._local = threading.local()
        self._clients: list[PacsClient] = []
        # C-MOVE listens on one fixed port ([pacs] move_port): one retrieval at a time.
        self._move_lock = threading.Lock() if config.pacs.retrieve == "move" else None

    # -- life cycle ------------------------------------------------------------------

    def start(self) -> None:
        """Clean the cache of interrupted staging, start the workers, resume pending requests."""
        self._cache.open()
        self._stopping.clear()
        workers.warm()
        self._keys = ThreadPoolExecutor(self._config.cache.workers, thread_name_prefix="stager-keys")
        self._syncs = ThreadPoolExecutor(SYNC_THREADS, thread_name_prefix="stager-fsync")
        pending = self._catalog.stages.staging_guids()
        self._catalog.stages.enqueue_jobs({guid: _batch_of(guid, self._catalog.namespace.lookup_guid(guid))
                                           for guid in pending})
        if pending:
            log.info("stager: resumed staging of %d files", len(pending))
        count = self._config.cache.workers
        self._pool = ThreadPoolExecutor(count + 1, thread_name_prefix="stager")
        for _ in range(count):
            self._pool.submit(self._work)
        self._pool.submit(self._tend)

    def stop(self) -> None:
        """Finish the retrievals under way without publishing them; queued ones stay queued
        in the catalog for the next start."""
        self._stopping.set()
        self._wake.set()
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        for helpers in (self._keys, self._syncs):
            if helpers is not None:
                helpers.shutdown(wait=True, cancel_futures=True)
        self._keys = self._syncs = None
        with self._lock:
            jobs, self._jobs = list(self._jobs.values()), {}
            clients, self._clients = self._clients, []
        for job in jobs:
            if not job.done.is_set():
                job.error = StageFailed("the storage element stopped before staging finished")
                job.done.set()
        for client in clients:
            try:
                client.close()
            except MdmError as exc:
                log.debug("closing a PACS association: %s", exc)

    # -- what is on disk -------------------------------------------------------------

    def locality(self, entry: Entry) -> str:
        """WLCG locality: on disk only when the entry's current version is cached."""
        found = self._cache.path(entry.guid, entry.content_version, touch=False)
        return DISK_AND_TAPE if found else TAPE

    def cached_path(self, entry: Entry) -> Path | None:
        """The complete cached file of the current version, marked recently used."""
        return self._cache.path(entry.guid, entry.content_version)

    def fetch(self, entry: Entry, timeout: float) -> Path:
        """The cached file, staging it first if needed and waiting up to ``timeout`` seconds
        (with ``[cache] readahead = "series"``, a slice's series is staged in the same run: the
        wait ends when that slice is published, not the series)."""
        deadline = time.monotonic() + timeout
        while True:
            path = self.cached_path(entry)
            if path is not None:
                return path
            (job,) = self._enqueue([(entry.guid, entry)], read_ahead=True)
            if not job.done.wait(max(0.0, deadline - time.monotonic())):
                raise StagingPending(f"{self._label(entry)} is being staged from the PACS; try again later")
            if job.error is not None:
                raise job.error
            if job.path is not None:
                return job.path
            # Staged by another front end, but evicted or replaced by a new version since: again.

    # -- stage requests --------------------------------------------------------------

    def submit(self, entries: list[Entry], pin_lifetime: int | None, requester: str) -> str:
        """Queue a request for ``entries`` (pinned ``pin_lifetime`` seconds once on disk); its id."""
        unique = list({e.lfn: e for e in entries}.values())
        if not unique:
            raise InvalidInput("a stage request needs at least one file")
        now = _now()
        lifetime = self._config.cache.pin_lifetime if pin_lifetime is None else pin_lifetime
        files = []
        for entry in unique:
            if self.cached_path(entry) is not None:
                files.append(StageFile(entry.lfn, entry.guid, COMPLETED, None, now, now, now + lifetime))
            else:
                files.append(StageFile(entry.lfn, entry.guid))
        request = StageRequest(str(uuid.uuid4()), requester, now, lifetime, tuple(files))
        batches = {entry.guid: _batch_of(entry.guid, entry) for entry, f in zip(unique, files, strict=True)
                   if f.state != COMPLETED}
        if self._pool is None:
            raise MdmError("the stager is not running")
        # One transaction: a front end dying in between leaves no request that no job serves.
        # Every file is queued in the catalog, even one waited for here: that wait may be for a
        # run another front end has just finished, before this request's files were written.
        with self._catalog.backend.transaction():
            self._catalog.stages.add_stage_request(request)
            self._catalog.stages.enqueue_jobs(batches)
        # A file found on disk above may have been evicted before its pin was written: it is
        # staged again, so that a COMPLETED file of a new request is on disk (FTS reads onDisk).
        found = [entry for entry, f in zip(unique, files, strict=True) if f.state == COMPLETED]
        kept = self._cache.published((entry.guid, entry.content_version) for entry in found) if found else set()
        if evicted := [entry for entry in found if entry.guid not in kept]:
            with self._catalog.backend.transaction():
                self._catalog.stages.reopen_stage_files(request.id, [entry.guid for entry in evicted])
                self._catalog.stages.enqueue_jobs({entry.guid: _batch_of(entry.guid, entry) for entry in evicted})
        self._wake.set()
        return request.id

    def request(self, request_id: str) -> StageRequest | None:
        """The request with each file's state and whether it is on disk now.

        A file still SUBMITTED or STARTED is reported not on disk without a catalog lookup:
        its batch publishes it before writing its state, and a client polling a request of n
        files while the batch runs would otherwise cost n lookups a poll (1000 files: the
        poller took the interpreter from the batch it waited for). The others are looked up
        by their LFNs in a few queries (the poll that sees a 100-file request done took 17-63 ms
        with a lookup per GUID), by GUID only where the LFN now names another file."""
        found = self._catalog.stages.stage_request(request_id)
        if found is None:
            return None
        ended = [f for f in found.files if f.state not in (SUBMITTED, STARTED)]
        entries = self._catalog.namespace.lookup_many([f.lfn for f in ended]) if ended else {}

        def on_disk(file: StageFile) -> bool:
            if file.state in (SUBMITTED, STARTED):
                return False
            entry = entries.get(file.lfn)
            if entry is None or entry.guid != file.guid:
                return self._on_disk(file.guid)  # renamed or replaced since
            return self._cache.path(entry.guid, entry.content_version, touch=False) is not None

        return replace(found, files=tuple(replace(f, on_disk=on_disk(f)) for f in found.files))

    def cancel(self, request_id: str, lfns: list[str]) -> None:
        self._known_files(request_id, lfns)
        self._catalog.stages.cancel_stage_files(request_id, lfns, _now())

    def delete(self, request_id: str) -> None:
        """Cancel what is not final, forget the request and release its pins."""
        if not self._catalog.stages.delete_stage_request(request_id):
            raise NotFound(f"no such stage request: {request_id}")

    def release(self, request_id: str, lfns: list[str]) -> None:
        self._known_files(request_id, lfns)
        self._catalog.stages.release_stage_files(request_id, lfns)

    def release_paths(self, lfns: list[str]) -> None:
        """Release every request's pins on these files (gfal-evict); they may then be evicted."""
        self._catalog.stages.release_stage_files(None, lfns)

    def _known_files(self, request_id: str, lfns: list[str]) -> None:
        found = self._catalog.stages.stage_request(request_id)
        if found is None:
            raise NotFound(f"no such stage request: {request_id}")
        unknown = {normalize_lfn(lfn) for lfn in lfns} - {f.lfn for f in found.files}
        if unknown:
            raise InvalidInput(f"not in stage request {request_id}: {', '.join(sorted(unknown))}")

    def _on_disk(self, guid: str) -> bool:
        entry = self._catalog.namespace.lookup_guid(guid)
        return entry is not None and self._cache.path(guid, entry.content_version, touch=False) is not None

    # -- jobs and batches --------------------------------------------------------------

    def _enqueue(self, files: Sequence[tuple[str, Entry | None]], read_ahead: bool = False) -> list[_Job]:
        """The job each GUID's waiters here share, queued in the catalog (in one transaction, so
        that a worker finds a request's files of one series together, with a series' 3D its
        3D.nii.gz) unless already there; with ``read_ahead``, the rest of a new slice's series
        after it (``_read_ahead``), waited for by nobody here."""
        jobs, new = [], {}
        companions = self._compressed_companions(files)
        with self._lock:
            if self._pool is None:
                raise MdmError("the stager is not running")
            for guid, entry in [*files, *companions]:
                job = self._jobs.get(guid)
                if job is None:
                    job = self._jobs[guid] = _Job(guid)
                    new[guid] = _batch_of(guid, entry)
                jobs.append(job)
        if not new:
            return jobs[: len(files)]
        try:
            ahead = {}
            if read_ahead:
                for guid, entry in files:
                    if guid in new and entry is not None:
                        ahead.update(self._read_ahead(entry))
            attempts = self._catalog.stages.enqueue_jobs({**new, **{g: b for g, b in ahead.items() if g not in new}})
        except BaseException:
            self._forget([job for job in jobs if job.guid in new])
            raise
        with self._lock:
            for job in jobs:
                if job.guid in attempts and job.attempt is None:
                    job.attempt = attempts[job.guid]
            emit(StageQueueChanged(len(self._jobs)))
        self._wake.set()
        return jobs[: len(files)]

    def _read_ahead(self, entry: Entry) -> dict[str, str]:
        """With ``[cache] readahead = "series"``, the other slices of a slice's series that are not
        on disk nor staged here already (GUID → batch), in the order of their instance numbers
        from this one on, then those before it: the order a reader of a series asks for them."""
        if self._config.cache.readahead != "series" or entry.kind == "volume":
            return {}
        with self._lock:
            known = set(self._jobs)
        directory = entry.lfn.rpartition("/")[0]
        listing = self._catalog.namespace.list_dir(directory)
        rows = self._catalog.index.series_images(directory)
        numbers = {guid: row.get("instance_number") for guid, row in rows.items()}
        mine = numbers.get(entry.guid)
        others = [e for e in (listing.entries if listing else []) if e.kind != "volume" and e.guid != entry.guid
                  and e.guid not in known and self._cache.path(e.guid, e.content_version, touch=False) is None]

        def rank(other: Entry) -> tuple[bool, float, str]:
            number = numbers.get(other.guid)
            if not isinstance(number, int | float) or not isinstance(mine, int | float):
                return (False, 0.0, other.lfn)
            return (number < mine, float(number), other.lfn)

        batch = _batch_of(entry.guid, entry)
        return {other.guid: batch for other in sorted(others, key=rank)}

    def _compressed_companions(self, files: Sequence[tuple[str, Entry | None]]) -> list[tuple[str, Entry]]:
        """With [volume] gzip, the 3D.nii.gz of each series whose 3D is to be staged and whose
        compressed volume is not on disk: staged in the same batch (one retrieval), so that its
        size and adler32 are in the catalog from the volume's first assembly on (README "Volumes")."""
        if not self._config.volume.gzip:
            return []
        asked = {guid for guid, _ in files}
        companions = []
        for _, entry in files:
            if entry is None or entry.kind != "volume" or entry.sop_uid != VOLUME:
                continue
            compressed = self._catalog.namespace.lookup(f"{entry.lfn}{COMPRESSED_VOLUME[len(VOLUME):]}")
            if compressed is not None and compressed.guid not in asked and not self._on_disk(compressed.guid):
                companions.append((compressed.guid, compressed))
        return companions

    def _forget(self, jobs: Sequence[_Job]) -> None:
        with self._lock:
            for job in jobs:
                if self._jobs.get(job.guid) is job:
                    del self._jobs[job.guid]
            emit(StageQueueChanged(len(self._jobs)))

    def _work(self) -> None:
        """A worker: claim a batch in the catalog, stage it; when there is none, wait to be woken
        by a job queued here or for the next look (jobs queued by other front ends, lapsed leases)."""
        while not self._stopping.is_set():
            try:
                claimed = self._catalog.stages.claim_jobs(self._holder, self._config.cache.lease, MAX_BATCH)
            except Exception as exc:  # the catalog down: look again later, never lose the worker
                log.warning("stager: cannot claim staging jobs: %s", exc)
                claimed = []
            if claimed:
                self._run(claimed)
            else:
                self._wake.wait(self._config.cache.poll_interval)
                self._wake.clear()

    def _tend(self) -> None:
        """Renew the leases of the batches under way; settle the jobs waited for here that other
        front ends (or an earlier run) finished."""
        lease = self._config.cache.lease
        renewed = time.monotonic()
        while not self._stopping.wait(self._config.cache.poll_interval):
            with self._lock:
                held = list(self._held)
                waiting = {g: j for g, j in self._jobs.items() if g not in self._held and j.attempt is not None}
            try:
                if held and time.monotonic() - renewed >= lease / 3:
                    self._catalog.stages.renew_jobs(self._holder, held, lease)
                    renewed = time.monotonic()
                if waiting:
                    found = self._catalog.stages.jobs(list(waiting))
                    for guid, job in waiting.items():
                        self._settle(job, found.get(guid))
            except Exception as exc:  # the catalog down: try again at the next tick
                log.warning("stager: cannot look at staging jobs: %s", exc)

    def _settle(self, job: _Job, found: StageJob | None) -> None:
        """Wake the waiters of ``job`` if the run they wait for has ended (here or elsewhere)."""
        assert job.attempt is not None
        if found is None:
            return
        if found.attempt == job.attempt and found.state not in (COMPLETED, FAILED):
            return
        if found.attempt == job.attempt and found.state == FAILED:
            job.error = StageFailed(found.error or "staging failed on another front end")
        else:
            entry = self._catalog.namespace.lookup_guid(job.guid)
            job.path = None if entry is None else self.cached_path(entry)
            if job.path is None and found.attempt > job.attempt and found.state not in (COMPLETED, FAILED):
                job.attempt = found.attempt  # ended, not on disk, queued again: wait for that run
                return
        self._forget([job])
        job.done.set()

    def _run(self, claimed: list[StageJob]) -> None:
        """Stage a claimed batch. Its jobs join those waited for here, so that a GET of a file
        the batch holds (read ahead) waits for this run; each waiter is answered as soon as its
        file is published (``_published``), the catalog told at the batch's end."""
        with self._lock:
            waited = {c.guid for c in claimed if c.guid in self._jobs}
            batch = [self._jobs.setdefault(c.guid, _Job(c.guid, c.attempt)) for c in claimed]
            self._held.update(c.guid for c in claimed)
        # The files someone here waits for first: a batch asked for in parts asks for them first.
        batch.sort(key=lambda job: job.guid not in waited)
        started = time.monotonic()
        outcomes: dict[str, tuple[str, str | None]] = {}
        try:
            for job, result in self._stage(batch).items():
                if isinstance(result, Path):
                    job.path = result
                    outcomes[job.guid] = (COMPLETED, None)
                else:
                    job.error = result
                    outcomes[job.guid] = (FAILED, result.reason)
                    log.warning("staging guid:%s failed: %s", job.guid, result.reason)
        except _Abandoned:
            for job in batch:
                if job.path is None:
                    job.error = StageFailed("the storage element stopped before staging finished")
        except Exception as exc:  # a bug must fail the waiters, not hang them
            reason = f"internal error ({exc.__class__.__name__})"
            log.exception("staging %d files failed: %s", len(batch), reason)
            for job in batch:
                job.error = StageFailed(reason)
                outcomes[job.guid] = (FAILED, reason)
        finally:
            try:
                if outcomes:
                    self._catalog.stages.finish_jobs(self._holder, outcomes, _now())
                else:
                    self._catalog.stages.release_jobs(self._holder, [job.guid for job in batch])
            finally:
                # Not renewed any longer: if the catalog missed the end, the lease lapses and
                # whoever takes the job over finds the files on disk.
                with self._lock:
                    self._held.difference_update(job.guid for job in batch)
                self._forget(batch)
                for job in batch:
                    emit(StageFinished(time.monotonic() - started, job.error.reason if job.error else None))
                    job.done.set()

    def _stage(self, batch: list[_Job]) -> dict[_Job, Path | StageFailed]:
        """Stage one series' files; a result per job, a path or why it failed.

        The slices' keys are fetched while the PACS sends the images, and each image goes
        to the protection pool as it arrives (``_received``): receiving, protecting and
        writing overlap, and no slice's ciphertext passes through this process."""
        if self._stopping.is_set():
            raise _Abandoned
        results: dict[_Job, Path | StageFailed] = {}
        todo: dict[_Job, Entry] = {}
        for job in batch:
            entry = self._catalog.namespace.lookup_guid(job.guid)
            if entry is None:
                results[job] = StageFailed("the file is no longer registered")
            elif (path := self._cache.path(job.guid, entry.content_version)) is not None:
                results[job] = path
            else:
                todo[job] = entry
        if not todo:
            return results
        self._catalog.stages.set_stage_states({job.guid: (STARTED, None) for job in todo}, _now())
        started = time.monotonic()
        # The PACS's images land in a private spool (PHI: 0700, removed with the batch); the
        # workers read them from there (``workers.protect``).
        with tempfile.TemporaryDirectory(prefix="mdm-stage-") as spool:
            results.update(self._stage_from(Path(spool), todo, results))
        log.info("staged %d of %d files of a series in %.2f s", sum(isinstance(r, Path) for r in results.values()),
                 len(batch), time.monotonic() - started)
        return results

    def _stage_from(
        self, spool: Path, todo: dict[_Job, Entry], results: dict[_Job, Path | StageFailed]
    ) -> dict[_Job, Path | StageFailed]:
        """Retrieve the batch's images into ``spool``, protect, check and publish them."""
        volumes = [job for job, entry in todo.items() if entry.kind == "volume"]
        slices = self._plan_slices({job: entry for job, entry in todo.items() if entry.kind != "volume"}, results)
        keys = self._fetch_first_keys(list(slices.values()))
        pinned: list[set[str]] = []
        received = functools.partial(self._received, slices, keys, pinned)
        source = parse_pfn(next(iter(todo.values())).pfn)
        missing: dict[str, str] = {}
        build = self._start_volume(volumes, todo, results)
        # 3D.nii.gz is made from the images in memory (srm_dicom/sidecar.py); 3D and the
        # sidecars need none kept.
        keep = any(todo[job].sop_uid == COMPRESSED_VOLUME for job in volumes)
        datasets: list[Dataset] = []
        try:
            if volumes:
                # The whole series once: the volume needs it, and its slices come with it.
                classes = self._series_classes(todo[volumes[0]])
                for sop, path in self._retrieve_iter(source.study, source.series, None, classes, spool):
                    received(sop, path)
                    if build is not None or keep:
                        ds = self._series_image(path, (source.study, source.series, sop))
                        if ds is not None and build is not None:
                            build.add(ds)
                        if ds is not None and keep:
                            datasets.append(ds)
            elif slices:
                guids = [item.job.guid for item in slices.values()]
                classes = frozenset(self._catalog.index.sop_classes(guids).values())
                missing = self._retrieve_instances(source.study, source.series, list(slices), classes, received,
                                                   spool, whole=self._whole_series(todo))
        except MdmError as exc:
            self._abandon(slices.values())
            if build is not None:
                build.close(self._cache)
            reason = StageFailed(exc.reason if isinstance(exc, StageFailed) else str(exc))
            return {job: reason for job in todo if job not in results}
        except BaseException:
            self._abandon(slices.values())
            if build is not None:
                build.close(self._cache)
            raise
        done: dict[_Job, Path | StageFailed] = {}
        if build is not None:
            done[build.job] = self._finish_volume(build)
        for job in volumes:
            if job not in results and job not in done:
                done[job] = self._publish(todo[job], functools.partial(self._volume, todo[job], datasets))
        done.update(self._finish_slices(slices, missing))
        return done

    def _series_image(self, path: Path, uids: tuple[str, str, str]) -> Dataset | None:
        """A retrieved image of the series, read here for its volume; None (logged) if it is
        not the image its name says."""
        ds = pydicom.dcmread(path)
        try:
            workers.check_uids(ds, uids)
        except MdmError:
            log.warning("retrieve: left out an image that is not the one its name says")
            return None
        return ds

    def _whole_series(self, todo: dict[_Job, Entry]) -> bool:
        """Whether the batch holds every slice the catalog knows of its series: then the PACS is
        asked for the series (one C-GET, much faster than a list of its SOP UIDs), and images
        of it no job of the batch waits for are left out (``_received``)."""
        held = {entry.guid for entry in todo.values() if entry.kind != "volume"}
        directory = next(iter(todo.values())).lfn.rpartition("/")[0]
        return set(self._catalog.index.series_images(directory)) <= held

    def _publish(self, entry: Entry, produce: Callable[[], bytes]) -> Path | StageFailed:
        try:
            payload = produce()
            if self._stopping.is_set():
                raise _Abandoned
            pinned = self._catalog.stages.pinned_guids(_now())
            path = self._cache.publish(entry.guid, entry.content_version, payload, pinned)
        except MdmError as exc:
            return StageFailed(exc.reason if isinstance(exc, StageFailed) else str(exc))
        log.info("staged %s: %d bytes", self._label(entry), len(payload))
        return path

    def _series_classes(self, volume: Entry) -> frozenset[str]:
        rows = self._catalog.index.series_images(volume.lfn.rpartition("/")[0])
        return frozenset(self._catalog.index.sop_classes(list(rows)).values())

    def _label(self, entry: Entry) -> str:
        """How logs and messages name a file: never with the PACS's original UIDs."""
        return entry.lfn if self._config.site.uids == "deidentified" else f"guid:{entry.guid}"

    def _pacs(self) -> PacsClient:
        """This worker's PACS client: its association is reused from one job to the next."""
        client = getattr(self._local, "pacs", None)
        if client is None:
            client = self._local.pacs = PacsClient(self._config.pacs)
            with self._lock:
                self._clients.append(client)
        return client

    def _retrieve_iter(
        self, study: str, series: str, sops: Sequence[str] | None, classes: frozenset[str], spool: Path,
        partial: list[str] | None = None,
    ) -> Iterator[tuple[str, Path]]:
        """The retrieved images' (SOP Instance UID, file in ``spool``) as they arrive (C-MOVE's
        one port held meanwhile)."""
        pacs = self._pacs()
        if self._move_lock is None:
            yield from pacs.retrieve_files(study, series, sops, classes, spool, partial)
            return
        with self._move_lock:
            yield from pacs.retrieve_files(study, series, sops, classes, spool, partial)

    def _retrieve_instances(
        self, study: str, series: str, sops: list[str], classes: frozenset[str],
        received: Callable[[str, Path], None], spool: Path, whole: bool,
    ) -> dict[str, str]:
        """Hand each image of ``sops`` to ``received`` as it arrives; why each missing one is missing.

        With ``whole``, the series is asked for (``_whole_series``). A request the PACS refuses
        as a whole is split (a series into its UIDs, a list in halves) until the refused UIDs
        stand alone: k refused files of n cost about k·log2(n) more requests."""
        got: set[str] = set()
        missing: dict[str, str] = {}
        unique = list(dict.fromkeys(sops))

        def ask(part: list[str] | None) -> None:
            partial: list[str] = []
            try:
                for sop, path in self._retrieve_iter(study, series, part, classes, spool, partial):
                    got.add(sop)
                    received(sop, path)
            except RetrieveRefused as exc:
                if part is None:
                    log.info("%s; asking for the series' images by their UIDs", exc)
                    by_uids()
                elif len(part) == 1:
                    missing[part[0]] = str(exc)
                else:
                    ask(part[: len(part) // 2])
                    ask(part[len(part) // 2:])
                return
            for sop in unique if part is None else part:
                if sop not in got:
                    missing[sop] = partial[0] if partial else f"{self._pacs().name} did not send it (not in the PACS?)"

        def by_uids() -> None:
            todo = [sop for sop in unique if sop not in got]
            for start in range(0, len(todo), MAX_UIDS_PER_RETRIEVE):
                ask(todo[start:start + MAX_UIDS_PER_RETRIEVE])

        if whole:
            ask(None)
        else:
            by_uids()
        return missing

    # -- slices through the protection pool ---------------------------------------------

    def _plan_slices(self, todo: dict[_Job, Entry], results: dict[_Job, Path | StageFailed]) -> dict[str, _Slice]:
        """The batch's slices by the PACS's SOP Instance UID, each with its recorded options
        (a slice whose options cannot be had fails here, into ``results``)."""
        slices: dict[str, _Slice] = {}
        for job, entry in todo.items():
            try:
                options = self._options(entry)
            except StageFailed as exc:
                results[job] = exc
                continue
            source = parse_pfn(entry.pfn)
            slices[source.sop or ""] = _Slice(job, entry, key_name(entry.guid, entry.content_version), options,
                                              (source.study, source.series, source.sop or ""))
        return slices

    def _fetch_first_keys(self, slices: list[_Slice]) -> Future[dict[str, bytes | MdmError]] | None:
        """The slices' keys, fetched and combined in the process pool while the PACS sends the
        images (``workers.fetch_keys``): a share of them per worker, each share in one request
        per key server."""
        if not slices or self._keys is None:
            return None
        names = [item.name for item in slices]
        step = -(-len(names) // workers.size())
        parts = [workers.submit(workers.fetch_keys, self._key_servers, names[start:start + step])
                 for start in range(0, len(names), step)]

        def gathered() -> dict[str, bytes | MdmError]:
            found: dict[str, bytes | MdmError] = {}
            for part in parts:
                try:
                    keys, calls = part.result()
                except MdmError:
                    raise
                except Exception as exc:  # a dead worker: these keys' files fail, with the reason
                    raise _protection_failure(exc) from None
                found.update(keys)
                for call in calls:
                    emit(call)
            return found

        return self._keys.submit(gathered)

    def _received(self, slices: dict[str, _Slice], keys: Future[dict[str, bytes | MdmError]] | None,
                  pinned: list[set[str]], sop: str, path: Path) -> None:
        """A retrieved image: if a slice of the batch, to a worker that reads it, checks that it is
        that slice's image and protects it into its cache file; any other is left out, never
        published (a series retrieved whole brings slices no job of the batch waits for)."""
        item = slices.get(sop)
        if item is None or item.future is not None or item.failure is not None or keys is None:
            return
        try:
            key = keys.result()[item.name]
        except MdmError as exc:
            key = exc
        if not isinstance(key, bytes):
            item.failure = _key_failure(key, _Produced())
            return
        entry = item.entry
        try:
            if not pinned:  # asked once per batch, when the first image arrives
                pinned.append(self._catalog.stages.pinned_guids(_now()))
            item.partial = self._cache.reserve(entry.guid, entry.content_version, entry.size or 0, pinned[0])
        except MdmError as exc:
            item.failure = StageFailed(str(exc))
            return
        item.source = path
        task = workers.ProtectTask(path, self._secret, item.options, key, entry.guid, entry.content_version,
                                   str(item.partial), sync=False, expected=item.uids)
        item.future = workers.submit(workers.protect, task)

    def _finish_slices(self, slices: dict[str, _Slice], missing: dict[str, str]) -> dict[_Job, Path | StageFailed]:
        """Publish each slice whose protected bytes are the catalog's (size and adler32), as
        its worker finishes and its file is fsynced; the others try the other combinations
        of key shares."""
        results: dict[_Job, Path | StageFailed] = {}
        running: dict[Future[Any], _Slice] = {}
        for sop, item in slices.items():
            if item.failure is not None:
                results[item.job] = item.failure
            elif item.future is None:
                results[item.job] = StageFailed(missing.get(sop, f"{self._pacs().name} did not send the image"))
            else:
                running[item.future] = item
        mismatched: list[_Slice] = []
        syncing: dict[Future[Any], _Slice] = {}
        protecting: set[Future[Any]] = set(running)
        published = 0
        # Futures are taken in the order they finish, from a queue: ``wait`` on all those left
        # costs O(n) a slice (1000 slices: 0.8 s of this thread, as py-spy showed).
        finished_ones: queue.SimpleQueue[Future[Any]] = queue.SimpleQueue()
        for future in protecting:
            future.add_done_callback(finished_ones.put)
        try:
            # One slice is published as soon as its file is fsynced, while others are still protected.
            while protecting or syncing:
                finished = finished_ones.get()
                if finished in syncing:
                    if self._commit_slice(syncing.pop(finished), finished, results):
                        published += 1
                    continue
                protecting.discard(finished)
                item = running[finished]
                assert item.partial is not None
                try:
                    protected = finished.result()
                except Exception as exc:  # a worker's failure is this file's, never the batch's
                    self._cache.cancel(item.partial)
                    results[item.job] = _protection_failure(exc)
                    continue
                if protected.size != item.entry.size or protected.adler32 != item.entry.adler32:
                    self._cache.cancel(item.partial)
                    mismatched.append(item)
                    continue
                assert self._syncs is not None
                synced = self._syncs.submit(_fsync, item.partial)
                syncing[synced] = item
                synced.add_done_callback(finished_ones.put)
        except BaseException:
            for pending in syncing:
                pending.cancel()
            self._abandon(item for item in running.values() if item.job not in results)
            raise
        finally:
            if published:
                self._cache.sync()
        if mismatched:
            results.update(self._verify_each_key(mismatched))
        return results

    def _commit_slice(self, item: _Slice, synced: Future[Any], results: dict[_Job, Path | StageFailed]) -> bool:
        """Publish a verified slice whose file was fsynced; whether it was."""
        entry = item.entry
        assert item.partial is not None
        if self._stopping.is_set():
            raise _Abandoned
        try:
            synced.result()
            results[item.job] = self._cache.commit(entry.guid, entry.content_version, item.partial, sync=False)
        except OSError as exc:
            self._cache.cancel(item.partial)
            results[item.job] = StageFailed(str(write_failure(self._cache.directory, exc)))
            return False
        except MdmError as exc:
            results[item.job] = StageFailed(str(exc))
            return False
        self._published(item.job, cast(Path, results[item.job]))
        log.info("staged %s: %d bytes", self._label(entry), entry.size)
        return True

    def _published(self, job: _Job, path: Path) -> None:
        """Answer the job's waiters here now, before the rest of the batch is done."""
        job.path = path
        job.done.set()

    def _abandon(self, slices: Iterable[_Slice]) -> None:
        """Stop the slices under way: wait for their workers, remove what they wrote."""
        for item in slices:
            if item.future is not None and not item.future.cancel():
                try:
                    item.future.result()
                except Exception:  # noqa: BLE001  (abandoned: its outcome no longer matters)
                    log.debug("an abandoned protection failed", exc_info=True)
            if item.partial is not None:
                self._cache.cancel(item.partial)

    def _verify_each_key(self, slices: list[_Slice]) -> dict[_Job, Path | StageFailed]:
        """Slices whose bytes under the first combination of key shares are not the catalog's:
        protect them in process with each combination in turn (a wrong share), and tell the
        content from the shares when none matches."""
        results: dict[_Job, Path | StageFailed] = {}
        by_name = {item.name: item for item in slices}
        produced = {name: _Produced() for name in by_name}
        images = {name: workers.read_image(cast(Path, item.source)) for name, item in by_name.items()}

        def matches(name: str, key: bytes) -> bool:
            item = by_name[name]
            entry, ds = item.entry, images[name]
            payload = protect_image(ds, self._secret, item.options, key, entry.guid, entry.content_version).payload
            produced[name].tries += 1
            produced[name].payloads[key] = payload
            return len(payload) == entry.size and _adler32(payload) == entry.adler32

        keys = self._keystore.fetch_keys(list(by_name), matches)
        for name, item in by_name.items():
            key = keys[name]
            if isinstance(key, bytes):
                payload = produced[name].payloads[key]
                results[item.job] = self._publish(item.entry, functools.partial(bytes, payload))
            else:
                results[item.job] = _key_failure(key, produced[name])
        return results

    def _options(self, entry: Entry) -> AnonymizationOptions:
        """The options the entry was registered with: a changed [anonymization] applies to new
        registrations only. Packaged rules that changed since cannot give the same bytes."""
        if entry.protection is None:
            return self._config.anonymization  # registered before protection records existed
        options, rules = recorded_options(entry.protection)
        if rules != rules_version():
            raise StageFailed(
                f"protected with anonymization rules {rules}, this storage element has {rules_version()}:"
                " re-issue it with 'mdm register --reprotect'"
            )
        return options

    # -- the series volume, slice by slice into its file ----------------------------------

    def _start_volume(
        self, volumes: list[_Job], todo: dict[_Job, Entry], results: dict[_Job, Path | StageFailed]
    ) -> _VolumeBuild | None:
        """The batch's ``3D``, planned from the catalog's Image rows (as at registration) into
        a temporary file of the cache, which the retrieved images then fill one by one; its
        key fetched meanwhile. None without a ``3D`` (or when it fails here, into ``results``)."""
        job = next((job for job in volumes if todo[job].sop_uid == VOLUME), None)
        if job is None:
            return None
        entry = todo[job]
        directory = entry.lfn.rpartition("/")[0]
        rows = self._catalog.index.series_images(directory)
        listing = self._catalog.namespace.list_dir(directory)
        sops = {e.guid: parse_pfn(e.pfn).sop for e in (listing.entries if listing else []) if e.kind != "volume"}
        guids = [guid for guid in rows if sops.get(guid)]
        try:
            plan = plan_volume([rows[guid] for guid in guids]).in_format(self._config.volume.format)
            plain = self._cache.reserve(entry.guid, entry.content_version, plan.file_size(self._config.volume.format),
                                        self._catalog.stages.pinned_guids(_now()))
        except NotAVolume as exc:
            results[job] = StageFailed(f"not a volume: {exc.reason}")
            return None
        except MdmError as exc:
            results[job] = StageFailed(str(exc))
            return None
        fd = os.open(plain, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            writer = VolumeWriter(plan, self._config.volume.format, fd)
        except BaseException:
            os.close(fd)
            self._cache.cancel(plain)
            raise
        key = None
        if entry.adler32 is not None and self._keys is not None:
            key = self._keys.submit(self._keystore.fetch_keys, [key_name(entry.guid, entry.content_version)],
                                    _first_key)
        return _VolumeBuild(job, entry, writer, plain, fd, {sops[guid] or "": i for i, guid in enumerate(guids)}, key)

    def _finish_volume(self, build: _VolumeBuild) -> Path | StageFailed:
        """Encrypt the filled volume file into the cache file, check it (a restage: against the
        catalog; a first assembly: records it), publish it."""
        entry = build.entry
        try:
            if build.writer.missing:
                total = len(build.writer.plan.sources)
                raise StageFailed(f"{self._pacs().name} sent {total - build.writer.missing} of the {total} slices"
                                  " of the series")
            if self._stopping.is_set():
                raise _Abandoned
            partial = self._encrypted_volume(build)
            path = self._cache.commit(entry.guid, entry.content_version, partial)
        except MdmError as exc:
            return StageFailed(exc.reason if isinstance(exc, StageFailed) else str(exc))
        finally:
            build.close(self._cache)
        log.info("staged %s: %d bytes", self._label(entry), entry.size or 0)
        return path

    def _encrypted_volume(self, build: _VolumeBuild) -> Path:
        """The fsynced cache file of the volume, encrypted from its plain file under its key."""
        entry = build.entry
        version, name = entry.content_version, key_name(entry.guid, entry.content_version)
        if entry.adler32 is None:
            # First assembly of this version: its key is born here, and its checksum recorded.
            key = new_file_key()
            readers = tuple(a.dn for a in entry.acl if a.perms & 4)
            self._keystore.put_key(name, key, key_acl(entry.owner, entry.vo, entry.mode, readers))
            partial, sums = self._encrypt_plain(build, key, with_sha256=True)
            if entry.size is not None and sums.size != entry.size:
                self._cache.cancel(partial)
                raise StageFailed(f"the assembled volume has {sums.size} bytes, not the {entry.size} announced")
            if not self._catalog.namespace.set_checksum(entry.guid, version, sums.size, sums.adler32, sums.sha256):
                self._cache.cancel(partial)
                raise StageFailed("the series changed while its volume was assembled; stage it again")
            return partial
        first = build.key.result()[name] if build.key is not None else None
        if isinstance(first, bytes):
            partial, sums = self._encrypt_plain(build, first)
            if sums.size == entry.size and sums.adler32 == entry.adler32:
                return partial
            self._cache.cancel(partial)
        produced = _Produced()
        found: list[Path] = []

        def matches(_: str, key: bytes) -> bool:
            partial, sums = self._encrypt_plain(build, key)
            produced.tries += 1
            produced.payloads[key] = f"{sums.size}:{sums.adler32}".encode()
            if sums.size == entry.size and sums.adler32 == entry.adler32:
                found.append(partial)
                return True
            self._cache.cancel(partial)
            return False

        result = self._keystore.fetch_keys([name], matches)[name]
        if isinstance(result, bytes):
            return found[0]
        raise _key_failure(result, produced)

    def _encrypt_plain(self, build: _VolumeBuild, key: bytes, with_sha256: bool = False) -> tuple[Path, _Sums]:
        """Encrypt the plain volume file into a new cache file (fsynced), summing what it writes."""
        entry = build.entry
        size = encrypted_size(build.writer.size)
        pinned = self._catalog.stages.pinned_guids(_now())
        partial = self._cache.reserve(entry.guid, entry.content_version, size, pinned)
        try:
            with open(build.plain, "rb") as src, open(partial, "wb") as out:
                sums = _Sums(out, hashlib.sha256() if with_sha256 else None)
                encrypt_stream(key, uuid.UUID(entry.guid).bytes, entry.content_version, src,
                               cast(IO[bytes], sums), size=build.writer.size)
                out.flush()
                os.fsync(out.fileno())
        except OSError as exc:
            self._cache.cancel(partial)
            raise StageFailed(str(write_failure(self._cache.directory, exc))) from None
        except BaseException:
            self._cache.cancel(partial)
            raise
        return partial, sums

    def _volume(self, entry: Entry, datasets: list[Dataset]) -> bytes:
        """The series volume, or one of its sidecars (by its name), assembled and encrypted."""
        try:
            rows = None  # a sidecar from the catalog's rows: what the served slices keep
            if entry.sop_uid not in (VOLUME, COMPRESSED_VOLUME):
                rows = list(self._catalog.index.series_images(entry.lfn.rpartition("/")[0]).values())
            plain = series_file(entry.sop_uid, datasets, self._config.volume.format, rows)
        except NotAVolume as exc:
            raise StageFailed(f"not a volume: {exc.reason}") from None
        version, key_id = entry.content_version, uuid.UUID(entry.guid).bytes
        name = key_name(entry.guid, version)
        if entry.adler32 is None:
            # First assembly of this version: its key is born here, and its checksum recorded.
            key = new_file_key()
            readers = tuple(a.dn for a in entry.acl if a.perms & 4)
            self._keystore.put_key(name, key, key_acl(entry.owner, entry.vo, entry.mode, readers))
            payload = bytes(encrypt_bytes(key, key_id, version, plain))
            if entry.size is not None and len(payload) != entry.size:
                raise StageFailed(
                    f"the assembled volume has {len(payload)} bytes, not the {entry.size} announced"
                )
            checksums = (len(payload), _adler32(payload), hashlib.sha256(payload).hexdigest())
            if not self._catalog.namespace.set_checksum(entry.guid, version, *checksums):
                raise StageFailed("the series changed while its volume was assembled; stage it again")
            return payload
        produced = _Produced()

        def matches(_: str, key: bytes) -> bool:
            payload = bytes(encrypt_bytes(key, key_id, version, plain))
            produced.tries += 1
            produced.payloads[key] = payload
            return len(payload) == entry.size and _adler32(payload) == entry.adler32

        found = self._keystore.fetch_keys([name], matches)[name]
        if isinstance(found, bytes):
            return produced.payloads[found]
        raise _key_failure(found, produced)


def _batch_of(guid: str, entry: Entry | None) -> str:
    """What a batch groups by: the PACS's study and series of an entry (a GUID alone if unknown)."""
    if entry is None:
        return guid
    try:
        source = parse_pfn(entry.pfn)
    except MdmError:
        return guid
    return f"{source.study}/{source.series}"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _protection_failure(exc: Exception) -> StageFailed:
    """Why a worker could not protect a slice, in one line (never the image's values)."""
    if isinstance(exc, MdmError):
        return StageFailed(str(exc))
    if isinstance(exc, BrokenProcessPool):
        return StageFailed("a protection worker stopped (killed or out of memory); stage the file again")
    log.error("protecting a slice failed: %s", exc.__class__.__name__)
    return StageFailed(f"internal error ({exc.__class__.__name__})")


def _key_failure(error: MdmError, produced: _Produced) -> StageFailed:
    """When no key's protected bytes match the catalog, tell whether the content or the key
    shares are to blame."""
    if isinstance(error, KeystoreError):
        if produced.tries > 1 and len(set(produced.payloads.values())) == 1:
            return StageFailed(CONTENT_DIFFERS)  # consistent shares, other bytes
        if produced.tries == 1:
            return StageFailed(f"{CONTENT_DIFFERS}, or a key server returned a wrong share")
    return StageFailed(f"key servers: {error}")
