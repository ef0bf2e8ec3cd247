"""Registration, the hospital side's write path: from a DICOM header to a catalog entry.

Every entry point (files, a PACS index walk, a DICOM push) hands datasets to
``Registrar.register``, which reads the header, anonymizes and encrypts the image once
(to record the true size and adler32 of what grid clients will get), stores it into the
PACS when asked, puts its key's shares on the key servers, and catalogs the slice, its
metadata, the erased header values and its series volume in one transaction.
Idempotent: an unchanged image adds nothing; a changed one bumps its content version.
"""

from __future__ import annotations

import hashlib
import logging
import os
import posixpath
import stat
import struct
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import UID

from srm_dicom.anonymize import burned_in_reason, protection_record
from srm_dicom.catalog import Catalog, Entry, Outcome
from srm_dicom.config import Config
from srm_dicom.crypto.container import encrypted_size, new_file_key
from srm_dicom.errors import InvalidInput, MdmError
from srm_dicom.metadata import extract_metadata
from srm_dicom.names import SERIES_FILES, VOLUME, UidTriple, is_uid, pfn
from srm_dicom.protect import key_acl, key_name, protect_image
from srm_dicom.rights import parse_mode
from srm_dicom.sidecar import BVAL, BVEC, JSON, has_diffusion, series_file_from_rows
from srm_dicom.uids import deidentify_uid
from srm_dicom.volume import NotAVolume, plan_volume

if TYPE_CHECKING:
    from srm_dicom.keystore.client import KeystoreClient
    from srm_dicom.pacs.client import PacsClient

log = logging.getLogger(__name__)

_REQUIRED_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")


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


def dataset_digest(ds: Dataset) -> str:
    """Digest of the encoded data set without its file meta, so a file and the same image
    received over the network (whose file meta differs) are recognised as one object."""
    buffer = DicomBytesIO()
    transfer_syntax = ds.file_meta.TransferSyntaxUID
    buffer.is_little_endian = transfer_syntax.is_little_endian
    buffer.is_implicit_VR = transfer_syntax.is_implicit_VR
    write_dataset(buffer, ds)
    return hashlib.sha256(buffer.getvalue()).hexdigest()


# What pydicom raises when a value it read leniently is converted, re-encoded or re-typed
# (a private element's VR from the dictionary): the file's fault, not ours.
# What a value that breaks its VR raises on its way through the anonymizer and pydicom's writer:
# the converters' errors, pydicom's OSError wrapping a struct.error on write, and AttributeError
# where a value of another type (a PersonName in a UI element) stands where a string was expected.
_VALUE_ERRORS = (ValueError, TypeError, OverflowError, NotImplementedError, struct.error, OSError, AttributeError)


@contextmanager
def _values_of_the_file(step: str) -> Iterator[None]:
    """Turn a malformed value met while the image is processed into one reason for the file."""
    try:
        yield
    except _VALUE_ERRORS as exc:
        raise InvalidInput(f"a header value cannot be {step} ({exc.__class__.__name__})") from None


def decode_fully(ds: Dataset) -> None:
    """Decode every element now, nested sequences included. pydicom decodes values lazily, on
    first access, and a malformed value then raises whatever its converter raises
    (ValueError, TypeError, OverflowError, NotImplementedError, struct.error...): decoded
    here, at the boundary, that is one reason for the file instead of a traceback later."""
    tag = None
    try:
        for element in ds.iterall():
            tag = element.tag
    except Exception as exc:  # pydicom's converters raise many types on corrupt input
        where = f" after element {tag}" if tag is not None else ""
        raise InvalidInput(f"corrupt DICOM element{where} ({exc.__class__.__name__})") from None


def check_header(ds: Dataset) -> None:
    """Refuse a data set the catalog cannot name: one of the three UIDs missing or malformed."""
    decode_fully(ds)
    if "TransferSyntaxUID" not in getattr(ds, "file_meta", Dataset()):
        raise InvalidInput("no transfer syntax in the file meta information")
    syntax = ds.file_meta.TransferSyntaxUID
    if not isinstance(syntax, UID) or not syntax.is_transfer_syntax:  # a mangled meta may hold a list
        raise InvalidInput("the file meta names no known transfer syntax")
    for keyword in _REQUIRED_UIDS:
        value = str(ds.get(keyword, "") or "").strip()
        if not value:
            raise InvalidInput(f"missing {keyword}")
        if not is_uid(value):
            raise InvalidInput(f"{keyword} is not a valid UID")


