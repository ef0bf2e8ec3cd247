"""pydicom's encoding of a data set, byte for byte, with its elements as read copied in bulk.

Registration encodes every image twice (its digest, then the served file) and staging once
more, and the bytes must never change: a staged file is checked against the size and adler32
recorded at registration, and the digest tells an unchanged image from a changed one. Most
elements of both data sets are still as read (pydicom's ``RawDataElement``, kept so by the
checks and the anonymizer), and for those pydicom's ``write_data_element`` only frames the
bytes it read, at the cost of a buffer object and a dozen calls each: a fifth of a worker's
time per slice (py-spy, README "Benchmarks"). Here such an element is framed with one
``struct.pack``, exactly as pydicom frames it; every other element, and every data set pydicom
would convert on its way out (another encoding or character set, a deflated syntax), goes
through pydicom itself.
"""

from __future__ import annotations

import struct
from io import BytesIO

from pydicom import dcmwrite
from pydicom.charset import default_encoding
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element, write_dataset
from pydicom.tag import tag_in_exception
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32

_UNDEFINED = 0xFFFFFFFF
_PIXEL_DATA = 0x7FE00010
_SOP_CLASS_UID = 0x00080016
_SOP_INSTANCE_UID = 0x00080018
_LONG_VRS = frozenset(str(vr) for vr in EXPLICIT_VR_LENGTH_32)


def _framing(little: bool) -> tuple[struct.Struct, struct.Struct, struct.Struct, struct.Struct, bytes]:
    """The tag, the tag and a 4-byte length (implicit VR), the 2- and 4-byte lengths after an
    explicit VR, and the sequence delimiter with its zero length."""
    end = "<" if little else ">"
    delimiter = struct.pack(f"{end}HHL", 0xFFFE, 0xE0DD, 0)
    return (struct.Struct(f"{end}HH"), struct.Struct(f"{end}HHL"), struct.Struct(f"{end}H"), struct.Struct(f"{end}L"),
            delimiter)


_FRAMING = {True: _framing(True), False: _framing(False)}


def _raw_element(elem: RawDataElement, implicit: bool, little: bool) -> bytes | None:
    """The element as pydicom's ``write_data_element`` writes a raw one; None where pydicom
    would do more than frame the bytes (warn and write UN, refuse, raise): left to pydicom."""
    value = elem.value
    if not isinstance(value, bytes):
        return None
    tag_only, tag_and_length, length_16, length_32, delimiter = _FRAMING[little]
    tag = elem.tag
    undefined = elem.length == _UNDEFINED
    if undefined and tag == _PIXEL_DATA:
        return None  # pydicom checks the encapsulation
    size = len(value)
    group, element = tag >> 16, tag & 0xFFFF
    if implicit:
        head = tag_and_length.pack(group, element, _UNDEFINED if undefined else size)
    else:
        vr = elem.VR
        if not isinstance(vr, str) or len(vr) != 2:
            return None
        if vr in _LONG_VRS:
            head = tag_only.pack(group, element) + vr.encode(default_encoding) + b"\0\0" + length_32.pack(
                _UNDEFINED if undefined else size)
        elif undefined:
            head = tag_only.pack(group, element) + vr.encode(default_encoding) + length_32.pack(_UNDEFINED)
        elif size > 0xFFFF:
            return None  # pydicom warns and writes it as UN
        else:
            head = tag_only.pack(group, element) + vr.encode(default_encoding) + length_16.pack(size)
    return head + value + delimiter if undefined else head + value


def encode_dataset(ds: Dataset, implicit: bool, little: bool) -> bytes:
    """``pydicom.filewriter.write_dataset`` of ``ds`` in this encoding, as bytes."""
    out = DicomBytesIO()
    out.is_implicit_VR, out.is_little_endian = implicit, little
    if (implicit, little) != tuple(ds.original_encoding) or ds.original_character_set != ds._character_set:
        write_dataset(out, ds)  # pydicom converts every element: nothing is written as read
        return out.getvalue()
    encodings = ds.get("SpecificCharacterSet", default_encoding)
    get_item = ds.get_item
    for tag in sorted(ds.keys()):
        if tag.element == 0 and tag.group > 6:
            continue  # as pydicom: retired group lengths are not written
        elem = get_item(tag)
        framed = _raw_element(elem, implicit, little) if isinstance(elem, RawDataElement) else None
        if framed is not None:
            out.write(framed)
            continue
        with tag_in_exception(tag):
            write_data_element(out, elem, encodings)
    return out.getvalue()


def part10(ds: Dataset) -> bytes:
    """``dcmwrite(buffer, ds, enforce_file_format=True)``: the preamble and file meta as pydicom
    writes them, then ``encode_dataset``. A case where dcmwrite changes the meta or the data set
    on the way (a meta naming other SOP UIDs, a deflated or unknown syntax, command or meta
    elements in the data set, which it refuses) is left to dcmwrite."""
    meta = ds.file_meta
    syntax = meta.get("TransferSyntaxUID")
    sop_class, sop_instance = ds.get(_SOP_CLASS_UID), ds.get(_SOP_INSTANCE_UID)
    plain = (
        isinstance(syntax, UID) and syntax.is_transfer_syntax and not syntax.is_private
        and syntax != DeflatedExplicitVRLittleEndian
        and not any(tag >> 16 in (0, 2) for tag in ds._dict)
        and "MediaStorageSOPClassUID" in meta and "MediaStorageSOPInstanceUID" in meta
        and (sop_class is None or not sop_class.value or sop_class.value == meta.MediaStorageSOPClassUID)
        and (sop_instance is None or not sop_instance.value or sop_instance.value == meta.MediaStorageSOPInstanceUID)
        and getattr(ds, "preamble", None) is None
    )
    buffer = BytesIO()
    if not plain:
        dcmwrite(buffer, ds, enforce_file_format=True)
        return buffer.getvalue()
    head = Dataset()
    head.file_meta = meta
    dcmwrite(buffer, head, enforce_file_format=True)  # preamble, "DICM", the file meta
    assert isinstance(syntax, UID)  # checked above
    if "PixelData" in ds:  # as dcmwrite: the syntax says whether pixel data is encapsulated
        ds["PixelData"].is_undefined_length = syntax.is_compressed
    buffer.write(encode_dataset(ds, syntax.is_implicit_VR, syntax.is_little_endian))
    return buffer.getvalue()
