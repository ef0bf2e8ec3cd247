"""The served files carry no PHI, keep their pixels bit for bit, and stay readable by real tools."""

import os
import shutil
import subprocess
import tomllib
from datetime import date
from importlib.resources import files
from io import BytesIO
from pathlib import Path

import nibabel
import numpy as np
import pytest
from pydicom import dcmread, dcmwrite
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, MRImageStorage

from phi import SAFE_PRIVATE_TAG, SAFE_PRIVATE_VALUE, make_phi_dataset, series_uids
from srm_dicom.anonymization_options import AnonymizationOptions
from srm_dicom.anonymize import (
    IMPLEMENTATION_VERSION_NAME,
    anonymize,
    profile_table,
    safe_attributes,
    safe_private,
    to_bytes,
)
from srm_dicom.errors import InvalidInput
from srm_dicom.uids import deidentify_uid

SECRET = b"s" * 32
PIXEL_DATA = 0x7FE00010
IN_CI = os.environ.get("CI") == "1"


def require_program(name: str) -> str:
    """The program's path; a missing program skips the test here but fails it in CI."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return path


def vendor_series() -> list[Path]:
    root = Path(os.environ.get("SRM_DICOM_DATA", "/work/shared/data")) / "dicom2nifti"
    if not root.is_dir():
        if IN_CI:
            raise RuntimeError(f"vendor DICOM data missing: {root}")
        return []
    return sorted(d for d in root.glob("*/*/*") if d.is_dir())


def slices(series: Path) -> list[Path]:
    return sorted(f for f in series.iterdir() if f.is_file())


def reread(result_bytes: bytes) -> Dataset:
    return dcmread(BytesIO(result_bytes))


def part10(ds: Dataset) -> bytes:
    buffer = BytesIO()
    dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


# -- the synthetic PHI slice ------------------------------------------------------------


def test_no_marker_survives_in_the_file():
    ds, markers = make_phi_dataset("QZ7")
    data = to_bytes(anonymize(ds, SECRET))
    assert [m for m in markers if m.encode() in data] == []
    assert data[:128] == b"\0" * 128 and data[128:132] == b"DICM"


def test_every_marker_is_recorded_as_erased():
    ds, markers = make_phi_dataset("QZ7")
    erased = anonymize(ds, SECRET).erased
    values = {e.value for e in erased}
    assert [m for m in markers if not any(m in v for v in values)] == []
    by_path = {e.path: e for e in erased}
    assert by_path["(0010,0010)"].keyword == "PatientName"
    assert by_path["(0010,0010)"].value == "QZ7PATNAME^Jane"
    deep = by_path["(0008,2112)[0].(0040,A170)[0].(0008,1070)"]
    assert (deep.keyword, deep.value) == ("OperatorsName", "QZ7DEEPOPER")
    assert by_path["(0002,0016)"].value == "QZ7SRCAE"


def test_pixel_data_is_identical_and_input_untouched():
    ds, _ = make_phi_dataset("QZ7")
    before = part10(ds)
    out = reread(to_bytes(anonymize(ds, SECRET)))
    assert out.PixelData == ds.PixelData
    assert part10(ds) == before


def test_same_input_secret_and_options_give_the_same_bytes():
    ds, _ = make_phi_dataset("QZ7")
    first = to_bytes(anonymize(ds, SECRET))
    second = to_bytes(anonymize(reread(part10(ds)), SECRET))
    assert first == second
    assert to_bytes(anonymize(ds, b"t" * 32)) != first


def test_a_series_stays_a_series_with_the_catalog_uids():
    study, series = series_uids("QZ7")
    one = reread(to_bytes(anonymize(make_phi_dataset("QZ7", instance=1)[0], SECRET)))
    two = reread(to_bytes(anonymize(make_phi_dataset("QZ7", instance=2)[0], SECRET)))
    assert one.StudyInstanceUID == two.StudyInstanceUID == deidentify_uid(SECRET, study)
    assert one.SeriesInstanceUID == two.SeriesInstanceUID == deidentify_uid(SECRET, series)
    assert one.FrameOfReferenceUID == two.FrameOfReferenceUID
    assert one.SOPInstanceUID != two.SOPInstanceUID
    original_sop = make_phi_dataset("QZ7", instance=1)[0].SOPInstanceUID
    assert one.SOPInstanceUID == deidentify_uid(SECRET, original_sop)
    assert one.file_meta.MediaStorageSOPInstanceUID == one.SOPInstanceUID
    # Well-known UIDs (SOP classes, transfer syntaxes) are not replaced.
    assert one.SOPClassUID == one.file_meta.MediaStorageSOPClassUID == MRImageStorage
    assert one.SourceImageSequence[0].ReferencedSOPClassUID == MRImageStorage
    reference = make_phi_dataset("QZ7")[0].SourceImageSequence[0].ReferencedSOPInstanceUID
    expected = deidentify_uid(SECRET, reference)
    assert one.SourceImageSequence[0].ReferencedSOPInstanceUID == expected


def test_file_meta_is_rebuilt_and_deidentification_declared():
    out = reread(to_bytes(anonymize(make_phi_dataset("QZ7")[0], SECRET)))
    meta = out.file_meta
    assert "SourceApplicationEntityTitle" not in meta
    assert "SendingApplicationEntityTitle" not in meta
    assert "PrivateInformation" not in meta
    assert meta.ImplementationVersionName == IMPLEMENTATION_VERSION_NAME
    assert meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert out.PatientIdentityRemoved == "YES"
    assert [i.CodeValue for i in out.DeidentificationMethodCodeSequence] == ["113100"]
    assert out.LongitudinalTemporalInformationModified == "REMOVED"
    assert not any(elem.tag.is_private for elem in out)
    assert 0x50002500 not in out and 0x60003000 not in out and 0x60004000 not in out
    # Type 2 attributes stay present, emptied; Patient ID becomes the keyed patient key.
    assert out.get("PatientName", "") == "" and out.get("PatientBirthDate", "") == ""
    assert len(out.PatientID) == 32
    assert "ReferencedStudySequence" not in out  # X/Z on a type 3 sequence: removed


def test_options_change_what_is_kept():
    ds, _ = make_phi_dataset("QZ7")
    ds.ProtocolName = "T1 QZ7PATNAME jane 3D QZ7ACC"
    options = AnonymizationOptions(
        retain_institution_identity=True,
        retain_device_identity=True,
        retain_patient_characteristics=True,
        retain_safe_private=True,
        clean_descriptors=True,
    )
    out = reread(to_bytes(anonymize(ds, SECRET, options)))
    assert out.InstitutionName == "QZ7INSTNAME"
    assert out.InstitutionAddress == "QZ7INSTADDR"
    assert out.StationName == "QZ7STATION" and out.DeviceSerialNumber == "QZ7SERIAL"
    assert out.PatientSex == "F" and out.PatientAge == "042Y"
    assert out[SAFE_PRIVATE_TAG].value == SAFE_PRIVATE_VALUE
    assert "QZ7PRIVVAL" not in str([e.value for e in out if e.tag.is_private])
    # Descriptors are kept without the words of values the profile removes (a typed-in name).
    assert out.ProtocolName == "T1 3D"
    assert out.SeriesDescription == "QZ7SERIESDESC"
    assert "PatientName" in out and out.PatientName == ""
    codes = {i.CodeValue for i in out.DeidentificationMethodCodeSequence}
    assert codes == {"113100", "113105", "113108", "113109", "113111", "113112"}


def test_longitudinal_option_shifts_dates_by_one_offset_per_patient():
    options = AnonymizationOptions(retain_longitudinal_modified_dates=True)
    ds, markers = make_phi_dataset("QZ7")
    out = reread(to_bytes(anonymize(ds, SECRET, options)))
    original = date.fromisoformat(ds.StudyDate)
    shifted = date.fromisoformat(out.SeriesDate)
    assert 1 <= (original - shifted).days <= 3650
    assert out.ContentDate == out.SeriesDate
    assert out.LongitudinalTemporalInformationModified == "MODIFIED"
    other = reread(to_bytes(anonymize(make_phi_dataset("QZ7", instance=5)[0], SECRET, options)))
    assert other.SeriesDate == out.SeriesDate
    data = to_bytes(anonymize(ds, SECRET, options))
    assert [m for m in markers if m.encode() in data] == []


def test_file_without_meta_in_implicit_vr_is_anonymized():
    ds, _ = make_phi_dataset("QZ7")
    del ds.file_meta
    buffer = BytesIO()
    dcmwrite(buffer, ds, implicit_vr=True, little_endian=True)
    odd = dcmread(BytesIO(buffer.getvalue()), force=True)
    out = reread(to_bytes(anonymize(odd, SECRET)))
    assert out.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
    assert out.PixelData == ds.PixelData
    assert out.PatientName == ""


def test_compressed_pixel_data_without_transfer_syntax_is_refused():
    ds = dcmread(next(iter(slices(_series_named("generic/compressed_jpeg/001")))))
    del ds.file_meta
    with pytest.raises(InvalidInput):
        anonymize(ds, SECRET)


# -- real vendor series -----------------------------------------------------------------


def _series_named(name: str) -> Path:
    matches = [s for s in vendor_series() if s.as_posix().endswith(name)]
    if not matches:
        pytest.skip(f"vendor series {name} not available")
    return matches[0]


@pytest.mark.parametrize(
    "series", vendor_series(), ids=lambda p: "/".join(p.parts[-3:])
)
def test_vendor_series_keep_pixels_and_stay_readable(series: Path):
    study_uids = set()
    for path in slices(series):
        source = dcmread(path)
        result = anonymize(source, SECRET)
        out = reread(to_bytes(result))
        assert out.get_item(PIXEL_DATA).value == source.get_item(PIXEL_DATA).value
        assert out.file_meta.TransferSyntaxUID == source.file_meta.TransferSyntaxUID
        assert out.StudyInstanceUID == deidentify_uid(SECRET, source.StudyInstanceUID)
        assert source.StudyInstanceUID.encode() not in to_bytes(result)
        assert out.get("PatientName", "") == "" and out.get("PatientBirthDate", "") == ""
        assert out.get("PatientID") != source.get("PatientID")
        assert not any(elem.tag.is_private for elem in out)
        study_uids.add(out.StudyInstanceUID)
    assert len(study_uids) == 1


def _dcm2niix_voxels(dcm2niix: str, src: Path, out: Path) -> np.ndarray:
    out.mkdir()
    subprocess.run(
        [dcm2niix, "-z", "n", "-b", "n", "-f", "volume", "-o", str(out), str(src)],
        check=True,
        capture_output=True,
    )
    (nifti,) = out.glob("volume*.nii")
    return np.asarray(nibabel.load(nifti).dataobj)


@pytest.mark.parametrize("name", ["siemens/anatomical/001", "generic/compressed_jpeg/001"])
def test_dcm2niix_converts_an_anonymized_series_to_the_same_voxels(name: str, tmp_path: Path):
    dcm2niix = require_program("dcm2niix")
    series = _series_named(name)
    anonymized = tmp_path / "anonymized"
    anonymized.mkdir()
    for index, path in enumerate(slices(series)):
        data = to_bytes(anonymize(dcmread(path), SECRET))
        (anonymized / f"{index:04d}.dcm").write_bytes(data)
    original = _dcm2niix_voxels(dcm2niix, series, tmp_path / "original_nii")
    converted = _dcm2niix_voxels(dcm2niix, anonymized, tmp_path / "anonymized_nii")
    assert converted.shape == original.shape
    assert np.array_equal(converted, original)


# -- the allow-list ---------------------------------------------------------------------


def test_the_safe_lists_are_data_with_a_source_and_a_reason_for_each_entry():
    table = {int(e["id"], 16) for e in profile_table() if e["id"].isalnum() and "X" not in e["id"].upper()}
    groups = tomllib.loads((files("srm_dicom") / "data" / "safe_attributes.toml").read_text())["group"]
    listed = [keyword for group in groups for keyword in group["attributes"]]
    assert all(group["source"].startswith("PS3.3") and group["reason"] for group in groups)
    assert len(listed) == len(set(listed)) == len(safe_attributes()) > 300
    assert not set(safe_attributes()) & table  # the Annex E table decides what it lists
    private = tomllib.loads((files("srm_dicom") / "data" / "safe_private.toml").read_text())["attribute"]
    assert all(e["source"] == "PS3.15 Table E.3.10-1" and e["reason"] and e["vr"] for e in private)
    assert len(safe_private()) == len(private)


def test_what_no_list_names_is_removed_at_any_depth():
    ds, _ = make_phi_dataset("QZ7")
    out = reread(to_bytes(anonymize(ds, SECRET)))
    for tag in (0x60000022, 0x60001500, 0x60000010, 0x50002500, 0x50003000, 0x00089990, 0x00111010):
        assert tag not in out  # overlay text and plane, curves, an unknown (UN) element, an orphan
    assert "SoftwareVersions" not in out and "WindowCenterWidthExplanation" not in out
    assert len(out.ContentSequence) == 0  # content text (D on a sequence: empty)
    region = out.SharedFunctionalGroupsSequence[0].FrameAnatomySequence[0].AnatomicRegionSequence[0]
    assert (region.CodeValue, region.CodingSchemeDesignator, region.CodeMeaning) == ("T-A0100", "SRT", "Brain")
    assert "CodingSchemeName" not in region and region.get("PatientName", "") == ""
    assert out.SharedFunctionalGroupsSequence[0].FrameAnatomySequence[0].FrameLaterality == "U"
    # What processing needs stays.
    for keyword in ("Rows", "BitsStored", "PixelSpacing", "ImagePositionPatient", "Modality", "Manufacturer"):
        assert out[keyword].value == ds[keyword].value


def test_safe_private_keeps_only_listed_elements_of_a_listed_creator():
    ds, _ = make_phi_dataset("QZ7")
    out = reread(to_bytes(anonymize(ds, SECRET, AnonymizationOptions(retain_safe_private=True))))
    private = {elem.tag: elem.value for elem in out if elem.tag.is_private}
    assert private == {0x00190010: "SIEMENS MR HEADER", SAFE_PRIVATE_TAG: SAFE_PRIVATE_VALUE}


def _dciodvfy_errors(dciodvfy: str, path: Path) -> set[str]:
    run = subprocess.run([dciodvfy, "-new", str(path)], capture_output=True, text=True)
    lines = (run.stderr + run.stdout).splitlines()
    return {" ".join(line.split()) for line in lines if line.startswith("Error")}


def test_served_files_pass_dciodvfy_with_no_new_errors(tmp_path: Path):
    dciodvfy = require_program("dciodvfy")
    phi = tmp_path / "phi.dcm"
    dcmwrite(phi, make_phi_dataset("QZ7")[0], enforce_file_format=True)
    originals = [phi] + [slices(series)[0] for series in vendor_series()]
    assert len(originals) > 10 or not IN_CI
    new_errors = {}
    for index, original in enumerate(originals):
        served = tmp_path / f"{index}.dcm"
        served.write_bytes(to_bytes(anonymize(dcmread(original), SECRET)))
        found = _dciodvfy_errors(dciodvfy, served) - _dciodvfy_errors(dciodvfy, original)
        if found:
            new_errors[original.as_posix()] = sorted(found)
    assert new_errors == {}
