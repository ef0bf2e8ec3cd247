"""The paper's metadata schema, read from one DICOM header.

Patient (nominative, indexed by an irreversible patient key), Image (technical, per GUID),
Medical (acquisition), DICOM (original and de-identified identifiers) and Protocol
(protocol name → GUIDs). The catalog backends store these rows next to the entry, in the
same transaction.

What the "anonymous" metadata level shows (srm_dicom/query.py: the Image table, modality,
body part, manufacturer and model, protocol names) is read from the served, anonymized data
set, never from the original header: an MIA caller then sees exactly what the file they may
download says, and nothing the anonymizer replaced or removed (a patient name typed into a
protocol name, for instance). The other columns, readable with "all" rights only, come from
the original header.
"""

from __future__ import annotations

from typing import Any

from pydicom.dataset import Dataset

from srm_dicom.acquisition import acquisition_record, diffusion_record
from srm_dicom.anonymize import DUMMY_TEXT
from srm_dicom.frames import frame_records
from srm_dicom.metadata_schema import IMAGE_FIELDS, MEDICAL_FIELDS, PATIENT_FIELDS, ImageMetadata, Row
from srm_dicom.uids import deidentify_uid, patient_key


def _value(ds: Dataset, keyword: str) -> Any:
    """A header value as a plain Python value: numbers stay numbers, lists become backslash text."""
    if keyword not in ds:
        return None
    try:
        element = ds[keyword]
        value = element.value
    except ValueError:  # a value that breaks its VR (e.g. text in a DS): keep what was written
        raw = ds.get_item(keyword).value  # type: ignore[union-attr]  # present: checked above
        return raw.decode("latin-1", "replace").strip() if isinstance(raw, bytes) else str(raw)
    if value is None or value == "" or isinstance(value, bytes):
        return None
    if element.VM > 1:
        return "\\".join(str(v) for v in value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    return str(value)


def image_fields(ds: Dataset) -> Row:
    """The Image row of a header (every column of IMAGE_COLUMNS)."""
    row = {column: _value(ds, keyword) for column, keyword in IMAGE_FIELDS.items()}
    row["frames"] = frame_records(ds)
    row["acquisition"] = acquisition_record(ds)
    row["diffusion"] = diffusion_record(ds)
    return row


# Medical columns of the anonymous level (srm_dicom/query.py), read from the served data set.
ANONYMOUS_MEDICAL = frozenset({"modality", "body_part", "manufacturer", "model"})


def extract_metadata(ds: Dataset, secret: bytes, served: Dataset | None = None) -> ImageMetadata:
    """Read the five tables' rows from a header; the patient key is keyed by the site secret.

    ``served`` is the anonymized data set grid clients receive: the anonymous-level values
    are read from it (registration always gives it; without it they come from ``ds``)."""
    anonymous = ds if served is None else served
    study, series, sop = (str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID))
    patient = {column: _value(ds, kw) for column, kw in PATIENT_FIELDS.items()}
    key = patient_key(secret, str(patient["patient_id"] or patient["name"] or ""), str(patient["issuer"] or ""))
    sop_class = ds.get("SOPClassUID") or ds.file_meta.get("MediaStorageSOPClassUID", "")
    transfer_syntax = ds.file_meta.get("TransferSyntaxUID", "") if hasattr(ds, "file_meta") else ""
    dicom = {
        "study_uid": study,
        "series_uid": series,
        "sop_uid": sop,
        "deid_study_uid": deidentify_uid(secret, study),
        "deid_series_uid": deidentify_uid(secret, series),
        "deid_sop_uid": deidentify_uid(secret, sop),
        "sop_class_uid": str(sop_class),
        "transfer_syntax_uid": str(transfer_syntax),
    }
    protocol = _value(anonymous, "ProtocolName")
    if protocol == DUMMY_TEXT:
        protocol = None  # replaced in the served file: the original is among the erased values
    medical = {
        column: _value(anonymous if column in ANONYMOUS_MEDICAL else ds, kw) for column, kw in MEDICAL_FIELDS.items()
    }
    return ImageMetadata(
        patient_key=key,
        patient=patient,
        image=image_fields(anonymous),
        medical=medical,
        dicom=dicom,
        protocols=(protocol,) if protocol else (),
    )
