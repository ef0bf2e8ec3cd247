"""Encoding stays pydicom's byte for byte: restaged files must match the size and adler32
recorded at registration, and digests must keep telling unchanged images from changed ones,
whichever version of the code wrote the catalog."""

import warnings
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom import dcmwrite
from pydicom.data import get_testdata_file
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset

from sites import require_vendor_data
from srm_dicom.anonymization_options import AnonymizationOptions
from srm_dicom.anonymize import anonymize
from srm_dicom.encode import encode_dataset, part10
from srm_dicom.prepare import burned_in_reason, check_header, read_dicom
from srm_dicom.synthetic import make_series

SECRET = b"encode test secret, 16+ chars"
OPTIONS = [
    AnonymizationOptions(),
    AnonymizationOptions(retain_safe_private=True, clean_descriptors=True, retain_longitudinal_modified_dates=True),
]
PYDICOM_FILES = ("CT_small.dcm", "MR_small.dcm", "MR_small_implicit.dcm", "rtplan.dcm", "image_dfl.dcm",
                 "JPEG2000.dcm", "MR_small_bigendian.dcm")


def _files(tmp_path: Path) -> list[Path]:
    found = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns when it cannot download its optional files
        found += [Path(str(get_testdata_file(name))) for name in PYDICOM_FILES]
    for index, ds in enumerate(make_series(slices=2, size=16, seed="encode")):
        path = tmp_path / f"synthetic{index}.dcm"
        ds.save_as(path, enforce_file_format=True)
        found.append(path)
    found += sorted(path for path in require_vendor_data().rglob("*") if path.is_file())
    return found


def _read(path: Path) -> pydicom.Dataset | None:
    """The data set as registration holds it when it encodes it (read, checked, named)."""
    try:
        ds = read_dicom(path)
        check_header(ds)
    except Exception:  # noqa: BLE001 - not an image registration takes: nothing to compare
        return None
    burned_in_reason(ds)
    return ds


def test_a_data_set_is_encoded_as_pydicom_writes_it(tmp_path):
    compared = 0
    for path in _files(tmp_path):
        ds, twin = _read(path), _read(path)
        if ds is None or twin is None:
            continue
        syntax = ds.file_meta.TransferSyntaxUID
        expected = DicomBytesIO()
        expected.is_implicit_VR, expected.is_little_endian = syntax.is_implicit_VR, syntax.is_little_endian
        write_dataset(expected, twin)
        assert encode_dataset(ds, syntax.is_implicit_VR, syntax.is_little_endian) == expected.getvalue(), path
        compared += 1
    assert compared >= len(PYDICOM_FILES)


@pytest.mark.parametrize("options", OPTIONS, ids=["default", "options"])
def test_a_served_file_is_the_file_dcmwrite_writes(tmp_path, options):
    compared = 0
    for path in _files(tmp_path):
        ds, twin = _read(path), _read(path)
        if ds is None or twin is None:
            continue
        expected = BytesIO()
        dcmwrite(expected, anonymize(twin, SECRET, options).dataset, enforce_file_format=True)
        assert part10(anonymize(ds, SECRET, options).dataset) == expected.getvalue(), path
        compared += 1
    assert compared >= len(PYDICOM_FILES)
