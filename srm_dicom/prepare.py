"""One image read, checked, named and protected: what registration does with each image before
the PACS, the key servers and the catalog see it (README, "What registration does to an image").

The CPU-bound part of registering, run in the protection workers for a batch
(``srm_dicom.workers.prepare``), so this module is what their fork server imports: pydicom, the
anonymizer, the metadata reader and the encryption, and nothing of the catalog, the PACS client
or the key servers. ``srm_dicom.register`` runs the rest of the pipeline.
"""

from __future__ import annotations

import hashlib
import struct
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.tag import BaseTag, Tag
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

from srm_dicom.anonymization_options import AnonymizationOptions
from srm_dicom.anonymize import burned_in_reason
from srm_dicom.crypto.container import new_file_key
from srm_dicom.encode import encode_dataset
from srm_dicom.errors import InvalidInput, MdmError
from srm_dicom.metadata import extract_metadata
from srm_dicom.metadata_schema import ImageMetadata
from srm_dicom.names import is_uid
from srm_dicom.protect import protect_image
from srm_dicom.uids import deidentify_uid

REQUIRED_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
# Checked with them: the SOP class is no part of the name, but the catalog records it and the
# PACS store offers it (a data set without one is refused here, not mid-way).
_CHECKED_UIDS = (*REQUIRED_UIDS, "SOPClassUID")
_NOT_IN_A_DATA_SET = ((0x0000, "command-set elements"), (0x0002, "file meta elements"))
DICOMDIR = "DICOMDIR"
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"

def dataset_digest(ds: Dataset) -> str:
    """Digest of the encoded data set without its file meta, so a file and the same image
    received over the network (whose file meta differs) are recognised as one object. The
    bytes are pydicom's ``write_dataset``'s (``srm_dicom.encode``), as the catalog's digests are."""
    transfer_syntax = ds.file_meta.TransferSyntaxUID
    encoded = encode_dataset(ds, transfer_syntax.is_implicit_VR, transfer_syntax.is_little_endian)
    return hashlib.sha256(encoded).hexdigest()


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


def decode_fully(ds: Dataset) -> Dataset:
    """Decode every element now, nested sequences included. pydicom decodes values lazily, on
    first access, and a malformed value then raises whatever its converter raises
    (ValueError, TypeError, OverflowError, NotImplementedError, struct.error...): decoded
    here, at the boundary, that is one reason for the file instead of a traceback later.

    The values are decoded in a copy of the element table: ``ds`` keeps its elements as read,
    which pydicom's writer copies as they are. The anonymizer keeps them so, as staging (which
    never decodes them) does, and the digest and the served file cost a copy of the bytes
    instead of encoding every value again (issue 9, "Registration as a pipeline").

    Returns the decoded copy, with the file meta of ``ds``: the metadata is read from it, so
    that no value is decoded twice."""
    implicit, little = ds.original_encoding
    tag = None
    try:
        # Iterating a Dataset yields its elements, decoded: its keys are the tags, left as they
        # are. get_item decodes an element whose raw value is None (an empty one) in ``ds``.
        probe = Dataset({key: ds.get_item(key) for key in ds.keys()})  # noqa: SIM118
        probe.set_original_encoding(implicit, little, ds.original_character_set)
        for element in probe.iterall():
            tag = element.tag
    except Exception as exc:  # pydicom's converters raise many types on corrupt input
        where = f" after element {tag}" if tag is not None else ""
        raise InvalidInput(f"corrupt DICOM element{where} ({exc.__class__.__name__})") from None
    if hasattr(ds, "file_meta"):
        probe.file_meta = ds.file_meta
    return probe


