"""Enhanced multi-frame images become volumes equal to dcm2niix's, or get one clear reason.

The objects are made here, with highdicom's Legacy Converted Enhanced MR and CT images,
from the shared single-frame vendor series (relabelled CT for the CT object); each is
written to disk and converted by dcm2niix, and our volume of the same object must match
it in canonical (RAS) orientation: same shape, equal data, affine within 1e-4.
"""

from __future__ import annotations

import copy
import json
import logging
import subprocess
import warnings
from collections.abc import Callable
from pathlib import Path

import nibabel
import numpy as np
import pytest
from highdicom.legacy import LegacyConvertedEnhancedCTImage, LegacyConvertedEnhancedMRImage
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)
from test_volume import GROUND_TRUTH, ground_truth, vendor_series

from conftest import require_program
from sites import require_vendor_data
from srm_dicom.frames import frame_records
from srm_dicom.metadata import extract_metadata
from srm_dicom.synthetic import make_series
from srm_dicom.volume import NotAVolume, assemble, image_row, plan_volume

# Secondary Capture (the RGB series) has no Legacy Converted Enhanced form.
SINGLE_FRAME = [series for series in GROUND_TRUTH if series != "generic/rgb/001"]
KINDS = ("MR", "CT")
# dcm2niix (v1.0.20220720) dies of SIGSEGV on multi-frame JPEG 2000 and RLE objects: it
# converts those objects decoded (same frames, same groups); ours assembles them as they are.
DCM2NIIX_CRASHES_ON = {JPEG2000Lossless, RLELossless}
# dcm2niix cannot tell the two time points of ge/fmri apart once they are frames of one
# object: the Legacy Converted object orders frames by InstanceNumber with no temporal
# dimension, and dcm2niix stacks all 8 frames as 8 slices at 4 positions. Ours is the 4D
# volume of the single-frame series, compared with dicom2nifti's reference instead.
DCM2NIIX_STACKS_TIME_POINTS = {"ge/fmri/001"}
# Where each frame has its own rescale, dcm2niix (v1.0.20220720) silently applies the first
# frame's to all of them. Ours rescales each frame: its geometry is compared with dcm2niix,
# its data with dicom2nifti's reference of the single-frame series.
DCM2NIIX_ONE_RESCALE = {"generic/anatomical/002_non_isotropic"}


def legacy_converted(datasets: list[Dataset], kind: str) -> Dataset:
    """One Legacy Converted Enhanced object of the series; CT relabels the slices first."""
    sources = [copy.deepcopy(ds) for ds in datasets]
    if kind == "CT":
        for ds in sources:
            ds.Modality, ds.SOPClassUID = "CT", CTImageStorage
            ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    make = LegacyConvertedEnhancedMRImage if kind == "MR" else LegacyConvertedEnhancedCTImage
    # dcm2niix reads no JPEG-LS: that object holds the decoded frames instead.
    syntax = ExplicitVRLittleEndian if sources[0].file_meta.TransferSyntaxUID == JPEGLSLossless else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)  # highdicom logs each attribute it cannot fill in
        try:
            converted = make(sources, generate_uid(), 1, generate_uid(), 1, transfer_syntax_uid=syntax)
        finally:
            logging.disable(logging.NOTSET)
    return dcmread(_encoded(converted))  # as a PACS would hand it back: parsed from bytes


def _encoded(ds: Dataset) -> object:
    import io

    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    return buffer


def dcm2niix(ds: Dataset, work: Path) -> nibabel.Nifti1Image:
    source, out = work / "dicom", work / "nifti"
    source.mkdir(parents=True)
    out.mkdir()
    if ds.file_meta.TransferSyntaxUID in DCM2NIIX_CRASHES_ON:
        ds = copy.deepcopy(ds)
        ds.decompress()  # the same frames and groups, in the native encoding
    ds.save_as(source / "object.dcm", enforce_file_format=True)
    subprocess.run(
        [require_program("dcm2niix"), "-z", "n", "-b", "n", "-f", "volume", "-o", str(out), str(source)],
        check=True, capture_output=True, timeout=120,
    )
    written = sorted(out.glob("*.nii"))
    assert len(written) == 1, f"dcm2niix wrote {[p.name for p in written]}"
    return nibabel.Nifti1Image.from_bytes(written[0].read_bytes())


