"""A series becomes one true volume file, or a clear reason why it cannot.

The yardstick is dicom2nifti's ground truth (``*_ground_truth.nii.gz`` beside each vendor
series). dicom2nifti orders slices by the patient coordinate (x, y or z) that varies most
across the series and builds its affine from that order, so its third axis may run against
the slice normal where ours runs along it. Both files are therefore compared in world space: each is reoriented
to the closest canonical RAS orientation with nibabel (an exact permutation/flip of voxel
axes, driven by each file's own affine), then voxel values and affines must agree.
"""

from __future__ import annotations

import io
import random
import subprocess
import uuid
from functools import cache
from pathlib import Path

import nibabel
import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset

from conftest import require_program
from mdm_catalog_sqlite import SQLiteCatalog
from sites import require_vendor_data
from srm_dicom.catalog import Catalog, Entry
from srm_dicom.errors import InvalidInput, MdmError
from srm_dicom.metadata import extract_metadata
from srm_dicom.names import VOLUME, UidTriple
from srm_dicom.synthetic import FakePatient, make_series
from srm_dicom.volume import (
    NIFTI_VOX_OFFSET,
    NotAVolume,
    VolumePlan,
    VolumeWriter,
    assemble,
    image_row,
    plan_volume,
)

GROUND_TRUTH = [
    "ge/anatomical/001",
    "ge/fmri/001",
    "philips/anatomical/001",
    "siemens/anatomical/001",
    "generic/anatomical/001",
    "generic/anatomical/002_non_isotropic",
    "generic/compressed/001",
    "generic/compressed_j2k/001",
    "generic/compressed_jpeg/001",
    "generic/compressed_jpegls/001",
    "generic/compressed_rle/001",
    "generic/rgb/001",
    "failing/slicecount/001",
]
FAILING = [
    ("failing/gantrytilting/001", "gantry tilt of about 14.0°"),
    ("failing/sliceincrement/001", "1 slice(s) missing after slice 3 of 4 (gap of 10 mm where the others are 5 mm)"),
    ("failing/sliceorientation/001", "slices have different orientations"),
    ("failing/notavolume/001", "all 4 slices are at the same position"),
]
FORMATS = ("nifti", "nrrd")


@cache
def _read(series: str) -> tuple[Dataset, ...]:
    files = sorted(path for path in (require_vendor_data() / series).rglob("*") if path.is_file())
    # Reversed: the order the files come in must not matter.
    return tuple(dcmread(path) for path in reversed(files))


def vendor_series(series: str) -> list[Dataset]:
    return list(_read(series))


def ground_truth(series: str) -> nibabel.Nifti1Image:
    return nibabel.load(require_vendor_data() / f"{series}_ground_truth.nii.gz")


def nifti(data: bytes) -> nibabel.Nifti1Image:
    return nibabel.Nifti1Image.from_bytes(data)


def voxels(image: nibabel.Nifti1Image) -> np.ndarray:
    """Voxel values as float64, RGB as a last axis of three."""
    array = np.asanyarray(image.dataobj)
    if array.dtype.names:
        return np.stack([array[channel] for channel in "RGB"], axis=-1).astype(np.float64)
    return array.astype(np.float64)


def read_nrrd(data: bytes) -> tuple[dict[str, str], bytes]:
    """A minimal NRRD reader: the header fields and the raw voxels after the blank line."""
    header, _, raw = data.partition(b"\n\n")
    lines = header.decode("ascii").split("\n")
    assert lines[0] == "NRRD0004"
    fields = dict(line.split(": ", 1) for line in lines[1:] if not line.startswith("#"))
    return fields, raw


def nrrd_vectors(text: str) -> list[list[float] | None]:
    return [None if part == "none" else [float(v) for v in part.strip("()").split(",")] for part in text.split()]


# -- the vendor series against dicom2nifti -------------------------------------------------


@pytest.mark.parametrize("series", GROUND_TRUTH)
def test_volume_matches_dicom2nifti_ground_truth(series: str) -> None:
    ours = nifti(assemble(vendor_series(series), "nifti"))
    truth = ground_truth(series)
    ours_ras, truth_ras = nibabel.as_closest_canonical(ours), nibabel.as_closest_canonical(truth)
    assert ours_ras.shape == truth_ras.shape
    np.testing.assert_allclose(ours_ras.affine, truth_ras.affine, atol=1e-4)
    np.testing.assert_allclose(voxels(ours_ras), voxels(truth_ras), rtol=1e-6, atol=1e-4)


