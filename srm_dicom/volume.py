"""A series as one volume file: NIfTI-1 or NRRD, planned from the catalog's Image rows.

The plan (slice order, shape, spacing, affine, voxel type) comes from header rows alone, so
the catalog can list a volume's exact size before any pixel has been retrieved; assembly
then decodes the pixels of the very same slices and must produce exactly that many bytes.
Slices are ordered by their position along the slice normal, never by InstanceNumber;
several slices at each position (time points, echoes, diffusion directions) make a 4D
volume, ordered within a position by InstanceNumber. Nothing of the DICOM header travels.

Voxel types follow the stored pixels, as dcm2niix writes them, and are decided from the
rows alone (the size must be known before any pixel is read): integers stay integers
(uint8, int16, or uint16 when 16 bits are stored unsigned) with the series' one rescale in
the NIfTI header's scl_slope/scl_inter; float32 holds the rescaled values only where the
slices' rescales differ (or in NRRD, which has no rescale field); colour is RGB24.

Both writers are hand-made: a NIfTI-1 single file is a fixed 348-byte struct, a 4-byte
extension flag and the raw voxels; an NRRD file is a short text header and the raw voxels.
Writing them here (about a hundred lines with numpy) keeps the header a pure function of
the plan — the size is known without pixels — and keeps nibabel and its image model
(scaling heuristics, dtype choices, array proxies) out of the product.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels import pixel_array

from srm_dicom.errors import InvalidInput, MdmError
from srm_dicom.metadata import image_fields  # the catalog's own conversion, so rows compare equal

FORMATS = ("nifti", "nrrd")

# Tolerances, in the spirit of dicom2nifti's checks (orientation 1e-3; it allows 5 % on
# spacing, we are stricter so that a missing slice in a thin series is never missed).
ORIENTATION_TOLERANCE = 1e-3  # on direction cosines
SPACING_TOLERANCE = 0.01  # relative, on the gap between neighbouring positions
POSITION_TOLERANCE_MM = 0.01  # two slices closer than this along the normal share a position
# A sideways drift of the stack under a tenth of a pixel is indistinguishable from none.
TILT_TOLERANCE_PIXELS = 0.1

GRAYSCALE = ("MONOCHROME1", "MONOCHROME2")
# pydicom decodes these to RGB (YBR_* converted unless raw decoding is asked for).
COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_RCT", "YBR_ICT")

# LPS (DICOM patient coordinates) to RAS (NIfTI world coordinates): x and y flip.
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])

NIFTI_HEADER_SIZE = 348
NIFTI_VOX_OFFSET = 352  # header + the 4-byte extension flag (no extensions)
_NIFTI_UNITS_MM = 2
_NIFTI_XFORM_SCANNER_ANAT = 1
# sizeof_hdr … magic, little-endian; the layout of nifti1.h, field by field.
_NIFTI_STRUCT = struct.Struct("<i10s18sihbb8h3fhhhh8ffffhbbffffii80s24shh6f4f4f4f16s4s")  # 348 bytes


@dataclass(frozen=True)
class VoxelType:
    """One voxel type in the three vocabularies that meet here: numpy, nifti1.h, NRRD."""

    name: str
    numpy: str
    nifti_code: int
    nrrd: str
    size: int  # bytes per voxel

    @property
    def is_integer(self) -> bool:
        return self.name not in ("float32", "rgb24")


UINT8 = VoxelType("uint8", "u1", 2, "uchar", 1)
INT8 = VoxelType("int8", "i1", 256, "signed char", 1)
INT16 = VoxelType("int16", "<i2", 4, "short", 2)
UINT16 = VoxelType("uint16", "<u2", 512, "ushort", 2)
INT32 = VoxelType("int32", "<i4", 8, "int", 4)
UINT32 = VoxelType("uint32", "<u4", 768, "uint", 4)
FLOAT32 = VoxelType("float32", "<f4", 16, "float", 4)
RGB24 = VoxelType("rgb24", "u1", 128, "uchar", 3)


class NotAVolume(MdmError):
    """The slices of a series do not make one volume; the reason says why, in one line."""

    http_status = 422

    def __init__(self, reason: str) -> None:
        super().__init__(f"not a volume: {reason}")
        self.reason = reason


@dataclass(frozen=True)
class VolumePlan:
    """Everything about a volume file but its voxel values.

    ``shape`` is in file order, fastest first: (columns, rows, slices[, volumes]).
    ``order`` lists indices into the planned slices in file order (volume by volume,
    then along the normal), ``sources`` the (row, frame) each comes from (frame None for
    a single-frame image), ``rescales`` their (slope, intercept), in the same order.
    ``affine`` maps (i, j, k) voxel indices to RAS millimetres. Integer voxels hold the
    stored values and ``slope``/``intercept`` the rescale; float32 voxels are rescaled.
    """

    shape: tuple[int, ...]
    voxel: VoxelType
    spacing: tuple[float, float, float]
    affine: tuple[tuple[float, float, float, float], ...]
    order: tuple[int, ...]
    sources: tuple[tuple[int, int | None], ...]
    rescales: tuple[tuple[float, float], ...]
    slope: float = 1.0
    intercept: float = 0.0

    @property
    def rgb(self) -> bool:
        return self.voxel is RGB24

    @property
    def rows(self) -> int:
        return self.shape[1]

    @property
    def columns(self) -> int:
        return self.shape[0]

    @property
    def data_size(self) -> int:
        return math.prod(self.shape) * self.voxel.size

    def in_format(self, fmt: str) -> VolumePlan:
        """The plan as ``fmt`` can hold it: NRRD has no rescale, so rescaled integers become
        float32 there."""
        if fmt not in FORMATS:
            raise InvalidInput(f"volume format must be one of {', '.join(FORMATS)}, not {fmt!r}")
        if fmt == "nrrd" and self.voxel.is_integer and (self.slope, self.intercept) != (1.0, 0.0):
            return replace(self, voxel=FLOAT32, slope=1.0, intercept=0.0)
        return self

    def header(self, fmt: str) -> bytes:
        """The file's header, everything before the voxels."""
        plan = self.in_format(fmt)
        return _nifti_header(plan) if fmt == "nifti" else _nrrd_header(plan)

    def file_size(self, fmt: str) -> int:
        """The exact size of the file ``render`` writes, known before any pixel is read."""
        return len(self.header(fmt)) + self.in_format(fmt).data_size


