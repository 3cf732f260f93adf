"""Text burned into the pixels of projection images that do not say so.

A CR/DX/MG/XA/RF/OT image whose Burned In Annotation is absent may still carry the patient's
name, ID or birth date in its pixels (a modality's annotation overlay flattened into the image).
:func:`scan_text` finds such text with Tesseract (Debian's ``tesseract-ocr``, run as a process
on the image: nothing leaves the edge) and says what to do:

- burned-in annotations are drawn at the top of the display range, so the image is windowed to
  its display (MONOCHROME1 inverted), thresholded just below its maximum and read as black text
  on white (Tesseract's "sparse text" mode); small images are read at twice their size;
- a word that spells an identifier of the instance (a name part, the Patient ID, the birth date
  in its usual spellings, the accession number, other IDs), and any confident word (three or
  more letters or digits) in the image or in its border zones, is masked: its box (padded) is
  set to black in every frame;
- after masking the image is read again; if an identifier can still be read, or the pixel data
  cannot be masked (compressed, signed, an odd photometric interpretation), the instance is
  quarantined at the edge (:class:`~dicom_io.deid.burned_in.BurnedInAnnotationError`).

It runs in the outbox's de-identification step (``radbridge_edge_deidentify_seconds`` includes
it), never on the acknowledgement path.
"""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.uid import UID

from dicom_io.deid.burned_in import Mask, black_value, quarantine
from dicom_io.deid.raw import text_of
from radbridge.errors import ConfigError

__all__ = ["SCANNED_MODALITIES", "TEXT_IN_PIXELS", "Word", "needs_scan", "scan_text", "tesseract"]

TEXT_IN_PIXELS = "burned_in_text"
SCANNED_MODALITIES = frozenset({"CR", "DX", "MG", "XA", "RF", "OT", "PX", "IO"})
_CONFIDENT = 80.0  # a word this sure, of three or more letters or digits, is text
_BORDER = 0.12  # the outer 12 % of each side: where annotation overlays sit
_BORDER_CONFIDENT = 60.0
_PAD = 4  # pixels around a masked word


@dataclass(frozen=True)
class Word:
    text: str
    confidence: float
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 in image pixels, inclusive


def tesseract() -> str:
    """The tesseract binary, or :class:`ConfigError` naming the setting that needs it."""
    found = shutil.which("tesseract")
    if found is None:
        raise ConfigError(
            "deidentification.text_in_pixels needs Tesseract (Debian: apt-get install "
            "tesseract-ocr); set it to 'off' only where the hospital's images never carry text"
        )
    return found


@functools.cache
def languages() -> str:
    """Latin, and Simplified Chinese where its model is installed (Debian's
    tesseract-ocr-chi-sim, which ./run installs): a name burned in as 汉字 is read too."""
    run = subprocess.run([tesseract(), "--list-langs"], capture_output=True, text=True, timeout=30)
    return "eng+chi_sim" if "chi_sim" in run.stdout.split() else "eng"


def needs_scan(ds: Dataset) -> bool:
    """A projection image that does not say whether text is burned into it."""
    if "PixelData" not in ds:
        return False
    modality = text_of(ds, 0x00080060).strip().upper()
    flag = text_of(ds, 0x00280301).strip().upper()
    return modality in SCANNED_MODALITIES and flag == ""


def scan_text(ds: Dataset, mode: str) -> Mask | None:
    """The mask that hides the text in ``ds``'s pixels (None: no text found), or raise the
    quarantine error (``mode`` "quarantine", or text that cannot be masked safely)."""
    tokens = _identifier_tokens(ds)
    image = _display(ds)
    words = [w for w in read_words(image) if _is_text(w, tokens, image.shape)]
    if not words:
        return None
    if mode == "quarantine":
        raise quarantine(TEXT_IN_PIXELS, f"{len(words)} word(s) of text found in the pixels")
    mask = _plan(ds, tuple(_padded(w.box, image.shape) for w in words))
    hidden = image.copy()
    for x0, y0, x1, y1 in mask.hide:
        hidden[y0 : y1 + 1, x0 : x1 + 1] = 0
    if any(_spells_identifier(w.text, tokens) for w in read_words(hidden)):
        raise quarantine(TEXT_IN_PIXELS, "an identifier is still readable after masking")
    return mask


