"""Mutated DICOM files for the fuzz suites: real files (a synthetic slice, pydicom's CT, MR,
implicit-VR, RT plan, deflated and JPEG 2000 files) broken where parsers break: element VRs,
lengths and values, random bytes, insertions, deletions and truncations. The registration
fuzz (``test_fuzz_register.py``) reads them from disk, the push fuzz
(``test_fuzz_listen.py``) sends them over C-STORE."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from hypothesis import strategies as st
from pydicom.data import get_testdata_file

from srm_dicom.synthetic import make_series

PYDICOM_FILES = ("CT_small.dcm", "MR_small.dcm", "MR_small_implicit.dcm", "rtplan.dcm", "image_dfl.dcm",
                 "JPEG2000.dcm")


# Explicit-VR elements whose header has a 4-byte length after 2 reserved bytes (PS3.5 7.1.2).
LONG_VRS = {"OB", "OW", "OF", "SQ", "UT", "UN", "UC", "UR", "OD", "OL", "OV"}


@dataclass(frozen=True)
class Seed:
    """A well-formed file and where its elements are: (header offset, value offset, explicit VR?)."""

    data: bytes
    elements: tuple[tuple[int, int, bool], ...]


def _seed(data: bytes) -> Seed:
    elements = []
    ds = pydicom.dcmread(io.BytesIO(data), defer_size=None)
    explicit = not ds.file_meta.TransferSyntaxUID.is_implicit_VR if "TransferSyntaxUID" in ds.file_meta else True
    for tag in sorted(ds.keys()):  # tags, not elements: iterating the data set would decode them
        raw = ds.get_item(tag)
        value_at = getattr(raw, "value_tell", None)
        if value_at is None:
            continue
        vr = getattr(raw, "VR", "") or ""
        header = 12 if explicit and vr in LONG_VRS else 8
        elements.append((value_at - header, value_at, explicit))
    return Seed(data, tuple(elements))


def _seeds() -> list[Seed]:
    buffer = io.BytesIO()
    make_series(slices=1, size=8, seed="fuzz")[0].save_as(buffer, enforce_file_format=True)
    found = [buffer.getvalue()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns when it cannot download its optional files
        for name in PYDICOM_FILES:
            path = get_testdata_file(name)
            if path is None:
                pytest.fail(f"pydicom's test file {name} is missing")
            found.append(Path(str(path)).read_bytes())
    return [_seed(data) for data in found]


SEEDS = _seeds()
VRS = [vr.encode() for vr in ("AE", "AS", "AT", "CS", "DA", "DS", "DT", "FD", "FL", "IS", "LO", "LT", "OB", "OW",
                              "PN", "SH", "SL", "SQ", "SS", "ST", "TM", "UI", "UL", "UN", "US", "UT", "ZZ", "\0\0")]
LENGTHS = [0, 1, 2, 3, 4, 7, 255, 0xFFFF, 0xFFFFFFFF, 0x7FFFFFFF, 0x80000000]


@st.composite
def mutants(draw: st.DrawFn) -> bytes:
    seed = draw(st.sampled_from(SEEDS))
    data = bytearray(seed.data)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["vr", "length", "value", "bytes", "insert", "delete", "truncate"]))
        header, value, explicit = draw(st.sampled_from(seed.elements))
        if header + 8 > len(data):
            continue
        if kind == "vr" and explicit:
            data[header + 4: header + 6] = draw(st.sampled_from(VRS))
        elif kind == "length":
            length = draw(st.sampled_from(LENGTHS))
            if explicit and value - header == 8:
                data[header + 6: header + 8] = (length & 0xFFFF).to_bytes(2, "little")
            else:
                data[value - 4: value] = length.to_bytes(4, "little")
        elif kind == "value":
            chunk = draw(st.binary(min_size=1, max_size=16))
            data[value: value + len(chunk)] = chunk
        elif kind == "bytes":
            at = draw(st.integers(0, len(data) - 1))
            data[at] = draw(st.integers(0, 255))
        elif kind == "insert":
            data[value:value] = draw(st.binary(min_size=1, max_size=64))
        elif kind == "delete":
            del data[value: value + draw(st.integers(1, 64))]
        else:
            del data[draw(st.integers(0, len(data))):]
    return bytes(data)


def _finding() -> pydicom.Dataset:
    """The synthetic slice every finding below is made from."""
    return make_series(slices=1, size=8, seed="fuzz finding")[0]


def _saved_and_patched(ds: pydicom.Dataset, header: bytes, offset: int, replacement: bytes) -> bytes:
    """``ds`` saved as a file, with ``replacement`` written ``offset`` bytes into the first
    element header starting with ``header`` (tag, then explicit VR): the mutation a finding was."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    data = bytearray(buffer.getvalue())
    at = data.index(header) + offset
    data[at: at + len(replacement)] = replacement
    return bytes(data)


SOP_CLASS_UID = b"\x08\x00\x16\x00UI"  # (0008,0016) UI, little endian explicit VR


def _no_rows_and_a_corrupt_sop_class() -> bytes:
    """Found by the push fuzz: an image without Rows whose SOP Class UID's VR is FD (pydicom's
    BytesLengthException from the completeness check, before any decoding was guarded)."""
    ds = _finding()
    del ds.Rows
    return _saved_and_patched(ds, SOP_CLASS_UID, 4, b"FD")


def _sop_class_in_the_command_group() -> bytes:
    """Found by the push fuzz: SOP Class UID's tag mutated into the command group, (0000,0016).
    pydicom reads it, but refuses to write it back (ValueError from dcmwrite): a push answered
    0xC211, an exception in our handler."""
    return _saved_and_patched(_finding(), SOP_CLASS_UID, 0, b"\x00\x00")


def _sop_class_in_group_0001() -> bytes:
    """Found by the push fuzz (in pydicom's RT plan): SOP Class UID's tag mutated to (0001,0016),
    so the data set has no SOP Class UID, which was not checked with the three UIDs of its
    name: an AttributeError when the catalog row was built, a push answered 0xC211."""
    return _saved_and_patched(_finding(), SOP_CLASS_UID, 0, b"\x01\x00")


def _an_empty_element_of_unknown_vr() -> bytes:
    """Found by the push fuzz (in pydicom's CT): an empty Laterality whose VR is ZZ. pydicom
    decodes an empty element when it is looked up, so building the decoding's copy of the
    element table raised NotImplementedError, outside its guard: a push answered 0xC211."""
    ds = _finding()
    ds.Laterality = ""
    return _saved_and_patched(ds, b"\x20\x00\x60\x00CS\x00\x00", 4, b"ZZ")


def _file_meta_in_the_data_set() -> bytes:
    """Found by the push fuzz: Implementation Class UID's tag mutated out of group 0002, so the
    file meta ends there and Implementation Version Name (0002,0013) is sent in the data set.
    The anonymizer recorded it as erased beside the receiver's own file meta element of that
    path: the catalog's unique (guid, path) raised IntegrityError, a push answered 0xC211."""
    return _saved_and_patched(_finding(), b"\x02\x00\x12\x00UI", 0, b"\x08\x00")


# Inputs the fuzzing found, run first in every run (hypothesis' @example).
FOUND = [_no_rows_and_a_corrupt_sop_class(), _sop_class_in_the_command_group(), _sop_class_in_group_0001(),
         _an_empty_element_of_unknown_vr(), _file_meta_in_the_data_set()]
