"""Segmenter inference and nodule post-processing: HU volume -> nodules in patient coordinates.

What serving calls: ``detect_nodules`` (resample + preprocess with the manifest, MONAI
sliding-window inference with the ONNX session, then ``find_nodules``), or its steps.
``find_nodules`` needs only numpy: threshold, connected components (26-connectivity,
union-find), then per component the centre in patient coordinates (DICOM LPS, mm), the
equivalent-sphere diameter and the volume in mm³, with a minimum-volume filter.

Geometry conventions (shared with ``models.ct_phantoms`` and ``dicom_io.volume``):

* arrays are indexed ``(z, y, x)`` = (slice ``k``, row ``j``, column ``i``);
* ``spacing`` is ``(z, y, x)`` in mm (slice spacing, row spacing, column spacing);
* ``origin`` is the patient position ``(x, y, z)`` in mm of the centre of voxel ``(0, 0, 0)``;
* ``direction`` is 3 x 3 whose columns are the unit vectors (patient LPS) of increasing
  ``i``, ``j`` and ``k``: ``[row direction, column direction, slice normal]``, so
  ``patient = origin + direction @ (i * sx, j * sy, k * sz)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from models.manifest import ModelManifest, SegmentationSpec
from models.repository import LoadedModel
from radbridge.errors import ModelError

__all__ = [
    "DetectedNodule",
    "connected_components",
    "detect_nodules",
    "find_nodules",
    "match_nodules",
    "onnx_predictor",
    "patient_to_voxel",
    "segmentation_validation_inference",
    "sliding_window_probabilities",
    "voxel_to_patient",
]

# The 13 "forward" neighbours of 26-connectivity (the other 13 are their negatives).
_FORWARD_26 = [
    (dz, dy, dx)
    for dz in (-1, 0, 1)
    for dy in (-1, 0, 1)
    for dx in (-1, 0, 1)
    if (dz, dy, dx) > (0, 0, 0)
]


@dataclass(frozen=True)
class DetectedNodule:
    """One connected component of the thresholded nodule probability map."""

    centre_mm: tuple[float, float, float]
    """Centre of mass (x, y, z), patient LPS coordinates in mm."""
    centre_voxel: tuple[float, float, float]
    """Centre of mass as (z, y, x) fractional voxel indices of the map."""
    diameter_mm: float
    """Diameter of the sphere with the component's volume."""
    volume_mm3: float
    """Voxel count times voxel volume."""
    voxels: int
    """Voxel count."""
    max_probability: float
    """Highest probability inside the component."""
    mean_probability: float
    """Mean probability inside the component."""

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready dict (rounded to 0.01 mm / 0.1 mm³ / 1e-4)."""
        return {
            "centre_mm": [round(v, 2) for v in self.centre_mm],
            "centre_voxel": [round(v, 2) for v in self.centre_voxel],
            "diameter_mm": round(self.diameter_mm, 2),
            "volume_mm3": round(self.volume_mm3, 1),
            "voxels": self.voxels,
            "max_probability": round(self.max_probability, 4),
            "mean_probability": round(self.mean_probability, 4),
        }


def _direction(direction: np.ndarray | None) -> np.ndarray:
    d = np.eye(3) if direction is None else np.asarray(direction, dtype=np.float64)
    if d.shape != (3, 3):
        raise ModelError(f"geometry: direction must be 3 x 3, got shape {d.shape}")
    return d


def voxel_to_patient(
    index_zyx: np.ndarray | tuple[float, float, float],
    spacing: tuple[float, float, float],
    origin: tuple[float, float, float],
    direction: np.ndarray | None = None,
) -> np.ndarray:
    """Fractional ``(z, y, x)`` voxel indices (shape (3,) or (N, 3)) -> patient ``(x, y, z)`` mm."""
    idx = np.asarray(index_zyx, dtype=np.float64)
    ijk = idx[..., ::-1] * np.asarray(spacing, dtype=np.float64)[::-1]  # (i*sx, j*sy, k*sz)
    return np.asarray(origin, dtype=np.float64) + ijk @ _direction(direction).T


def patient_to_voxel(
    point_xyz: np.ndarray | tuple[float, float, float],
    spacing: tuple[float, float, float],
    origin: tuple[float, float, float],
    direction: np.ndarray | None = None,
) -> np.ndarray:
    """Patient ``(x, y, z)`` mm (shape (3,) or (N, 3)) -> fractional ``(z, y, x)`` indices."""
    p = np.asarray(point_xyz, dtype=np.float64) - np.asarray(origin, dtype=np.float64)
    ijk = p @ np.linalg.inv(_direction(direction)).T / np.asarray(spacing, dtype=np.float64)[::-1]
    return np.asarray(ijk[..., ::-1])


def _find(parent: np.ndarray) -> np.ndarray:
    """Pointer-jump until every element points at its root."""
    while True:
        grand = parent[parent]
        if np.array_equal(grand, parent):
            return parent
        parent = grand


def connected_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Label the 26-connected components of a 3-D boolean mask.

    Returns:
        ``(labels, n)``: int32 labels of ``mask``'s shape (0 = background, components
        1..n numbered in raster order of their first voxel) and the component count.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 3:
        raise ModelError(f"connected components: expected a 3-D mask, got shape {mask.shape}")
    labels = np.zeros(mask.shape, dtype=np.int32)
    flat = np.flatnonzero(mask)
    if flat.size == 0:
        return labels, 0
    # index of each foreground voxel in `flat` (raster order), -1 elsewhere; padded by one
    # voxel so neighbour look-ups never wrap around an edge
    padded = np.full(tuple(s + 2 for s in mask.shape), -1, dtype=np.int64)
    padded[1:-1, 1:-1, 1:-1][mask] = np.arange(flat.size)
    zz, yy, xx = (c + 1 for c in np.nonzero(mask))
    src_list, dst_list = [], []
    for dz, dy, dx in _FORWARD_26:
        nb = padded[zz + dz, yy + dy, xx + dx]
        hit = nb >= 0
        src_list.append(np.flatnonzero(hit))
        dst_list.append(nb[hit])
    src, dst = np.concatenate(src_list), np.concatenate(dst_list)
    parent = np.arange(flat.size)
    while src.size:  # hook the larger root under the smaller, then compress, until stable
        ra, rb = parent[src], parent[dst]
        differ = ra != rb
        if not differ.any():
            break
        ra, rb = ra[differ], rb[differ]
        lo, hi = np.minimum(ra, rb), np.maximum(ra, rb)
        np.minimum.at(parent, hi, lo)
        parent = _find(parent)
        src, dst = src[differ], dst[differ]
    roots, comp = np.unique(parent, return_inverse=True)  # roots ascend = first-voxel order
    labels.reshape(-1)[flat] = comp.astype(np.int32) + 1
    return labels, int(roots.size)


def find_nodules(
    probability: np.ndarray,
    *,
    spacing: tuple[float, float, float],
    origin: tuple[float, float, float],
    direction: np.ndarray | None = None,
    threshold: float = 0.5,
    min_volume_mm3: float = 0.0,
) -> list[DetectedNodule]:
    """Threshold a nodule probability map and describe each connected component.

    Args:
        probability: (z, y, x) nodule probability (or a binary mask) on the grid described by
            ``spacing``/``origin``/``direction`` (for a resampled map: the resampled grid).
        spacing: (z, y, x) voxel spacing in mm.
        origin: Patient (x, y, z) mm of voxel (0, 0, 0).
        direction: 3 x 3 direction cosines (columns for i, j, k); identity when None.
        threshold: Voxels with probability >= threshold are foreground.
        min_volume_mm3: Components smaller than this are dropped.

    Returns:
        Nodules sorted by decreasing volume.
    """
    prob = np.asarray(probability, dtype=np.float32)
    if prob.ndim != 3:
        raise ModelError(f"find_nodules: expected a (z, y, x) map, got shape {prob.shape}")
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ModelError(f"find_nodules: spacing must be 3 positive values, got {spacing}")
    labels, n = connected_components(prob >= threshold)
    if n == 0:
        return []
    voxel_mm3 = float(np.prod(np.asarray(spacing, dtype=np.float64)))
    flat_labels = labels.reshape(-1)
    fg = np.flatnonzero(flat_labels)
    lab = flat_labels[fg] - 1
    zyx = np.stack(np.unravel_index(fg, labels.shape), axis=1).astype(np.float64)
    p = prob.reshape(-1)[fg].astype(np.float64)
    counts = np.bincount(lab, minlength=n).astype(np.float64)
    centres = np.stack([np.bincount(lab, zyx[:, a], n) for a in range(3)], axis=1) / counts[:, None]
    p_sum = np.bincount(lab, p, n)
    p_max = np.full(n, -np.inf)
    np.maximum.at(p_max, lab, p)
    centres_mm = voxel_to_patient(centres, spacing, origin, direction)
    out = []
    for c in range(n):
        volume = counts[c] * voxel_mm3
        if volume < min_volume_mm3:
            continue
        out.append(
            DetectedNodule(
                centre_mm=(
                    float(centres_mm[c, 0]),
                    float(centres_mm[c, 1]),
                    float(centres_mm[c, 2]),
                ),
                centre_voxel=(float(centres[c, 0]), float(centres[c, 1]), float(centres[c, 2])),
                diameter_mm=float((6.0 * volume / np.pi) ** (1.0 / 3.0)),
                volume_mm3=float(volume),
                voxels=int(counts[c]),
                max_probability=float(p_max[c]),
                mean_probability=float(p_sum[c] / counts[c]),
            )
        )
    return sorted(out, key=lambda d: -d.volume_mm3)


def match_nodules(
    truth_centres_mm: list[tuple[float, float, float]],
    truth_diameters_mm: list[float],
    detected: list[DetectedNodule],
    *,
    min_radius_mm: float = 0.0,
) -> tuple[list[bool], int]:
    """Match detections to truth nodules.

    A truth nodule is detected when some detection's centre lies within its radius (or within
    ``min_radius_mm`` when that is larger). Each detection counts for at most one truth nodule
    (the nearest whose radius it lies in); detections inside none are false positives.

    Returns:
        ``(detected_flags, false_positives)``: one flag per truth nodule, and the FP count.
    """
    if len(truth_centres_mm) != len(truth_diameters_mm):
        raise ModelError("match_nodules: need one diameter per truth centre")
    hit = [False] * len(truth_centres_mm)
    fp = 0
    truth = np.asarray(truth_centres_mm, dtype=np.float64).reshape(-1, 3)
    radii = np.maximum(np.asarray(truth_diameters_mm, dtype=np.float64) / 2.0, min_radius_mm)
    for det in detected:
        if truth.size == 0:
            fp += 1
            continue
        dist = np.linalg.norm(truth - np.asarray(det.centre_mm), axis=1)
        inside = np.flatnonzero(dist <= radii)
        if inside.size == 0:
            fp += 1
            continue
        hit[int(inside[np.argmin(dist[inside])])] = True
    return hit, fp


def onnx_predictor(session: Any, input_name: str) -> Callable[[np.ndarray], np.ndarray]:
    """Wrap an ``onnxruntime.InferenceSession`` as ``(N, C, z, y, x) -> logits`` (numpy)."""

    def predict(x: np.ndarray) -> np.ndarray:
        return np.asarray(session.run(None, {input_name: np.ascontiguousarray(x)})[0])

    return predict


def sliding_window_probabilities(
    predict: Callable[[np.ndarray], np.ndarray],
    image: np.ndarray,
    seg: SegmentationSpec,
) -> np.ndarray:
    """Per-class probabilities of a preprocessed volume by MONAI sliding-window inference.

    Args:
        predict: ``(N, C, *roi_size) float32 -> (N, classes, *roi_size)`` logits, e.g.
            ``onnx_predictor(session, manifest.input.name)``.
        image: The preprocessed volume (C, z, y, x) (``models.transforms.prepare_volume``);
            a volume smaller than the window is padded (``seg.padding_mode``).
        seg: The manifest's ``segmentation`` (roi_size, overlap, sw_batch_size, blend_mode,
            padding_mode, activation). Windows are activated (softmax/sigmoid) before blending.

    Returns:
        (classes, z, y, x) float32 probabilities; with softmax, channel 0 is background.
    """
    import torch
    from monai.inferers import sliding_window_inference

    arr = np.asarray(image, dtype=np.float32)
    if arr.ndim != 4:
        raise ModelError(f"sliding window: expected a (C, z, y, x) volume, got {arr.shape}")

    def window(x: torch.Tensor) -> torch.Tensor:
        logits = torch.from_numpy(np.asarray(predict(x.numpy()), dtype=np.float32))
        if seg.activation == "softmax":
            return torch.softmax(logits, dim=1)
        return torch.sigmoid(logits)

    with torch.no_grad():
        out = sliding_window_inference(
            torch.from_numpy(arr)[None],
            roi_size=list(seg.roi_size),
            sw_batch_size=seg.sw_batch_size,
            predictor=window,
            overlap=seg.overlap,
            mode=seg.blend_mode,
            padding_mode=seg.padding_mode,
        )
    return np.asarray(out[0], dtype=np.float32)  # type: ignore[index]


def detect_nodules(
    predict: Callable[[np.ndarray], np.ndarray] | None,
    manifest: ModelManifest,
    hu: np.ndarray,
    spacing: tuple[float, float, float],
    origin: tuple[float, float, float],
    direction: np.ndarray | None = None,
    *,
    label: int = 0,
    probabilities: Callable[[np.ndarray], np.ndarray] | None = None,
) -> tuple[list[DetectedNodule], np.ndarray, tuple[float, float, float]]:
    """The whole segmenter path: HU volume -> resample + preprocess -> sliding window -> nodules.

    Args:
        predict: The model (``onnx_predictor(session, manifest.input.name)``), unless
            ``probabilities`` is given.
        manifest: A ``segmentation`` manifest.
        hu: (z, y, x) Hounsfield units (``dicom_io.volume.read_series``).
        spacing, origin, direction: Its geometry (same source).
        label: Which of ``manifest.labels`` to report.
        probabilities: Runs the whole sliding window elsewhere instead of through ``predict``
            (the center's ModelRunner, next to its session): preprocessed (C, z, y, x) volume
            -> (classes, z, y, x) probabilities, as :func:`sliding_window_probabilities`.

    Returns:
        ``(nodules, probability, model_spacing)``: the nodules (threshold and minimum volume
        from the manifest), the label's probability map on the model grid (same origin and
        direction, spacing ``model_spacing``).
    """
    from models.transforms import prepare_volume

    seg = manifest.segmentation
    if manifest.task != "segmentation" or seg is None:
        raise ModelError(f"{manifest.name}:{manifest.version}: not a segmentation model")
    image, model_spacing = prepare_volume(hu, spacing, seg.spacing_mm, manifest.preprocessing)
    if probabilities is not None:
        probs = probabilities(image)
    elif predict is not None:
        probs = sliding_window_probabilities(predict, image, seg)
    else:
        raise ModelError("detect_nodules: give predict or probabilities")
    channel = probs[label + seg.channels_per_label_offset]
    nodules = find_nodules(
        channel,
        spacing=model_spacing,
        origin=origin,
        direction=direction,
        threshold=manifest.labels[label].threshold,
        min_volume_mm3=seg.min_volume_mm3,
    )
    return nodules, channel, model_spacing


def segmentation_validation_inference(model: LoadedModel, batch: int = 2) -> np.ndarray:
    """The segmenter counterpart of ``models.importer.validation_inference``.

    Runs (1) a batch of ``batch`` windows of ``roi_size`` straight through the ONNX model and
    (2) a synthetic chest-like HU volume (lung with a 12 mm soft-tissue sphere) through
    ``detect_nodules``, both on the CPU.

    Returns:
        The probability map of the first label from (2).

    Raises:
        ModelError: Wrong output shapes, non-finite values, or a failing transform.
    """
    import onnxruntime as ort

    m = model.manifest
    seg = m.segmentation
    if m.task != "segmentation" or seg is None:
        raise ModelError(f"{model.key}: not a segmentation model")
    session = ort.InferenceSession(str(model.onnx_path), providers=["CPUExecutionProvider"])
    predict = onnx_predictor(session, m.input.name)
    channels = len(m.labels) + seg.channels_per_label_offset
    in_channels = int(m.input.shape[1])
    x = np.zeros((batch, in_channels, *seg.roi_size), dtype=m.input.dtype)
    try:
        out = predict(x)
    except Exception as exc:  # ONNX Runtime raises its own types
        raise ModelError(f"{model.key}: validation inference failed: {exc}") from None
    if out.shape != (batch, channels, *seg.roi_size):
        raise ModelError(
            f"{model.key}: output shape {list(out.shape)} for input {list(x.shape)}, "
            f"expected {[batch, channels, *seg.roi_size]}"
        )
    spacing = (2.0, 1.5, 1.5)
    shape = (48, 64, 72)
    hu = np.full(shape, -850.0, dtype=np.float32)
    axes = (np.arange(n) * s for n, s in zip(shape, spacing, strict=True))
    zz, yy, xx = np.meshgrid(*axes, indexing="ij")
    hu[(zz - 48.0) ** 2 + (yy - 48.0) ** 2 + (xx - 54.0) ** 2 <= 36.0] = 40.0
    try:
        _, probs, _ = detect_nodules(predict, m, hu, spacing, (0.0, 0.0, 0.0))
    except ModelError:
        raise
    except Exception as exc:  # a transform or the sliding window rejected the model
        raise ModelError(f"{model.key}: validation inference failed: {exc}") from None
    if not np.isfinite(probs).all() or probs.min() < 0.0 or probs.max() > 1.0:
        raise ModelError(f"{model.key}: validation inference produced invalid probabilities")
    return probs
