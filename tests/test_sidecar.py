"""The files beside a volume: a BIDS sidecar with no patient attribute, and FSL b-values and
vectors as dcm2niix writes them.

dcm2niix's b-vectors and ours follow one convention (components along the file's own
voxel axes, the first negated when the affine's determinant is positive), but dcm2niix
flips the row order of every image where we keep it (our affine carries that flip
instead), so its j axis is our -j. The relation tested is therefore the one that matters
to a user: each file's vectors, taken back to patient space through that file's own
affine, are the same directions.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import nibabel
import numpy as np
import pytest
from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset
from pydicom.uid import MRImageStorage, generate_uid
from test_volume import GROUND_TRUTH, vendor_series

from conftest import require_program
from sites import require_vendor_data
from srm_dicom.acquisition import FIELDS, acquisition_record
from srm_dicom.anonymize import AnonymizationOptions, anonymize
from srm_dicom.names import SIDECARS
from srm_dicom.sidecar import fsl_files, has_diffusion, series_file
from srm_dicom.synthetic import FakePatient, make_series
from srm_dicom.volume import assemble, image_row, plan_volume

SECRET = b"sidecar test secret"
GRADIENTS = [(0.0, 0.0, 0.0), (1.0, 0.0, 0.0), (0.0, 0.7071068, 0.7071068), (0.5773503, -0.5773503, 0.5773503)]
BVALUES = [0, 1000, 1000, 2000]
# Keys both write from the same DICOM attributes, compared value for value (not Manufacturer:
# dcm2niix shortens it to "GE", "Siemens", …, where ours is the header's own value).
SHARED_KEYS = ("Modality", "MagneticFieldStrength", "ManufacturersModelName", "EchoTime",
               "RepetitionTime", "FlipAngle", "SliceThickness", "ImagingFrequency", "MRAcquisitionType")


def options() -> AnonymizationOptions:
    return AnonymizationOptions()


def dcm2niix(source: Path, out: Path) -> Path:
    out.mkdir()
    subprocess.run([require_program("dcm2niix"), "-z", "n", "-f", "volume", "-o", str(out), str(source)],
                   check=True, capture_output=True, timeout=120)
    return out / "volume"


def dti_series(orientation: tuple[float, ...] = (0.8660254, 0.5, 0.0, -0.5, 0.8660254, 0.0),
               patient: FakePatient | None = None) -> list[Dataset]:
    """4 slices × 4 diffusion volumes, standard attributes (read by dcm2niix for Philips)."""
    out = []
    for volume, (bvalue, gradient) in enumerate(zip(BVALUES, GRADIENTS, strict=True)):
        extra = {"patient": patient} if patient else {}
        normal = np.cross(orientation[:3], orientation[3:])
        for index, ds in enumerate(make_series(slices=4, size=16, seed="sidecar dti", **extra)):
            ds.ImagePositionPatient = [float(v) for v in np.array([-8.0, -8.0, 0.0]) + 2 * index * normal]
            ds.Modality, ds.SOPClassUID = "MR", MRImageStorage
            ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.InstanceNumber = volume * 4 + ds.InstanceNumber
            ds.ImageOrientationPatient = list(orientation)
            ds.Manufacturer, ds.MagneticFieldStrength, ds.EchoTime, ds.RepetitionTime = "Philips", 3, 89.5, 8000
            ds.DiffusionBValue = bvalue
            ds.DiffusionDirectionality = "DIRECTIONAL" if bvalue else "NONE"
            if bvalue:
                ds.DiffusionGradientOrientation = list(gradient)
            out.append(ds)
    return out


def write(series: list[Dataset], directory: Path) -> Path:
    directory.mkdir(parents=True)
    for number, ds in enumerate(series):
        ds.save_as(directory / f"{number:03d}.dcm", enforce_file_format=True)
    return directory


def world_vectors(bvec: str, affine: np.ndarray) -> np.ndarray:
    """Each column of a bvec file as a direction in RAS through its file's affine."""
    vectors = np.array([[float(v) for v in line.split()] for line in bvec.strip().splitlines()])
    axes = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    if np.linalg.det(axes) > 0:
        vectors[0] = -vectors[0]  # FSL's radiological flip, undone
    return axes @ vectors


