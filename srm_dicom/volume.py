"""A series as one volume file: NIfTI-1 or NRRD, planned from the catalog's Image rows.

The plan (slice order, shape, spacing, affine, voxel type) comes from header rows alone, so
the catalog can list a volume's exact size before any pixel has been retrieved; assembly
then decodes the pixels of the very same slices and must produce exactly that many bytes.
Slices are ordered by their position along the slice normal, never by InstanceNumber;
several slices at each position (time points, echoes, diffusion directions) make a 4D
volume, ordered within a position by InstanceNumber. Nothing of the DICOM header travels.

Voxel types are fixed per kind of image, not per pixel values, because the size must be
known beforehand: grayscale is always float32 after rescale slope/intercept (exact for any
16-bit stored value, and slope/intercept are not in the Image rows), colour is RGB24.

Both writers are hand-made: a NIfTI-1 single file is a fixed 348-byte struct, a 4-byte
extension flag and the raw voxels; an NRRD file is a short text header and the raw voxels.
Writing them here (about a hundred lines with numpy) keeps the header a pure function of
the plan — the size is known without pixels — and keeps nibabel and its image model
(scaling heuristics, dtype choices, array proxies) out of the product.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut, pixel_array

from srm_dicom.errors import InvalidInput, MdmError
from srm_dicom.metadata import IMAGE_FIELDS, _value  # the catalog's own conversion, so rows compare equal

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
_NIFTI_FLOAT32, _NIFTI_RGB24 = 16, 128
_NIFTI_UNITS_MM = 2
_NIFTI_XFORM_SCANNER_ANAT = 1
# sizeof_hdr … magic, little-endian; the layout of nifti1.h, field by field.
_NIFTI_STRUCT = struct.Struct("<i10s18sihbb8h3fhhhh8ffffhbbffffii80s24shh6f4f4f4f16s4s")  # 348 bytes


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
    then along the normal). ``affine`` maps (i, j, k) voxel indices to RAS millimetres.
    """

    shape: tuple[int, ...]
    rgb: bool
    spacing: tuple[float, float, float]
    affine: tuple[tuple[float, float, float, float], ...]
    order: tuple[int, ...]

    @property
    def rows(self) -> int:
        return self.shape[1]

    @property
    def columns(self) -> int:
        return self.shape[0]

    @property
    def bytes_per_voxel(self) -> int:
        return 3 if self.rgb else 4

    @property
    def data_size(self) -> int:
        return math.prod(self.shape) * self.bytes_per_voxel

    def header(self, fmt: str) -> bytes:
        """The file's header, everything before the voxels."""
        if fmt == "nifti":
            return _nifti_header(self)
        if fmt == "nrrd":
            return _nrrd_header(self)
        raise InvalidInput(f"volume format must be one of {', '.join(FORMATS)}, not {fmt!r}")

    def file_size(self, fmt: str) -> int:
        """The exact size of the file ``render`` writes, known before any pixel is read."""
        return len(self.header(fmt)) + self.data_size


def plan_volume(slices: Sequence[dict[str, Any]]) -> VolumePlan:
    """Plan a volume from the series' Image rows (``extract_metadata(ds, secret).image``)."""
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
    return VolumePlan(
        shape=shape,
        rgb=int(first["samples_per_pixel"]) == 3,
        spacing=(float(column_spacing), float(row_spacing), float(np.linalg.norm(step))),
        affine=tuple(tuple(float(v) + 0.0 for v in line) for line in affine),  # + 0.0: no "-0"
        order=tuple(group[t] for t in range(volumes) for group in groups),
    )


def image_row(ds: Dataset) -> dict[str, Any]:
    """A dataset's Image row, exactly as ``extract_metadata`` gives it to the catalog.

    Same fields, same value conversion; the other four tables are not read (they took
    40 % of a 100-slice assembly).
    """
    return {column: _value(ds, keyword) for column, keyword in IMAGE_FIELDS.items()}


def assemble(datasets: Sequence[Dataset], fmt: str) -> bytes:
    """The series as one volume file; ``len(result) == plan_volume(rows).file_size(fmt)``."""
    plan = plan_volume([image_row(ds) for ds in datasets])
    return render(plan, (_pixels(datasets[index], plan) for index in plan.order), fmt)


def render(plan: VolumePlan, frames: Iterable[np.ndarray], fmt: str) -> bytes:
    """Header then voxels; ``frames`` are the decoded slices in ``plan.order``, taken one at
    a time so that only the output buffer holds the whole volume."""
    header = plan.header(fmt)
    out = np.empty(len(header) + plan.data_size, dtype=np.uint8)
    out[: len(header)] = np.frombuffer(header, dtype=np.uint8)
    voxels = out[len(header):]
    if not plan.rgb:
        voxels = voxels.view("<f4")
    voxels = voxels.reshape(len(plan.order), plan.rows, plan.columns, *((3,) if plan.rgb else ()))
    for slot, frame in zip(voxels, frames, strict=True):
        slot[...] = frame  # C order (row, column[, sample]) = NIfTI/NRRD order, x fastest
    return out.tobytes()


def _pixels(ds: Dataset, plan: VolumePlan) -> np.ndarray:
    """One slice's voxel values: rescaled float32 grayscale, or 8-bit RGB."""
    array = pixel_array(ds)  # not ds.pixel_array, which keeps a decoded copy on the dataset
    expected = (plan.rows, plan.columns, 3) if plan.rgb else (plan.rows, plan.columns)
    if array.shape != expected:
        raise NotAVolume(f"a slice decodes to {array.shape} pixels where {expected} were expected")
    if plan.rgb:
        return array.astype(np.uint8, copy=False)
    return apply_modality_lut(array, ds).astype(np.float32, copy=False)


def _check_kind(row: dict[str, Any]) -> None:
    """Only what the writers can hold: single-frame grayscale (any depth) or 8-bit colour."""
    for column in ("rows", "columns", "samples_per_pixel", "bits_allocated", "photometric"):
        if row.get(column) in (None, ""):
            raise NotAVolume(f"a slice has no {column.replace('_', ' ')}")
    frames = row.get("number_of_frames")
    if frames not in (None, "") and int(str(frames)) > 1:
        raise NotAVolume(f"multiframe images ({int(str(frames))} frames) are not supported")
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
    datatype, bitpix = (_NIFTI_RGB24, 24) if plan.rgb else (_NIFTI_FLOAT32, 32)
    header = _NIFTI_STRUCT.pack(
        NIFTI_HEADER_SIZE, b"", b"", 0, 0, ord("r"), 0,  # sizeof_hdr … regular, dim_info
        *dim,
        0.0, 0.0, 0.0, 0, datatype, bitpix, 0,  # intent_p1…p3, intent_code, datatype, bitpix, slice_start
        *pixdim,
        float(NIFTI_VOX_OFFSET), 1.0, 0.0,  # vox_offset, scl_slope, scl_inter: values are stored as is
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


def _vector(values: Sequence[float]) -> str:
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
        f"type: {'uchar' if plan.rgb else 'float'}",
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