@pytest.mark.parametrize("series", GROUND_TRUTH)
def test_nifti_header_is_a_valid_single_file_with_qform_and_sform(series: str) -> None:
    datasets = vendor_series(series)
    plan = plan_volume([image_row(ds) for ds in datasets])
    data = assemble(datasets, "nifti")
    image = nifti(data)
    header = nibabel.Nifti1Header.from_fileobj(io.BytesIO(data))  # as stored, before nibabel's image model
    assert header["magic"] == b"n+1" and int(header["vox_offset"]) == NIFTI_VOX_OFFSET
    assert int(header["qform_code"]) == int(header["sform_code"]) == 1
    np.testing.assert_allclose(image.get_sform(), plan.affine, atol=1e-4)
    np.testing.assert_allclose(image.get_qform(), plan.affine, atol=1e-4)
    assert header.get_xyzt_units() == ("mm", "unknown")
    assert header["descrip"] == b"srm-dicom"
    rgb = np.dtype([("R", "u1"), ("G", "u1"), ("B", "u1")])
    assert header.get_data_dtype() == (rgb if plan.rgb else np.dtype(plan.voxel.numpy))
    assert (float(header["scl_slope"]), float(header["scl_inter"])) == (plan.slope, plan.intercept)
    assert image.shape == plan.shape


def dcm2niix_volume(directory: Path, out: Path) -> nibabel.Nifti1Image:
    """dcm2niix's one NIfTI of a directory (no gzip, no sidecar), loaded into memory."""
    out.mkdir()
    subprocess.run(
        [require_program("dcm2niix"), "-z", "n", "-b", "n", "-f", "volume", "-o", str(out), str(directory)],
        check=True, capture_output=True, timeout=120,
    )
    written = sorted(out.glob("*.nii"))
    assert len(written) == 1, f"dcm2niix wrote {[p.name for p in written]}"
    return nibabel.Nifti1Image.from_bytes(written[0].read_bytes())


def raw_scaling(image: nibabel.Nifti1Image) -> tuple[np.dtype, float, float]:
    """The stored voxel type and scl_slope/scl_inter as in the file (nibabel reads 0 as 1/0)."""
    header = image.header
    slope, inter = float(header["scl_slope"]), float(header["scl_inter"])
    if not np.isfinite(slope) or slope == 0:
        slope, inter = 1.0, 0.0
    return header.get_data_dtype(), slope, inter


@pytest.mark.parametrize("series", [s for s in GROUND_TRUTH if "jpegls" not in s])  # dcm2niix lacks JPEG-LS
def test_voxel_type_and_rescale_are_those_dcm2niix_writes(series: str, tmp_path: Path) -> None:
    ours = nifti(assemble(vendor_series(series), "nifti"))
    theirs = dcm2niix_volume(require_vendor_data() / series, tmp_path / "dcm2niix")
    assert raw_scaling(ours) == raw_scaling(theirs)
    ours_ras, theirs_ras = nibabel.as_closest_canonical(ours), nibabel.as_closest_canonical(theirs)
    ours_raw, theirs_raw = np.asanyarray(ours_ras.dataobj), np.asanyarray(theirs_ras.dataobj)
    if ours_raw.dtype.kind == "f":  # dcm2niix rescales in single precision, we in double
        np.testing.assert_allclose(ours_raw, theirs_raw, rtol=1e-6)
    else:
        np.testing.assert_array_equal(ours_raw, theirs_raw)


@pytest.mark.parametrize("series", GROUND_TRUTH)
def test_nrrd_holds_the_same_voxels_and_geometry(series: str) -> None:
    datasets = vendor_series(series)
    plan = plan_volume([image_row(ds) for ds in datasets])
    fields, raw = read_nrrd(assemble(datasets, "nrrd"))
    assert raw == assemble(datasets, "nifti")[NIFTI_VOX_OFFSET:]
    sizes = [int(size) for size in fields["sizes"].split()]
    assert sizes == ([3] if plan.rgb else []) + list(plan.shape)
    assert fields["type"] == plan.in_format("nrrd").voxel.nrrd
    assert (fields["encoding"], fields["endian"]) == ("raw", "little")
    assert fields["space"] == "right-anterior-superior"
    directions = [d for d in nrrd_vectors(fields["space directions"]) if d is not None]
    np.testing.assert_allclose(np.array(directions).T, np.array(plan.affine)[:3, :3], atol=1e-6)
    np.testing.assert_allclose(nrrd_vectors(fields["space origin"])[0], np.array(plan.affine)[:3, 3], atol=1e-6)
    assert len(raw) == plan.data_size


