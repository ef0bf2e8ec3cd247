"""The stager: SRM prepareToGet over a PACS playing the role of tape.

Staging a file means retrieving its images from the PACS over DICOM, protecting them
exactly as registration did (so the bytes match the catalog's size and adler32, which
is checked before anything is published) and publishing them in the disk cache. Every
request for a file not yet on disk, a GET or a stage request, joins one job per GUID
(single flight), run by a bounded pool of workers that each keep one PACS association.

Stage requests, their per-file states and their pins live in the catalog, so they
survive a restart: on start, leftovers of interrupted staging are removed from the
cache and every file some request still waits for is staged again.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
import uuid
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

from srm_dicom.cache import DiskCache
from srm_dicom.catalog import (
    COMPLETED,
    FAILED,
    STARTED,
    Catalog,
    Entry,
    StageFile,
    StageRequest,
)
from srm_dicom.config import Config
from srm_dicom.crypto.container import encrypt_bytes, new_file_key
from srm_dicom.errors import InvalidInput, MdmError, NotFound
from srm_dicom.events import StageFinished, StageQueueChanged, emit
from srm_dicom.keystore import KeystoreError
from srm_dicom.keystore.client import KeystoreClient
from srm_dicom.names import Pfn, normalize_lfn, parse_pfn
from srm_dicom.pacs.client import PacsClient
from srm_dicom.protect import key_acl, key_name, protect_image
from srm_dicom.sidecar import series_file
from srm_dicom.volume import NotAVolume

log = logging.getLogger(__name__)

DISK_AND_TAPE, TAPE = "DISK_AND_TAPE", "TAPE"
CONTENT_DIFFERS = "the PACS returned different content than was registered"


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
    """The stager is stopping: leave the file's state as it is, to be resumed at the next start."""


@dataclass
class _Job:
    """One staging of one GUID, shared by everyone waiting for it."""

    guid: str
    done: threading.Event = field(default_factory=threading.Event)
    path: Path | None = None
    error: StageFailed | None = None


def _now() -> int:
    return int(time.time())


def _adler32(data: bytes | bytearray) -> str:
    return f"{zlib.adler32(data):08x}"


