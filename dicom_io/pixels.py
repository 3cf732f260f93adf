"""Pixel decoding to arrays: stored values -> modality LUT -> float32, MONOCHROME2 polarity.

Any transfer syntax the edge accepts is decoded here, on demand, by pydicom 3 and the installed
plugins: native (implicit/explicit VR little endian, explicit VR big endian, deflated), RLE
Lossless, JPEG Baseline/Extended/Lossless (Process 14 and SV1), JPEG-LS Lossless and
Near-lossless, JPEG 2000 (lossless and lossy). ``tests/test_pixels.py`` covers each of them.

Only grayscale images are decoded: the models take one channel of modality values (HU, ...).
Colour images (RGB, YBR_*, PALETTE COLOR and other photometric interpretations) are refused
with ``DatasetError("unsupported_pixels")`` before any decoding, rather than being turned into
luminance: a modality LUT does not apply to them, a palette index is no intensity at all, and a
luminance image of e.g. a Doppler overlay is not what a grayscale model was trained on, so a
result computed on it would look valid while being meaningless.
"""

from __future__ import annotations

from io import BytesIO

import numpy as np
import pydicom
from pydicom.pixels import apply_modality_lut

from radbridge.errors import DatasetError

__all__ = ["GRAYSCALE", "decode_frame"]

GRAYSCALE = frozenset({"MONOCHROME1", "MONOCHROME2"})


def decode_frame(encoded: bytes, frame: int = 0) -> tuple[np.ndarray, str]:
    """Return one frame as float32 (H, W) after the modality LUT, and the modality.

    MONOCHROME1 images are inverted so that bright always means dense, as models expect.
    Only the requested frame of a multi-frame image is decoded.

    Raises ``DatasetError`` with reason ``undecodable_pixels`` (not a dataset, no pixel data,
    corrupt pixel data, no plugin for the transfer syntax), ``unsupported_pixels`` (not a grayscale
    image) or ``no_such_frame`` (``frame`` outside ``0 .. NumberOfFrames - 1``).
    """
    try:
        ds = pydicom.dcmread(BytesIO(encoded))
        photometric = str(ds.get("PhotometricInterpretation", "") or "").strip()
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except Exception as exc:
        raise DatasetError("undecodable_pixels", f"pixel data cannot be decoded: {exc}") from None
    if not any(kw in ds for kw in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise DatasetError("undecodable_pixels", "the dataset has no pixel data")
    if photometric not in GRAYSCALE or samples != 1:
        raise DatasetError(
            "unsupported_pixels",
            f"expected a grayscale image, got {photometric or 'no'} photometric interpretation "
            f"with {samples} sample(s) per pixel",
        )
    if not 0 <= frame < frames:
        raise DatasetError("no_such_frame", f"frame {frame} requested of {frames}")
    try:
        ds.pixel_array_options(index=frame)
        arr = ds.pixel_array
    except Exception as exc:
        raise DatasetError("undecodable_pixels", f"pixel data cannot be decoded: {exc}") from None
    if arr.ndim != 2:
        raise DatasetError("unsupported_pixels", f"expected a grayscale frame, got {arr.shape}")
    out = np.asarray(apply_modality_lut(arr, ds), dtype=np.float32)
    if photometric == "MONOCHROME1":
        out = out.max() + out.min() - out
    return out, str(ds.get("Modality", "") or "")