def plan_volume(rows: Sequence[dict[str, Any]]) -> VolumePlan:
    """Plan a volume from the series' Image rows (``extract_metadata(ds, secret).image``);
    the frames of a multi-frame image are planned as slices."""
    slices = _slices(rows)
    if len(slices) < 2:
        raise NotAVolume("a single slice" if slices else "no slices")
    first = slices[0]
    for row in slices:
        _check_kind(row)
        _check_same_image(first, row)
    x, y, normal = _orientation(slices)
    row_spacing, column_spacing = _pixel_spacing(slices)
    positions = np.array([_numbers(row, "image_position", 3) for row in slices])

    groups = _group_by_position(positions @ normal)
    if len(groups) == 1:
        raise NotAVolume(f"all {len(slices)} slices are at the same position")
    counts = {len(group) for group in groups}
    if len(counts) > 1:
        raise NotAVolume(
            f"positions hold different numbers of slices ({min(counts)} to {max(counts)}): "
            "a slice is missing or duplicated"
        )
    volumes = counts.pop()
    groups = [_order_at_position(slices, group) for group in groups]
    stack = positions[[group[0] for group in groups]]
    _check_spacing(stack @ normal)
    _check_tilt(stack, normal, min(row_spacing, column_spacing))

    step = (stack[-1] - stack[0]) / (len(stack) - 1)
    lps = np.column_stack([x * column_spacing, y * row_spacing, step, stack[0]])
    affine = np.vstack([_LPS_TO_RAS @ lps, [0.0, 0.0, 0.0, 1.0]])
    shape: tuple[int, ...] = (int(first["columns"]), int(first["rows"]), len(stack))
    if volumes > 1:
        shape += (volumes,)
    order = tuple(group[t] for t in range(volumes) for group in groups)
    rescales = tuple(_rescale(slices[index]) for index in order)
    sources = tuple((int(slices[index]["source"]), slices[index]["frame"]) for index in order)
    voxel = _voxel_type(first, set(rescales))
    slope, intercept = rescales[0] if voxel.is_integer else (1.0, 0.0)
    return VolumePlan(
        shape=shape,
        voxel=voxel,
        spacing=(float(column_spacing), float(row_spacing), float(np.linalg.norm(step))),
        affine=tuple((a + 0.0, b + 0.0, c + 0.0, d + 0.0) for a, b, c, d in affine.tolist()),  # + 0.0: no "-0"
        order=order,
        sources=sources,
        rescales=rescales,
        slope=slope,
        intercept=intercept,
    )


