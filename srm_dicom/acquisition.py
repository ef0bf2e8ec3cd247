"""One image's acquisition parameters and diffusion encoding, kept in its Image row.

A series' sidecars (``3D.json``, ``3D.bval``, ``3D.bvec``; srm_dicom/sidecar.py) are built
from these records, so their sizes are known at registration from the catalog's rows alone,
as the volume's is: listings stay true before any assembly (rclone checks them).

Only a fixed list of acquisition attributes is read, every one of them on the safe list
served files keep (srm_dicom/data/safe_attributes.toml; tests/test_sidecar.py checks it):
nothing of the Patient, Study or equipment-location modules, nothing above the "anonymous"
metadata level. Two more are read from the served data set only when it keeps them: its
AcquisitionTime (the retain-dates options), for SliceTiming, and the vendors' private
diffusion attributes (retain_safe_private).
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

# Not a sidecar key: the image's AcquisitionTime (seconds since midnight), which the sidecar
# turns into SliceTiming; present only where the served file keeps AcquisitionTime (the
# Basic Profile removes it; the retain-dates options keep it).
ACQUIRED = "acquired"

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


# Enhanced MR's names of attributes the sidecar reads (PS3.3 C.8.13.5.2, MR Echo macro).
_ENHANCED_NAMES = {"EchoTime": ("EffectiveEchoTime",)}


def acquisition_record(ds: Dataset) -> str | None:
    """The ``acquisition`` column: the sidecar's keys and values for this image (JSON)."""
    record: dict[str, Any] = {}
    for key, keyword, scale in FIELDS:
        value = _json_value(_find(ds, keyword), scale)
        if value not in (None, "", []):
            record[key] = value
    acquired = time_of_day(ds.get("AcquisitionTime"))
    if acquired is not None:
        record[ACQUIRED] = acquired
    return json.dumps(record, separators=(",", ":")) if record else None


def time_of_day(value: Any) -> float | None:
    """Seconds since midnight of a DICOM TM ("HHMMSS.ffffff", or the old "HH:MM:SS") or of
    the time part of a DT ("YYYYMMDDHHMMSS.ffffff&ZZXX"); None when absent or unreadable."""
    text = str(value or "").strip()
    if len(text) >= 14 and text[:14].isdigit() and "." not in text[:8]:  # a DT: its time part
        text = text[8:]
    text = text.split("+")[0].split("-")[0].replace(":", "")
    whole, _, fraction = text.partition(".")
    if not whole.isdigit() or len(whole) not in (2, 4, 6) or (fraction and not fraction.isdigit()):
        return None
    hours, minutes, seconds = int(whole[:2]), int(whole[2:4] or 0), int(whole[4:6] or 0)
    if hours > 23 or minutes > 59 or seconds > 60:
        return None
    return hours * 3600 + minutes * 60 + seconds + (float(f"0.{fraction}") if fraction else 0.0)


def diffusion_record(ds: Dataset) -> str | None:
    """The ``diffusion`` column of a single-frame image: its b-value and gradient (patient
    LPS), from the standard attributes (top level or in its MR Diffusion Sequence), else from
    its vendor's private ones, which a served file keeps only with retain_safe_private
    (srm_dicom/data/safe_private.toml): GE, Siemens, Philips, read as dcm2niix reads them
    (a Philips b-value from the standard attribute, its direction from the private ones; GE's
    private pair first, as dcm2niix ignores GE's standard gradient)."""
    bvalue, vector = _standard_diffusion(ds)
    private_b, private_vector = _private_diffusion(ds, bvalue)
    if str(ds.get("Manufacturer") or "").upper().startswith("GE") and private_vector is not None:
        bvalue, vector = (bvalue if private_b is None else private_b), private_vector
    bvalue = private_b if bvalue is None else bvalue
    if bvalue is None:
        return None
    record: dict[str, Any] = {"bvalue": bvalue}
    vector = private_vector if vector is None else vector
    if vector is not None:
        record["gradient"] = vector
    return json.dumps(record, separators=(",", ":"))


def _standard_diffusion(ds: Dataset) -> tuple[float | None, list[float] | None]:
    """The standard b-value and gradient; an image whose Diffusion Directionality is neither
    DIRECTIONAL nor BMATRIX (ISOTROPIC, NONE) has no direction, whatever it holds (dcm2niix)."""
    bvalue, gradient = _number(ds.get("DiffusionBValue")), ds.get("DiffusionGradientOrientation")
    directionality = ds.get("DiffusionDirectionality")
    if bvalue is None:
        for item in _items(ds, "MRDiffusionSequence"):
            bvalue, directionality = _number(item.get("DiffusionBValue")), item.get("DiffusionDirectionality")
            for direction in _items(item, "DiffusionGradientDirectionSequence"):
                gradient = direction.get("DiffusionGradientOrientation")
    if bvalue is not None and directionality not in (None, "", "DIRECTIONAL", "BMATRIX"):
        return bvalue, [0.0, 0.0, 0.0]
    return bvalue, _vector(gradient)


