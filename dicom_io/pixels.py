"""Pixel decoding to arrays: stored values -> modality LUT -> float32, MONOCHROME2 polarity."""

from __future__ import annotations

from io import BytesIO

import numpy as np
import pydicom
from pydicom.pixels import apply_modality_lut

from radbridge.errors import DatasetError

__all__ = ["decode_frame"]


def decode_frame(encoded: bytes, frame: int = 0) -> tuple[np.ndarray, str]:
    """Return one frame as float32 (H, W) after the modality LUT, and the modality.

    MONOCHROME1 images are inverted so that bright always means dense, as models expect.
    """
    try:
        ds = pydicom.dcmread(BytesIO(encoded))
        arr = ds.pixel_array
    except Exception as exc:
        raise DatasetError("undecodable_pixels", f"pixel data cannot be decoded: {exc}") from None
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        arr = arr[frame]
    if arr.ndim != 2:
        raise DatasetError("unsupported_pixels", f"expected a grayscale frame, got {arr.shape}")
    out = np.asarray(apply_modality_lut(arr, ds), dtype=np.float32)
    if str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1":
        out = out.max() + out.min() - out
    return out, str(ds.get("Modality", "") or "")