@pytest.mark.parametrize("series", GROUND_TRUTH)
def test_size_from_the_catalogs_rows_is_the_assembled_size(series: str, tmp_path: Path) -> None:
    """The rows go through the real SQLite catalog, as they will before a first assembly."""
    datasets = vendor_series(series)
    catalog = Catalog(SQLiteCatalog(tmp_path / "catalog.db"))
    try:
        guids = [register(catalog, ds) for ds in datasets]
        rows = [catalog.index.metadata(guid).image for guid in guids]  # type: ignore[union-attr]
    finally:
        catalog.close()
    plan = plan_volume(rows)
    assert [image_row(ds) for ds in datasets] == [extract_metadata(ds, b"any").image for ds in datasets]
    for fmt in FORMATS:
        assert len(assemble(datasets, fmt)) == plan.file_size(fmt)


def register(catalog: Catalog, ds: Dataset) -> str:
    metadata = extract_metadata(ds, b"volume test secret")
    uids = metadata.dicom
    common = dict(
        study_uid=uids["deid_study_uid"], series_uid=uids["deid_series_uid"], owner="CN=test", vo="demo",
        mode=0o640, metadata_mode="none", pfn="dicom://PACS@localhost:104/x",
    )
    guid = str(uuid.uuid4())
    triple = UidTriple(uids["deid_study_uid"], uids["deid_series_uid"], uids["deid_sop_uid"])
    volume_triple = UidTriple(uids["deid_study_uid"], uids["deid_series_uid"], VOLUME)
    entry = Entry(lfn=triple.lfn("demo"), guid=guid, kind="slice", sop_uid=triple.sop, **common)
    volume = Entry(lfn=volume_triple.lfn("demo"), guid=str(uuid.uuid4()), kind="volume", sop_uid=VOLUME, **common)
    catalog.register_image(entry, metadata, volume)
    return guid


@pytest.mark.parametrize(("series", "reason"), FAILING)
def test_a_series_that_is_not_one_volume_gets_a_clear_reason(series: str, reason: str) -> None:
    datasets = vendor_series(series)
    with pytest.raises(NotAVolume) as planned:
        plan_volume([image_row(ds) for ds in datasets])
    with pytest.raises(NotAVolume) as assembled:
        assemble(datasets, "nifti")
    message = str(planned.value)
    assert isinstance(planned.value, MdmError) and message == str(assembled.value)
    assert message.startswith("not a volume: ") and reason in message and "\n" not in message


# -- synthetic series ----------------------------------------------------------------------


def synthetic(slices: int = 8, size: int = 16, seed: str = "volume test") -> list[Dataset]:
    return make_series(slices=slices, size=size, seed=seed)


def stored(ds: Dataset) -> np.ndarray:
    return np.frombuffer(ds.PixelData, dtype="<i2").reshape(ds.Rows, ds.Columns)


def test_slices_are_ordered_by_position_not_instance_number_nor_arrival() -> None:
    series = synthetic()
    expected = assemble(series, "nifti")
    shuffled = synthetic()
    numbers = list(range(1, len(shuffled) + 1))
    random.Random(4).shuffle(numbers)
    for ds, number in zip(shuffled, numbers, strict=True):
        ds.InstanceNumber = number
    random.Random(7).shuffle(shuffled)
    assert assemble(shuffled, "nifti") == expected
    data = nifti(expected).get_fdata()
    for k, ds in enumerate(series):  # make_series puts slice k at z = 2k
        np.testing.assert_array_equal(data[:, :, k], stored(ds).T.astype(np.float64) - 1024)


def test_integers_keep_their_stored_type_with_the_rescale_in_the_header() -> None:
    series = synthetic(slices=4, size=8)
    data = assemble(series, "nifti")
    header = nibabel.Nifti1Header.from_fileobj(io.BytesIO(data))
    assert header.get_data_dtype() == "<i2"
    assert (float(header["scl_slope"]), float(header["scl_inter"])) == (1.0, -1024.0)
    raw = np.frombuffer(data[NIFTI_VOX_OFFSET:], dtype="<i2").reshape(4, 8, 8)
    for k, ds in enumerate(series):
        np.testing.assert_array_equal(raw[k], stored(ds))  # the stored values, untouched
    assert len(data) == 352 + 4 * 8 * 8 * 2


def test_differing_rescales_make_float32_of_the_rescaled_values() -> None:
    series = synthetic(slices=4, size=8)
    series[2].RescaleSlope, series[2].RescaleIntercept = 0.5, -10
    image = nifti(assemble(series, "nifti"))
    assert image.get_data_dtype() == "<f4"
    np.testing.assert_allclose(image.get_fdata()[:, :, 2], stored(series[2]).T * 0.5 - 10)
    np.testing.assert_allclose(image.get_fdata()[:, :, 1], stored(series[1]).T - 1024.0)


