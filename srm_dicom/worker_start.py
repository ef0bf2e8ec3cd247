"""What a protection worker sets up before its first task, done once in the fork server.

Imported by the fork server of ``srm_dicom/workers.py`` only (its preload), never by the
server: it protects one small made-up image, so that the lazy imports and caches a first
protection sets up (pydicom's writers and character sets, the cipher; a first protection
cost 17-27 ms of CPU against 6 for the next, issue 9) are in the fork server, and every
worker forked from it has them. A failure here is no worker's: it is ignored, and the
first task pays as before.
"""

from __future__ import annotations

import logging
import uuid
from io import BytesIO

from pydicom import Dataset, dcmwrite
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage

from srm_dicom.anonymization_options import AnonymizationOptions
from srm_dicom.workers import ProtectTask, protect

log = logging.getLogger(__name__)


def _sample() -> bytes:
    """A Part-10 image of one 16-bit pixel, with the attributes the anonymizer changes."""
    ds = Dataset()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID = "2.25.1", "2.25.2", "2.25.3"
    ds.PatientName, ds.PatientID, ds.StudyDate, ds.StudyTime = "Sample^Image", "sample", "20000101", "000000"
    ds.Modality, ds.StudyDescription, ds.InstanceNumber = "OT", "sample", 1
    ds.Rows = ds.Columns = ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation, ds.BitsAllocated, ds.BitsStored, ds.HighBit = "MONOCHROME2", 16, 16, 15
    ds.PixelRepresentation, ds.PixelData = 0, b"\0\0"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    out = BytesIO()
    dcmwrite(out, ds, enforce_file_format=True)
    return out.getvalue()


def _protect_once() -> None:
    try:
        protect(ProtectTask(_sample(), b"\0" * 32, AnonymizationOptions(), b"\0" * 32, str(uuid.UUID(int=0)), 1))
    except Exception:  # noqa: BLE001 - a warm-up: the first real task pays instead
        log.debug("protection warm-up failed", exc_info=True)


_protect_once()
