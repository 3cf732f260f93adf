"""Synthetic chest CT volumes in Hounsfield units with pulmonary nodules of known geometry.

Each phantom is an axial CT stack: air outside an elliptic body (subcutaneous fat ~-100 HU
around soft tissue ~40 HU), a vertebral body (~350 HU), a trachea (air) in the upper slices,
two lungs (~-850 HU with faint texture), branching vessel trees inside the lungs (~40 HU
tubes, 1-4.5 mm radius, soft edged) and 0-3 ellipsoidal nodules (equivalent diameter 4-30 mm,
-50..+60 HU, soft edge of one voxel) entirely inside a lung, plus Gaussian noise. Vessels and
nodules share their density on purpose: only shape tells them apart.

Size choice: 128 x 128 pixels in-plane at 2.3-2.7 mm (a 294-346 mm field of view that holds the
body) and 64-96 slices of 2.0, 2.5 or 3.0 mm covering 165-230 mm of the chest (so that a 64-voxel
window at 2.5 mm always fits). That is about 1-1.6 M voxels per volume: small enough to train a
3-D network on two CPU cores in about two minutes, coarse enough that nodules under 6 mm are
only 2-3 voxels across (and hard to tell from a vessel).

Geometry follows ``models.nodules``: arrays are (z, y, x), spacing (z, y, x) mm, origin the
patient (x, y, z) LPS position of voxel (0, 0, 0), direction identity (axial, head first
supine: +x patient left, +y posterior, +z head). All random draws come from the generator,
in a fixed order.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from models.nodules import voxel_to_patient
from radbridge.errors import ModelError

__all__ = [
    "HU_MAX",
    "HU_MIN",
    "NODULE_DIAMETER_MM",
    "CTPhantom",
    "TruthNodule",
    "chest_ct",
    "sample_volumes",
]

HU_MIN, HU_MAX = -1024, 3071
NODULE_DIAMETER_MM = (4.0, 30.0)
_IN_PLANE = 128
_PIXEL_MM = (2.3, 2.7)
_SLICE_MM = (2.0, 2.5, 3.0)
_SLICES = (64, 96)
_COVERAGE_MM = (165.0, 230.0)  # craniocaudal extent: at least 64 voxels of 2.5 mm
_AIR, _FAT, _SOFT, _BONE, _LUNG, _VESSEL = -1000.0, -100.0, 40.0, 350.0, -850.0, 40.0


@dataclass(frozen=True)
class TruthNodule:
    """A nodule as drawn: exact centre and size."""

    centre_voxel: tuple[float, float, float]
    """(z, y, x) fractional voxel indices of the centre."""
    centre_mm: tuple[float, float, float]
    """Patient (x, y, z) LPS mm: ``origin + direction @ (x*sx, y*sy, z*sz)`` of the above."""
    diameter_mm: float
    """Equivalent-sphere diameter: 2 * (a*b*c)^(1/3) of the semi-axes."""
    volume_mm3: float
    """4/3 * pi * a * b * c."""
    semi_axes_mm: tuple[float, float, float]
    """Ellipsoid semi-axes a, b, c (mm), before the random rotation."""
    hu: float
    """Density of the solid part."""


@dataclass(frozen=True)
class CTPhantom:
    """One synthetic chest CT volume and its truth."""

    hu: np.ndarray
    """(z, y, x) int16 Hounsfield units, clipped to [-1024, 3071]."""
    label: np.ndarray
    """(z, y, x) uint8: 1 where the voxel centre lies inside a nodule's nominal surface."""
    nodules: list[TruthNodule]
    spacing: tuple[float, float, float]
    """(z, y, x) mm: slice spacing (= slice thickness), row and column pixel spacing."""
    origin: tuple[float, float, float]
    """Patient (x, y, z) LPS mm of the centre of voxel (0, 0, 0) (the lowest slice)."""
    direction: np.ndarray = field(default_factory=lambda: np.eye(3))
    """3 x 3, columns = LPS unit vectors of increasing x, y, z index."""


