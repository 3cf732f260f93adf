"""dicom_io.structure: what parses in full is accepted, anything cut, bent or inflated is not."""

from __future__ import annotations

import io
import struct
import tracemalloc
import zlib
from pathlib import Path

import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
)

from dicom_io.header import parse_header
from dicom_io.structure import Limits, check_structure
from radbridge.errors import DatasetError
from tests.conftest import make_instance


def _part10(ds: pydicom.Dataset, syntax: str = ExplicitVRLittleEndian) -> bytes:
    ds.file_meta.TransferSyntaxUID = syntax
    buf = io.BytesIO()
    ds.save_as(
        buf,
        enforce_file_format=True,
        little_endian=syntax != ExplicitVRBigEndian,
        implicit_vr=syntax == ImplicitVRLittleEndian,
    )
    return buf.getvalue()


def _reason(encoded: bytes, limits: Limits | None = None) -> str:
    with pytest.raises(DatasetError) as err:
        check_structure(encoded, limits)
    return err.value.reason


@pytest.mark.parametrize(
    "syntax",
    [
        ImplicitVRLittleEndian,
        ExplicitVRLittleEndian,
        ExplicitVRBigEndian,
        DeflatedExplicitVRLittleEndian,
    ],
)
def test_valid_instances_pass_in_every_native_syntax(syntax: str) -> None:
    check_structure(_part10(make_instance(), syntax))


def test_sequences_of_defined_and_undefined_length_pass() -> None:
    ds = make_instance()  # carries SourceImageSequence (undefined length when pydicom writes)
    seq_item = pydicom.Dataset()
    seq_item.CodeValue, seq_item.CodingSchemeDesignator = "T-D3000", "SRT"
    inner = pydicom.Dataset()
    inner.ConceptNameCodeSequence = [seq_item]
    ds.AnatomicRegionSequence = [inner, seq_item]
    check_structure(_part10(ds))
    check_structure(_part10(ds, ImplicitVRLittleEndian))


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_every_cut_of_an_instance_is_refused(syntax: str) -> None:
    """Truncated anywhere after the file meta — mid-header, mid-value, inside a sequence, at an
    element boundary after the pixel module began or inside the pixel data — the receive
    path's checks (the structure, then the header fields the index needs) refuse it. The only
    cuts that pass end at a top-level element boundary before the pixel module: a complete,
    smaller data set (all UIDs, no image), which is what pydicom reads from those bytes too."""
    encoded = _part10(make_instance(rows=8), syntax)
    whole = list(pydicom.dcmread(io.BytesIO(encoded)).keys())
    start = encoded.index(b"\x08\x00\x05\x00")  # the data set's first element (0008,0005)
    passed = []
    for cut in range(start + 1, len(encoded)):
        try:
            check_structure(encoded[:cut])
            parse_header(encoded[:cut])
        except DatasetError:
            continue
        passed.append(cut)
        kept = list(pydicom.dcmread(io.BytesIO(encoded[:cut])).keys())
        assert kept == whole[: len(kept)], f"cut at {cut} passed but is not a prefix"
        assert 0x00280010 not in kept and 0x00280011 not in kept, f"cut at {cut}"
    assert len(passed) < 8  # a handful of boundaries between the last UID and Rows


def test_pixel_data_shorter_than_the_pixel_module_is_refused_longer_is_padding() -> None:
    ds = make_instance()
    full = ds.PixelData
    ds.PixelData = full[:-2]
    assert _reason(_part10(ds)) == "pixel_length"
    ds.PixelData = full + b"\0" * 64
    check_structure(_part10(ds))


def test_pixel_module_values_are_checked_before_any_decoding() -> None:
    ds = make_instance()
    ds.NumberOfFrames = "9"
    encoded = _part10(ds)
    frames = b"\x28\x00\x08\x00IS\x02\x009 "
    assert frames in encoded
    assert _reason(encoded.replace(frames, frames[:-2] + b"1A")) == "pixel_module"
    ds = make_instance()
    del ds.Rows
    assert _reason(_part10(ds)) == "pixel_module"
    ds = make_instance()
    ds.Rows = ds.Columns = 65535
    ds.NumberOfFrames = 1000  # 8 GiB of pixels declared in a tiny file
    assert _reason(_part10(ds)) == "pixel_too_large"


