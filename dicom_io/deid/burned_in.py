"""Burned-in annotation: an instance whose pixels may show identity never leaves silently.

An instance is at risk when it says so (Burned In Annotation YES) or when it is of a kind known
to burn text into its pixels: ultrasound (modality US, the US Image and US Multi-frame Image
storage classes, retired ones too) and secondary capture (modality SC, every Secondary Capture
storage class: screen saves, scanned documents, the dose screens CT scanners write). The edge
cannot read text in pixels, so an at-risk instance is quarantined (:class:`BurnedInAnnotationError`:
kept at the edge, unsent) unless the agreement asks to mask and masking is safe:

- ultrasound with a Sequence of Ultrasound Regions: every pixel outside the union of the
  regions is set to black;
- ultrasound without regions: the agreement's top band of rows is set to black, if it has one;
- only native little-endian 8/16-bit unsigned pixel data in MONOCHROME1/2, RGB, YBR_FULL or
  PALETTE COLOR (with a black palette entry) is rewritten. Anything else (compressed pixel data,
  YBR 4:2:2, secondary capture, a non-ultrasound image flagged YES) is quarantined.

After masking, Burned In Annotation is set to NO and Clean Pixel Data (113101) is declared.
Text drawn inside an ultrasound data region (a sonographer's label) stays: the regions are the
image itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels import apply_color_lut
from pydicom.uid import UID

from dicom_io.deid.raw import text_of
from radbridge.errors import DeidentificationError

__all__ = [
    "FLAGGED",
    "SECONDARY_CAPTURE",
    "ULTRASOUND",
    "BurnedInAnnotationError",
    "Mask",
    "black_value",
    "burned_in_risk",
    "plan_mask",
    "quarantine",
]

FLAGGED = "burned_in_flagged"
ULTRASOUND = "burned_in_ultrasound"
SECONDARY_CAPTURE = "burned_in_secondary_capture"
_ULTRASOUND_CLASSES = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.6.1",  # US Image Storage
        "1.2.840.10008.5.1.4.1.1.3.1",  # US Multi-frame Image Storage
        "1.2.840.10008.5.1.4.1.1.6",  # US Image Storage (retired)
        "1.2.840.10008.5.1.4.1.1.3",  # US Multi-frame Image Storage (retired)
    }
)
_SECONDARY_CAPTURE_CLASSES = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture Image Storage
        "1.2.840.10008.5.1.4.1.1.7.1",  # Multi-frame Single Bit SC
        "1.2.840.10008.5.1.4.1.1.7.2",  # Multi-frame Grayscale Byte SC
        "1.2.840.10008.5.1.4.1.1.7.3",  # Multi-frame Grayscale Word SC
        "1.2.840.10008.5.1.4.1.1.7.4",  # Multi-frame True Color SC
    }
)
_WHAT = {
    FLAGGED: "BurnedInAnnotation is YES",
    ULTRASOUND: "ultrasound burns text into its pixels",
    SECONDARY_CAPTURE: "secondary capture (screen, document or dose report image)",
    "burned_in_text": "text was read in the pixels",
}


class BurnedInAnnotationError(DeidentificationError):
    """The instance may show identity in its pixels and was not masked: keep it at the edge.

    ``reason`` is a stable code (``burned_in_flagged``, ``burned_in_ultrasound``,
    ``burned_in_secondary_capture``) for logs and metric labels; the message holds no identity.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


_PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)  # Pixel Data, Float and Double Float


def burned_in_risk(ds: Dataset) -> str | None:
    """Why ``ds``'s pixels may show identity (a reason code), or ``None`` when they should not."""
    if all(ds.get_item(tag) is None for tag in _PIXEL_TAGS):
        return None
    sop_class = text_of(ds, 0x00080016)
    modality = text_of(ds, 0x00080060).strip().upper()
    if modality == "US" or sop_class in _ULTRASOUND_CLASSES:
        return ULTRASOUND
    if modality == "SC" or sop_class in _SECONDARY_CAPTURE_CLASSES:
        return SECONDARY_CAPTURE
    if text_of(ds, 0x00280301).strip().upper() == "YES":  # Burned In Annotation
        return FLAGGED
    return None


def quarantine(reason: str, why: str) -> BurnedInAnnotationError:
    """The error that keeps an at-risk instance at the edge."""
    return BurnedInAnnotationError(
        reason, f"{_WHAT.get(reason, reason)}: pixel data may show identity; {why}"
    )