def assert_same_volume(ours: nibabel.Nifti1Image, theirs: nibabel.Nifti1Image, data: bool = True) -> None:
    ours_ras, theirs_ras = nibabel.as_closest_canonical(ours), nibabel.as_closest_canonical(theirs)
    assert ours_ras.shape == theirs_ras.shape
    np.testing.assert_allclose(ours_ras.affine, theirs_ras.affine, atol=1e-4)
    if data:
        np.testing.assert_allclose(ours_ras.get_fdata(), theirs_ras.get_fdata(), rtol=1e-6, atol=1e-4)


def nifti(data: bytes) -> nibabel.Nifti1Image:
    return nibabel.Nifti1Image.from_bytes(data)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("series", SINGLE_FRAME)
def test_a_multiframe_object_of_each_vendor_series_is_the_volume_dcm2niix_makes(
    series: str, kind: str, tmp_path: Path
) -> None:
    single = vendor_series(series)
    converted = legacy_converted(single, kind)
    assert int(converted.NumberOfFrames) == len(single)
    ours = nifti(assemble([converted], "nifti"))
    assert ours.get_data_dtype() == nifti(assemble(single, "nifti")).get_data_dtype()  # native type kept
    if series in DCM2NIIX_STACKS_TIME_POINTS:
        assert_same_volume(ours, ground_truth(series))
        assert ours.shape == (64, 64, 4, 2)
    elif series in DCM2NIIX_ONE_RESCALE:
        assert_same_volume(ours, dcm2niix(converted, tmp_path), data=False)
        assert_same_volume(ours, ground_truth(series))
    else:
        assert_same_volume(ours, dcm2niix(converted, tmp_path))
    # The plan from the catalog's row alone gives the size of what is assembled.
    row = extract_metadata(converted, b"frames test").image
    assert row == image_row(converted) and row["frames"] is not None
    assert plan_volume([row]).file_size("nifti") == len(assemble([converted], "nifti"))


# -- 4D and bad input, from a synthetic series ---------------------------------------------


def synthetic_object(slices: int = 6, kind: str = "CT") -> Dataset:
    series = make_series(slices=slices, size=16, seed="frames test")
    return legacy_converted(series, kind)


def _items(ds: Dataset) -> list[Dataset]:
    return list(ds.PerFrameFunctionalGroupsSequence)


def test_frames_at_the_same_positions_make_4d_by_temporal_position(tmp_path: Path) -> None:
    """Two time points in one object: frames 1-4 at t=1 and 5-8 at t=2, interleaved."""
    series = make_series(slices=4, size=16, seed="frames 4d")
    later = make_series(slices=4, size=16, seed="frames 4d")
    for ds, again in zip(series, later, strict=True):
        again.SOPInstanceUID = generate_uid()
        again.InstanceNumber = ds.InstanceNumber + 4
        again.PixelData = (np.frombuffer(ds.PixelData, "<i2") + 7).astype("<i2").tobytes()
    converted = legacy_converted(series + later, "CT")
    for item in _items(converted):
        number = int(item.UnassignedPerFrameConvertedAttributesSequence[0].InstanceNumber)
        item.FrameContentSequence[0].TemporalPositionIndex = 1 if number <= 4 else 2
    image = nifti(assemble([converted], "nifti"))
    assert image.shape == (16, 16, 4, 2)
    data = image.get_fdata()
    np.testing.assert_array_equal(data[..., 1] - data[..., 0], 7.0)
    expected = nifti(assemble(series, "nifti")).get_fdata()
    np.testing.assert_array_equal(data[..., 0], expected)


