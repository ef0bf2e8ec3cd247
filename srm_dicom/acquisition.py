"""One image's acquisition parameters and diffusion encoding, kept in its Image row.

A series' sidecars (``3D.json``, ``3D.bval``, ``3D.bvec``; srm_dicom/sidecar.py) are built
from these records, so their sizes are known at registration from the catalog's rows alone,
as the volume's is: listings stay true before any assembly (rclone checks them).

Only a fixed list of acquisition attributes is read, every one of them on the safe list
served files keep (srm_dicom/data/safe_attributes.toml; tests/test_sidecar.py checks it):
nothing of the Patient, Study or equipment-location modules, nothing above the "anonymous"
metadata level.
"""

from __future__ import annotations

import json
from typing import Any

from pydicom.dataset import Dataset

# (BIDS key, DICOM keyword, scale): BIDS times are in seconds, DICOM's in milliseconds.
FIELDS: tuple[tuple[str, str, float], ...] = (
    ("Modality", "Modality", 1),
    ("MagneticFieldStrength", "MagneticFieldStrength", 1),
    ("ImagingFrequency", "ImagingFrequency", 1),
    ("Manufacturer", "Manufacturer", 1),
    ("ManufacturersModelName", "ManufacturerModelName", 1),
    ("BodyPartExamined", "BodyPartExamined", 1),
    ("MRAcquisitionType", "MRAcquisitionType", 1),
    ("ScanningSequence", "ScanningSequence", 1),
    ("SequenceVariant", "SequenceVariant", 1),
    ("ScanOptions", "ScanOptions", 1),
    ("SequenceName", "SequenceName", 1),
    ("ImageType", "ImageType", 1),
    ("SliceThickness", "SliceThickness", 1),
    ("SpacingBetweenSlices", "SpacingBetweenSlices", 1),
    ("EchoTime", "EchoTime", 1e-3),
    ("RepetitionTime", "RepetitionTime", 1e-3),
    ("InversionTime", "InversionTime", 1e-3),
    ("FlipAngle", "FlipAngle", 1),
    ("EchoTrainLength", "EchoTrainLength", 1),
    ("PixelBandwidth", "PixelBandwidth", 1),
    ("KVP", "KVP", 1),
    ("XRayTubeCurrent", "XRayTubeCurrent", 1),
    ("ExposureTime", "ExposureTime", 1e-3),
    ("ConvolutionKernel", "ConvolutionKernel", 1),
)


def acquisition_record(ds: Dataset) -> str | None:
    """The ``acquisition`` column: the sidecar's keys and values for this image (JSON)."""
    record: dict[str, Any] = {}
    for key, keyword, scale in FIELDS:
        value = _json_value(_find(ds, keyword), scale)
        if value not in (None, "", []):
            record[key] = value
    return json.dumps(record, separators=(",", ":")) if record else None


def diffusion_record(ds: Dataset) -> str | None:
    """The ``diffusion`` column of a single-frame image: its b-value and gradient (LPS), from
    the standard attributes at the top level or in its MR Diffusion Sequence (JSON)."""
    bvalue, gradient = _number(ds.get("DiffusionBValue")), ds.get("DiffusionGradientOrientation")
    if bvalue is None:
        for item in _items(ds, "MRDiffusionSequence"):
            bvalue = _number(item.get("DiffusionBValue"))
            for direction in _items(item, "DiffusionGradientDirectionSequence"):
                gradient = direction.get("DiffusionGradientOrientation")
    if bvalue is None:
        return None
    record: dict[str, Any] = {"bvalue": bvalue}
    try:
        vector = [float(v) for v in gradient] if gradient is not None else []
    except (TypeError, ValueError):
        vector = []
    if len(vector) == 3:
        record["gradient"] = vector
    return json.dumps(record, separators=(",", ":"))


def _items(ds: Dataset, keyword: str) -> list[Dataset]:
    try:
        return list(ds.get(keyword) or [])
    except TypeError:
        return []


def _find(ds: Dataset, keyword: str) -> Any:
    """A top-level value, else (multi-frame) one from the shared functional groups."""
    value = ds.get(keyword)
    if value not in (None, ""):
        return value
    for group in _items(ds, "SharedFunctionalGroupsSequence"):
        for element in group:
            if element.VR == "SQ":
                for item in element.value:
                    found = item.get(keyword)
                    if found not in (None, ""):
                        return found
    return None


def _json_value(value: Any, scale: float) -> Any:
    if value is None or isinstance(value, bytes):
        return None
    if isinstance(value, str):
        return value.strip()
    if hasattr(value, "__iter__"):
        return [_json_value(v, scale) for v in value]
    try:
        if isinstance(value, int) and scale == 1:
            return int(value)
        return round(float(value) * scale, 9) + 0.0
    except (TypeError, ValueError):
        return None


def _number(value: Any) -> float | None:
    if value in (None, ""):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None
