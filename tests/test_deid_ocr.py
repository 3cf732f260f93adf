"""Text burned into projection images without Burned In Annotation (dicom_io/deid/ocr.py), with
Debian's Tesseract: a generated radiograph with the patient's name, ID and birth date drawn into
its pixels leaves masked (or not at all); a clean one leaves untouched."""

from __future__ import annotations

import time
from io import BytesIO

import numpy as np
import pydicom
import pytest
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, RLELossless

from dicom_io.deid import deidentify
from dicom_io.deid.burned_in import BurnedInAnnotationError
from dicom_io.deid.ocr import TEXT_IN_PIXELS, _display, _identifier_tokens, needs_scan, read_words
from dicom_io.deid.ocr import _spells_identifier as spells
from dicom_io.pseudonyms import Pseudonymizer
from models.cxr_phantoms import chest_radiograph
from tests.conftest import PATIENT, make_instance

NAME = "WANG XIAODONG"  # the test patient's name, as a modality overlay writes it


def _radiograph(size: int = 768, text: bool = True, monochrome1: bool = False) -> Dataset:
    """A CR of the test patient; with ``text``, its name, ID and birth date burned into the
    top-left corner and its ID again mid-image, at the brightest display value."""
    ds = make_instance(modality="CR")
    pixels = chest_radiograph(np.random.default_rng(5), {"cardiomegaly"}, size=size)
    pixels = (pixels.astype(np.uint32) * 3500 // 4095).astype(np.uint16)  # headroom for text
    if text:
        image = Image.fromarray(pixels.astype(np.int32), mode="I")
        draw = ImageDraw.Draw(image)
        font = ImageFont.load_default(size=max(14, size // 32))
        draw.text((12, 10), f"{NAME}  {PATIENT['id']}", fill=4095, font=font)
        draw.text((12, 10 + size // 24), "DOB 1965-04-12", fill=4095, font=font)
        draw.text((size // 3, size // 2), PATIENT["id"], fill=4095, font=font)
        pixels = np.asarray(image, dtype=np.int32).astype(np.uint16)
    if monochrome1:
        pixels = (4095 - pixels).astype(np.uint16)
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.PixelRepresentation = 0
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.PixelData = pixels.tobytes()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    if "BurnedInAnnotation" in ds:
        del ds.BurnedInAnnotation
    return ds


def _roundtrip(ds: Dataset) -> Dataset:
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return pydicom.dcmread(BytesIO(buf.getvalue()))


def _codes(ds: Dataset) -> set[str]:
    return {str(i.CodeValue) for i in ds.DeidentificationMethodCodeSequence}


def test_burned_in_identity_is_read_masked_and_unreadable_after() -> None:
    ds = _roundtrip(_radiograph())
    assert needs_scan(ds)
    tokens = _identifier_tokens(ds)
    before = read_words(_display(ds))
    assert any(spells(w.text, tokens) for w in before), [w.text for w in before]
    t0 = time.perf_counter()
    out = _roundtrip(deidentify(ds, Pseudonymizer(b"k" * 32), text_in_pixels="mask").dataset)
    print(f"text scan + mask, 768 x 768 CR: {time.perf_counter() - t0:.2f} s")
    assert out.BurnedInAnnotation == "NO" and "113101" in _codes(out)  # Clean Pixel Data
    after = read_words(_display(out))
    assert not any(spells(w.text, tokens) for w in after), [w.text for w in after]
    changed = ds.pixel_array != out.pixel_array
    assert changed[:60, :400].any()  # the corner overlay is gone
    assert changed.mean() < 0.05  # and little else: the image stays readable


def test_a_clean_radiograph_leaves_untouched() -> None:
    ds = _roundtrip(_radiograph(text=False))
    out = _roundtrip(deidentify(ds, Pseudonymizer(b"k" * 32), text_in_pixels="mask").dataset)
    assert np.array_equal(ds.pixel_array, out.pixel_array)
    assert "113101" not in _codes(out) and "BurnedInAnnotation" not in out


def test_monochrome1_text_is_found_and_blacked_out_as_displayed() -> None:
    ds = _roundtrip(_radiograph(monochrome1=True))
    out = _roundtrip(deidentify(ds, Pseudonymizer(b"k" * 32), text_in_pixels="mask").dataset)
    assert "113101" in _codes(out)
    masked = ds.pixel_array != out.pixel_array
    assert (out.pixel_array[masked] == 4095).all()  # black in MONOCHROME1 is the maximum


def test_quarantine_mode_and_unmaskable_pixels_keep_the_image_at_the_edge() -> None:
    ds = _roundtrip(_radiograph())
    with pytest.raises(BurnedInAnnotationError) as held:
        deidentify(ds, Pseudonymizer(b"k" * 32), text_in_pixels="quarantine")
    assert held.value.reason == TEXT_IN_PIXELS
    compressed = _radiograph()
    compressed.compress(RLELossless)
    with pytest.raises(BurnedInAnnotationError, match="compressed"):
        deidentify(_roundtrip(compressed), Pseudonymizer(b"k" * 32), text_in_pixels="mask")


def test_only_unflagged_projection_images_are_scanned() -> None:
    ds = _radiograph()
    assert needs_scan(ds)
    ds.BurnedInAnnotation = "NO"
    assert not needs_scan(ds)  # the modality says: trusted
    ct = make_instance(modality="CT")
    assert not needs_scan(ct)
    # "off" (the library default) scans nothing.
    out = deidentify(_roundtrip(_radiograph()), Pseudonymizer(b"k" * 32)).dataset
    assert "113101" not in _codes(out)


WQY = "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc"  # ./run test installs it


def test_a_chinese_name_burned_in_as_ideographs_is_masked() -> None:
    """The hospitals are in China: a name drawn as 王小东 is read (Tesseract's chi_sim, which
    ./run installs) and masked like one in pinyin."""
    from dicom_io.deid.ocr import languages

    assert "chi_sim" in languages(), "tesseract-ocr-chi-sim is missing (./run installs it)"
    ds = _radiograph(text=False)
    pixels = ds.pixel_array.astype(np.int32)
    image = Image.fromarray(pixels, mode="I")
    ImageDraw.Draw(image).text((14, 12), "王小东", fill=4095, font=ImageFont.truetype(WQY, 40))
    ds.PixelData = np.asarray(image, dtype=np.int32).astype(np.uint16).tobytes()
    ds = _roundtrip(ds)
    tokens = _identifier_tokens(ds)
    assert "王小东" in tokens
    assert any(spells(w.text, tokens) for w in read_words(_display(ds)))
    out = _roundtrip(deidentify(ds, Pseudonymizer(b"k" * 32), text_in_pixels="mask").dataset)
    assert "113101" in _codes(out)
    assert not any(spells(w.text, tokens) for w in read_words(_display(out)))
