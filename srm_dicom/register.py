"""Registration, the hospital side's write path: from a DICOM header to a catalog entry.

Every entry point hands files or data sets to ``Registrar.register_many`` (files, a PACS
index walk) or ``Registrar.register`` (one pushed image). Each image is read and checked,
anonymized and encrypted once (``srm_dicom.prepare``, in a worker process for a batch: to record the
true size and adler32 of what grid clients will get), stored into the PACS when asked, its
key's shares put on the key servers, and the slice, its metadata, the erased header values
and its series volume cataloged; a batch's images share one association, one bulk key
request per server and one transaction. Idempotent: an unchanged image adds nothing; a
changed one bumps its content version.
"""

from __future__ import annotations

import logging
import os
import posixpath
import stat
import time
import uuid
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import BrokenExecutor, Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydicom.dataset import Dataset

from srm_dicom import workers
from srm_dicom.anonymize import protection_record
from srm_dicom.catalog import Catalog, Entry, Outcome
from srm_dicom.config import Config
from srm_dicom.crypto.container import encrypted_size
from srm_dicom.entry_key import key_acl, key_name
from srm_dicom.errors import MdmError, PacsError
from srm_dicom.keystore import Acl
from srm_dicom.metadata_schema import ImageMetadata
from srm_dicom.names import SERIES_FILES, VOLUME, UidTriple, normalize_lfn, pfn
from srm_dicom.prepare import REQUIRED_UIDS, Job, Prepared, Settings, Source, prepare, read_dicom
from srm_dicom.rights import parse_mode
from srm_dicom.sidecar import BVAL, BVEC, JSON, has_diffusion, series_file_from_rows
from srm_dicom.uids import deidentify_uid
from srm_dicom.volume import NotAVolume, plan_volume

if TYPE_CHECKING:
    from srm_dicom.keystore.client import KeystoreClient
    from srm_dicom.pacs.client import PacsClient

log = logging.getLogger(__name__)

@dataclass
class Summary:
    """What a batch did, per outcome, with the reason of every failure."""

    counts: dict[Outcome, int] = field(default_factory=lambda: dict.fromkeys(Outcome, 0))
    failures: list[tuple[str, str]] = field(default_factory=list)
    # Files a directory walk met that are not for registering (README, NIfTI, DICOMDIR, a
    # FIFO): counted by reason, never failures (README, "mdm register").
    skipped: dict[str, int] = field(default_factory=dict)

    def add(self, outcome: Outcome) -> None:
        self.counts[outcome] += 1

    def fail(self, source: str, reason: str) -> None:
        self.failures.append((source, reason))

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1

    def line(self) -> str:
        parts = [f"{n} {o.value}" for o, n in self.counts.items()]
        parts.append(f"{len(self.failures)} failed")
        parts += [f"{n} skipped ({reason})" for reason, n in sorted(self.skipped.items())]
        return ", ".join(parts)


# Images per batch: at most one association opening, one bulk put per key server and one
# catalog transaction each. Large enough that those round trips vanish per image, small enough
# that results (and the progress bar) come regularly and a failed batch redoes little.
BATCH = 64
# Images handed to the protection workers ahead of the one being stored: two batches keep them
# busy while this process stores and commits one.
WINDOW = 2 * BATCH


@dataclass(frozen=True)
class Result:
    """What registering one source did: its outcome and LFN, or why it failed."""

    source: Source
    lfn: str | None = None
    outcome: Outcome | None = None
    error: MdmError | None = None


@dataclass(frozen=True)
class _Staged:
    """An image on its way through a batch: prepared, not yet stored or cataloged."""

    source: Source
    lfn: str
    prepared: Prepared
    known: Entry | None


@dataclass(frozen=True)
class _Record:
    """What one staged image writes: its key's shares and its catalog rows."""

    staged: _Staged
    key_id: str
    acl: Acl
    entry: Entry
    metadata: ImageMetadata
    volume: Entry
    sidecars: list[Entry]