# A frame record's key (srm_dicom/frames.py) → the Image column it stands for, and its name.
_FRAME_COLUMNS = {
    "position": ("image_position", "image position (Plane Position Sequence)"),
    "orientation": ("image_orientation", "image orientation (Plane Orientation Sequence)"),
    "spacing": ("pixel_spacing", "pixel spacing (Pixel Measures Sequence)"),
}


def _slices(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows to plan, one per slice: a single-frame image's row as it is, a multi-frame
    image's row once per frame with that frame's geometry and rescale. Each carries its
    ``source`` (row index) and ``frame`` (index in its image, None for a single frame)."""
    multiframe = [row.get("frames") not in (None, "") for row in rows]
    if any(multiframe) and not all(multiframe):
        raise NotAVolume("the series mixes single-frame and multi-frame images")
    if not any(multiframe):
        for row in rows:
            frames = _frame_count(row)
            if frames > 1:
                raise NotAVolume(
                    f"a multi-frame image ({frames} frames) without per-frame functional groups "
                    "(Plane Position, Plane Orientation)"
                )
        return [dict(row, source=index, frame=None) for index, row in enumerate(rows)]
    slices: list[dict[str, Any]] = []
    keys: list[tuple[Any, ...]] = []
    for index, row in enumerate(rows):
        for record in _frame_records(row):
            number = int(record["n"])
            frame = dict(row, source=index, frame=number - 1, number_of_frames=None)
            for key, (column, name) in _FRAME_COLUMNS.items():
                if key not in record:
                    raise NotAVolume(f"frame {number} of a multi-frame image has no {name}")
                frame[column] = "\\".join(str(v) for v in record[key])
            frame["slice_thickness"] = record.get("thickness", row.get("slice_thickness"))
            frame["rescale_slope"] = record.get("slope", row.get("rescale_slope"))
            frame["rescale_intercept"] = record.get("intercept", row.get("rescale_intercept"))
            slices.append(frame)
            # Volumes at one position follow the temporal position, then the object's
            # InstanceNumber, then the dimension index values (b-value, gradient, …), then
            # the frame's place in its object.
            keys.append((
                int(record.get("temporal") or 0), int(row.get("instance_number") or 0),
                tuple(record.get("index") or ()), number,
            ))
    for rank, position in enumerate(sorted(range(len(keys)), key=keys.__getitem__), start=1):
        slices[position]["instance_number"] = rank  # the order of frames sharing a position
    return slices


def _frame_count(row: dict[str, Any]) -> int:
    value = row.get("number_of_frames")
    if value in (None, ""):
        return 1
    try:
        return int(str(value))
    except ValueError:
        raise NotAVolume("an image has an unreadable number of frames") from None


def _frame_records(row: dict[str, Any]) -> list[dict[str, Any]]:
    """A multi-frame image's frame records (srm_dicom/frames.py), or its one reason."""
    try:
        parsed = json.loads(str(row["frames"]))
    except ValueError:
        raise NotAVolume("a multi-frame image has unreadable frame records") from None
    if not isinstance(parsed, dict):
        raise NotAVolume("a multi-frame image has unreadable frame records")
    if "invalid" in parsed:
        raise NotAVolume(f"a multi-frame image is inconsistent: {parsed['invalid']}")
    records = parsed.get("frames")
    if not isinstance(records, list) or not all(isinstance(r, dict) and "n" in r for r in records):
        raise NotAVolume("a multi-frame image has unreadable frame records")
    if len(records) != _frame_count(row):
        raise NotAVolume(f"a multi-frame image has {len(records)} frame records for {_frame_count(row)} frames")
    return records


def _rescale(row: dict[str, Any]) -> tuple[float, float]:
    """A slice's (RescaleSlope, RescaleIntercept); absent means identity, as in PS3.3."""
    values = []
    for column, default in (("rescale_slope", 1.0), ("rescale_intercept", 0.0)):
        value = row.get(column)
        try:
            number = default if value in (None, "") else float(value)
        except (TypeError, ValueError):
            raise NotAVolume(f"a slice has an unreadable {column.replace('_', ' ')}") from None
        if not math.isfinite(number):
            raise NotAVolume(f"a slice has an invalid {column.replace('_', ' ')}")
        values.append(number + 0.0)
    if values[0] == 0:
        raise NotAVolume("a slice has a rescale slope of 0")
    return values[0], values[1]


def _voxel_type(first: dict[str, Any], rescales: set[tuple[float, float]]) -> VoxelType:
    """dcm2niix's choice: the stored integer type when one rescale holds for every slice,
    float32 otherwise. Unsigned 16-bit pixels of at most 15 stored bits fit int16, which
    dcm2niix writes for them; with all 16 bits stored, uint16 keeps every value exact."""
    if int(first["samples_per_pixel"]) == 3:
        return RGB24
    if len(rescales) > 1:
        return FLOAT32
    signed = int(first.get("pixel_representation") or 0) == 1
    bits, stored = int(first["bits_allocated"]), int(first.get("bits_stored") or first["bits_allocated"])
    if bits == 8:
        return INT8 if signed else UINT8
    if bits == 16:
        return INT16 if signed or stored <= 15 else UINT16
    if bits == 32:
        return INT32 if signed else UINT32
    raise NotAVolume(f"unsupported pixels: {bits} bits allocated")


def image_row(ds: Dataset) -> dict[str, Any]:
    """A dataset's Image row, exactly as ``extract_metadata`` gives it to the catalog.

    Same fields, same value conversion; the other four tables are not read (they took
    40 % of a 100-slice assembly).
    """
    return image_fields(ds)


def assemble(datasets: Sequence[Dataset], fmt: str) -> bytes:
    """The series as one volume file; ``len(result) == plan_volume(rows).file_size(fmt)``."""
    plan = plan_volume([image_row(ds) for ds in datasets]).in_format(fmt)
    return render(plan, (_stored(datasets[source], frame, plan) for source, frame in plan.sources), fmt)


def render(plan: VolumePlan, frames: Iterable[np.ndarray], fmt: str) -> bytes:
    """Header then voxels; ``frames`` are the decoded stored values of the slices in
    ``plan.order``, taken one at a time so that only the output buffer holds the whole volume."""
    plan = plan.in_format(fmt)
    header = plan.header(fmt)
    out = bytearray(len(header) + plan.data_size)
    out[: len(header)] = header
    step = plan.data_size // max(1, len(plan.order))
    offset = len(header)
    for frame, rescale in zip(frames, plan.rescales, strict=True):
        out[offset:offset + step] = _voxels(plan, frame, rescale).data.cast("B")
        offset += step
    return bytes(out)


class VolumeWriter:
    """A volume file written slice by slice into an open file, in whatever order the slices
    arrive, each at the offset its place in the plan gives it: one slice is in memory at a
    time, never the volume (a 1 GiB series stages in a few MiB; README "Volumes").

    ``plan`` is ``plan_volume(rows)`` of the catalog's Image rows of the series, which gave
    the volume's size at registration; ``add(source, ds)`` takes the retrieved image of
    ``rows[source]``.
    """

    def __init__(self, plan: VolumePlan, fmt: str, fd: int) -> None:
        self.plan = plan.in_format(fmt)
        header = self.plan.header(fmt)
        self.size = len(header) + self.plan.data_size
        self._fd = fd
        self._start = len(header)
        self._step = self.plan.data_size // len(self.plan.order)
        self._slots: dict[int, list[tuple[int, int | None]]] = {}
        for slot, (source, frame) in enumerate(self.plan.sources):
            self._slots.setdefault(source, []).append((slot, frame))
        self._pending = set(range(len(self.plan.sources)))
        os.pwrite(fd, header, 0)

    def add(self, source: int, ds: Dataset) -> None:
        """Write the slices (or frames) of ``rows[source]`` from its image ``ds``."""
        for slot, frame in self._slots.get(source, ()):
            if slot not in self._pending:
                continue
            voxels = _voxels(self.plan, _stored(ds, frame, self.plan), self.plan.rescales[slot])
            os.pwrite(self._fd, voxels.data.cast("B"), self._start + slot * self._step)
            self._pending.discard(slot)

    @property
    def missing(self) -> int:
        """How many of the planned slices no image has filled yet."""
        return len(self._pending)


def _voxels(plan: VolumePlan, frame: np.ndarray, rescale: tuple[float, float]) -> np.ndarray:
    """One slice's voxels as the file stores them (C order: row, column[, sample], x fastest)."""
    if plan.voxel is FLOAT32:
        # The rescale of the rows the plan was made from (PS3.3 C.7.6.16.2.9 for frames).
        slope, intercept = rescale
        voxels = (frame.astype(np.float64) * slope + intercept).astype(FLOAT32.numpy)
    else:
        voxels = frame.astype(plan.voxel.numpy, copy=False)
    return np.ascontiguousarray(voxels)


def _stored(ds: Dataset, frame: int | None, plan: VolumePlan) -> np.ndarray:
    """One slice's (or frame's) stored values: integers without their rescale, or 8-bit RGB."""
    # Not ds.pixel_array, which keeps a decoded copy on the dataset; a frame alone is decoded.
    array = pixel_array(ds) if frame is None else pixel_array(ds, index=frame)
    expected = (plan.rows, plan.columns, 3) if plan.rgb else (plan.rows, plan.columns)
    if array.shape != expected:
        raise NotAVolume(f"a slice decodes to {array.shape} pixels where {expected} were expected")
    if plan.rgb:
        return array.astype(np.uint8, copy=False)
    bits_stored = int(ds.get("BitsStored") or ds.BitsAllocated)
    if array.dtype.kind == "u" and bits_stored < array.dtype.itemsize * 8:
        array = array & ((1 << bits_stored) - 1)  # bits above BitsStored are not the pixel's
    return array


def _check_kind(row: dict[str, Any]) -> None:
    """Only what the writers can hold: single-frame grayscale (any depth) or 8-bit colour."""
    for column in ("rows", "columns", "samples_per_pixel", "bits_allocated", "photometric"):
        if row.get(column) in (None, ""):
            raise NotAVolume(f"a slice has no {column.replace('_', ' ')}")
    samples, photometric = int(row["samples_per_pixel"]), str(row["photometric"])
    if samples == 1 and photometric in GRAYSCALE:
        return
    if samples == 3 and photometric in COLOUR and int(row["bits_allocated"]) == 8:
        return
    raise NotAVolume(
        f"unsupported pixels: {samples} sample(s) of {row['bits_allocated']} bits, {photometric}"
    )


def _check_same_image(first: dict[str, Any], row: dict[str, Any]) -> None:
    if (row["rows"], row["columns"]) != (first["rows"], first["columns"]):
        raise NotAVolume(f"mixed image sizes: {first['columns']}×{first['rows']} and {row['columns']}×{row['rows']}")
    for column in ("samples_per_pixel", "bits_allocated", "photometric"):
        if row[column] != first[column]:
            raise NotAVolume(f"mixed {column.replace('_', ' ')}: {first[column]} and {row[column]}")


def _orientation(slices: Sequence[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The row and column direction cosines shared by every slice, and the slice normal."""
    orientation = _numbers(slices[0], "image_orientation", 6)
    for row in slices[1:]:
        if np.max(np.abs(_numbers(row, "image_orientation", 6) - orientation)) > ORIENTATION_TOLERANCE:
            raise NotAVolume("slices have different orientations (ImageOrientationPatient)")
    x, y = orientation[:3], orientation[3:]
    lengths = np.array([np.linalg.norm(x), np.linalg.norm(y)])
    if np.max(np.abs(lengths - 1)) > ORIENTATION_TOLERANCE or abs(float(x @ y)) > ORIENTATION_TOLERANCE:
        raise NotAVolume("ImageOrientationPatient is not two orthogonal unit vectors")
    normal = np.cross(x, y)
    return x, y, normal / np.linalg.norm(normal)


def _pixel_spacing(slices: Sequence[dict[str, Any]]) -> tuple[float, float]:
    """(row spacing, column spacing) shared by every slice, as DICOM orders PixelSpacing."""
    spacing = _numbers(slices[0], "pixel_spacing", 2)
    if np.min(spacing) <= 0:
        raise NotAVolume("PixelSpacing is not positive")
    for row in slices[1:]:
        if np.max(np.abs(_numbers(row, "pixel_spacing", 2) - spacing)) > SPACING_TOLERANCE * np.min(spacing):
            raise NotAVolume("slices have different pixel spacings (PixelSpacing)")
    return float(spacing[0]), float(spacing[1])


def _numbers(row: dict[str, Any], column: str, count: int) -> np.ndarray:
    """A backslash-separated number list as the catalog stores it (e.g. "0.5\\0.5")."""
    value = row.get(column)
    name = column.replace("_", " ")
    if value in (None, ""):
        raise NotAVolume(f"a slice has no {name}")
    try:
        numbers = np.array([float(part) for part in str(value).split("\\")])
    except ValueError:
        raise NotAVolume(f"a slice has an unreadable {name}") from None
    if len(numbers) != count or not np.all(np.isfinite(numbers)):
        raise NotAVolume(f"a slice has an invalid {name} ({len(numbers)} values, {count} expected)")
    return numbers


def _group_by_position(along_normal: np.ndarray) -> list[list[int]]:
    """Slice indices grouped by position along the normal, groups in increasing position."""
    ranked = sorted(range(len(along_normal)), key=lambda i: along_normal[i])
    groups = [[ranked[0]]]
    for previous, index in zip(ranked, ranked[1:], strict=False):
        if along_normal[index] - along_normal[previous] <= POSITION_TOLERANCE_MM:
            groups[-1].append(index)
        else:
            groups.append([index])
    return groups


def _order_at_position(slices: Sequence[dict[str, Any]], group: list[int]) -> list[int]:
    """The slices at one position, one per volume, in InstanceNumber order."""
    if len(group) == 1:
        return group
    numbers = [slices[index].get("instance_number") for index in group]
    if None in numbers or len(set(numbers)) != len(numbers):
        raise NotAVolume(
            f"{len(group)} slices share a position but their InstanceNumbers cannot order them into volumes"
        )
    return sorted(group, key=lambda index: int(slices[index]["instance_number"]))


def _check_spacing(along_normal: np.ndarray) -> None:
    """Even gaps between positions; a gap of about k gaps is named as missing slices."""
    gaps = np.diff(along_normal)
    usual = float(np.median(gaps))
    tolerance = max(POSITION_TOLERANCE_MM, SPACING_TOLERANCE * usual)
    for index, gap in enumerate(gaps):
        if abs(gap - usual) <= tolerance:
            continue
        multiple = round(gap / usual)
        if multiple >= 2 and abs(gap - multiple * usual) <= tolerance * multiple:
            raise NotAVolume(
                f"{multiple - 1} slice(s) missing after slice {index + 1} of {len(along_normal)} "
                f"(gap of {gap:.3g} mm where the others are {usual:.3g} mm)"
            )
        raise NotAVolume(f"uneven slice spacing: gaps from {gaps.min():.3g} to {gaps.max():.3g} mm")


def _check_tilt(stack: np.ndarray, normal: np.ndarray, pixel: float) -> None:
    """Slices stacked along their own normal: a gantry tilt shifts them sideways."""
    offsets = stack - stack[0]
    sideways = offsets - np.outer(offsets @ normal, normal)
    drift = float(np.max(np.linalg.norm(sideways, axis=1)))
    if drift > TILT_TOLERANCE_PIXELS * pixel:
        along = float(np.linalg.norm(offsets[-1]))
        angle = math.degrees(math.asin(min(1.0, float(np.linalg.norm(sideways[-1])) / along)))
        raise NotAVolume(
            f"slices are not stacked along their normal (gantry tilt of about {angle:.1f}°, "
            f"drift of {drift:.3g} mm): reslicing is not supported"
        )


def _quaternion(rotation: np.ndarray) -> tuple[float, float, float, float]:
    """(qfac, b, c, d) of the qform: nifti1.h's quaternion of the nearest proper rotation."""
    u, _, vt = np.linalg.svd(rotation)  # nearest orthogonal matrix (cosines may be slightly skewed)
    r = u @ vt
    qfac = 1.0
    if np.linalg.det(r) < 0:
        qfac = -1.0
        r[:, 2] = -r[:, 2]
    # Shepperd's method: divide by the largest of the four candidates for stability.
    trace = np.trace(r)
    candidates = [trace, r[0, 0], r[1, 1], r[2, 2]]
    best = int(np.argmax(candidates))
    if best == 0:
        a = 0.5 * math.sqrt(1 + trace)
        b, c, d = (r[2, 1] - r[1, 2]) / (4 * a), (r[0, 2] - r[2, 0]) / (4 * a), (r[1, 0] - r[0, 1]) / (4 * a)
    elif best == 1:
        b = 0.5 * math.sqrt(1 + r[0, 0] - r[1, 1] - r[2, 2])
        a, c, d = (r[2, 1] - r[1, 2]) / (4 * b), (r[0, 1] + r[1, 0]) / (4 * b), (r[0, 2] + r[2, 0]) / (4 * b)
    elif best == 2:
        c = 0.5 * math.sqrt(1 - r[0, 0] + r[1, 1] - r[2, 2])
        a, b, d = (r[0, 2] - r[2, 0]) / (4 * c), (r[0, 1] + r[1, 0]) / (4 * c), (r[1, 2] + r[2, 1]) / (4 * c)
    else:
        d = 0.5 * math.sqrt(1 - r[0, 0] - r[1, 1] + r[2, 2])
        a, b, c = (r[1, 0] - r[0, 1]) / (4 * d), (r[0, 2] + r[2, 0]) / (4 * d), (r[1, 2] + r[2, 1]) / (4 * d)
    if a < 0:  # the qform keeps b, c, d and recomputes a >= 0
        b, c, d = -b, -c, -d
    return qfac, float(b), float(c), float(d)


def _nifti_header(plan: VolumePlan) -> bytes:
    affine = np.array(plan.affine)
    qfac, b, c, d = _quaternion(affine[:3, :3] / np.array(plan.spacing))
    dim = [len(plan.shape), *plan.shape] + [1] * (7 - len(plan.shape))
    pixdim = [qfac, *plan.spacing] + [1.0] * 4  # no time unit: the 4th axis may be echoes
    datatype, bitpix = plan.voxel.nifti_code, plan.voxel.size * 8
    header = _NIFTI_STRUCT.pack(
        NIFTI_HEADER_SIZE, b"", b"", 0, 0, ord("r"), 0,  # sizeof_hdr … regular, dim_info
        *dim,
        0.0, 0.0, 0.0, 0, datatype, bitpix, 0,  # intent_p1…p3, intent_code, datatype, bitpix, slice_start
        *pixdim,
        float(NIFTI_VOX_OFFSET), plan.slope, plan.intercept,  # vox_offset, scl_slope, scl_inter
        0, 0, _NIFTI_UNITS_MM,  # slice_end, slice_code, xyzt_units
        0.0, 0.0, 0.0, 0.0, 0, 0,  # cal_max, cal_min, slice_duration, toffset, glmax, glmin
        b"srm-dicom", b"",  # descrip, aux_file: nothing of the DICOM header
        _NIFTI_XFORM_SCANNER_ANAT, _NIFTI_XFORM_SCANNER_ANAT,
        b, c, d, *affine[:3, 3],
        *affine[0], *affine[1], *affine[2],
        b"", b"n+1\0",
    )
    return header + b"\0\0\0\0"  # extension flag: none


def _number(value: float) -> str:
    """Fixed formatting, so the header (and the file size) is a function of the plan alone."""
    return f"{value + 0.0:.10g}"


def _vector(values: Iterable[float]) -> str:
    return "(" + ",".join(_number(v) for v in values) + ")"


def _nrrd_header(plan: VolumePlan) -> bytes:
    affine = np.array(plan.affine)
    directions = [_vector(affine[:3, axis]) for axis in range(3)]
    kinds = ["domain"] * 3
    sizes = list(plan.shape)
    if len(plan.shape) == 4:
        directions.append("none")
        kinds.append("list")
    if plan.rgb:
        directions.insert(0, "none")
        kinds.insert(0, "RGB-color")
        sizes.insert(0, 3)
    lines = [
        "NRRD0004",
        "# Complete NRRD file format specification at:",
        "# http://teem.sourceforge.net/nrrd/format.html",
        f"type: {plan.voxel.nrrd}",
        f"dimension: {len(sizes)}",
        "space: right-anterior-superior",
        f"sizes: {' '.join(str(size) for size in sizes)}",
        f"space directions: {' '.join(directions)}",
        f"kinds: {' '.join(kinds)}",
        'space units: "mm" "mm" "mm"',
        f"space origin: {_vector(affine[:3, 3])}",
        "encoding: raw",
        "endian: little",
    ]
    return ("\n".join(lines) + "\n\n").encode("ascii")