def check_header(ds: Dataset, decoded: Dataset | None = None) -> Dataset:
    """Refuse a data set the catalog cannot name or record: one of the three UIDs or the SOP
    Class UID missing or malformed. ``decoded``: what ``decode_fully`` made of it already (a
    file read); returned."""
    if decoded is None:
        decoded = decode_fully(ds)
    if "TransferSyntaxUID" not in getattr(ds, "file_meta", Dataset()):
        raise InvalidInput("no transfer syntax in the file meta information")
    syntax = ds.file_meta.TransferSyntaxUID
    if not isinstance(syntax, UID) or not syntax.is_transfer_syntax:  # a mangled meta may hold a list
        raise InvalidInput("the file meta names no known transfer syntax")
    # PS3.10: neither the command group nor the file meta is part of a stored data set (pydicom
    # reads them there but will not write them, and the anonymizer records the meta's as well).
    for group, what in _NOT_IN_A_DATA_SET:
        if ds.group_dataset(group):
            raise InvalidInput(f"holds {what} (group {group:04X}), which no stored data set may")
    for keyword in _CHECKED_UIDS:  # read in ``decoded``: ``ds`` keeps its elements as read
        value = str(decoded.get(keyword, "") or "").strip()
        if not value:
            raise InvalidInput(f"missing {keyword}")
        if not is_uid(value):
            raise InvalidInput(f"{keyword} is not a valid UID")
    return decoded



Source = Path | Dataset


@dataclass(frozen=True)
class Settings:
    """What protecting an image needs of the site's config; sent with every job to a worker."""

    secret: bytes
    options: AnonymizationOptions
    original_uids: bool


@dataclass(frozen=True)
class Job:
    """One image to prepare: a file (read in the worker) or a data set received over DICOM.
    ``guid`` None: a new entry, with a fresh GUID and version 1."""

    source: Source
    settings: Settings
    guid: str | None = None
    version: int = 1


@dataclass(frozen=True)
class Prepared:
    """One image read, named, protected and described: what the PACS, the key servers and the
    catalog need of it, small enough to come back from a worker (the payload stays there).
    ``failure``: why it could not be protected; it still counts as unchanged when the catalog
    already holds the same image."""

    names: tuple[str, str, str]  # study, series, SOP of the LFN
    digest: str
    burned_in: str | None
    sop_class: str
    transfer_syntax: str
    as_read: bool  # a file whose bytes go to the PACS as they are (PacsClient.store_file)
    guid: str = ""
    version: int = 1
    key: bytes = b""
    size: int = 0
    adler32: str = ""
    sha256: str = ""
    metadata: ImageMetadata | None = None
    failure: MdmError | None = None


def prepare(job: Job) -> Prepared | MdmError:
    """Read, check, name, digest and protect one image: the CPU-bound part of registering,
    run in a worker process for a batch (a module-level function, so it pickles). A new image
    is protected under a fresh GUID before the catalog is asked whether it is new: one trip to
    a worker per image, and the rare image that turns out to be a changed one is protected again
    under its entry's GUID (``Registrar._staged``)."""
    try:
        if isinstance(job.source, Path):
            ds, decoded = _read(job.source)
            check_header(ds, decoded)
        else:
            ds = job.source
            decoded = check_header(ds)
        settings = job.settings
        # Values are read in ``decoded``, never in ``ds``: pydicom decodes an element in place on
        # access, and the writer then re-encodes it in its normal form (b" CT " as b"CT"), which
        # staging, reading the image as the PACS sends it, would not do: other protected bytes.
        burned_in = burned_in_reason(decoded)
        if burned_in and settings.options.burned_in == "refuse":
            raise InvalidInput(f"refused: {burned_in} ([anonymization] burned_in = \"refuse\")")
        original = tuple(str(decoded.get(k)).strip() for k in REQUIRED_UIDS)
        names = original if settings.original_uids else tuple(deidentify_uid(settings.secret, u) for u in original)
        with _values_of_the_file("encoded"):
            digest = dataset_digest(ds)
        named = Prepared(
            names=names,  # type: ignore[arg-type]  # three UIDs
            digest=digest,
            burned_in=burned_in,
            sop_class=str(decoded.SOPClassUID),
            transfer_syntax=str(ds.file_meta.TransferSyntaxUID),
            as_read=isinstance(job.source, Path) and _sendable_as_read(decoded, ds),
        )
    except MdmError as exc:
        return exc
    try:
        return _protect(named, ds, decoded, job)
    except MdmError as exc:
        return replace(named, failure=exc)


