"""The files beside a series volume, as dcm2niix writes them beside its NIfTI.

- ``3D.json``: a BIDS-style sidecar of acquisition parameters, from the ``acquisition``
  record (srm_dicom/acquisition.py) of the volume's first slice: a fixed list of
  acquisition attributes that served files keep, never a patient attribute.
- ``3D.bval`` / ``3D.bvec``: for diffusion series, FSL's text files, one column per volume
  of the 4D file: b-values, and gradient directions in the image frame, with dcm2niix's
  conventions: components along the voxel axes i, j, k of the file's own affine, the first
  one negated when that affine's determinant is positive (FSL's radiological convention).

Every file is a pure function of the series' Image rows and the volume plan, so its size
is known at registration (README "Volumes"). ``3D.nii.gz`` (``[volume] gzip``) is the
volume deterministically gzip-compressed: its size is known once it is first made.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Sequence
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from srm_dicom.acquisition import ACQUIRED
from srm_dicom.errors import InvalidInput
from srm_dicom.names import COMPRESSED_VOLUME, VOLUME
from srm_dicom.volume import NotAVolume, VolumePlan, assemble, image_row, plan_volume

SOFTWARE = "srm-dicom"
GZIP_LEVEL = 6  # zlib's default: fixed, since the level changes the bytes
_DAY = 24 * 3600.0
_HALF_DAY = _DAY / 2
JSON, BVAL, BVEC = f"{VOLUME}.json", f"{VOLUME}.bval", f"{VOLUME}.bvec"


def sidecar_json(rows: Sequence[dict[str, Any]], plan: VolumePlan) -> bytes:
    """The BIDS sidecar: the acquisition record of the volume's first slice, and SliceTiming
    where the slices' acquisition times are known."""
    sidecar = _record(rows[plan.sources[0][0]])
    sidecar.pop(ACQUIRED, None)
    timing = slice_timing(rows, plan, sidecar)
    if timing is not None:
        sidecar["SliceTiming"] = timing
    sidecar["ConversionSoftware"] = SOFTWARE
    return (json.dumps(sidecar, indent="\t", ensure_ascii=True) + "\n").encode("ascii")


def slice_timing(rows: Sequence[dict[str, Any]], plan: VolumePlan, sidecar: dict[str, Any]) -> list[float] | None:
    """BIDS SliceTiming: each slice's acquisition time (s) after the first slice's, in the
    file's slice order, from the slices of the first volume, as dcm2niix takes it from
    Siemens 2D slices' AcquisitionTime; for a multi-frame image, from each frame's Frame
    Acquisition DateTime. Only for a 2D MR acquisition whose slices' times are all known
    and not all equal; a series crossing midnight counts the times before noon as the next day."""
    if sidecar.get("Modality") != "MR" or sidecar.get("MRAcquisitionType") == "3D":
        return None
    slices = plan.shape[2]
    times = []
    for source, frame in plan.sources[:slices]:
        record = _record(rows[source]) if frame is None else _frame_records(rows[source])[frame]
        value = record.get(ACQUIRED)
        if not isinstance(value, int | float):
            return None
        times.append(float(value))
    if max(times) - min(times) > _HALF_DAY:
        times = [t - _DAY if t > _HALF_DAY else t for t in times]
    first = min(times)
    if max(times) == first:
        return None
    return [round(t - first, 6) + 0.0 for t in times]


def has_diffusion(row: dict[str, Any]) -> bool:
    """Whether an Image row is diffusion-weighted (a b-value above 0): then its series lists
    3D.bval and 3D.bvec. A b-value of 0 alone (some anatomical series carry one) is not."""
    text = row.get("diffusion")
    records = [json.loads(str(text))] if text else _frame_records(row)
    return any(float(record.get("bvalue") or 0) > 0 for record in records)


def fsl_files(rows: Sequence[dict[str, Any]], plan: VolumePlan) -> tuple[bytes, bytes]:
    """``3D.bval`` and ``3D.bvec`` of the volume ``plan`` describes (one column per volume)."""
    volumes = plan.shape[3] if len(plan.shape) == 4 else 1
    per_volume = len(plan.sources) // volumes
    bvalues, vectors = [], []
    for volume in range(volumes):
        source, frame = plan.sources[volume * per_volume]
        encoding = _encoding(rows[source], frame)
        if encoding is None:
            raise NotAVolume(f"volume {volume + 1} of the series has no diffusion b-value")
        bvalues.append(encoding[0])
        vectors.append(_image_frame(encoding[1], plan))
    bval = " ".join(_fsl(b) for b in bvalues) + "\n"
    bvec = "".join(" ".join(_fsl(v[axis]) for v in vectors) + "\n" for axis in range(3))
    return bval.encode("ascii"), bvec.encode("ascii")


def series_file_from_rows(name: str, rows: Sequence[dict[str, Any]], plan: VolumePlan) -> bytes:
    """A sidecar's bytes from the rows alone."""
    if name == JSON:
        return sidecar_json(rows, plan)
    if name in (BVAL, BVEC):
        bval, bvec = fsl_files(rows, plan)
        return bval if name == BVAL else bvec
    raise InvalidInput(f"{name} is not a sidecar of a series")


def series_file(
    name: str, datasets: Sequence[Dataset], fmt: str, rows: Sequence[dict[str, Any]] | None = None
) -> bytes:
    """The plain bytes of one file of a series (``3D``, ``3D.nii.gz`` or a sidecar), from its
    images; a sidecar from ``rows`` when given: the catalog's Image rows, read from the served
    data sets at registration, which alone say what the served slices keep (a retrieved
    original still holds its AcquisitionTime and private attributes)."""
    if name == VOLUME:
        return assemble(datasets, fmt)
    if name == COMPRESSED_VOLUME:
        return compress(assemble(datasets, "nifti"))
    if rows is None:
        rows = [image_row(ds) for ds in datasets]
    return series_file_from_rows(name, rows, plan_volume(rows))


def compress(volume: bytes) -> bytes:
    """``3D.nii.gz``: deterministic gzip (no name, mtime 0, level GZIP_LEVEL), so that the
    same volume always gives the same bytes, the size and adler32 recorded at its first
    assembly hold for every restaging (with the same zlib: README "Volumes")."""
    return gzip.compress(volume, compresslevel=GZIP_LEVEL, mtime=0)


def _record(row: dict[str, Any]) -> dict[str, Any]:
    """An Image row's acquisition record (srm_dicom/acquisition.py)."""
    text = row.get("acquisition")
    record = json.loads(str(text)) if text else {}
    return record if isinstance(record, dict) else {}


def _frame_records(row: dict[str, Any]) -> list[dict[str, Any]]:
    text = row.get("frames")
    if not text:
        return []
    try:
        parsed = json.loads(str(text))
    except ValueError:
        return []
    records = parsed.get("frames") if isinstance(parsed, dict) else None
    return records if isinstance(records, list) else []


def _encoding(row: dict[str, Any], frame: int | None) -> tuple[float, np.ndarray] | None:
    """(b-value, gradient in patient LPS) of one slice or frame; b=0 has no direction."""
    if frame is None:
        text = row.get("diffusion")
        record = json.loads(str(text)) if text else {}
    else:
        record = _frame_records(row)[frame]
    if "bvalue" not in record:
        return None
    bvalue = float(record["bvalue"])
    gradient = record.get("gradient")
    vector = np.zeros(3)
    if bvalue > 0 and isinstance(gradient, list) and len(gradient) == 3:
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


def _fsl(value: float) -> str:
    """dcm2niix's number format (%g); never "-0"."""
    return f"{round(float(value), 6) + 0.0:g}"