class Registrar:
    """Registers images for one site: names them, protects them, stores them into the PACS,
    puts their keys on the key servers and catalogs them."""

    def __init__(
        self,
        config: Config,
        catalog: Catalog,
        pacs: PacsClient | None,
        keystore: KeystoreClient,
        owner: str | None = None,
    ) -> None:
        self._config = config
        self._catalog = catalog
        self._pacs = pacs
        self._keystore = keystore
        self._owner = owner or config.site.registrar
        self._mode = parse_mode(config.site.file_mode)
        self._secret = config.site.secret_bytes
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
            for volume_lfn in sorted(volumes):
                sizes = self._series_sizes(volume_lfn)
                directory = posixpath.dirname(volume_lfn)
                for name in SERIES_FILES:  # a sidecar the series does not have is not bumped
                    self._catalog.namespace.bump_volume(posixpath.join(directory, name), sizes.get(name), time.time())

    def _names(self, ds: Dataset) -> tuple[str, str, str]:
        original = tuple(str(ds.get(k)).strip() for k in _REQUIRED_UIDS)
        if self._config.site.uids == "original":
            return original  # type: ignore[return-value]
        return tuple(deidentify_uid(self._secret, uid) for uid in original)  # type: ignore[return-value]

    def lfn(self, ds: Dataset) -> str:
        """The LFN an image is (or would be) registered under, from its checked header."""
        return UidTriple(*self._names(ds)).lfn(self._config.site.vo)

    def register(self, ds: Dataset, store_in_pacs: bool, reprotect: bool = False) -> Outcome:
        """Register one image. Raises MdmError with the reason if it cannot be registered;
        then nothing is cataloged and no key is left on the key servers. ``reprotect``: an
        unchanged image protected with other options than [anonymization] now says gets a
        new content version protected with the current ones."""
        check_header(ds)
        options = self._config.anonymization
        burned_in = burned_in_reason(ds)
        if burned_in and options.burned_in == "refuse":
            raise InvalidInput(f"refused: {burned_in} ([anonymization] burned_in = \"refuse\")")
        study, series, sop = self._names(ds)
        site, pacs = self._config.site, self._config.pacs
        lfn = UidTriple(study, series, sop).lfn(site.vo)
        with _values_of_the_file("encoded"):
            digest = dataset_digest(ds)
        record = protection_record(options)
        known = self._catalog.namespace.lookup(lfn)
        if known is not None and known.source_digest == digest and (not reprotect or known.protection == record):
            return Outcome.UNCHANGED
        guid = known.guid if known else str(uuid.uuid4())
        version = known.content_version + 1 if known else 1
        owner, mode = (known.owner, known.mode) if known else (self._owner, self._mode)
        metadata_mode = site.metadata_mode
        if burned_in:  # burned_in = "private": the owner and the register group only
            mode, metadata_mode = mode & 0o700, "private"
        key = new_file_key()
        with _values_of_the_file("anonymized"):
            protected = protect_image(ds, self._secret, options, key, guid, version)
        with _values_of_the_file("read for the metadata"):
            metadata = extract_metadata(ds, self._secret, served=protected.served)
        if store_in_pacs:
            if self._pacs is None:
                raise MdmError("no PACS connection to store the image into")
            self._pacs.store(ds)
        original = metadata.dicom
        common: dict[str, Any] = dict(owner=owner, vo=site.vo, mode=mode, metadata_mode=metadata_mode)
        entry = Entry(
            lfn=lfn,
            guid=guid,
            pfn=pfn(pacs.aet, pacs.host, pacs.port, original["study_uid"], original["series_uid"], original["sop_uid"]),
            kind="slice",
            study_uid=study,
            series_uid=series,
            sop_uid=sop,
            size=protected.size,
            adler32=protected.adler32,
            sha256=protected.sha256,
            content_version=version,
            source_digest=digest,
            protection=record,
            **common,
        )
        volume_lfn = UidTriple(study, series, VOLUME).lfn(site.vo)
        volume = Entry(
            lfn=volume_lfn,
            guid=str(uuid.uuid4()),
            pfn=pfn(pacs.aet, pacs.host, pacs.port, original["study_uid"], original["series_uid"]),
            kind="volume",
            study_uid=study,
            series_uid=series,
            sop_uid=VOLUME,
            size=None,
            **common,
        )
        # Inside a batch, the sizes are planned when it ends.
        sizes = self._series_sizes(volume_lfn, guid, metadata.image) if self._deferred is None else {}
        volume = replace(volume, size=sizes.get(VOLUME))
        sidecars = [
            replace(volume, lfn=f"{volume_lfn}{suffix}", guid=str(uuid.uuid4()), sop_uid=f"{VOLUME}{suffix}",
                    size=sizes.get(f"{VOLUME}{suffix}"))
            for suffix in self._sidecar_suffixes(metadata.image, volume_lfn)
        ]
        erased = tuple((e.path, e.keyword, e.value) for e in protected.erased)
        readers = tuple(a.dn for a in known.acl if a.perms & 4) if known else ()
        self._keystore.put_key(key_name(guid, version), key, key_acl(owner, site.vo, mode, readers))
        try:
            outcome = self._catalog.register_image(entry, replace(metadata, erased=erased), volume, sidecars)
        except BaseException:
            self._forget_key(key_name(guid, version))
            raise
        if known is not None:
            self._forget_key(key_name(guid, known.content_version))
        if self._deferred is not None:
            self._deferred.add(volume_lfn)
        log.debug("%s %s", outcome.value, lfn)
        return outcome

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

    def _sidecar_suffixes(self, image: dict, volume_lfn: str) -> list[str]:
        """Every volume has its JSON sidecar; a diffusion series (this image has a b-value,
        or an earlier one had) also its b-values and vectors; with [volume] gzip, 3D.nii.gz,
        whose size is known only once compressed (its first assembly, README "Volumes")."""
        suffixes = [".json"]
        if has_diffusion(image) or self._catalog.namespace.lookup(f"{volume_lfn}.bval") is not None:
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
DICOMDIR = "DICOMDIR"
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"


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