def test_frame_records_carry_geometry_rescale_and_ordering() -> None:
    converted = synthetic_object(slices=3)
    records = json.loads(frame_records(converted) or "")["frames"]
    assert [r["n"] for r in records] == [1, 2, 3]
    assert all(len(r["position"]) == 3 and len(r["orientation"]) == 6 and len(r["spacing"]) == 2 for r in records)
    assert {(r["slope"], r["intercept"]) for r in records} == {(1.0, -1024.0)}
    assert frame_records(make_series(slices=1, size=8)[0]) is None


def _drop_position(ds: Dataset) -> Dataset:
    del _items(ds)[2].PlanePositionSequence
    return ds


def _tilt_one_frame(ds: Dataset) -> Dataset:
    shared = ds.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0]
    for item in _items(ds):
        plane = Dataset()
        plane.ImageOrientationPatient = list(shared.ImageOrientationPatient)
        item.PlaneOrientationSequence = Sequence([plane])
    _items(ds)[3].PlaneOrientationSequence[0].ImageOrientationPatient = [1, 0, 0, 0, 0, 1]
    return ds


def _drop_frame(ds: Dataset) -> Dataset:
    """Frame 3 taken out of the object entirely (groups and pixels): a hole in the stack."""
    frame_bytes = int(ds.Rows) * int(ds.Columns) * 2
    items = _items(ds)
    order = sorted(range(len(items)), key=lambda i: float(items[i].PlanePositionSequence[0].ImagePositionPatient[2]))
    gone = order[2]
    ds.PerFrameFunctionalGroupsSequence = Sequence([item for i, item in enumerate(items) if i != gone])
    ds.PixelData = ds.PixelData[: gone * frame_bytes] + ds.PixelData[(gone + 1) * frame_bytes:]
    ds.NumberOfFrames = len(items) - 1
    return ds


def _fewer_groups(ds: Dataset) -> Dataset:
    ds.PerFrameFunctionalGroupsSequence = Sequence(_items(ds)[:-1])
    return ds


def _two_shared_items(ds: Dataset) -> Dataset:
    ds.SharedFunctionalGroupsSequence.append(Dataset())
    return ds


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (_drop_position, "frame 3 of a multi-frame image has no image position (Plane Position Sequence)"),
        (_tilt_one_frame, "slices have different orientations"),
        (_drop_frame, "1 slice(s) missing after slice 2 of 5"),
        (_fewer_groups, "Per-Frame Functional Groups Sequence has 5 items for 6 frames"),
        (_two_shared_items, "Shared Functional Groups Sequence has more than one item"),
    ],
)
def test_a_broken_multiframe_object_gets_one_clear_reason(change: Callable[[Dataset], Dataset], reason: str) -> None:
    broken = change(synthetic_object())
    with pytest.raises(NotAVolume) as planned:
        plan_volume([image_row(broken)])
    with pytest.raises(NotAVolume) as assembled:
        assemble([broken], "nifti")
    message = str(planned.value)
    assert message == str(assembled.value) and reason in message
    assert message.startswith("not a volume: ") and "\n" not in message


def test_a_series_mixing_single_and_multiframe_images_is_not_a_volume() -> None:
    series = make_series(slices=4, size=16, seed="frames mixed")
    converted = legacy_converted(series[:2], "CT")
    with pytest.raises(NotAVolume, match="the series mixes single-frame and multi-frame images"):
        plan_volume([image_row(ds) for ds in [converted, *series[2:]]])


def test_vendor_reference_still_holds_for_the_single_frame_series() -> None:
    """The data of the converted object is the data of the series (not a dcm2niix quirk)."""
    series = "siemens/anatomical/001"
    converted = legacy_converted(vendor_series(series), "MR")
    assert_same_volume(nifti(assemble([converted], "nifti")), ground_truth(series))
    require_vendor_data()

