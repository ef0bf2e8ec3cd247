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

import copy
import json
import subprocess
from pathlib import Path

import nibabel
import numpy as np
import pytest
from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import MRImageStorage, generate_uid
from test_frames import legacy_converted
from test_volume import GROUND_TRUTH, vendor_series

from conftest import require_program
from sites import require_vendor_data
from srm_dicom.acquisition import FIELDS, acquisition_record
from srm_dicom.anonymization_options import AnonymizationOptions
from srm_dicom.anonymize import anonymize
from srm_dicom.names import SIDECARS
from srm_dicom.sidecar import fsl_files, has_diffusion, series_file, sidecar_json
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


# -- vendor private diffusion attributes, against dcm2niix ---------------------------------
#
# The shared data hold no diffusion series (the GE DTI series with its 001_ground_truth.bval
# and .bvec is not among them): the series are made here from the shared single-frame vendor
# series, each slice repeated once per diffusion volume with the vendor's private b-value and
# gradient (and, for Philips, the standard b-value dcm2niix reads with them).

PRIVATE_BVALUES = [0, 1000, 1000, 2000, 2000]
# The last gradient is shorter than 1: GE's way of giving a lower b-value (dcm2niix's issue 163).
PRIVATE_GRADIENTS = [(0.0, 0.0, 0.0), (1.0, 0.0, 0.0), (0.0, 0.6, 0.8), (0.6, 0.48, 0.64), (0.0, 0.7071068, 0.0)]
SHARED_GE = "ge/anatomical/001"  # sagittal; the axial and coronal variants take its pixels
GE_ORIENTATIONS = {"sagittal": None, "axial": (1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
                   "coronal": (1.0, 0.0, 0.0, 0.0, 0.0, -1.0),
                   "oblique": (0.8660254, 0.5, 0.0, -0.5, 0.8660254, 0.0)}


def private_diffusion_series(vendor: str, orientation: tuple[float, ...] | None = None, phase: str = "COL",
                             ) -> list[Dataset]:
    """A diffusion series of the shared ``vendor`` series, with its vendor's private attributes."""
    source = sorted(vendor_series(SHARED_GE if vendor == "ge" else f"{vendor}/anatomical/001"),
                    key=lambda ds: int(ds.InstanceNumber))
    series_uid, out = generate_uid(), []
    volumes = zip(PRIVATE_BVALUES, PRIVATE_GRADIENTS, strict=True) if vendor == "ge" else \
        zip(BVALUES, [(0.0, 0.0, 0.0), (1.0, 0.0, 0.0), (0.0, 0.6, 0.8), (0.6, 0.48, 0.64)], strict=True)
    for volume, (bvalue, gradient) in enumerate(volumes):
        for index, original in enumerate(source):
            ds = copy.deepcopy(original)
            ds.remove_private_tags()
            ds.SeriesInstanceUID, ds.SOPInstanceUID = series_uid, generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.InstanceNumber = volume * len(source) + index + 1
            ds.PatientPosition, ds.MRAcquisitionType = "HFS", "2D"
            if orientation is not None:
                normal = np.cross(orientation[:3], orientation[3:])
                ds.ImageOrientationPatient = list(orientation)
                ds.ImagePositionPatient = [float(v) for v in np.array([-40.0, -140.0, 124.0]) + index * normal]
            if vendor == "ge":
                ds.InPlanePhaseEncodingDirection = phase
                parameters = ds.private_block(0x0043, "GEMS_PARM_01", create=True)
                parameters.add_new(0x39, "IS", [1_000_000_000 + bvalue, 8, 0, 0])
                block = ds.private_block(0x0019, "GEMS_ACQU_01", create=True)
                for offset, value in zip((0xBB, 0xBC, 0xBD), gradient, strict=True):
                    block.add_new(offset, "DS", f"{value:.7f}")
            elif vendor == "siemens":
                block = ds.private_block(0x0019, "SIEMENS MR HEADER", create=True)
                block.add_new(0x0C, "IS", bvalue)
                if bvalue:
                    block.add_new(0x0E, "FD", list(gradient))
            else:  # the shared Philips slices hold a standard direction of 0 (NONE): dropped here
                del ds.DiffusionGradientOrientation
                ds.DiffusionBValue = float(bvalue)
                ds.DiffusionDirectionality = "DIRECTIONAL" if bvalue else "NONE"
                ds.private_block(0x2001, "Philips Imaging DD 001", create=True).add_new(0x03, "FL", float(bvalue))
                block = ds.private_block(0x2005, "Philips MR Imaging DD 001", create=True)
                for offset, value in zip((0xB0, 0xB1, 0xB2), gradient, strict=True):
                    block.add_new(offset, "FL", float(value))
            out.append(ds)
    return out


def assert_diffusion_equals_dcm2niix(series: list[Dataset], tmp_path: Path) -> tuple[bytes, bytes]:
    """Our 3D.bval equals dcm2niix's, text for text; our 3D.bvec gives its directions in patient space
    (within 1e-4: both files hold 6 significant digits, of the cosines of a real, slightly oblique series)."""
    rows = [image_row(ds) for ds in series]
    plan = plan_volume(rows)
    bval, bvec = fsl_files(rows, plan)
    theirs = dcm2niix(write(series, tmp_path / "dicom"), tmp_path / "nifti")
    assert bval.decode() == theirs.with_suffix(".bval").read_text()
    their_affine = nibabel.load(theirs.with_suffix(".nii")).affine
    np.testing.assert_allclose(world_vectors(bvec.decode(), np.array(plan.affine)),
                               world_vectors(theirs.with_suffix(".bvec").read_text(), their_affine), atol=1e-4)
    return bval, bvec


@pytest.mark.parametrize(("orientation", "phase"), [
    ("sagittal", "COL"), ("sagittal", "ROW"), ("axial", "COL"), ("axial", "ROW"), ("coronal", "COL"),
    ("oblique", "COL"),
])
def test_ge_private_b_values_and_gradients_equal_dcm2niix(orientation: str, phase: str, tmp_path: Path) -> None:
    """GE's (0043,1039) b-value (less its 10^9 bias) and (0019,10bb-bd) gradient in GE's logical
    axes, turned and flipped as dcm2niix does; the short last gradient halves its b-value."""
    series = private_diffusion_series("ge", GE_ORIENTATIONS[orientation], phase)
    bval, bvec = assert_diffusion_equals_dcm2niix(series, tmp_path)
    assert bval == b"0 1000 1000 2000 1000\n"
    assert np.abs(np.array([[float(v) for v in line.split()] for line in bvec.decode().splitlines()])).sum() > 3


@pytest.mark.parametrize("vendor", ["siemens", "philips"])
def test_siemens_and_philips_private_diffusion_equal_dcm2niix(vendor: str, tmp_path: Path) -> None:
    """Siemens' (0019,100C)/(0019,100E) and Philips' (2005,10b0-b2) directions: patient axes, as
    the standard attributes (dcm2niix 1.0.20220720 takes Philips' b-value from (0018,9087) only)."""
    series = private_diffusion_series(vendor)
    bval, bvec = assert_diffusion_equals_dcm2niix(series, tmp_path)
    assert bval == b"0 1000 1000 2000\n"
    assert len({line.split()[1] for line in bvec.decode().splitlines()}) > 1  # real directions, not zeros


def test_philips_private_b_factor_alone_is_read() -> None:
    series = private_diffusion_series("philips")
    for ds in series:
        del ds.DiffusionBValue
    rows = [image_row(ds) for ds in series]
    assert fsl_files(rows, plan_volume(rows))[0] == b"0 1000 1000 2000\n"


@pytest.mark.parametrize("vendor", ["ge", "siemens", "philips"])
def test_private_diffusion_is_read_from_served_files_only_with_retain_safe_private(vendor: str) -> None:
    """The Image row is read from the served file: the private attributes, and GE's patient
    position and phase-encoding direction, reach it only with retain_safe_private."""
    series = private_diffusion_series(vendor)
    original = [image_row(ds)["diffusion"] for ds in series]
    assert all(original)
    kept = [image_row(anonymize(ds, SECRET, AnonymizationOptions(retain_safe_private=True)).dataset)["diffusion"]
            for ds in series]
    assert kept == original
    served = [anonymize(ds, SECRET, options()).dataset for ds in series]
    if vendor == "philips":  # the standard b-value stays, the private directions go
        assert all(json.loads(image_row(ds)["diffusion"]).get("gradient", [0, 0, 0]) == [0, 0, 0] for ds in served)
    else:
        assert not any(image_row(ds)["diffusion"] for ds in served)


def test_ge_gradients_need_a_head_first_supine_patient_and_a_phase_direction() -> None:
    """As for dcm2niix, GE's logical axes mean nothing otherwise: b-values, no vectors."""
    series = private_diffusion_series("ge")
    for ds in series:
        ds.PatientPosition = "FFS"
    records = [json.loads(image_row(ds)["diffusion"]) for ds in series]
    assert [r["bvalue"] for r in records][::4] == [0, 1000, 1000, 2000, 2000]
    assert not any("gradient" in r for r in records)


def diffusion_object(series: list[Dataset]) -> Dataset:
    """The Legacy Converted Enhanced MR object of a diffusion series, each frame's b-value and
    gradient in its MR Diffusion Sequence, as an Enhanced MR object holds them."""
    converted = legacy_converted(series, "MR")
    by_sop = {str(ds.SOPInstanceUID): ds for ds in series}
    for item in converted.PerFrameFunctionalGroupsSequence:
        source = by_sop[str(item.ConversionSourceAttributesSequence[0].ReferencedSOPInstanceUID)]
        diffusion = Dataset()
        diffusion.DiffusionBValue = source.DiffusionBValue
        diffusion.DiffusionDirectionality = source.DiffusionDirectionality
        if "DiffusionGradientOrientation" in source:
            direction = Dataset()
            direction.DiffusionGradientOrientation = source.DiffusionGradientOrientation
            diffusion.DiffusionGradientDirectionSequence = DicomSequence([direction])
        item.MRDiffusionSequence = DicomSequence([diffusion])
    return converted


def test_a_multiframe_diffusion_object_has_its_series_bvals_and_bvecs_and_dcm2niix_agrees(tmp_path: Path) -> None:
    """Frames at 4 positions × 4 b-values: a 4D volume whose FSL files are those of the
    single-frame series; dcm2niix writes the same b-values and directions (its NIfTI stacks
    the 16 frames as slices: README "Volumes")."""
    series = dti_series()
    converted = diffusion_object(series)
    rows = [image_row(converted)]
    assert has_diffusion(rows[0])
    plan = plan_volume(rows)
    assert plan.shape == (16, 16, 4, 4)
    single = [image_row(ds) for ds in series]
    assert fsl_files(rows, plan) == fsl_files(single, plan_volume(single))
    assert series_file("3D", [converted], "nifti") == series_file("3D", series, "nifti")
    theirs = dcm2niix(write([converted], tmp_path / "dicom"), tmp_path / "nifti")
    bval, bvec = fsl_files(rows, plan)
    assert bval.decode() == theirs.with_suffix(".bval").read_text()
    np.testing.assert_allclose(world_vectors(bvec.decode(), np.array(plan.affine)),
                               world_vectors(theirs.with_suffix(".bvec").read_text(),
                                             nibabel.load(theirs.with_suffix(".nii")).affine), atol=1e-5)


# -- SliceTiming -----------------------------------------------------------------------------

INTERLEAVED = [0, 2, 1, 3]  # slice k (along the normal) is acquired INTERLEAVED[k]-th


def functional_series(volumes: int = 3, repetition: float = 2.0, start: float = 23 * 3600 + 59 * 60 + 57,
                      ) -> list[Dataset]:
    """A 2D multi-volume Siemens series of the shared Siemens slices, interleaved, each slice's
    AcquisitionTime its own (crossing midnight from the second volume on)."""
    source = sorted(vendor_series("siemens/anatomical/001"), key=lambda ds: float(
        np.dot(ds.ImagePositionPatient, np.cross(ds.ImageOrientationPatient[:3], ds.ImageOrientationPatient[3:]))))
    series_uid, out = generate_uid(), []
    for volume in range(volumes):
        for index, original in enumerate(source):
            ds = copy.deepcopy(original)
            ds.SeriesInstanceUID, ds.SOPInstanceUID = series_uid, generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.InstanceNumber = volume * len(source) + index + 1
            ds.MRAcquisitionType, ds.RepetitionTime = "2D", repetition * 1000
            seconds = (start + volume * repetition + INTERLEAVED[index] * repetition / len(source)) % (24 * 3600)
            hours, minutes = int(seconds // 3600), int(seconds % 3600 // 60)
            ds.AcquisitionTime = f"{hours:02d}{minutes:02d}{seconds % 60:09.6f}"
            out.append(ds)
    return out


def test_slice_timing_equals_dcm2niix_from_the_slices_acquisition_times(tmp_path: Path) -> None:
    series = functional_series(start=14 * 3600 + 30 * 60 + 50)
    ours = json.loads(series_file("3D.json", series, "nifti"))
    assert ours["SliceTiming"] == [0.0, 1.0, 0.5, 1.5]
    assert "acquired" not in ours and "AcquisitionTime" not in ours
    theirs = dcm2niix(write(series, tmp_path / "dicom"), tmp_path / "nifti")
    their_timing = json.loads(theirs.with_suffix(".json").read_text())["SliceTiming"]
    plan = plan_volume([image_row(ds) for ds in series])
    their_k = nibabel.load(theirs.with_suffix(".nii")).affine[:3, 2]
    if float(np.dot(their_k, np.array(plan.affine)[:3, 2])) < 0:  # its slices run the other way
        their_timing = their_timing[::-1]
    assert ours["SliceTiming"] == pytest.approx(their_timing, abs=1e-6)


def test_slice_timing_across_midnight_and_of_a_multiframe_object() -> None:
    """Times before noon after times in the evening are the next day's; an Enhanced object's
    frames give theirs in Frame Acquisition DateTime (highdicom writes them from the slices)."""
    series = functional_series()
    assert json.loads(series_file("3D.json", series, "nifti"))["SliceTiming"] == [0.0, 1.0, 0.5, 1.5]
    converted = legacy_converted(functional_series(start=8 * 3600), "MR")
    assert json.loads(series_file("3D.json", [converted], "nifti"))["SliceTiming"] == [0.0, 1.0, 0.5, 1.5]


def test_no_slice_timing_where_it_is_not_known_or_means_nothing() -> None:
    """Not for a 3D acquisition, nor CT, nor when the served slices dropped AcquisitionTime
    (the Basic Profile does; retain_longitudinal_modified_dates keeps times)."""
    for change in ({"MRAcquisitionType": "3D"}, {"Modality": "CT"}):
        series = functional_series()
        for ds in series:
            for keyword, value in change.items():
                setattr(ds, keyword, value)
        assert "SliceTiming" not in json.loads(series_file("3D.json", series, "nifti"))
    series = functional_series()
    served = [anonymize(ds, SECRET, options()).dataset for ds in series]
    rows = [image_row(ds) for ds in served]
    assert "SliceTiming" not in json.loads(sidecar_json(rows, plan_volume(rows)))
    dates = AnonymizationOptions(retain_longitudinal_modified_dates=True)
    kept = [anonymize(ds, SECRET, dates).dataset for ds in series]
    rows = [image_row(ds) for ds in kept]
    assert json.loads(sidecar_json(rows, plan_volume(rows)))["SliceTiming"] == [0.0, 1.0, 0.5, 1.5]


def test_ge_private_pair_wins_over_its_standard_attributes(tmp_path: Path) -> None:
    """A GE slice with both: dcm2niix takes GE's b-value and gradient from the private pair (its
    standard gradient it ignores), so the shortened gradient still lowers the b-value."""
    series = private_diffusion_series("ge", GE_ORIENTATIONS["axial"])
    for ds in series:
        ds.DiffusionBValue = 3000.0
        ds.DiffusionGradientOrientation = [0.0, 0.0, 1.0]
    bval, _ = assert_diffusion_equals_dcm2niix(series, tmp_path)
    assert bval == b"0 1000 1000 2000 1000\n"


def test_an_enhanced_mr_object_gives_its_acquisition_parameters_from_its_functional_groups(tmp_path: Path) -> None:
    """Repetition time and flip angle in the MR Timing macro, the echo time as the MR Echo
    macro's EffectiveEchoTime, per frame: read there as dcm2niix reads them, from the served object."""
    single = vendor_series("siemens/anatomical/001")
    converted = legacy_converted(single, "MR")
    for item in converted.PerFrameFunctionalGroupsSequence:
        timing, echo = Dataset(), Dataset()
        timing.RepetitionTime, timing.FlipAngle = single[0].RepetitionTime, 9.0
        echo.EffectiveEchoTime = single[0].EchoTime
        item.MRTimingAndRelatedParametersSequence = DicomSequence([timing])
        item.MREchoSequence = DicomSequence([echo])
    served = anonymize(converted, SECRET, options()).dataset
    ours = json.loads(series_file("3D.json", [served], "nifti"))
    assert ours["RepetitionTime"] == pytest.approx(float(single[0].RepetitionTime) / 1000)
    assert ours["EchoTime"] == pytest.approx(float(single[0].EchoTime) / 1000) and ours["FlipAngle"] == 9
    theirs = json.loads(dcm2niix(write([converted], tmp_path / "dicom"), tmp_path / "nifti").with_suffix(".json")
                        .read_text())
    for key in ("EchoTime", "RepetitionTime", "FlipAngle"):
        assert ours[key] == pytest.approx(theirs[key], rel=1e-6), key
