"""The series × result table of the volumes, for a closing note: every shared vendor series,
as its single-frame files and as the Legacy Converted Enhanced MR and CT objects made of
them (tests/test_frames.py), against dcm2niix's conversion of the same files.

Run: python tests/volume_table.py   (prints a Markdown table; needs dcm2niix and the vendor data)

Columns: the volume equal to dcm2niix's (canonical orientation: shape, affine within 1e-4,
data), else to dicom2nifti's reference where dcm2niix cannot be the yardstick (it reads no
JPEG-LS; the known multi-frame differences of README "Volumes"); the voxel type and
scl_slope/scl_inter equal to dcm2niix's; 3D.json made from the served (anonymized) files,
with no patient attribute and none of the patient's values. The assertions that keep these
cells true run in tests/test_volume.py, tests/test_frames.py and tests/test_sidecar.py.
"""

from __future__ import annotations

import copy
import json
import tempfile
from pathlib import Path

import nibabel
import numpy as np
from pydicom.dataset import Dataset
from test_frames import (
    DCM2NIIX_ONE_RESCALE,
    DCM2NIIX_STACKS_TIME_POINTS,
    SINGLE_FRAME,
    dcm2niix,
    legacy_converted,
)
from test_volume import GROUND_TRUTH, dcm2niix_volume, ground_truth, raw_scaling, vendor_series, voxels

from sites import require_vendor_data
from srm_dicom.anonymize import anonymize
from srm_dicom.sidecar import series_file
from srm_dicom.volume import assemble

SECRET = b"volume table"
MARKERS = {"PatientName": "TABLE^MARKER", "PatientID": "TBL-4711", "PatientBirthDate": "19380101"}
PATIENT_KEYS = ("Patient", "Institution", "Station", "Device", "Operator", "Physician")


def _sidecar_cell(datasets: list[Dataset]) -> str:
    """3D.json of the served files: present, no patient key, none of the patient's values."""
    served = [anonymize(ds, SECRET).dataset for ds in datasets]
    data = series_file("3D.json", served, "nifti")
    sidecar = json.loads(data)
    clean = not [k for k in sidecar if k.startswith(PATIENT_KEYS)] and not [m for m in MARKERS.values() if m.encode()
                                                                            in data]
    return f"yes ({len(sidecar)} keys), no patient attribute" if clean else "PATIENT DATA"


def _with_a_patient(datasets: list[Dataset]) -> list[Dataset]:
    """Copies of the files with recognisable patient values (the shared ones say "dicom2nifti",
    as does their SequenceName)."""
    marked = [copy.deepcopy(ds) for ds in datasets]
    for ds in marked:
        for keyword, value in MARKERS.items():
            setattr(ds, keyword, value)
    return marked


def _same(ours: nibabel.Nifti1Image, theirs: nibabel.Nifti1Image) -> bool:
    """Canonical orientation: same shape, affine within 1e-4, equal voxels (RGB as a last axis)."""
    ours_ras, theirs_ras = nibabel.as_closest_canonical(ours), nibabel.as_closest_canonical(theirs)
    return (ours_ras.shape == theirs_ras.shape and np.allclose(ours_ras.affine, theirs_ras.affine, atol=1e-4)
            and np.allclose(voxels(ours_ras), voxels(theirs_ras), rtol=1e-6, atol=1e-4))


def row(series: str, form: str, work: Path) -> tuple[str, str, str, str]:
    single = _with_a_patient(vendor_series(series))
    datasets = single if form == "single-frame" else [legacy_converted(single, form[-2:])]
    ours = nibabel.Nifti1Image.from_bytes(assemble(datasets, "nifti"))
    jpegls = "jpegls" in series
    if form == "single-frame":
        theirs = None if jpegls else dcm2niix_volume(require_vendor_data() / series, work / "dcm2niix")
    else:
        theirs = dcm2niix(datasets[0], work)
    truth = ground_truth(series)
    if theirs is None:
        volume = "dcm2niix reads no JPEG-LS; = dicom2nifti: " + ("yes" if _same(ours, truth) else "NO")
        voxel = f"{raw_scaling(ours)[0]} (dcm2niix: none)"
    else:
        known = form != "single-frame" and series in DCM2NIIX_STACKS_TIME_POINTS | DCM2NIIX_ONE_RESCALE
        why = "stacks time points as slices" if series in DCM2NIIX_STACKS_TIME_POINTS else "applies frame 1's rescale"
        if _same(ours, theirs):
            volume = "yes"
        elif known:
            volume = f"no: dcm2niix {why}; = dicom2nifti: " + ("yes" if _same(ours, truth) else "NO")
        else:
            volume = "NO"
        dtype, theirs_dtype = raw_scaling(ours)[0], raw_scaling(theirs)[0]
        if raw_scaling(ours) == raw_scaling(theirs):
            voxel = f"yes ({dtype})"
        else:
            voxel = f"no: {dtype}, dcm2niix {theirs_dtype}" + (f" ({why})" if known else "")
    return series, form, volume, f"{voxel} | {_sidecar_cell(datasets)}"


def main() -> None:
    print("| series | form | volume = dcm2niix | voxel type = dcm2niix | 3D.json |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="volume-table-") as tmp:
        for number, series in enumerate(GROUND_TRUTH):
            forms = ["single-frame"] + (["multi-frame MR", "multi-frame CT"] if series in SINGLE_FRAME else [])
            for index, form in enumerate(forms):
                work = Path(tmp) / f"{number}-{index}"
                work.mkdir()
                print("| " + " | ".join(row(series, form, work)) + " |")


if __name__ == "__main__":
    main()
