"""A built-in synthetic CT series with a fake patient, for the demo and the tests.

No real data ships with the product; this series has a correct geometry (positions along
the slice normal, orientation, spacing) and a simple phantom so a volume can be checked.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid


@dataclass(frozen=True)
class FakePatient:
    name: str = "DEMO^SYNTHETIC"
    patient_id: str = "DEMO-0001"
    birth_date: str = "19700101"
    sex: str = "O"


def _phantom(index: int, slices: int, size: int) -> np.ndarray:
    """A sphere of 1000 HU-ish in a ramp background: every slice differs, shapes are visible."""
    grid = np.arange(size) - size / 2
    y, x = np.meshgrid(grid, grid, indexing="ij")
    z = index - slices / 2
    radius = size / 3
    inside = x**2 + y**2 + (z * size / slices) ** 2 < radius**2
    return (np.where(inside, 1000, 0) + np.arange(size)[None, :] * 2 + index).astype(np.int16)


def make_series(
    slices: int = 16,
    size: int = 64,
    seed: str = "srm-dicom demo",
    patient: FakePatient = FakePatient(),
) -> list[Dataset]:
    """``slices`` axial CT slices of ``size``×``size``; the same seed gives the same UIDs and bytes."""
    study = generate_uid(entropy_srcs=[seed, "study"])
    series = generate_uid(entropy_srcs=[seed, "series"])
    frame = generate_uid(entropy_srcs=[seed, "frame"])
    out = []
    for index in range(slices):
        sop = generate_uid(entropy_srcs=[seed, "sop", str(index)])
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds = Dataset()
        ds.file_meta = meta
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series
        ds.FrameOfReferenceUID = frame
        ds.PatientName = patient.name
        ds.PatientID = patient.patient_id
        ds.PatientBirthDate = patient.birth_date
        ds.PatientSex = patient.sex
        ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = "20260101"
        ds.StudyTime = "120000"
        ds.AccessionNumber = "DEMO0001"
        ds.StudyID = "1"
        ds.Modality = "CT"
        ds.Manufacturer = "srm-dicom"
        ds.InstitutionName = "Demo Hospital"
        ds.ReferringPhysicianName = "DEMO^REFERRER"
        ds.StudyDescription = "Synthetic demo study"
        ds.SeriesDescription = "Synthetic sphere phantom"
        ds.BodyPartExamined = "HEAD"
        ds.ProtocolName = "demo-phantom"
        ds.SeriesNumber = 1
        ds.InstanceNumber = index + 1
        ds.ImagePositionPatient = [-size / 2, -size / 2, float(index) * 2.0]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [1.0, 1.0]
        ds.SliceThickness = 2.0
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = ds.Columns = size
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        ds.PixelData = _phantom(index, slices, size).tobytes()
        out.append(ds)
    return out
