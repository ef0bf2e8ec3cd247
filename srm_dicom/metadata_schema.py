"""The paper's metadata schema: the columns of the Patient, Image and Medical tables, the DICOM
keyword each is read from, and the record of one image's rows.

Apart from the reading of a header (srm_dicom/metadata.py) so that the catalog and its
backends, imported by every ``mdm`` command, do not import pydicom.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

Row = dict[str, Any]

# Column name → DICOM keyword, per table. The order is the column order of the schema.
PATIENT_FIELDS = {
    "name": "PatientName",
    "patient_id": "PatientID",
    "issuer": "IssuerOfPatientID",
    "birth_date": "PatientBirthDate",
    "sex": "PatientSex",
    "age": "PatientAge",
    "weight": "PatientWeight",
    "size": "PatientSize",
}
IMAGE_FIELDS = {
    "rows": "Rows",
    "columns": "Columns",
    "bits_allocated": "BitsAllocated",
    "bits_stored": "BitsStored",
    "samples_per_pixel": "SamplesPerPixel",
    "photometric": "PhotometricInterpretation",
    "number_of_frames": "NumberOfFrames",
    "pixel_spacing": "PixelSpacing",
    "slice_thickness": "SliceThickness",
    "image_position": "ImagePositionPatient",
    "image_orientation": "ImageOrientationPatient",
    "instance_number": "InstanceNumber",
    # The stored voxel type and its rescale: volumes keep integers as they are stored, with
    # the rescale in the NIfTI header (README "Volumes").
    "pixel_representation": "PixelRepresentation",
    "rescale_slope": "RescaleSlope",
    "rescale_intercept": "RescaleIntercept",
}
# Every column of the Image table: the fields above, the per-frame geometry of a
# multi-frame image (srm_dicom/frames.py), from which its volume is planned, and the
# acquisition and diffusion records its series' sidecars are built from (acquisition.py).
IMAGE_COLUMNS = (*IMAGE_FIELDS, "frames", "acquisition", "diffusion")
MEDICAL_FIELDS = {
    "modality": "Modality",
    "study_date": "StudyDate",
    "series_date": "SeriesDate",
    "acquisition_date": "AcquisitionDate",
    "body_part": "BodyPartExamined",
    "institution": "InstitutionName",
    "referring_physician": "ReferringPhysicianName",
    "performing_physician": "PerformingPhysicianName",
    "study_description": "StudyDescription",
    "series_description": "SeriesDescription",
    "manufacturer": "Manufacturer",
    "model": "ManufacturerModelName",
}


@dataclass(frozen=True)
class ImageMetadata:
    patient_key: str
    patient: Row
    image: Row
    medical: Row
    dicom: Row
    protocols: tuple[str, ...] = field(default=())
    # (tag path, keyword, original value) of what anonymization erased: "all" rights only.
    erased: tuple[tuple[str, str, str], ...] = field(default=())