@dataclass(frozen=True)
class _Flight:
    """A batch stored into the PACS whose keys and catalog rows are on their way."""

    items: list[Result | _Staged]
    failed: dict[int, Result]  # by id of the staged image: stored, then failed alone
    cataloged: Future[dict[int, Result]]
    lfns: set[str]

    def results(self) -> Iterator[Result]:
        """Every image's result in order, once the batch is cataloged (raises what cataloging raised)."""
        cataloged = self.cataloged.result()
        for item in self.items:
            if isinstance(item, Result):
                yield item
            elif id(item) in self.failed:
                yield self.failed[id(item)]
            elif id(item) in cataloged:
                yield cataloged[id(item)]


class Registrar:
    """Registers images for one site: names them, protects them, stores them into the PACS,
    puts their keys on the key servers and catalogs them.

    ``register_many`` is the pipeline (README, "What registration does to an image"):
    images are prepared (read, named, anonymized, encrypted) a window ahead, with ``pool`` in
    the worker processes of ``srm_dicom.workers``;
    each batch of ``BATCH`` is then stored into the PACS over the one kept association, its
    keys go to the key servers in one bulk request each, and it is cataloged in one
    transaction. ``register`` is the same for one image."""

    def __init__(
        self,
        config: Config,
        catalog: Catalog,
        pacs: PacsClient | None,
        keystore: KeystoreClient,
        owner: str | None = None,
        pool: bool = False,
    ) -> None:
        self._config = config
        self._catalog = catalog
        self._pacs = pacs
        self._keystore = keystore
        self._owner = owner or config.site.registrar
        self._mode = parse_mode(config.site.file_mode)
        self._secret = config.site.secret_bytes
        self._pool = pool
        self._settings = Settings(self._secret, config.anonymization, config.site.uids == "original")
        # Inside ``batch``: the series volumes whose size is planned when the batch ends.
        self._deferred: set[str] | None = None

    @contextmanager
    def batch(self) -> Iterator[None]:
        """Register many images: each touched series volume's size is planned once, when the
        batch ends, instead of from the whole series at every image (n²/2 catalog rows for an
        n-image series). Meanwhile the volumes list no size, as a series not yet one volume does."""
        if self._deferred is not None:  # already in a batch: join it
            yield
            return
        self._deferred = set()
        try:
            yield
        finally:
            volumes, self._deferred = self._deferred, None
            planned = {volume_lfn: self._series_sizes(volume_lfn) for volume_lfn in sorted(volumes)}
            with self._catalog.backend.transaction():
                for volume_lfn, sizes in planned.items():
                    directory = posixpath.dirname(volume_lfn)
                    for name in SERIES_FILES:  # a sidecar the series does not have is not bumped
                        self._catalog.namespace.bump_volume(posixpath.join(directory, name), sizes.get(name),
                                                            time.time())

    def lfn(self, ds: Dataset) -> str:
        """The LFN an image is (or would be) registered under, from its checked header."""
        original = (str(ds.get(k)).strip() for k in REQUIRED_UIDS)
        if self._config.site.uids == "original":
            return UidTriple(*original).lfn(self._config.site.vo)
        return UidTriple(*(deidentify_uid(self._secret, uid) for uid in original)).lfn(self._config.site.vo)

    def register(self, ds: Dataset, store_in_pacs: bool, reprotect: bool = False) -> Outcome:
        """Register one image. Raises MdmError with the reason if it cannot be registered;
        then nothing is cataloged and no key is left on the key servers. ``reprotect``: an
        unchanged image protected with other options than [anonymization] now says gets a
        new content version protected with the current ones."""
        (result,) = self._pipeline([ds], store_in_pacs, reprotect, pool=False)
        if result.error is not None:
            raise result.error
        assert result.outcome is not None  # a result without an error has its outcome
        return result.outcome

    def register_many(
        self, sources: Iterable[Source], store_in_pacs: bool, reprotect: bool = False
    ) -> Iterator[Result]:
        """Register files and data sets, a result for each, in their order, as batches complete.
        A failed image is its result's error; a PACS failure (down, refusing) raises PacsError
        once the images stored before it are cataloged."""
        with self.batch():
            yield from self._pipeline(sources, store_in_pacs, reprotect, self._pool, overlap=True)

    def _pipeline(
        self, sources: Iterable[Source], store_in_pacs: bool, reprotect: bool, pool: bool, overlap: bool = False
    ) -> Iterator[Result]:
        """Results in the order of ``sources``, a batch at a time. With ``overlap``, the stages
        run side by side: while the workers prepare the batches ahead, this thread stores batch
        N+1 into the PACS (storescu or the kept association: waiting, mostly) while a thread of
        its own puts batch N's keys and catalogs it. Each batch still goes PACS, keys, catalog
        in that order (README, "What registration does to an image"). An image met twice (the
        same LFN) ends the batch before it, and waits until the first is cataloged, so the
        second meets the first in the catalog."""
        cataloger = ThreadPoolExecutor(1, thread_name_prefix="mdm-catalog") if overlap else None
        flights: deque[_Flight] = deque()
        try:
            for pending, lfns in self._batches(self._prepared(sources, pool)):
                if any(lfns & flight.lfns for flight in flights):
                    while flights:
                        yield from flights.popleft().results()
                items = self._stage(pending, reprotect)
                stored, failed, error = self._send([item for item in items if isinstance(item, _Staged)],
                                                   store_in_pacs)
                if cataloger is None:
                    cataloged: Future[dict[int, Result]] = Future()
                    cataloged.set_result(self._catalog_batch(stored))
                else:
                    cataloged = cataloger.submit(self._catalog_batch, stored)
                flights.append(_Flight(items, failed, cataloged, lfns))
                while len(flights) > (1 if error is None else 0):
                    yield from flights.popleft().results()
                if error is not None:
                    raise error
            while flights:
                yield from flights.popleft().results()
        finally:
            if cataloger is not None:  # a batch not yet cataloged is left as a kill would leave it
                cataloger.shutdown(wait=True, cancel_futures=True)

    def _batches(
        self, prepared: Iterable[tuple[Source, Prepared | MdmError]]
    ) -> Iterator[tuple[list[tuple[Source, Prepared | MdmError]], set[str]]]:
        """The prepared images in batches of ``BATCH`` LFNs, with their LFNs; an LFN met again
        ends the batch before it."""
        pending: list[tuple[Source, Prepared | MdmError]] = []
        lfns: set[str] = set()
        for source, item in prepared:
            if isinstance(item, Prepared):
                lfn = self._lfn(item)
                if lfn in lfns:
                    yield pending, lfns
                    pending, lfns = [], set()
                lfns.add(lfn)
            pending.append((source, item))
            if len(lfns) >= BATCH:
                yield pending, lfns
                pending, lfns = [], set()
        if pending:
            yield pending, lfns

    def _lfn(self, prepared: Prepared) -> str:
        return normalize_lfn(UidTriple(*prepared.names).lfn(self._config.site.vo))

    def _stage(self, pending: list[tuple[Source, Prepared | MdmError]], reprotect: bool) -> list[Result | _Staged]:
        """Tell new, changed and unchanged images apart with one catalog lookup: a result for
        those that are done (failed, unchanged), the others staged for the PACS and the catalog."""
        known = self._catalog.namespace.lookup_many(
            [self._lfn(prepared) for _, prepared in pending if isinstance(prepared, Prepared)]
        )
        record = protection_record(self._config.anonymization)
        items: list[Result | _Staged] = []
        for source, prepared in pending:
            if isinstance(prepared, MdmError):
                items.append(Result(source, error=prepared))
                continue
            lfn = self._lfn(prepared)
            entry = known.get(lfn)
            if entry is not None and entry.source_digest == prepared.digest and (
                not reprotect or entry.protection == record
            ):
                items.append(Result(source, lfn, Outcome.UNCHANGED))
                continue
            if entry is not None:  # a changed image: protected again under its entry's GUID, next version
                prepared = prepare(Job(source, self._settings, entry.guid, entry.content_version + 1))
                if isinstance(prepared, MdmError):
                    items.append(Result(source, lfn, error=prepared))
                    continue
            if prepared.failure is not None:
                items.append(Result(source, lfn, error=prepared.failure))
                continue
            items.append(_Staged(source, lfn, prepared, entry))
        return items

    def _prepared(self, sources: Iterable[Source], pool: bool) -> Iterator[tuple[Source, Prepared | MdmError]]:
        """``prepare`` of every source, in order: here, or in the worker processes
        (``srm_dicom.workers``) at most ``WINDOW`` ahead. A job whose worker died is prepared
        here: the pool is replaced for the next ones."""
        jobs = (Job(source, self._settings) for source in sources)
        if not pool:
            for job in jobs:
                yield job.source, prepare(job)
            return
        pending: deque[tuple[Job, Future[Prepared | MdmError]]] = deque()

        def first() -> tuple[Source, Prepared | MdmError]:
            job, future = pending.popleft()
            try:
                return job.source, future.result()
            except BrokenExecutor:
                log.warning("a protection worker died; preparing an image in process")
                return job.source, prepare(job)

        for job in jobs:
            pending.append((job, workers.submit(workers.prepare, job)))
            if len(pending) >= WINDOW:
                yield first()
        while pending:
            yield first()

    def _send(
        self, batch: list[_Staged], store_in_pacs: bool
    ) -> tuple[list[_Staged], dict[int, Result], PacsError | None]:
        """Store a batch into the PACS: the images stored, in order, the results of those that
        failed alone (by ``id``), and a PACS failure, which stops the storing (the images stored
        before it are still cataloged; the caller raises it after their results). With the
        dcmtk engine storescu sends the files first; the rest go over the kept association,
        opened for their contexts only if there is a rest."""
        if not batch or not store_in_pacs:
            return batch, {}, None
        if self._pacs is None:
            error = MdmError("no PACS connection to store the image into")
            return [], {id(staged): Result(staged.source, staged.lfn, error=error) for staged in batch}, None
        stored: list[_Staged] = []
        failed: dict[int, Result] = {}
        try:
            sent = self._pacs.store_files([
                (staged.source, staged.prepared.sop_class, staged.prepared.transfer_syntax)
                for staged in batch if isinstance(staged.source, Path) and staged.prepared.as_read
            ])
            rest = {id(staged) for staged in batch if not (isinstance(staged.source, Path) and staged.source in sent)}
            if rest:
                self._pacs.offer({(staged.prepared.sop_class, staged.prepared.transfer_syntax)
                                  for staged in batch if id(staged) in rest})
            for staged in batch:
                try:
                    if id(staged) in rest:
                        self._store(staged)
                except PacsError:
                    raise
                except MdmError as exc:  # a file that changed or vanished since it was prepared
                    failed[id(staged)] = Result(staged.source, staged.lfn, error=exc)
                else:
                    stored.append(staged)
        except PacsError as exc:
            return stored, failed, exc
        return stored, failed, None

    def _store(self, staged: _Staged) -> None:
        assert self._pacs is not None  # checked by the caller
        source, prepared = staged.source, staged.prepared
        if isinstance(source, Path):
            if prepared.as_read:
                self._pacs.store_file(source, prepared.sop_class, prepared.transfer_syntax)
                return
            source = read_dicom(source)
        self._pacs.store(source)

    def _catalog_batch(self, batch: list[_Staged]) -> dict[int, Result]:
        """Put the batch's keys (one bulk request per key server), then catalog it in one
        transaction; if that fails, image by image, so one image's conflict fails it alone.
        A key whose image is not cataloged is deleted again."""
        if not batch:
            return {}
        diffusion: dict[str, bool] = {}
        records = [self._record(staged, diffusion) for staged in batch]
        try:
            self._keystore.put_keys([(r.key_id, r.staged.prepared.key, r.acl) for r in records])
        except MdmError as exc:
            return {id(r.staged): Result(r.staged.source, r.staged.lfn, error=exc) for r in records}
        outcomes: list[Outcome | MdmError]
        try:
            with self._catalog.backend.transaction():
                outcomes = [self._catalog_one(r) for r in records]
        except MdmError:
            outcomes = [self._catalog_alone(r) for r in records]
        except BaseException:
            for r in records:
                self._forget_key(r.key_id)
            raise
        results: dict[int, Result] = {}
        for r, outcome in zip(records, outcomes, strict=True):
            staged = r.staged
            if isinstance(outcome, MdmError) or outcome is Outcome.UNCHANGED:
                self._forget_key(r.key_id)  # nothing written, or another writer got there first
            elif staged.known is not None:
                self._forget_key(key_name(staged.known.guid, staged.known.content_version))
            if isinstance(outcome, MdmError):
                results[id(staged)] = Result(staged.source, staged.lfn, error=outcome)
                continue
            if self._deferred is not None:
                self._deferred.add(r.volume.lfn)
            log.debug("%s %s", outcome.value, staged.lfn)
            results[id(staged)] = Result(staged.source, staged.lfn, outcome)
        return results

    def _catalog_one(self, r: _Record) -> Outcome:
        return self._catalog.register_image(r.entry, r.metadata, r.volume, r.sidecars)

    def _catalog_alone(self, r: _Record) -> Outcome | MdmError:
        try:
            return self._catalog_one(r)
        except MdmError as exc:
            return exc

    def _record(self, staged: _Staged, diffusion: dict[str, bool]) -> _Record:
        """The key and the catalog rows of a staged image; outside a batch, its series volume's
        size planned now, from the series' rows and this image's. ``diffusion``: whether each
        series met so far in this batch is a diffusion one (asked of the catalog once)."""
        prepared, known = staged.prepared, staged.known
        assert prepared.metadata is not None  # staged images are protected
        site, pacs = self._config.site, self._config.pacs
        owner, mode = (known.owner, known.mode) if known else (self._owner, self._mode)
        metadata_mode = site.metadata_mode
        if prepared.burned_in:  # burned_in = "private": the owner and the register group only
            mode, metadata_mode = mode & 0o700, "private"
        study, series, sop = prepared.names
        original = prepared.metadata.dicom
        common: dict[str, Any] = dict(owner=owner, vo=site.vo, mode=mode, metadata_mode=metadata_mode)
        entry = Entry(
            lfn=staged.lfn,
            guid=prepared.guid,
            pfn=pfn(pacs.aet, pacs.host, pacs.port, original["study_uid"], original["series_uid"], original["sop_uid"]),
            kind="slice",
            study_uid=study,
            series_uid=series,
            sop_uid=sop,
            size=prepared.size,
            adler32=prepared.adler32,
            sha256=prepared.sha256,
            content_version=prepared.version,
            source_digest=prepared.digest,
            protection=protection_record(self._config.anonymization),
            **common,
        )
        volume_lfn = UidTriple(study, series, VOLUME).lfn(site.vo)
        image = prepared.metadata.image
        sizes = self._series_sizes(volume_lfn, prepared.guid, image) if self._deferred is None else {}
        volume = Entry(
            lfn=volume_lfn,
            guid=str(uuid.uuid4()),
            pfn=pfn(pacs.aet, pacs.host, pacs.port, original["study_uid"], original["series_uid"]),
            kind="volume",
            study_uid=study,
            series_uid=series,
            sop_uid=VOLUME,
            size=sizes.get(VOLUME),
            **common,
        )
        sidecars = [
            replace(volume, lfn=f"{volume_lfn}{suffix}", guid=str(uuid.uuid4()), sop_uid=f"{VOLUME}{suffix}",
                    size=sizes.get(f"{VOLUME}{suffix}"))
            for suffix in self._sidecar_suffixes(image, volume_lfn, diffusion)
        ]
        readers = tuple(a.dn for a in known.acl if a.perms & 4) if known else ()
        return _Record(staged, key_name(prepared.guid, prepared.version), key_acl(owner, site.vo, mode, readers),
                       entry, prepared.metadata, volume, sidecars)

    def _series_sizes(self, volume_lfn: str, guid: str | None = None, image: dict | None = None) -> dict[str, int]:
        """The sizes of the series volume and its sidecars once this slice (if any) is in, from
        the rows alone: listings are true before the first assembly. Empty when the series is
        not (yet) one volume: staging will say why."""
        rows = self._catalog.index.series_images(posixpath.dirname(volume_lfn))
        if guid is not None and image is not None:
            rows[guid] = image
        series_rows = list(rows.values())
        try:
            plan = plan_volume(series_rows)
            sizes = {VOLUME: encrypted_size(plan.file_size(self._config.volume.format))}
            sizes[JSON] = encrypted_size(len(series_file_from_rows(JSON, series_rows, plan)))
            if any(has_diffusion(row) for row in series_rows):
                for name in (BVAL, BVEC):
                    sizes[name] = encrypted_size(len(series_file_from_rows(name, series_rows, plan)))
        except NotAVolume:
            return {}
        return sizes

    def _sidecar_suffixes(self, image: dict, volume_lfn: str, diffusion: dict[str, bool]) -> list[str]:
        """Every volume has its JSON sidecar; a diffusion series (this image has a b-value,
        or an earlier one had) also its b-values and vectors; with [volume] gzip, 3D.nii.gz,
        whose size is known only once compressed (its first assembly, README "Volumes")."""
        if volume_lfn not in diffusion:
            diffusion[volume_lfn] = self._catalog.namespace.lookup(f"{volume_lfn}.bval") is not None
        diffusion[volume_lfn] = diffusion[volume_lfn] or has_diffusion(image)
        suffixes = [".json"]
        if diffusion[volume_lfn]:
            suffixes += [".bval", ".bvec"]
        if self._config.volume.gzip:
            suffixes.append(".nii.gz")
        return suffixes

    def _forget_key(self, name: str) -> None:
        """Best effort: a share left behind unlocks nothing the catalog still names."""
        try:
            self._keystore.delete_key(name)
        except MdmError as exc:
            log.warning("key %s left on key servers: %s", name, exc)