@pytest.mark.parametrize("orientation", [(0.8660254, 0.5, 0.0, -0.5, 0.8660254, 0.0), (1.0, 0, 0, 0, 0.8660254, -0.5)])
def test_bval_equals_dcm2niix_and_bvec_is_the_same_directions(orientation: tuple[float, ...], tmp_path: Path) -> None:
    series = dti_series(orientation)
    rows = [image_row(ds) for ds in series]
    assert any(has_diffusion(row) for row in rows)
    plan = plan_volume(rows)
    bval, bvec = fsl_files(rows, plan)
    theirs = dcm2niix(write(series, tmp_path / "dicom"), tmp_path / "nifti")
    assert bval.decode() == theirs.with_suffix(".bval").read_text()
    assert bval.decode() == "0 1000 1000 2000\n"
    ours_world = world_vectors(bvec.decode(), np.array(plan.affine))
    their_affine = nibabel.load(theirs.with_suffix(".nii")).affine
    np.testing.assert_allclose(ours_world, world_vectors(theirs.with_suffix(".bvec").read_text(), their_affine),
                               atol=1e-5)
    lps = np.array(GRADIENTS).T
    np.testing.assert_allclose(ours_world, np.diag([-1.0, -1.0, 1.0]) @ lps, atol=1e-5)  # RAS of the gradients


def test_a_series_without_b_values_has_no_diffusion_files() -> None:
    series = make_series(slices=4, size=16, seed="sidecar plain")
    assert not any(has_diffusion(image_row(ds)) for ds in series)


@pytest.mark.parametrize("series", GROUND_TRUTH)
def test_sidecar_of_each_vendor_series_agrees_with_dcm2niix(series: str, tmp_path: Path) -> None:
    datasets = vendor_series(series)
    ours = json.loads(series_file("3D.json", datasets, "nifti"))
    assert ours["ConversionSoftware"] == "srm-dicom"
    assert not [key for key in ours if key.startswith(("Patient", "Institution", "Station", "Device", "Acquisition"))]
    if "jpegls" in series:  # dcm2niix reads no JPEG-LS
        return
    theirs = json.loads(dcm2niix(require_vendor_data() / series, tmp_path / "nifti").with_suffix(".json").read_text())
    compared = [key for key in SHARED_KEYS if key in theirs and key in ours]
    assert compared or series == "generic/rgb/001"
    for key in compared:
        if isinstance(theirs[key], float | int):
            assert ours[key] == pytest.approx(theirs[key], rel=1e-6), key
        else:
            assert ours[key] == theirs[key], key


def test_sidecar_holds_no_patient_attribute_nor_anything_above_anonymous() -> None:
    patient = FakePatient(name="SIDECAR^PHI^MARKER", patient_id="PHI-ID-777", birth_date="19380101")
    series = dti_series(patient=patient)
    for ds in series:
        ds.InstitutionName, ds.StationName, ds.DeviceSerialNumber = "Hospital of Marker", "STATION-MARKER", "SN-777"
        ds.PatientWeight, ds.PatientAge, ds.OperatorsName = 71.5, "083Y", "OPERATOR^MARKER"
    data = series_file("3D.json", series, "nifti")
    sidecar = json.loads(data)
    assert sidecar["EchoTime"] == 0.0895 and sidecar["RepetitionTime"] == 8 and sidecar["MagneticFieldStrength"] == 3
    for marker in (b"MARKER", b"PHI-ID", b"1938", b"SN-777", b"083Y", b"71.5", series[0].StudyInstanceUID.encode(),
                   str(series[0].SeriesInstanceUID).encode(), b"20260101"):
        assert marker not in data
    assert not [key for key in sidecar if "Patient" in key or "UID" in key or "Date" in key or key[-4:] == "Time"
                and key not in ("EchoTime", "RepetitionTime", "InversionTime", "ExposureTime")]


def test_sidecars_are_deterministic_and_named_as_dcm2niix_names_them() -> None:
    series = dti_series()
    for name in SIDECARS:
        assert series_file(name, series, "nifti") == series_file(name, list(reversed(dti_series())), "nifti")
    assert SIDECARS == ("3D.json", "3D.bval", "3D.bvec")
    assert len(series_file("3D", series, "nifti")) == len(assemble(series, "nifti"))


def test_the_sidecar_holds_only_what_served_slices_keep() -> None:
    """Every acquisition attribute the sidecar reads survives anonymization unchanged."""
    ds = dti_series()[0]
    for _, keyword, _ in FIELDS:
        if keyword not in ds:
            setattr(ds, keyword, {"CS": "X", "DS": "1.5", "IS": "3", "LO": "x", "SH": "x"}.get(
                dictionary_VR(keyword), "1"))
    record = acquisition_record(ds)
    assert record is not None and len(json.loads(record)) == len(FIELDS)
    assert acquisition_record(anonymize(ds, SECRET, options()).dataset) == record


def test_a_b_value_of_zero_alone_is_not_a_diffusion_series() -> None:
    series = dti_series()
    b0 = [ds for ds in series if ds.DiffusionBValue == 0]
    assert b0 and not any(has_diffusion(image_row(ds)) for ds in b0)
    assert all(has_diffusion(image_row(ds)) for ds in series if ds.DiffusionBValue > 0)