def read_dicom(path: Path) -> Dataset:
    """Read a whole Part-10 file (or a bare data set), turning every failure into one reason."""
    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError:
        raise NotDicom("not a DICOM file") from None
    except PermissionError:
        raise InvalidInput("permission denied") from None
    except (OSError, EOFError) as exc:
        raise InvalidInput(f"cannot read: {exc.__class__.__name__}") from None
    except Exception as exc:  # pydicom raises many types on corrupt input
        raise InvalidInput(f"corrupt or truncated DICOM ({exc.__class__.__name__})") from None
    if "TransferSyntaxUID" not in getattr(ds, "file_meta", Dataset()):
        raise InvalidInput("not a DICOM Part-10 file (no file meta information)")
    if str(ds.file_meta.get("MediaStorageSOPClassUID", "")) == MEDIA_STORAGE_DIRECTORY:
        raise NotAnImage(DICOMDIR)
    _check_complete(ds)  # first: it reads the raw elements' declared lengths
    decode_fully(ds)
    return ds


class NotDicom(InvalidInput):
    """Not a DICOM file at all (a README, a NIfTI volume): skipped in a walk."""


class NotAnImage(InvalidInput):
    """A readable file that is no image to register (a DICOMDIR): skipped in a walk."""


def _check_complete(ds: Dataset) -> None:
    """pydicom stops quietly at a short read; a truncated file shows as a last element
    shorter than its declared length, or as an image without its pixel data."""
    if len(ds):
        last = ds.get_item(list(ds.keys())[-1])
        declared = getattr(last, "length", 0xFFFFFFFF)
        if declared != 0xFFFFFFFF and isinstance(last.value, bytes) and len(last.value) < declared:
            raise InvalidInput("truncated DICOM file")
    is_image = "Rows" in ds or "Image" in getattr(ds.get("SOPClassUID"), "name", "")
    if is_image and not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise InvalidInput("truncated DICOM file (image without pixel data)")
