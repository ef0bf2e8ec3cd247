"""The frames of an enhanced multi-frame image, flattened into one small record per frame.

An Enhanced MR/CT/PET or Legacy Converted Enhanced image carries each frame's geometry and
rescale in functional groups (PS3.3 C.7.6.16): a macro in the frame's item of the Per-Frame
Functional Groups Sequence, or else in the one item of the Shared Functional Groups
Sequence. Volumes are planned from the catalog's Image rows alone, so the Image row of a
multi-frame image keeps these per-frame values as compact JSON (the ``frames`` column);
the planner then treats every frame as a slice. Every value here is one the served file
keeps (geometry, rescale, frame ordering, diffusion encoding, and the time of day the
frame was acquired where the served file keeps it): nothing identifying.

A malformed object never raises here: its record names what is wrong, and planning a
volume from it gives that reason.
"""

from __future__ import annotations

import json
from typing import Any

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import Tag

from srm_dicom.acquisition import ACQUIRED, time_of_day

# The Dimension Index Pointers that say how frames are ordered (PS3.3 C.7.6.17).
_TEMPORAL_POSITION_INDEX = Tag(0x0020, 0x9128)
_STACK_ID = Tag(0x0020, 0x9056)
_IN_STACK_POSITION = Tag(0x0020, 0x9057)


def frame_records(ds: Dataset) -> str | None:
    """The ``frames`` column of a multi-frame image's Image row; None for a single frame or
    an image without functional groups (planning says why that is not a volume)."""
    try:
        frames = int(ds.get("NumberOfFrames") or 1)
    except (TypeError, ValueError):
        return _invalid("its NumberOfFrames is not a number")
    if frames <= 1 or "PerFrameFunctionalGroupsSequence" not in ds:
        return None
    try:
        return json.dumps({"frames": _records(ds, frames)}, separators=(",", ":"))
    except _Malformed as exc:
        return _invalid(str(exc))


class _Malformed(Exception):
    """The functional groups cannot be read; the message is the reason, in a few words."""


def _invalid(reason: str) -> str:
    return json.dumps({"invalid": reason}, separators=(",", ":"))


def _records(ds: Dataset, frames: int) -> list[dict[str, Any]]:
    per_frame = ds.PerFrameFunctionalGroupsSequence
    if len(per_frame) != frames:
        raise _Malformed(f"its Per-Frame Functional Groups Sequence has {len(per_frame)} items for {frames} frames")
    shared_sequence = ds.get("SharedFunctionalGroupsSequence") or []
    if len(shared_sequence) > 1:
        raise _Malformed("its Shared Functional Groups Sequence has more than one item")
    shared = shared_sequence[0] if shared_sequence else Dataset()
    pointers = _dimension_pointers(ds)
    records = []
    for number, item in enumerate(per_frame, start=1):
        record: dict[str, Any] = {"n": number}
        _put(record, "position", _macro(item, shared, "PlanePositionSequence", "ImagePositionPatient", ds))
        _put(record, "orientation", _macro(item, shared, "PlaneOrientationSequence", "ImageOrientationPatient", ds))
        _put(record, "spacing", _macro(item, shared, "PixelMeasuresSequence", "PixelSpacing", ds))
        _put(record, "thickness", _macro(item, shared, "PixelMeasuresSequence", "SliceThickness", ds))
        _put(record, "slope", _macro(item, shared, "PixelValueTransformationSequence", "RescaleSlope", ds))
        _put(record, "intercept", _macro(item, shared, "PixelValueTransformationSequence", "RescaleIntercept", ds))
        content = _item(item, "FrameContentSequence")
        indices = _numbers(content.get("DimensionIndexValues")) if content is not None else None
        if indices is not None:
            record["index"] = indices
        for key, keyword, tag in (
            ("temporal", "TemporalPositionIndex", _TEMPORAL_POSITION_INDEX),
            ("stack", "StackID", _STACK_ID),
            ("in_stack", "InStackPositionNumber", _IN_STACK_POSITION),
        ):
            value = content.get(keyword) if content is not None else None
            if value in (None, "") and indices is not None and tag in pointers:
                position = pointers.index(tag)
                value = indices[position] if position < len(indices) else None
            _put(record, key, value)
        acquired = time_of_day(content.get("FrameAcquisitionDateTime")) if content is not None else None
        if acquired is not None:
            record[ACQUIRED] = acquired
        diffusion = _item(item, "MRDiffusionSequence") or _item(shared, "MRDiffusionSequence")
        if diffusion is not None:
            _put(record, "bvalue", diffusion.get("DiffusionBValue"))
            direction = _item(diffusion, "DiffusionGradientDirectionSequence")
            if direction is not None:
                _put(record, "gradient", direction.get("DiffusionGradientOrientation"))
        records.append(record)
    return records


def _dimension_pointers(ds: Dataset) -> list[Any]:
    return [item.get("DimensionIndexPointer") for item in ds.get("DimensionIndexSequence") or []]


def _item(container: Dataset, keyword: str) -> Dataset | None:
    """The one item of a functional group macro's sequence, or None."""
    sequence = container.get(keyword)
    if not sequence:
        return None
    if len(sequence) != 1:
        raise _Malformed(f"its {keyword} holds {len(sequence)} items where one is allowed")
    return sequence[0]


def _macro(item: Dataset, shared: Dataset, sequence: str, keyword: str, ds: Dataset) -> Any:
    """A macro's attribute for one frame: per-frame first, then shared, then (as Legacy
    Converted objects from older converters do) the top level."""
    for container in (item, shared):
        found = _item(container, sequence)
        if found is not None and found.get(keyword) not in (None, ""):
            return found.get(keyword)
    return ds.get(keyword)


def _numbers(value: Any) -> list[float | int] | None:
    """One number or several (a pydicom MultiValue) as a list of plain ints and floats."""
    if value in (None, ""):
        return None
    values = list(value) if isinstance(value, list | tuple | MultiValue) else [value]
    try:
        return [int(v) if isinstance(v, int) else float(v) for v in values]
    except (TypeError, ValueError):
        raise _Malformed("a frame has a value that is not a number in its functional groups") from None


def _put(record: dict[str, Any], key: str, value: Any) -> None:
    """Numbers as numbers, several as a list; absent values are left out of the record."""
    if value in (None, ""):
        return
    if isinstance(value, str) and key == "stack":
        record[key] = value.strip()
        return
    numbers = _numbers(value)
    if numbers is None:
        return
    record[key] = numbers if key in ("position", "orientation", "spacing", "index", "gradient") else numbers[0]