@dataclass(frozen=True)
class Mask:
    """What to black out: everything outside ``keep`` rectangles, or the top ``band`` rows,
    or (``hide``) just these rectangles (text found by dicom_io/deid/ocr.py)."""

    keep: tuple[tuple[int, int, int, int], ...]  # (x0, y0, x1, y1), inclusive
    band: int
    black: tuple[int, ...]  # one value per sample
    dtype: str
    frames: int
    rows: int
    columns: int
    samples: int
    planar: int
    hide: tuple[tuple[int, int, int, int], ...] = ()  # (x0, y0, x1, y1), inclusive

    def apply(self, out: Dataset) -> None:
        """Rewrite ``out.PixelData`` with the masked pixels and set BurnedInAnnotation NO."""
        raw = bytes(out.PixelData)
        count = self.frames * self.rows * self.columns * self.samples
        size = count * np.dtype(self.dtype).itemsize
        pixels = np.frombuffer(raw[:size], dtype=self.dtype).copy()
        if self.samples > 1 and self.planar == 1:
            arr = pixels.reshape(self.frames, self.samples, self.rows, self.columns)
            view = arr.transpose(0, 2, 3, 1)  # frames, rows, columns, samples (a view)
        else:
            view = pixels.reshape(self.frames, self.rows, self.columns, self.samples)
        hide = np.ones((self.rows, self.columns), dtype=bool)
        if self.hide:
            hide[:] = False
            for x0, y0, x1, y1 in self.hide:
                hide[y0 : y1 + 1, x0 : x1 + 1] = True
        elif self.keep:
            for x0, y0, x1, y1 in self.keep:
                hide[y0 : y1 + 1, x0 : x1 + 1] = False
        else:
            hide[:] = False
            hide[: self.band, :] = True
        view[:, hide, :] = np.array(self.black, dtype=self.dtype)
        out.PixelData = pixels.tobytes() + raw[size:]
        out.BurnedInAnnotation = "NO"


def plan_mask(ds: Dataset, reason: str, top_band_rows: int) -> Mask:
    """How to mask ``ds`` safely, or raise :class:`BurnedInAnnotationError` (quarantine)."""
    if reason != ULTRASOUND:
        raise quarantine(reason, "only ultrasound can be masked; quarantined at the edge")
    ts = UID(str(ds.file_meta.get("TransferSyntaxUID", "") or ""))
    if not ts or ts.is_compressed or not ts.is_little_endian or "PixelData" not in ds:
        raise quarantine(reason, "pixel data is not native little endian; quarantined")
    bits = int(ds.get("BitsAllocated", 0) or 0)
    if bits not in (8, 16) or int(ds.get("PixelRepresentation", 0) or 0) != 0:
        raise quarantine(reason, "only unsigned 8 or 16 bit pixels can be masked; quarantined")
    rows, columns = int(ds.Rows), int(ds.Columns)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    dtype = "u1" if bits == 8 else "<u2"
    if len(ds.PixelData) < frames * rows * columns * samples * bits // 8:
        raise quarantine(reason, "pixel data is shorter than its description; quarantined")
    black = black_value(ds, bits, samples, reason)
    keep = _regions(ds, rows, columns)
    band = min(top_band_rows, rows)
    if not keep and band <= 0:
        raise quarantine(reason, "no ultrasound regions and no top band configured; quarantined")
    planar = int(ds.get("PlanarConfiguration", 0) or 0)
    return Mask(keep, band, black, dtype, frames, rows, columns, samples, planar)


def black_value(ds: Dataset, bits: int, samples: int, reason: str) -> tuple[int, ...]:
    """The stored value(s) that display as black, or quarantine (``reason``) if unknown."""
    photometric = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
    if samples == 1 and photometric == "MONOCHROME2":
        return (0,)
    if samples == 1 and photometric == "MONOCHROME1":
        return ((1 << int(ds.get("BitsStored", bits) or bits)) - 1,)
    if samples == 3 and photometric == "RGB":
        return (0, 0, 0)
    if samples == 3 and photometric == "YBR_FULL" and bits == 8:
        return (0, 128, 128)
    if samples == 1 and photometric == "PALETTE COLOR":
        index = _black_palette_index(ds, bits)
        if index is not None:
            return (index,)
        raise quarantine(reason, "the palette has no black entry; quarantined")
    raise quarantine(reason, f"photometric interpretation {photometric!r} not masked here")


def _black_palette_index(ds: Dataset, bits: int) -> int | None:
    try:
        entries, first, _ = (int(v) for v in ds.RedPaletteColorLookupTableDescriptor)
        entries = entries or 65536
        indices = np.arange(first, min(first + entries, 1 << bits), dtype=np.uint16)
        rgb = apply_color_lut(indices, ds)
    except (AttributeError, ValueError, TypeError, KeyError):
        return None
    black = np.flatnonzero((np.asarray(rgb) == 0).all(axis=-1))
    return int(indices[black[0]]) if black.size else None


def _regions(ds: Dataset, rows: int, columns: int) -> tuple[tuple[int, int, int, int], ...]:
    out = []
    for region in ds.get("SequenceOfUltrasoundRegions", None) or []:
        try:
            x0, y0 = int(region.RegionLocationMinX0), int(region.RegionLocationMinY0)
            x1, y1 = int(region.RegionLocationMaxX1), int(region.RegionLocationMaxY1)
        except (AttributeError, TypeError, ValueError):
            continue
        x0, y0 = max(x0, 0), max(y0, 0)
        x1, y1 = min(x1, columns - 1), min(y1, rows - 1)
        if x0 <= x1 and y0 <= y1:
            out.append((x0, y0, x1, y1))
    return tuple(out)
