"""Volumetric segmentation of one CT series at the center, in the Preprocessor deployment
(``Preprocessor.segment_series``; blocking: runs in a worker thread there).

The series is assembled by its geometry (``dicom_io.volume.read_series``: slices sorted along
the normal, modality LUT applied), resampled and preprocessed with the manifest's pipeline,
and segmented by MONAI sliding-window inference — in the center, inside the ModelRunner
deployment beside its session, so the volume crosses Ray once and no window does. Nodules are
reported in patient coordinates; the label's probability map is brought back onto the source
slices for the DICOM SEG.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from io import BytesIO

import numpy as np
import pydicom

from dicom_io.volume import read_series, sorted_along
from models.manifest import ModelManifest
from models.nodules import DetectedNodule, detect_nodules

__all__ = ["SeriesSegmentation", "segment_series"]


@dataclass(frozen=True)
class SeriesSegmentation:
    nodules: list[DetectedNodule]
    mask: np.ndarray  # (frames, rows, cols) bool, frames in the order of ``sources``
    sources: list[pydicom.Dataset]  # headers, sorted by position along the slice normal
    max_probability: float
    seconds: dict[str, float] = field(default_factory=dict)  # decode, sliding_window, map


def segment_series(
    encoded: Sequence[bytes],
    manifest: ModelManifest,
    probabilities: Callable[[np.ndarray], np.ndarray],
) -> SeriesSegmentation:
    """``probabilities``: the preprocessed (C, z, y, x) volume -> its (classes, z, y, x)
    probabilities by sliding window (the ModelRunner's ``segment``, or
    :func:`models.nodules.sliding_window_probabilities` on a local session)."""
    t0 = time.perf_counter()
    hu, spacing, origin, direction = read_series(list(encoded))
    t1 = time.perf_counter()
    nodules, prob, _ = detect_nodules(
        None, manifest, hu, spacing, origin, direction, probabilities=probabilities
    )
    t2 = time.perf_counter()
    threshold = manifest.labels[0].threshold
    on_source = _resize(prob, hu.shape)
    headers = [pydicom.dcmread(BytesIO(b), stop_before_pixels=True) for b in encoded]
    sources = sorted_along(headers, np.asarray(direction, dtype=np.float64).reshape(3, 3)[:, 2])
    t3 = time.perf_counter()
    return SeriesSegmentation(
        nodules=nodules,
        mask=on_source >= threshold,
        sources=sources,
        max_probability=float(prob.max()) if prob.size else 0.0,
        seconds={"decode": t1 - t0, "sliding_window": t2 - t1, "map": t3 - t2},
    )


def _resize(volume: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Trilinear resize of a (z, y, x) map onto another grid covering the same extent."""
    if tuple(volume.shape) == tuple(shape):
        return volume
    import torch

    t = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))[None, None]
    out = torch.nn.functional.interpolate(t, size=tuple(shape), mode="trilinear")
    return np.asarray(out[0, 0].numpy())