# The vendors' private diffusion attributes: (private creator, group, element offsets).
_SIEMENS = ("SIEMENS MR HEADER", 0x0019, 0x0C, 0x0E)  # B_value (IS), DiffusionGradientDirection (FD×3, LPS)
_PHILIPS_B = ("Philips Imaging DD 001", 0x2001, 0x03)  # Diffusion B-Factor (FL)
_PHILIPS_DIRECTION = ("Philips MR Imaging DD 001", 0x2005, (0xB0, 0xB1, 0xB2))  # RL, AP, FH (FL, LPS)
_GE_B = ("GEMS_PARM_01", 0x0043, 0x39)  # Slop_int_6…9: the b-value first, plus 10^9 on some versions
_GE_DIRECTION = ("GEMS_ACQU_01", 0x0019, (0xBB, 0xBC, 0xBD))  # User data 20-22 (DS), GE's logical axes
_GE_BIAS = 1_000_000_000
# GE's logical gradient axes along the image's (row, column, normal), by the slice plane the
# normal is closest to (sagittal, coronal, axial): the directions dcm2niix's geCorrectBvecs
# (from dicm2nii) writes, taken back to patient space (tests/test_sidecar.py checks them).
_GE_AXES = {0: np.diag([1.0, 1.0, -1.0]), 1: np.diag([-1.0, 1.0, 1.0]), 2: np.diag([-1.0, -1.0, 1.0])}
_GE_ROW_PHASE = np.array([[0.0, 1.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])  # phase encoding along rows


def _private_diffusion(ds: Dataset, standard_b: float | None) -> tuple[float | None, list[float] | None]:
    manufacturer = str(ds.get("Manufacturer") or "").upper()
    if "SIEMENS" in manufacturer:
        creator, group, b_offset, g_offset = _SIEMENS
        return _number(_private(ds, creator, group, b_offset)), _vector(_private(ds, creator, group, g_offset))
    if "PHILIPS" in manufacturer:
        creator, group, offsets = _PHILIPS_DIRECTION
        gradient = [_private(ds, creator, group, offset) for offset in offsets]
        return _number(_private(ds, *_PHILIPS_B)), _vector(None if None in gradient else gradient)
    if manufacturer.startswith("GE"):
        return _ge_diffusion(ds, standard_b)
    return None, None


def _ge_diffusion(ds: Dataset, standard_b: float | None) -> tuple[float | None, list[float] | None]:
    """GE's b-value and gradient, the gradient taken from GE's logical axes to patient LPS as
    dcm2niix does: only for a head-first supine patient with a known phase-encoding
    direction; a gradient of length between 0.03 and 0.97 scales the b-value by its square
    (rounded to 5 s/mm², dcm2niix's issue 163) and is normalized."""
    value = _private(ds, *_GE_B)
    first = value[0] if isinstance(value, MultiValue | list) and len(value) else value
    bvalue = _number(first)
    if bvalue is not None:
        bvalue = float(int(bvalue) % _GE_BIAS)
    elif standard_b is None:
        return None, None
    b = bvalue if bvalue is not None else standard_b
    creator, group, offsets = _GE_DIRECTION
    raw = _vector([_private(ds, creator, group, offset) for offset in offsets])
    orientation = _vector(ds.get("ImageOrientationPatient"), 6)
    phase = str(ds.get("InPlanePhaseEncodingDirection") or "").upper()
    if (raw is None or orientation is None or phase not in ("ROW", "COL")
            or str(ds.get("PatientPosition") or "").upper() != "HFS"):
        return bvalue, None
    gradient = np.array(raw)
    length = float(np.linalg.norm(gradient))
    if b is None or b <= 0 or length <= 1e-6:
        return bvalue, [0.0, 0.0, 0.0]
    if 0.03 < length < 0.97:
        scaled = b * length * length
        bvalue = 5.0 if 0 < scaled < 5 else float(int((scaled + 2.5) / 5) * 5)
        gradient = gradient / length
    row, column = np.array(orientation[:3]), np.array(orientation[3:])
    normal = np.cross(row, column)
    axes = _GE_AXES[int(np.argmax(np.abs(normal)))]
    if phase == "ROW":
        axes = axes @ _GE_ROW_PHASE
    lps = np.column_stack([row, column, normal]) @ axes @ gradient
    return bvalue, [float(v) for v in lps]


def _private(ds: Dataset, creator: str, group: int, offset: int) -> Any:
    """A private element's value by its creator's block, wherever the block sits; None if absent."""
    try:
        return ds.private_block(group, creator)[offset].value
    except (KeyError, ValueError):
        return None


def _vector(value: Any, count: int = 3) -> list[float] | None:
    """``count`` finite numbers, or None."""
    if value is None or isinstance(value, str | bytes):
        return None
    try:
        numbers = [float(v) for v in value]
    except (TypeError, ValueError):
        return None
    return numbers if len(numbers) == count and all(math.isfinite(v) for v in numbers) else None


def _items(ds: Dataset, keyword: str) -> list[Dataset]:
    try:
        return list(ds.get(keyword) or [])
    except TypeError:
        return []


def _find(ds: Dataset, keyword: str) -> Any:
    """A top-level value, else (multi-frame) one from the functional groups: shared, then the
    first frame's; where an enhanced object names it otherwise (EffectiveEchoTime of the MR
    Echo macro for EchoTime), that name too, as dcm2niix reads it."""
    value = ds.get(keyword)
    if value not in (None, ""):
        return value
    groups = _items(ds, "SharedFunctionalGroupsSequence") + _items(ds, "PerFrameFunctionalGroupsSequence")[:1]
    for name in (keyword, *_ENHANCED_NAMES.get(keyword, ())):
        for group in groups:
            for element in group:
                if element.VR == "SQ":
                    for item in element.value:
                        found = item.get(name)
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
