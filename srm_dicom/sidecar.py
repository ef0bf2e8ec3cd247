"""The files beside a series volume, as dcm2niix writes them beside its NIfTI.

- ``3D.json``: a BIDS-style sidecar of acquisition parameters, from the ``acquisition``
  record (srm_dicom/acquisition.py) of the volume's first slice: a fixed list of
  acquisition attributes that served files keep, never a patient attribute.
- ``3D.bval`` / ``3D.bvec``: for diffusion series, FSL's text files, one column per volume
  of the 4D file: b-values, and gradient directions in the image frame, with dcm2niix's
  conventions: components along the voxel axes i, j, k of the file's own affine, the first
  one negated when that affine's determinant is positive (FSL's radiological convention).

Every file is a pure function of the series' Image rows and the volume plan, so its size
is known at registration (README "Volumes").
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from srm_dicom.errors import InvalidInput
from srm_dicom.names import VOLUME
from srm_dicom.volume import NotAVolume, VolumePlan, assemble, image_row, plan_volume

SOFTWARE = "srm-dicom"
JSON, BVAL, BVEC = f"{VOLUME}.json", f"{VOLUME}.bval", f"{VOLUME}.bvec"


def sidecar_json(rows: Sequence[dict[str, Any]], plan: VolumePlan) -> bytes:
    """The BIDS sidecar: the acquisition record of the volume's first slice."""
    text = rows[plan.sources[0][0]].get("acquisition")
    sidecar = json.loads(str(text)) if text else {}
    sidecar["ConversionSoftware"] = SOFTWARE
    return (json.dumps(sidecar, indent="\t", ensure_ascii=True) + "\n").encode("ascii")


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


def series_file(name: str, datasets: Sequence[Dataset], fmt: str) -> bytes:
    """The plain bytes of one file of a series (``3D`` or a sidecar), from its images."""
    if name == VOLUME:
        return assemble(datasets, fmt)
    rows = [image_row(ds) for ds in datasets]
    return series_file_from_rows(name, rows, plan_volume(rows))


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