def _encapsulated(frames: int, bot: bool = True) -> pydicom.Dataset:
    ds = make_instance()
    ds.NumberOfFrames = frames
    fragments = [bytes([i]) * 64 for i in range(frames)]
    ds.PixelData = encapsulate(fragments, has_bot=bot)
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = RLELossless
    return ds


def test_encapsulated_pixel_data_structure() -> None:
    check_structure(_part10(_encapsulated(3), RLELossless))
    check_structure(_part10(_encapsulated(3, bot=False), RLELossless))
    ds = _encapsulated(3)
    ds.NumberOfFrames = 4  # more frames than fragments
    assert _reason(_part10(ds, RLELossless)) == "pixel_fragments"
    encoded = bytearray(_part10(_encapsulated(3), RLELossless))
    bot = encoded.index(b"\xfe\xff\x00\xe0\x0c\x00\x00\x00")  # BOT item, 3 offsets
    struct.pack_into("<L", encoded, bot + 12, 7)  # second offset points inside a fragment
    assert _reason(bytes(encoded)) == "pixel_fragments"
    cut = _part10(_encapsulated(3), RLELossless)[:-8]  # no sequence delimiter
    assert _reason(cut) == "truncated"


def test_native_pixel_data_in_an_encapsulated_syntax_is_refused() -> None:
    ds = make_instance()
    encoded = _part10(ds)
    # Same bytes, but the meta now claims RLE: native Pixel Data where fragments must be.
    lied = encoded.replace(ExplicitVRLittleEndian.encode() + b"\0", RLELossless.encode() + b"\0")
    assert _reason(lied) == "malformed"


def test_bad_vr_and_stray_delimiters_are_malformed() -> None:
    encoded = _part10(make_instance())
    start = encoded.index(b"\x08\x00\x05\x00")
    bent = bytearray(encoded)
    bent[start + 4 : start + 6] = b"ZZ"
    assert _reason(bytes(bent)) == "malformed"
    stray = encoded[:start] + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00" + encoded[start:]
    assert _reason(stray) == "malformed"
    assert _reason(b"\0" * 128 + b"NOPE" + encoded[132:]) == "unparseable"


def test_nesting_is_bounded() -> None:
    ds = make_instance()
    item = pydicom.Dataset()
    item.CodeValue = "1"
    for _ in range(40):
        outer = pydicom.Dataset()
        outer.ConceptNameCodeSequence = [item]
        item = outer
    ds.ContentSequence = [item]
    assert _reason(_part10(ds)) == "malformed"


def _deflate_bomb(inflated_mib: int) -> bytes:
    """A Deflated Explicit VR instance whose data set inflates to ``inflated_mib`` MiB."""
    ds = make_instance(rows=8)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    meta = io.BytesIO()
    pydicom.filewriter.write_file_meta_info(meta, ds.file_meta, enforce_standard=True)
    # An OB private element of zeros: compresses about 1000:1.
    size = inflated_mib << 20
    header = struct.pack("<HH2sHL", 0x0009, 0x1010, b"OB", 0, size)
    z = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts = [z.compress(header)]
    zeros = bytes(1 << 20)
    for _ in range(inflated_mib):
        parts.append(z.compress(zeros))
    parts.append(z.flush())
    return b"\0" * 128 + b"DICM" + meta.getvalue() + b"".join(parts)


def test_deflate_bomb_is_refused_in_bounded_memory() -> None:
    bomb = _deflate_bomb(512)  # 512 MiB inflated from about 0.5 MiB
    assert len(bomb) < 1 << 20
    tracemalloc.start()
    try:
        assert _reason(bomb, Limits(max_inflated_bytes=32 << 20)) == "inflate_limit"
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 50 << 20, f"peak {peak >> 20} MiB while refusing the bomb"


def test_truncated_deflate_stream_is_refused() -> None:
    encoded = _part10(make_instance(), DeflatedExplicitVRLittleEndian)
    assert _reason(encoded[:-20]) in ("truncated", "malformed")


def test_pydicom_test_files_that_parse_in_full_pass() -> None:
    from pydicom.data import get_testdata_file

    for name in ("CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm", "rtdose.dcm", "SC_rgb_rle.dcm"):
        path = get_testdata_file(name)
        assert path is not None
        check_structure(Path(path).read_bytes())
    for name, reason in (("MR_truncated.dcm", "truncated"), ("rtplan_truncated.dcm", "truncated")):
        path = get_testdata_file(name)
        assert path is not None
        assert _reason(Path(path).read_bytes()) == reason
