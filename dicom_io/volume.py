"""Pixel decoding of a CT (or MR) series into one volume with its patient geometry.

``read_series`` takes the single-frame instances of one series, sorts them by position along
the slice normal (never by InstanceNumber, which scanners number either way), applies the
modality LUT (RescaleSlope/Intercept: Hounsfield units for CT) and returns the geometry in
the conventions of ``models.nodules``:

* volume ``(z, y, x)`` float32 = (slice ``k``, row ``j``, column ``i``);
* spacing ``(z, y, x)`` mm: slice spacing (from positions, not SliceThickness), row spacing,
  column spacing (``PixelSpacing`` is [row spacing, column spacing]);
* origin: patient ``(x, y, z)`` LPS mm of the centre of voxel ``(0, 0, 0)`` (the first
  slice along the normal);
* direction: 3 x 3, columns = row direction, column direction, slice normal, so that
  ``patient = origin + direction @ (i * sx, j * sy, k * sz)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut

from radbridge.errors import DatasetError

__all__ = ["read_series", "sorted_along"]

_ORIENTATION_TOL = 1e-4  # direction cosines of all slices must agree this well
_SPACING_TOL = 0.01  # relative spread of slice-to-slice distances allowed
_SHEAR_TOL = 1e-3  # in-plane drift per mm along the normal (gantry tilt) allowed


def _read(source: Path | str | bytes) -> Dataset:
    try:
        if isinstance(source, bytes):
            return pydicom.dcmread(BytesIO(source))
        return pydicom.dcmread(source)
    except Exception as exc:
        where = "instance bytes" if isinstance(source, bytes) else str(source)
        raise DatasetError("undecodable_pixels", f"{where}: not readable DICOM: {exc}") from None


def _floats(ds: Dataset, keyword: str, n: int) -> np.ndarray:
    value = ds.get(keyword)
    try:
        arr = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        arr = np.empty(0)
    if arr.size != n:
        raise DatasetError(
            "missing_geometry", f"instance {ds.get('InstanceNumber', '?')}: {keyword} missing"
        )
    return arr


def read_series(
    sources: Sequence[Path | str | bytes],
) -> tuple[np.ndarray, tuple[float, float, float], tuple[float, float, float], np.ndarray]:
    """Decode a series of single-frame slices into a (z, y, x) volume after the modality LUT.

    Args:
        sources: Paths or encoded bytes of the instances of one series, in any order.

    Returns:
        ``(volume, spacing, origin, direction)`` as described in the module docstring.

    Raises:
        DatasetError: Unreadable instances, mixed series, multi-frame instances, missing or
            inconsistent geometry (orientation, size, pixel spacing), duplicate positions,
            uneven slice spacing, or a sheared (tilted-gantry) stack.
    """
    if not sources:
        raise DatasetError("empty_series", "read_series: no instances given")
    datasets = [_read(s) for s in sources]
    first = datasets[0]
    series = {str(ds.get("SeriesInstanceUID", "")) for ds in datasets}
    if len(series) > 1:
        raise DatasetError("mixed_series", f"read_series: {len(series)} series given, need one")
    orientation = _floats(first, "ImageOrientationPatient", 6)
    row, col = orientation[:3], orientation[3:]
    normal = np.cross(row, col)
    if abs(np.linalg.norm(row) - 1) > 1e-3 or abs(np.linalg.norm(col) - 1) > 1e-3:
        raise DatasetError("bad_geometry", f"ImageOrientationPatient not unit: {list(orientation)}")
    normal /= np.linalg.norm(normal)
    pixel_spacing = _floats(first, "PixelSpacing", 2)
    shape = (int(first.Rows), int(first.Columns))
    positions = []
    for ds in datasets:
        if int(ds.get("NumberOfFrames", 1) or 1) != 1:
            raise DatasetError("unsupported_pixels", "read_series: multi-frame instances")
        if np.max(np.abs(_floats(ds, "ImageOrientationPatient", 6) - orientation)) > (
            _ORIENTATION_TOL
        ):
            raise DatasetError("inconsistent_series", "read_series: slice orientations differ")
        if (int(ds.Rows), int(ds.Columns)) != shape or np.any(
            _floats(ds, "PixelSpacing", 2) != pixel_spacing
        ):
            raise DatasetError("inconsistent_series", "read_series: slice sizes/spacings differ")
        positions.append(_floats(ds, "ImagePositionPatient", 3))
    pos = np.stack(positions)
    along = pos @ normal
    order = np.argsort(along, kind="stable")
    pos, along = pos[order], along[order]
    if len(datasets) > 1:
        steps = np.diff(along)
        if np.min(steps) <= 1e-6:
            raise DatasetError("inconsistent_series", "read_series: two slices share a position")
        slice_spacing = float(np.mean(steps))
        if np.ptp(steps) > _SPACING_TOL * slice_spacing:
            raise DatasetError(
                "inconsistent_series",
                f"read_series: uneven slice spacing {float(steps.min()):.4g}.."
                f"{float(steps.max()):.4g} mm (missing slices?)",
            )
        drift = (pos[-1] - pos[0]) - normal * (along[-1] - along[0])
        if np.linalg.norm(drift) > _SHEAR_TOL * (along[-1] - along[0]) + 1e-3:
            raise DatasetError(
                "unsupported_geometry",
                "read_series: slice positions do not follow the normal (gantry tilt?)",
            )
    else:
        thickness = first.get("SpacingBetweenSlices") or first.get("SliceThickness") or 1.0
        slice_spacing = float(thickness)
    volume = np.empty((len(datasets), *shape), dtype=np.float32)
    for k, idx in enumerate(order):
        ds = datasets[int(idx)]
        try:
            pixels = ds.pixel_array
        except Exception as exc:
            raise DatasetError(
                "undecodable_pixels", f"pixel data cannot be decoded: {exc}"
            ) from None
        volume[k] = np.asarray(apply_modality_lut(pixels, ds), dtype=np.float32)
    spacing = (slice_spacing, float(pixel_spacing[0]), float(pixel_spacing[1]))
    origin = (float(pos[0][0]), float(pos[0][1]), float(pos[0][2]))
    direction = np.column_stack([row, col, normal])
    return volume, spacing, origin, direction


def sorted_along(slices: Sequence[Dataset], normal: Sequence[float] | np.ndarray) -> list[Dataset]:
    """Single-frame slices in the order of their Image Position (Patient) along ``normal``
    (the slice normal; its length does not matter)."""
    n = np.asarray(normal, dtype=np.float64)
    return sorted(
        slices, key=lambda ds: float(np.dot(np.asarray(ds.ImagePositionPatient, dtype=float), n))
    )