def test_nrrd_without_a_rescale_field_holds_rescaled_float32() -> None:
    series = synthetic(slices=4, size=8)
    fields, raw = read_nrrd(assemble(series, "nrrd"))
    assert fields["type"] == "float"
    np.testing.assert_array_equal(np.frombuffer(raw, "<f4").reshape(4, 8, 8)[0], stored(series[0]) - 1024.0)
    for ds in series:
        del ds.RescaleSlope, ds.RescaleIntercept
    fields, raw = read_nrrd(assemble(series, "nrrd"))
    assert fields["type"] == "short" and len(raw) == 4 * 8 * 8 * 2


def test_unsigned_pixels_of_16_stored_bits_stay_uint16() -> None:
    series = synthetic(slices=3, size=8)
    for ds in series:
        ds.PixelRepresentation, ds.BitsStored = 0, 16
        ds.PixelData = (stored(ds).astype(np.int32) + 40000).astype("<u2").tobytes()
        del ds.RescaleSlope, ds.RescaleIntercept
    image = nifti(assemble(series, "nifti"))
    assert image.get_data_dtype() == "<u2"
    assert int(np.asanyarray(image.dataobj).max()) > 32767


def test_geometry_is_ras() -> None:
    series = synthetic(slices=4, size=8)
    image = nifti(assemble(series, "nifti"))
    # LPS origin (-4, -4, 0) is RAS (4, 4, 0); rows run along -x and columns along -y in RAS.
    np.testing.assert_allclose(image.affine, [[-1, 0, 0, 4], [0, -1, 0, 4], [0, 0, 2, 0], [0, 0, 0, 1]])
    assert image.header.get_zooms() == (1.0, 1.0, 2.0)


def test_a_missing_middle_slice_is_named() -> None:
    series = synthetic()
    del series[4]
    with pytest.raises(NotAVolume, match=r"1 slice\(s\) missing after slice 4 of 7 \(gap of 4 mm where the others"):
        plan_volume([image_row(ds) for ds in series])


def test_uneven_spacing_is_refused() -> None:
    series = synthetic()
    series[3].ImagePositionPatient = [-8.0, -8.0, 6.5]
    with pytest.raises(NotAVolume, match="uneven slice spacing"):
        assemble(series, "nrrd")


def four_d(volumes: int = 3, slices: int = 5) -> list[Dataset]:
    """``volumes`` time points at the same positions, instance numbers running volume by volume."""
    out = []
    for t in range(volumes):
        for ds in synthetic(slices=slices, seed=f"volume test t{t}"):
            ds.InstanceNumber = t * slices + ds.InstanceNumber
            ds.PixelData = (stored(ds) + 100 * t).astype("<i2").tobytes()
            out.append(ds)
    return out


def test_several_volumes_at_the_same_positions_make_a_4d_volume() -> None:
    series = four_d()
    expected = list(series)
    random.Random(3).shuffle(series)
    image = nifti(assemble(series, "nifti"))
    assert image.shape == (16, 16, 5, 3) and image.header["dim"][0] == 4
    data = image.get_fdata()
    for t in range(3):
        for k in range(5):
            np.testing.assert_array_equal(data[:, :, k, t], stored(expected[t * 5 + k]).T - 1024.0)
    fields, _ = read_nrrd(assemble(series, "nrrd"))
    assert fields["dimension"] == "4" and fields["kinds"] == "domain domain domain list"
    assert fields["space directions"].endswith(" none")


def test_a_4d_series_missing_one_slice_is_refused() -> None:
    series = four_d()
    del series[7]
    with pytest.raises(NotAVolume, match=r"positions hold different numbers of slices \(2 to 3\)"):
        plan_volume([image_row(ds) for ds in series])