def _rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def _segment_occupancy(
    coords: tuple[np.ndarray, np.ndarray, np.ndarray],
    p0: np.ndarray,
    p1: np.ndarray,
    radius: float,
    edge: float,
    spacing: tuple[float, float, float],
    origin: tuple[float, float, float],
    shape: tuple[int, int, int],
) -> tuple[tuple[slice, slice, slice], np.ndarray] | None:
    """Soft occupancy of a tube of ``radius`` around p0->p1 (patient mm) within its bounding box."""
    lo = np.minimum(p0, p1) - radius - edge
    hi = np.maximum(p0, p1) + radius + edge
    box = []
    for axis_xyz, axis_zyx in ((2, 0), (1, 1), (0, 2)):
        a = int(np.floor((lo[axis_xyz] - origin[axis_xyz]) / spacing[axis_zyx]))
        b = int(np.ceil((hi[axis_xyz] - origin[axis_xyz]) / spacing[axis_zyx])) + 1
        a, b = max(a, 0), min(b, shape[axis_zyx])
        if a >= b:
            return None
        box.append(slice(a, b))
    sz, sy, sx = box
    z, y, x = coords[0][sz], coords[1][:, sy], coords[2][:, :, sx]
    d = p1 - p0
    length2 = float(d @ d) or 1e-9
    rx, ry, rz = x - p0[0], y - p0[1], z - p0[2]
    t = np.clip((rx * d[0] + ry * d[1] + rz * d[2]) / length2, 0.0, 1.0)
    dist = np.sqrt((rx - t * d[0]) ** 2 + (ry - t * d[1]) ** 2 + (rz - t * d[2]) ** 2)
    return (sz, sy, sx), np.clip(0.5 + (radius - dist) / edge, 0.0, 1.0)


def _vessel_tree(
    rng: np.random.Generator, root: np.ndarray, lateral: float
) -> list[tuple[np.ndarray, np.ndarray, float]]:
    """Segments (p0, p1, radius) of one tree: 4 trunks, four binary generations each."""
    segments: list[tuple[np.ndarray, np.ndarray, float]] = []
    stack = []
    for _ in range(4):
        d = rng.standard_normal(3) * np.array([0.6, 1.0, 1.2])
        d[0] = lateral * (abs(d[0]) + 0.4)
        length, radius = rng.uniform(25.0, 40.0), rng.uniform(2.5, 4.0)
        stack.append((root, d / np.linalg.norm(d), length, radius, 0))
    while stack:
        p0, d, length, radius, gen = stack.pop()
        p1 = p0 + d * length
        segments.append((p0, p1, radius))
        if gen >= 4:
            continue
        for _ in range(2):
            turn = rng.standard_normal(3)
            turn -= (turn @ d) * d
            turn /= np.linalg.norm(turn) + 1e-9
            angle = np.deg2rad(rng.uniform(20.0, 45.0))
            child = np.cos(angle) * d + np.sin(angle) * turn
            stack.append(
                (p1, child, length * rng.uniform(0.65, 0.85), max(radius * 0.72, 0.8), gen + 1)
            )
    return segments


