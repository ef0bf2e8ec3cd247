"""The files beside a series volume, as dcm2niix writes them beside its NIfTI.

- ``3D.nii.gz`` (where ``[volume] gzip`` is on): the NIfTI volume, gzip-compressed.
- ``3D.json``: a BIDS-style sidecar of acquisition parameters. It is built from the
  *served* (anonymized) header of the volume's first slice, and only from a fixed list of
  acquisition attributes, so it can never hold more than a served slice does, and never a
  patient attribute (README "Volumes").
- ``3D.bval`` / ``3D.bvec``: for diffusion series, FSL's text files, one column per volume
  of the 4D file: b-values, and gradient directions in the image frame, with dcm2niix's
  conventions: components along the voxel axes i, j, k of the file's own affine, the first
  one negated when that affine's determinant is positive (FSL's radiological convention).
  Only the standard attributes are read (Diffusion B-Value, Diffusion Gradient Orientation,
  at the top level or in the MR Diffusion Sequence of a frame's functional groups).
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Sequence
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from srm_dicom.anonymize import AnonymizationOptions, anonymize
from srm_dicom.errors import InvalidInput
from srm_dicom.frames import frame_records
from srm_dicom.names import GZIPPED_VOLUME, VOLUME
from srm_dicom.volume import NotAVolume, VolumePlan, assemble, image_row, plan_volume

SOFTWARE = "srm-dicom"

# (BIDS key, DICOM keyword, scale): BIDS times are in seconds, DICOM's in milliseconds.
# Acquisition parameters only; none of the Patient, Study or Equipment-location modules.
_FIELDS: tuple[tuple[str, str, float], ...] = (
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


def sidecar_json(served_first: Dataset) -> bytes:
    """The BIDS sidecar from the served header of the volume's first slice."""
    sidecar: dict[str, Any] = {}
    for key, keyword, scale in _FIELDS:
        value = _find(served_first, keyword)
        if value is not None:
            sidecar[key] = _json_value(value, scale)
    sidecar["ConversionSoftware"] = SOFTWARE
    return (json.dumps(sidecar, indent="\t", ensure_ascii=True) + "\n").encode("ascii")


def served_header(ds: Dataset, secret: bytes, options: AnonymizationOptions) -> Dataset:
    """The header a grid client receives for ``ds``: what the sidecar may draw from."""
    return anonymize(ds, secret, options).dataset


def _find(ds: Dataset, keyword: str) -> Any:
    """A top-level value, else (multi-frame) one from the shared functional groups."""
    value = ds.get(keyword)
    if value not in (None, ""):
        return value
    for group in ds.get("SharedFunctionalGroupsSequence") or []:
        for element in group:
            if element.VR == "SQ":
                for item in element.value:
                    found = item.get(keyword)
                    if found not in (None, ""):
                        return found
    return None


def _json_value(value: Any, scale: float) -> Any:
    if isinstance(value, bytes):
        return None
    if isinstance(value, str):
        return value.strip()
    if hasattr(value, "__iter__"):
        return [_json_value(v, scale) for v in value]
    if isinstance(value, int) and scale == 1:
        return int(value)
    number = float(value) * scale
    return round(number, 9) + 0.0


# -- diffusion -------------------------------------------------------------------------


def has_diffusion(ds: Dataset) -> bool:
    """Whether the image carries a b-value (then its series lists 3D.bval and 3D.bvec)."""
    if _number(ds.get("DiffusionBValue")) is not None:
        return True
    records = _records(ds)
    return any("bvalue" in record for record in records)


def fsl_files(datasets: Sequence[Dataset], plan: VolumePlan) -> tuple[bytes, bytes]:
    """``3D.bval`` and ``3D.bvec`` of the volume ``plan`` describes (one column per volume)."""
    volumes = plan.shape[3] if len(plan.shape) == 4 else 1
    per_volume = len(plan.sources) // volumes
    records = {index: _records(datasets[index]) for index in {source for source, _ in plan.sources}}
    bvalues, vectors = [], []
    for volume in range(volumes):
        source, frame = plan.sources[volume * per_volume]
        encoding = _encoding(datasets[source], None if frame is None else records[source][frame])
        if encoding is None:
            raise NotAVolume(f"volume {volume + 1} of the series has no diffusion b-value")
        bvalues.append(encoding[0])
        vectors.append(_image_frame(encoding[1], plan))
    bval = " ".join(_fsl(b) for b in bvalues) + "\n"
    bvec = "".join(" ".join(_fsl(v[axis]) for v in vectors) + "\n" for axis in range(3))
    return bval.encode("ascii"), bvec.encode("ascii")


def _records(ds: Dataset) -> list[dict[str, Any]]:
    text = frame_records(ds)
    if text is None:
        return []
    parsed = json.loads(text)
    return parsed.get("frames", []) if isinstance(parsed, dict) else []


def _encoding(ds: Dataset, record: dict[str, Any] | None) -> tuple[float, np.ndarray] | None:
    """(b-value, gradient in patient LPS) of one slice or frame; b=0 has no direction."""
    if record is not None:
        bvalue, gradient = _number(record.get("bvalue")), record.get("gradient")
    else:
        bvalue = _number(ds.get("DiffusionBValue"))
        gradient = ds.get("DiffusionGradientOrientation")
        if bvalue is None:
            for item in ds.get("MRDiffusionSequence") or []:
                bvalue = _number(item.get("DiffusionBValue"))
                for direction in item.get("DiffusionGradientDirectionSequence") or []:
                    gradient = direction.get("DiffusionGradientOrientation")
    if bvalue is None:
        return None
    vector = np.zeros(3)
    if bvalue > 0 and gradient is not None and len(gradient) == 3:
        vector = np.array([float(v) for v in gradient])
    return bvalue, vector


def _image_frame(gradient: np.ndarray, plan: VolumePlan) -> np.ndarray:
    """A patient-frame (LPS) gradient along the file's voxel axes, FSL-flipped as dcm2niix does."""
    directions = np.array(plan.affine)[:3, :3] / np.array(plan.spacing)  # unit voxel axes, RAS
    lps = np.diag([-1.0, -1.0, 1.0]) @ directions
    vector = lps.T @ gradient
    if np.linalg.det(directions) > 0:
        vector[0] = -vector[0]
    return vector


def _number(value: Any) -> float | None:
    if value in (None, ""):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _fsl(value: float) -> str:
    """dcm2niix's number format (%g); never "-0"."""
    return f"{round(float(value), 6) + 0.0:g}"


def gzipped(data: bytes) -> bytes:
    """gzip with no name and no time in its header, so restaging gives the same bytes."""
    return gzip.compress(data, compresslevel=6, mtime=0)


def series_file(
    name: str, datasets: Sequence[Dataset], fmt: str, secret: bytes, options: AnonymizationOptions
) -> bytes:
    """The plain bytes of one file of a series (``3D`` or a sidecar), from its images."""
    if name == VOLUME:
        return assemble(datasets, fmt)
    if name == GZIPPED_VOLUME:
        return gzipped(assemble(datasets, "nifti"))
    plan = plan_volume([image_row(ds) for ds in datasets])
    if name == f"{VOLUME}.json":
        return sidecar_json(served_header(datasets[plan.sources[0][0]], secret, options))
    if name in (f"{VOLUME}.bval", f"{VOLUME}.bvec"):
        bval, bvec = fsl_files(datasets, plan)
        return bval if name.endswith(".bval") else bvec
    raise InvalidInput(f"{name} is not a file of a series")