NOT_DICOM = "not DICOM"
NOT_REGULAR = "not a regular file"


def iter_files(paths: Iterable[Path], summary: Summary) -> Iterator[Path]:
    """Files under the given paths, recursively and sorted; unreadable directories are reported.

    Only regular files are yielded: opening a FIFO or a device would wait forever. One a walk
    meets is skipped; one named on the command line is a failure."""
    for path in paths:
        kind = _kind(path)
        if kind == "file":
            yield path
        elif kind == "directory":
            def report(error: OSError) -> None:
                summary.fail(str(error.filename), f"cannot read directory: {error.strerror}")

            for root, dirs, files in os.walk(path, onerror=report):
                dirs.sort()
                for name in sorted(files):
                    found = Path(root) / name
                    if _kind(found) == "other":
                        summary.skip(NOT_REGULAR)
                    else:
                        yield found  # a dangling link too: reading it says so
        elif kind == "other":
            summary.fail(str(path), NOT_REGULAR)
        else:
            summary.fail(str(path), "no such file or directory")


def _kind(path: Path) -> str:
    """file | directory | other (FIFO, socket, device) | missing, links followed."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return "missing"  # a dangling link too
    if stat.S_ISREG(mode):
        return "file"
    return "directory" if stat.S_ISDIR(mode) else "other"