def _protect(named: Prepared, ds: Dataset, decoded: Dataset, job: Job) -> Prepared:
    settings, guid, key = job.settings, job.guid or str(uuid.uuid4()), new_file_key()
    with _values_of_the_file("anonymized"):
        protected = protect_image(ds, settings.secret, settings.options, key, guid, job.version)
    with _values_of_the_file("read for the metadata"):
        metadata = extract_metadata(decoded, settings.secret, served=_decoded_view(protected.served, ds, decoded))
    erased = tuple((e.path, e.keyword, e.value) for e in protected.erased)
    return replace(
        named, guid=guid, version=job.version, key=key, size=protected.size, adler32=protected.adler32,
        sha256=protected.sha256, metadata=replace(metadata, erased=erased),
    )


def _decoded_view(served: Dataset, ds: Dataset, decoded: Dataset) -> Dataset:
    """``served`` with each element the anonymizer kept as read (the very element of ``ds``)
    replaced by its decoded twin from ``decoded``: the same values, not decoded again. As it is
    when its character set is not that of ``ds`` (its text would decode otherwise)."""
    if served._character_set != decoded._character_set:
        return served
    elements: dict[BaseTag, Any] = {}
    for tag in served.keys():  # noqa: SIM118 - the tags; iterating the data set would decode it
        element = served.get_item(tag, keep_deferred=True)
        elements[tag] = decoded.get_item(tag) if element is ds.get_item(tag, keep_deferred=True) else element
    view = Dataset(elements)
    implicit, little = served.original_encoding
    view.set_original_encoding(implicit, little, served.original_character_set)
    view.file_meta = served.file_meta
    return view


def _sendable_as_read(decoded: Dataset, ds: Dataset) -> bool:
    """Whether the file's own bytes are the image the PACS must receive: its file meta names the
    data set's SOP class and instance, and the data set is encoded as the meta says (pydicom
    reads some files leniently; those are sent as decoded, re-encoded in their syntax)."""
    meta = ds.file_meta
    syntax = meta.TransferSyntaxUID
    return (
        str(meta.get("MediaStorageSOPClassUID", "")) == str(decoded.SOPClassUID)
        and str(meta.get("MediaStorageSOPInstanceUID", "")) == str(decoded.SOPInstanceUID)
        and syntax != DeflatedExplicitVRLittleEndian
        and tuple(ds.original_encoding) == (syntax.is_implicit_VR, syntax.is_little_endian)
    )


def read_dicom(path: Path) -> Dataset:
    """Read a whole Part-10 file (or a bare data set), turning every failure into one reason."""
    return _read(path)[0]


def _read(path: Path) -> tuple[Dataset, Dataset]:
    """``read_dicom``, and what ``decode_fully`` made of the data set."""
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
    decode_fully(ds.file_meta)  # decoded lazily too, and read below and at every step after
    if str(ds.file_meta.get("MediaStorageSOPClassUID", "")) == MEDIA_STORAGE_DIRECTORY:
        raise NotAnImage(DICOMDIR)
    check_complete(ds)  # first: it reads the raw elements' declared lengths
    return ds, decode_fully(ds)


class NotDicom(InvalidInput):
    """Not a DICOM file at all (a README, a NIfTI volume): skipped in a walk."""


class NotAnImage(InvalidInput):
    """A readable file that is no image to register (a DICOMDIR): skipped in a walk."""


def check_complete(ds: Dataset) -> None:
    """pydicom stops quietly at a short read; a truncated file shows as a last element
    shorter than its declared length, or as an image without its pixel data."""
    if len(ds):
        last = ds.get_item(list(ds.keys())[-1], keep_deferred=True)  # raw: decode_fully decodes it
        declared = getattr(last, "length", 0xFFFFFFFF)
        if declared != 0xFFFFFFFF and isinstance(last.value, bytes) and len(last.value) < declared:
            raise InvalidInput("truncated DICOM file")
    try:  # decoded before decode_fully: a corrupt SOP Class UID is this file's reason too; in a
        # copy of the element, as decode_fully does, so that ``ds`` keeps it as read
        sop_class = Dataset({tag: ds.get_item(tag) for tag in (Tag(0x00080016),) if tag in ds}).get("SOPClassUID")
    except Exception as exc:  # pydicom's converters raise many types on corrupt input
        raise InvalidInput(f"corrupt DICOM element (0008,0016) ({exc.__class__.__name__})") from None
    is_image = "Rows" in ds or "Image" in getattr(sop_class, "name", "")
    if is_image and not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise InvalidInput("truncated DICOM file (image without pixel data)")