def test_a_4d_series_that_instance_numbers_cannot_order_is_refused() -> None:
    series = four_d(volumes=2)
    series[5].InstanceNumber = series[0].InstanceNumber
    with pytest.raises(NotAVolume, match="InstanceNumbers cannot order them"):
        plan_volume([image_row(ds) for ds in series])


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda s: s[:1], "a single slice"),
        (lambda s: [*s[:3], _resized(s[3])], "mixed image sizes: 16×16 and 16×8"),
        (lambda s: [_multiframe(ds) for ds in s], "a multi-frame image (2 frames) without per-frame functional groups"),
        (lambda s: [_tilted(ds, i) for i, ds in enumerate(s)], "gantry tilt of about 11.3°"),
        (lambda s: [*s[:3], _without(s[3], "ImagePositionPatient")], "a slice has no image position"),
        (lambda s: [*s[:3], _palette(s[3])], "unsupported pixels: 1 sample(s) of 16 bits, PALETTE COLOR"),
    ],
)
def test_what_cannot_be_one_volume_is_refused_with_its_reason(change, reason: str) -> None:  # type: ignore[no-untyped-def]
    series = change(synthetic(slices=4))
    with pytest.raises(NotAVolume) as error:
        plan_volume([image_row(ds) for ds in series])
    assert reason in str(error.value)


def _resized(ds: Dataset) -> Dataset:
    ds.Rows = 8
    ds.PixelData = ds.PixelData[: 8 * 16 * 2]
    return ds


def _multiframe(ds: Dataset) -> Dataset:
    ds.NumberOfFrames = 2
    return ds


def _tilted(ds: Dataset, index: int) -> Dataset:
    ds.ImagePositionPatient = [-8.0, -8.0 + 0.4 * index, 2.0 * index]  # 0.4 mm sideways per 2 mm
    return ds


def _without(ds: Dataset, keyword: str) -> Dataset:
    delattr(ds, keyword)
    return ds


def _palette(ds: Dataset) -> Dataset:
    ds.PhotometricInterpretation = "PALETTE COLOR"
    return ds


def test_output_is_deterministic_and_carries_nothing_of_the_dicom_header() -> None:
    patient = FakePatient(name="VOLUME^PHI^MARKER", patient_id="PHI-ID-4242", birth_date="19411207")
    series = make_series(slices=6, size=16, seed="volume phi", patient=patient)
    for fmt in FORMATS:
        data = assemble(series, fmt)
        assert data == assemble(make_series(slices=6, size=16, seed="volume phi", patient=patient), fmt)
        plan = plan_volume([image_row(ds) for ds in series])
        assert data[: len(plan.header(fmt))] == plan.header(fmt)
        head = plan.header(fmt)
        markers = [b"VOLUME", b"PHI-ID", b"19411207", b"20260101", b"Demo Hospital", b"demo-phantom"]
        markers += [str(series[0][kw].value).encode() for kw in ("StudyInstanceUID", "SeriesInstanceUID")]
        markers += [str(ds.SOPInstanceUID).encode() for ds in series]
        assert not [marker for marker in markers if marker in head]


def test_an_unknown_format_is_refused() -> None:
    with pytest.raises(InvalidInput, match="volume format must be one of nifti, nrrd"):
        assemble(synthetic(slices=3), "analyze")


def test_the_plan_needs_no_pixels() -> None:
    rows = [image_row(ds) for ds in synthetic(slices=10, size=32)]
    plan = plan_volume(rows)
    assert isinstance(plan, VolumePlan) and plan.shape == (32, 32, 10)
    assert plan.file_size("nifti") == 352 + 32 * 32 * 10 * 2  # int16 with its rescale in the header
    assert plan.file_size("nrrd") == len(plan.header("nrrd")) + 32 * 32 * 10 * 4  # rescaled float32


@pytest.mark.parametrize("series", ["generic/rgb/001", "ge/fmri/001", "philips/anatomical/001"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_a_volume_written_slice_by_slice_in_any_order_is_the_assembled_file(series: str, fmt: str,
                                                                             tmp_path: Path) -> None:
    datasets = vendor_series(series)
    rows = [image_row(ds) for ds in datasets]
    path = tmp_path / "volume"
    with path.open("wb+") as out:
        writer = VolumeWriter(plan_volume(rows), fmt, out.fileno())
        assert writer.missing == len(writer.plan.sources) and writer.size == plan_volume(rows).file_size(fmt)
        arrival = list(range(len(datasets)))
        random.Random(3).shuffle(arrival)
        for index in arrival:
            writer.add(index, datasets[index])
            writer.add(index, datasets[index])  # a duplicate delivery writes nothing twice
        assert writer.missing == 0
    assert path.read_bytes() == assemble(datasets, fmt)


def test_a_volume_writer_counts_the_slices_no_image_filled(tmp_path: Path) -> None:
    series = synthetic(slices=5, size=8)
    with (tmp_path / "volume").open("wb+") as out:
        writer = VolumeWriter(plan_volume([image_row(ds) for ds in series]), "nifti", out.fileno())
        for index in (0, 3, 4):
            writer.add(index, series[index])
        assert writer.missing == 2