def chest_ct(rng: np.random.Generator, n_nodules: int | None = None) -> CTPhantom:
    """Draw one chest CT phantom.

    Args:
        rng: Source of every random variation (geometry, anatomy, vessels, nodules, noise).
        n_nodules: Nodules to place (0-3); drawn uniformly from 0..3 when None. A nodule
            that finds no room in 100 tries is shrunk by 15 % (at most three times), then
            left out.

    Returns:
        The phantom with its HU volume, nodule label mask and truth nodules.
    """
    if n_nodules is not None and not 0 <= n_nodules <= 3:
        raise ModelError(f"n_nodules: must be 0..3, got {n_nodules}")
    # -- fixed-order draws: geometry, anatomy, nodule count --
    px = round(float(rng.uniform(*_PIXEL_MM)), 4)  # DICOM DS-exact: 0.1 um steps
    sz = float(rng.choice(_SLICE_MM))
    coverage = float(rng.uniform(*_COVERAGE_MM))
    nz = int(np.clip(round(coverage / sz) + 1, *_SLICES))
    shape = (nz, _IN_PLANE, _IN_PLANE)
    spacing = (sz, px, px)
    half = (_IN_PLANE - 1) * px / 2.0
    table_z = round(float(rng.uniform(-400.0, -100.0)), 3)
    origin = (
        round(-half + float(rng.normal(0, 3)), 3),
        round(-half + float(rng.normal(0, 3)), 3),
        table_z,
    )
    extent_z = (nz - 1) * sz
    bx, by = rng.uniform(122.0, 0.97 * half), rng.uniform(88.0, 108.0)  # body semi-axes
    fat = rng.uniform(8.0, 18.0)
    lung_x, lung_y = rng.uniform(62.0, 72.0), rng.uniform(0.0, 8.0)  # lung centres (+-x, y)
    ax, ay = rng.uniform(40.0, 48.0), rng.uniform(62.0, 0.82 * by)  # lung semi-axes
    lung_zc = table_z + extent_z * rng.uniform(0.45, 0.6)
    lung_hz = extent_z * rng.uniform(0.55, 0.75)  # lung half-height
    spine_r = rng.uniform(14.0, 18.0)
    count = int(rng.integers(0, 4)) if n_nodules is None else n_nodules

    z = (origin[2] + np.arange(nz) * sz).reshape(nz, 1, 1)
    y = (origin[1] + np.arange(_IN_PLANE) * px).reshape(1, _IN_PLANE, 1)
    x = (origin[0] + np.arange(_IN_PLANE) * px).reshape(1, 1, _IN_PLANE)
    coords = (z, y, x)

    # -- anatomy --
    body = (x / bx) ** 2 + (y / by) ** 2 < 1.0
    inner = (x / (bx - fat)) ** 2 + (y / (by - fat)) ** 2 < 1.0
    hu = np.where(body, np.float32(_FAT), np.float32(_AIR))
    hu = np.where(inner, np.float32(_SOFT), hu)
    spine = (x**2 + (y - (by - fat - spine_r - 8.0)) ** 2) < spine_r**2
    hu = np.where(spine, np.float32(_BONE), hu)
    hu = np.broadcast_to(hu, shape).copy()
    taper = np.sqrt(np.clip(1.0 - ((z - lung_zc) / lung_hz) ** 2, 0.0, None))
    lungs = []
    for side in (-1.0, 1.0):  # patient right (-x), patient left (+x)
        with np.errstate(divide="ignore", invalid="ignore"):
            r2 = ((x - side * lung_x) / (ax * taper)) ** 2 + ((y - lung_y) / (ay * taper)) ** 2
        lungs.append(np.nan_to_num(r2, nan=2.0, posinf=2.0) < 1.0)
    lung = lungs[0] | lungs[1]
    texture = rng.standard_normal(shape, dtype=np.float32) * 12.0
    hu = np.where(lung, np.float32(_LUNG) + texture, hu)
    trachea = ((x**2 + (y - lung_y + 25.0) ** 2) < 81.0) & (z > lung_zc + 0.3 * lung_hz)
    hu = np.where(trachea & inner, np.float32(_AIR), hu)

    # -- vessels: three trees per lung rooted in the hilum just outside its medial edge (so the
    # junction blob lies in the mediastinum), clipped to the lungs --
    edge = float(np.mean(spacing))
    vessels = np.zeros(shape, dtype=np.float32)
    roots = [
        np.array([side * (lung_x - 1.02 * ax), lung_y, lung_zc + level * lung_hz])
        for side in (-1.0, 1.0)
        for level in (-0.4, 0.0, 0.4)
    ]
    for root in roots:
        for p0, p1, radius in _vessel_tree(rng, root, float(np.sign(root[0]))):
            got = _segment_occupancy(coords, p0, p1, radius, edge, spacing, origin, shape)
            if got is not None:
                box, occ = got
                np.maximum(vessels[box], occ, out=vessels[box])
    vessels *= lung
    hu += vessels * (np.float32(_VESSEL) - hu)

    # -- nodules, fully inside one lung, not touching each other --
    label = np.zeros(shape, dtype=np.uint8)
    nodules: list[TruthNodule] = []
    lung_idx = np.flatnonzero(lung)
    probe = np.array([[a, b, c] for a in (-1, 0, 1) for b in (-1, 0, 1) for c in (-1, 0, 1)])
    probe = probe / np.maximum(np.linalg.norm(probe, axis=1, keepdims=True), 1e-9)
    for _ in range(count):
        diameter = float(rng.uniform(*NODULE_DIAMETER_MM))
        elong = rng.uniform(-0.15, 0.15, size=3)
        rot = _rotation(rng)
        density = float(rng.uniform(-50.0, 60.0))
        stretch = np.exp(elong - elong.mean())  # semi-axes / radius; geometric mean 1
        for attempt in range(400):
            d_try = diameter * (0.85 ** (attempt // 100))  # shrink when it does not fit
            centre_idx = np.array(
                np.unravel_index(lung_idx[rng.integers(lung_idx.size)], shape), dtype=np.float64
            ) + rng.uniform(-0.5, 0.5, size=3)
            centre = voxel_to_patient(centre_idx, spacing, origin)
            r_mm = d_try / 2.0
            pts = centre + probe * (r_mm * stretch.max() + edge)
            pidx = np.rint(((pts - origin) / np.array([px, px, sz]))[:, ::-1]).astype(int)
            inside = np.all((pidx >= 0) & (pidx < np.array(shape)), axis=1)
            if not inside.all():
                continue
            same_lung = any(lg[tuple(pidx.T)].all() for lg in lungs)
            apart = all(
                np.linalg.norm(centre - np.array(n.centre_mm)) > r_mm + n.diameter_mm / 2 + 3.0
                for n in nodules
            )
            if same_lung and apart:
                break
        else:
            continue  # no room (rare): fewer nodules
        semi = r_mm * stretch
        got = _segment_occupancy(
            coords, centre, centre, float(semi.max()), edge, spacing, origin, shape
        )
        if got is None:
            continue
        box = got[0]
        rel = np.stack(
            np.broadcast_arrays(
                x[:, :, box[2]] - centre[0], y[:, box[1]] - centre[1], z[box[0]] - centre[2]
            ),
            axis=-1,
        )
        local = rel @ rot  # coordinates along the ellipsoid's axes
        rho = np.sqrt(np.sum((local / semi) ** 2, axis=-1))
        occ = np.clip(0.5 + (1.0 - rho) * r_mm / edge, 0.0, 1.0).astype(np.float32)
        hu[box] += occ * (np.float32(density) - hu[box])
        label[box] |= (rho <= 1.0).astype(np.uint8)
        nodules.append(
            TruthNodule(
                centre_voxel=(float(centre_idx[0]), float(centre_idx[1]), float(centre_idx[2])),
                centre_mm=(float(centre[0]), float(centre[1]), float(centre[2])),
                diameter_mm=float(2.0 * r_mm),
                volume_mm3=float(4.0 / 3.0 * np.pi * np.prod(semi)),
                semi_axes_mm=(float(semi[0]), float(semi[1]), float(semi[2])),
                hu=density,
            )
        )

    noise_sd = rng.uniform(8.0, 18.0)
    hu += rng.standard_normal(shape, dtype=np.float32) * np.float32(noise_sd)
    out = np.clip(np.rint(hu), HU_MIN, HU_MAX).astype(np.int16)
    return CTPhantom(
        hu=out, label=label, nodules=nodules, spacing=spacing, origin=origin, direction=np.eye(3)
    )


def sample_volumes(n: int, seed: int) -> list[CTPhantom]:
    """``n`` phantoms from ``numpy.random.default_rng([seed, i])`` each (0-3 nodules)."""
    return [chest_ct(np.random.default_rng([seed, i])) for i in range(n)]