class Stager:
    """Stages catalog entries into the disk cache; see the module docstring."""

    def __init__(self, config: Config, catalog: Catalog, keystore: KeystoreClient) -> None:
        self._config = config
        self._catalog = catalog
        self._keystore = keystore
        self._secret = config.site.secret_bytes
        self._cache = DiskCache(config.path(config.cache.dir), config.cache.quota_bytes)
        self._lock = threading.Lock()
        self._jobs: dict[str, _Job] = {}
        self._pool: ThreadPoolExecutor | None = None
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
        self._pool = ThreadPoolExecutor(self._config.cache.workers, thread_name_prefix="stager")
        pending = self._catalog.stages.staging_guids()
        for guid in pending:
            self._job(guid)
        if pending:
            log.info("stager: resumed staging of %d files", len(pending))

    def stop(self) -> None:
        """Finish the retrievals under way without publishing them; queued ones stay queued
        in the catalog for the next start."""
        self._stopping.set()
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
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
        """The cached file, staging it first if needed and waiting up to ``timeout`` seconds."""
        path = self.cached_path(entry)
        if path is not None:
            return path
        job = self._job(entry.guid)
        if not job.done.wait(timeout):
            raise StagingPending(f"{self._label(entry)} is being staged from the PACS; try again later")
        if job.error is not None:
            raise job.error
        assert job.path is not None
        return job.path

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
        self._catalog.stages.add_stage_request(request)
        for file in files:
            if file.state != COMPLETED:
                self._job(file.guid)
        return request.id

    def request(self, request_id: str) -> StageRequest | None:
        """The request with each file's state and whether it is on disk now."""
        found = self._catalog.stages.stage_request(request_id)
        if found is None:
            return None
        return replace(found, files=tuple(replace(f, on_disk=self._on_disk(f.guid)) for f in found.files))

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

    # -- jobs ------------------------------------------------------------------------

    def _job(self, guid: str) -> _Job:
        """The running job for ``guid``, or a new one queued on the pool."""
        with self._lock:
            job = self._jobs.get(guid)
            if job is not None:
                return job
            if self._pool is None:
                raise MdmError("the stager is not running")
            job = self._jobs[guid] = _Job(guid)
            self._pool.submit(self._run, job)
            emit(StageQueueChanged(len(self._jobs)))
            return job

    def _run(self, job: _Job) -> None:
        started = time.monotonic()
        try:
            job.path = self._stage(job.guid)
            self._catalog.stages.set_stage_state(job.guid, COMPLETED, _now())
        except _Abandoned:
            job.error = StageFailed("the storage element stopped before staging finished")
        except MdmError as exc:
            reason = exc.reason if isinstance(exc, StageFailed) else str(exc)
            job.error = StageFailed(reason)
            self._catalog.stages.set_stage_state(job.guid, FAILED, _now(), reason)
            log.warning("staging guid:%s failed: %s", job.guid, reason)
        except Exception as exc:  # a bug must fail the waiters, not hang them
            reason = f"internal error ({exc.__class__.__name__})"
            job.error = StageFailed(reason)
            self._catalog.stages.set_stage_state(job.guid, FAILED, _now(), reason)
            log.error("staging guid:%s failed: %s", job.guid, reason)
        finally:
            with self._lock:
                if self._jobs.get(job.guid) is job:
                    del self._jobs[job.guid]
                emit(StageQueueChanged(len(self._jobs)))
            emit(StageFinished(time.monotonic() - started, job.error.reason if job.error else None))
            job.done.set()

    def _stage(self, guid: str) -> Path:
        if self._stopping.is_set():
            raise _Abandoned
        entry = self._catalog.namespace.lookup_guid(guid)
        if entry is None:
            raise StageFailed("the file is no longer registered")
        path = self._cache.path(guid, entry.content_version)
        if path is not None:
            return path
        self._catalog.stages.set_stage_state(guid, STARTED, _now())
        started = time.monotonic()
        source = parse_pfn(entry.pfn)
        payload = self._volume(entry, source) if entry.kind == "volume" else self._slice(entry, source)
        if self._stopping.is_set():
            raise _Abandoned
        path = self._cache.publish(guid, entry.content_version, payload, self._catalog.stages.pinned_guids(_now()))
        log.info("staged %s: %d bytes in %.2f s", self._label(entry), len(payload), time.monotonic() - started)
        return path

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

    def _retrieve(self, source: Pfn) -> list:
        pacs = self._pacs()
        if self._move_lock is None:
            return list(pacs.retrieve(source.study, source.series, source.sop))
        with self._move_lock:
            return list(pacs.retrieve(source.study, source.series, source.sop))

    def _slice(self, entry: Entry, source: Pfn) -> bytes:
        datasets = self._retrieve(source)
        if len(datasets) != 1:
            raise StageFailed(f"{self._pacs().name} returned {len(datasets)} images instead of one")
        ds = datasets[0]
        version = entry.content_version
        produced: dict[bytes, bytes] = {}

        def matches(key: bytes) -> bool:
            payload = protect_image(ds, self._secret, self._config.anonymization, key, entry.guid, version).payload
            produced[key] = payload
            return len(payload) == entry.size and _adler32(payload) == entry.adler32

        key = self._fetch_key(key_name(entry.guid, version), matches, produced)
        return produced[key]

    def _volume(self, entry: Entry, source: Pfn) -> bytes:
        """The series volume, or one of its sidecars (by its name), assembled and encrypted."""
        datasets = self._retrieve(source)
        try:
            plain = series_file(entry.sop_uid, datasets, self._config.volume.format)
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
        produced: dict[bytes, bytes] = {}

        def matches(key: bytes) -> bool:
            payload = bytes(encrypt_bytes(key, key_id, version, plain))
            produced[key] = payload
            return len(payload) == entry.size and _adler32(payload) == entry.adler32

        return produced[self._fetch_key(name, matches, produced)]

    def _fetch_key(self, name: str, matches: Callable[[bytes], bool], produced: dict[bytes, bytes]) -> bytes:
        """The key whose protected bytes match the catalog; when none does, tell whether the
        content or the key shares are to blame."""
        tries = 0

        def counted(key: bytes) -> bool:
            nonlocal tries
            tries += 1
            return matches(key)

        try:
            return self._keystore.fetch_key(name, counted)
        except KeystoreError as exc:
            if tries > 1 and len(produced) == 1:
                raise StageFailed(CONTENT_DIFFERS) from None  # consistent shares, other bytes
            if tries == 1:
                raise StageFailed(f"{CONTENT_DIFFERS}, or a key server returned a wrong share") from None
            raise StageFailed(f"key servers: {exc}") from None
