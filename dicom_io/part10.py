"""Part 10 bytes of a de-identified dataset, written by concatenating its elements' bytes.

The engine's output (:mod:`dicom_io.deid`) is made of raw elements already encoded in the output
transfer syntax, plus a few sequences. pydicom's writer handles any dataset, and its fixed cost
per element (a buffer, checks, a context manager) is most of what de-identifying an instance
costs. For little endian transfer syntaxes this module writes the same bytes pydicom would
(``tests/test_part10.py`` compares them byte for byte) by joining element headers and values:

- a raw element in the output encoding: its header and its bytes (undefined length kept, with
  its Sequence Delimitation Item, as pydicom does);
- a sequence: each item with its defined length, the sequence itself with its defined length
  (as pydicom writes sequences it did not read);
- anything else (a value pydicom still has to encode): pydicom's own ``write_data_element``.

The File Meta Information is written the same way (its group length and version added, as
pydicom's ``write_file_meta_info`` does). Big endian and deflated transfer syntaxes go to
pydicom's ``dcmwrite`` whole.
"""

from __future__ import annotations

import struct
from io import BytesIO

from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import dcmwrite, write_data_element
from pydicom.uid import DeflatedExplicitVRLittleEndian
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32

__all__ = ["to_part10"]

_UNDEFINED = 0xFFFFFFFF
_ITEM = struct.pack("<HH", 0xFFFE, 0xE000)
_SEQUENCE_END = struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
_LONG_VRS = frozenset(str(vr) for vr in EXPLICIT_VR_LENGTH_32)


def to_part10(ds: Dataset) -> bytes:
    """``ds`` (with ``file_meta`` and ``preamble``) as Part 10 file bytes."""
    syntax = ds.file_meta.TransferSyntaxUID
    if not syntax.is_little_endian or syntax == DeflatedExplicitVRLittleEndian:
        buf = BytesIO()
        dcmwrite(buf, ds, enforce_file_format=True)
        return buf.getvalue()
    parts = [(ds.preamble or b"\x00" * 128) + b"DICM", _file_meta(ds.file_meta)]
    charset = ds.get("SpecificCharacterSet", "ISO_IR 6")
    _dataset(parts, ds, bool(syntax.is_implicit_VR), charset)
    return b"".join(parts)


def _dataset(parts: list[bytes], ds: Dataset, implicit: bool, charset: object) -> None:
    items = ds._dict  # the writer reads the element dict, as pydicom's own writer does
    for tag in sorted(items, key=int):
        t = int(tag)
        if not t & 0xFFFF and t >> 16 > 6:  # no retired group lengths (PS3.5 7.2)
            continue
        elem = items[tag]
        if (
            isinstance(elem, RawDataElement)
            and elem.value is not None
            and elem.is_implicit_VR == implicit
            and elem.is_little_endian
            and (implicit or (elem.VR is not None and len(elem.VR) == 2))
        ):
            undefined = elem.length == _UNDEFINED
            length = _UNDEFINED if undefined else len(elem.value)
            parts.append(_header(t, elem.VR, length, implicit))
            parts.append(elem.value)
            if undefined:
                parts.append(_SEQUENCE_END)
        elif isinstance(elem, DataElement) and elem.VR == "SQ" and not elem.is_undefined_length:
            body: list[bytes] = []
            for item in elem.value:
                inner: list[bytes] = []
                _dataset(inner, item, implicit, charset)
                data = b"".join(inner)
                body += [_ITEM, struct.pack("<I", len(data)), data]
            data = b"".join(body)
            parts += [_header(t, "SQ", len(data), implicit), data]
        else:
            parts.append(_pydicom_element(ds, tag, implicit, charset))


def _file_meta(meta: Dataset) -> bytes:
    """Group 0002 in explicit VR little endian, with its group length and version (PS3.10 7.1),
    as pydicom's ``write_file_meta_info(enforce_standard=True)`` writes it."""
    elems: dict[int, tuple[str, bytes]] = {0x00020001: ("OB", b"\x00\x01")}
    for tag, elem in meta._dict.items():
        t = int(tag)
        if t == 0x00020000:
            continue
        if isinstance(elem, RawDataElement) and elem.VR is not None and elem.value is not None:
            elems[t] = (elem.VR, elem.value)
            continue
        vr, value = str(elem.VR), elem.value
        data = value if isinstance(value, bytes) else str(value or "").encode("ascii")
        if len(data) % 2:
            data += b"\x00" if vr in ("UI", "OB") else b" "
        elems[t] = (vr, data)
    body = b"".join(
        _header(t, vr, len(data), False) + data for t, (vr, data) in sorted(elems.items())
    )
    return _header(0x00020000, "UL", 4, False) + struct.pack("<I", len(body)) + body


def _header(tag: int, vr: str | None, length: int, implicit: bool) -> bytes:
    group_element = struct.pack("<HH", tag >> 16, tag & 0xFFFF)
    if implicit:
        return group_element + struct.pack("<I", length)
    assert vr is not None
    if vr in _LONG_VRS:
        return group_element + vr.encode("ascii") + b"\x00\x00" + struct.pack("<I", length)
    return group_element + vr.encode("ascii") + struct.pack("<H", length)


def _pydicom_element(ds: Dataset, tag: int, implicit: bool, charset: object) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, implicit
    write_data_element(fp, ds[tag], charset)  # type: ignore[arg-type]
    return fp.getvalue()