def read_words(image: np.ndarray) -> list[Word]:
    """Words Tesseract reads in an 8-bit display image (text drawn at its brightest)."""
    scale = 2 if max(image.shape) < 1024 else 1
    top = int(image.max())
    if top < 32:
        return []
    text = image >= max(top - 8, int(top * 0.97))
    binary = np.where(text, 0, 255).astype(np.uint8)
    if scale > 1:
        binary = np.kron(binary, np.ones((scale, scale), np.uint8))
    with tempfile.TemporaryDirectory(prefix="radbridge-ocr-") as tmp:
        png = Path(tmp) / "image.png"
        Image.fromarray(binary).save(png)
        run = subprocess.run(
            [tesseract(), str(png), "stdout", "--psm", "11", "-l", languages(), "tsv"],
            capture_output=True,
            text=True,
            timeout=120,
        )
    if run.returncode != 0:
        raise quarantine(TEXT_IN_PIXELS, "the text scan failed; quarantined")
    words = []
    for line in run.stdout.splitlines()[1:]:
        cols = line.split("\t")
        if len(cols) != 12 or not cols[11].strip():
            continue
        left, top_, width, height = (int(c) // scale for c in cols[6:10])
        box = (left, top_, left + max(width, 1) - 1, top_ + max(height, 1) - 1)
        words.append(Word(cols[11].strip(), float(cols[10]), box))
    return words


def _display(ds: Dataset) -> np.ndarray:
    """The first frame as the reader would see its brightest pixels, 8-bit."""
    try:
        pixels = ds.pixel_array
    except Exception:  # an undecodable image cannot be checked: keep it at the edge
        raise quarantine(TEXT_IN_PIXELS, "pixel data cannot be decoded to scan it") from None
    frame = pixels[0] if int(ds.get("NumberOfFrames", 1) or 1) > 1 else pixels
    if frame.ndim == 3:  # colour: the brightest channel
        frame = frame.max(axis=-1)
    a = frame.astype(np.float64)
    lo, hi = float(a.min()), float(a.max())
    scaled = (a - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(a)
    if text_of(ds, 0x00280004).strip().upper() == "MONOCHROME1":
        scaled = 255.0 - scaled
    return scaled.astype(np.uint8)


def _is_text(word: Word, tokens: frozenset[str], shape: tuple[int, ...]) -> bool:
    if _spells_identifier(word.text, tokens) and word.confidence >= 30:
        return True
    chars = len(_norm(word.text))
    if _CJK.search(_norm(word.text)):
        chars += 1  # two ideographs carry as much as three letters
    if chars >= 3 and word.confidence >= _CONFIDENT:
        return True
    return chars >= 2 and word.confidence >= _BORDER_CONFIDENT and _in_border(word.box, shape)


def _in_border(box: tuple[int, int, int, int], shape: tuple[int, ...]) -> bool:
    rows, columns = shape[0], shape[1]
    x0, y0, x1, y1 = box
    return (
        y1 < rows * _BORDER
        or y0 > rows * (1 - _BORDER)
        or x1 < columns * _BORDER
        or x0 > columns * (1 - _BORDER)
    )


_CJK = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")


def _norm(text: str) -> str:
    """Letters, digits and CJK ideographs, upper case: how an identifier is compared."""
    return re.sub(r"[^0-9A-Z\u3400-\u9fff\uf900-\ufaff]", "", text.upper())


def _identifier_tokens(ds: Dataset) -> frozenset[str]:
    """The instance's identifiers as OCR would spell them (letters and digits, upper case)."""
    raw: set[str] = set()
    name = text_of(ds, 0x00100010)
    for group in name.split("="):
        parts = [p for p in re.split(r"[\^\s]+", group) if p]
        raw.update(parts)
        raw.add("".join(parts))
    for tag in (0x00100020, 0x00080050, 0x00101000):  # Patient ID, Accession, Other IDs
        raw.update(v for v in text_of(ds, tag).split("\\") if v)
    birth = text_of(ds, 0x00100030).strip()
    if len(birth) == 8 and birth.isdigit():
        year, month, day = birth[:4], birth[4:6], birth[6:]
        raw.update({birth, day + month + year, month + day + year})  # separators are dropped
    return frozenset(t for t in (_norm(r) for r in raw) if len(t) >= 2)


def _spells_identifier(text: str, tokens: frozenset[str]) -> bool:
    word = _norm(text)
    if len(word) < 2:
        return False
    # Long Latin tokens and any CJK name of two or more ideographs may sit inside a word.
    return any(((len(t) >= 4 or _CJK.search(t)) and t in word) or t == word for t in tokens)


def _padded(box: tuple[int, int, int, int], shape: tuple[int, ...]) -> tuple[int, int, int, int]:
    x0, y0, x1, y1 = box
    return (
        max(x0 - _PAD, 0),
        max(y0 - _PAD, 0),
        min(x1 + _PAD, shape[1] - 1),
        min(y1 + _PAD, shape[0] - 1),
    )


def _plan(ds: Dataset, hide: tuple[tuple[int, int, int, int], ...]) -> Mask:
    """A mask blacking out ``hide`` in every frame, or quarantine when that is not safe."""
    ts = UID(str(ds.file_meta.get("TransferSyntaxUID", "") or ""))
    if not ts or ts.is_compressed or not ts.is_little_endian:
        raise quarantine(TEXT_IN_PIXELS, "text found in compressed pixel data; quarantined")
    bits = int(ds.get("BitsAllocated", 0) or 0)
    if bits not in (8, 16) or int(ds.get("PixelRepresentation", 0) or 0) != 0:
        raise quarantine(TEXT_IN_PIXELS, "text found in signed or odd-sized pixels; quarantined")
    rows, columns = int(ds.Rows), int(ds.Columns)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    black = black_value(ds, bits, samples, TEXT_IN_PIXELS)
    planar = int(ds.get("PlanarConfiguration", 0) or 0)
    dtype = "u1" if bits == 8 else "<u2"
    return Mask((), 0, black, dtype, frames, rows, columns, samples, planar, hide=hide)
