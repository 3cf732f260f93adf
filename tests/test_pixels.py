"""decode_frame over every transfer syntax the edge accepts and stores as received.

The samples and their references are in ``tests.corpus.SYNTAX_CASES``: collection files where
pydicom-data / pydicom's test files have a grayscale one, else made from an uncompressed image
(JPEG Baseline by GDCM, JPEG Lossless with each predictor by a small encoder here, JPEG-LS
near-lossless by pyjpegls). Lossless samples must decode bit-exactly to an uncompressed
reference of the same image; lossy ones close to it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.pixels import apply_modality_lut
from pydicom.uid import JPEGLossless, JPEGLosslessSV1

from dicom_io.pixels import decode_frame
from radbridge.errors import DatasetError
from tests.corpus import REQUIRED_SYNTAXES, SYNTAX_CASES, SyntaxCase, make_jpeg_lossless


def _file(name: str) -> Path:
    return Path(str(get_testdata_file(name)))


def test_every_required_syntax_has_a_case() -> None:
    assert {str(c.syntax) for c in SYNTAX_CASES} == set(REQUIRED_SYNTAXES)


@pytest.mark.parametrize("case", SYNTAX_CASES, ids=lambda c: c.id)
def test_decode_frame(case: SyntaxCase, tmp_path: Path) -> None:
    path = case.sample(tmp_path)
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    assert ds.file_meta.TransferSyntaxUID == case.syntax  # read, not trusted from the name
    assert ds.PhotometricInterpretation in ("MONOCHROME1", "MONOCHROME2")

    out, modality = decode_frame(path.read_bytes())

    assert out.dtype == np.float32 and out.shape == (ds.Rows, ds.Columns)
    assert np.isfinite(out).all()
    assert modality == str(ds.get("Modality", "") or "")
    ref = case.reference(path)
    assert ref.shape == out.shape
    if case.tolerance is None:
        np.testing.assert_array_equal(out, ref)
        return
    diff = np.abs(out.astype(np.float64) - ref)
    value_range = float(ref.max() - ref.min())
    assert value_range > 0 and diff.mean() <= case.tolerance * value_range
    if case.max_error is not None:
        assert diff.max() <= case.max_error


@pytest.mark.parametrize("predictor", range(1, 8))
@pytest.mark.parametrize("plugin", ["gdcm", "pylibjpeg"])
def test_generated_jpeg_lossless_is_decoded_alike_by_each_plugin(
    predictor: int, plugin: str, tmp_path: Path
) -> None:
    """The JPEG Lossless samples are made here; both decoders must agree they are lossless."""
    syntax = JPEGLosslessSV1 if predictor == 1 else JPEGLossless
    ds = pydicom.dcmread(make_jpeg_lossless(tmp_path, syntax, predictor))
    ds.pixel_array_options(decoding_plugin=plugin)
    original = pydicom.dcmread(_file("MR_small.dcm")).pixel_array
    np.testing.assert_array_equal(ds.pixel_array, original)


@pytest.mark.parametrize(
    ("name", "reference"),
    [
        ("emri_small_RLE.dcm", "emri_small.dcm"),
        ("emri_small_jpeg_2k_lossless.dcm", "emri_small.dcm"),
        ("emri_small_jpeg_ls_lossless.dcm", "emri_small.dcm"),
        ("emri_small_big_endian.dcm", "emri_small.dcm"),
    ],
)
def test_one_frame_of_a_multiframe_image(name: str, reference: str) -> None:
    ref = pydicom.dcmread(_file(reference))
    frames = apply_modality_lut(ref.pixel_array, ref).astype(np.float32)
    encoded = _file(name).read_bytes()
    for index in (0, 4, 9):
        out, _ = decode_frame(encoded, frame=index)
        np.testing.assert_array_equal(out, frames[index])
    for index in (10, -1):
        with pytest.raises(DatasetError) as err:
            decode_frame(encoded, frame=index)
        assert err.value.reason == "no_such_frame"


def test_monochrome1_is_inverted() -> None:
    path = _file("6154")  # dicomdirtests/77654033/CR1/6154, a 16x16 CR
    ds = pydicom.dcmread(path)
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    raw = apply_modality_lut(ds.pixel_array, ds).astype(np.float32)
    out, modality = decode_frame(path.read_bytes())
    assert modality == "CR"
    np.testing.assert_array_equal(out, raw.max() + raw.min() - raw)


@pytest.mark.parametrize(
    "name",
    [
        "SC_rgb_jpeg_dcmtk.dcm",  # JPEG Baseline, YBR_FULL
        "US1_J2KR.dcm",  # JPEG 2000 Lossless, YBR_RCT
        "SC_rgb_rle.dcm",  # RLE, RGB
        "SC_rgb.dcm",  # explicit VR little endian, RGB
        "OBXXXX1A.dcm",  # PALETTE COLOR: one sample per pixel, but indices, not intensities
    ],
)
def test_colour_images_are_refused(name: str) -> None:
    with pytest.raises(DatasetError) as err:
        decode_frame(_file(name).read_bytes())
    assert err.value.reason == "unsupported_pixels"


def test_undecodable_pixels() -> None:
    # JPEG-lossy.dcm (12-bit JPEG Extended) has a non-conformant scan header (Se != 63) that
    # no installed plugin decodes; the edge stores it anyway (pixels are decoded on demand).
    with pytest.raises(DatasetError) as err:
        decode_frame(_file("JPEG-lossy.dcm").read_bytes())
    assert err.value.reason == "undecodable_pixels"
    with pytest.raises(DatasetError) as err:
        decode_frame(b"not DICOM at all")
    assert err.value.reason == "undecodable_pixels"
    with pytest.raises(DatasetError) as err:  # an SR: no pixel data
        decode_frame(_file("test-SR.dcm").read_bytes())
    assert err.value.reason == "undecodable_pixels"
