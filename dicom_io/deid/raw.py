"""Element access for the de-identification fast path: values read and written as bytes.

pydicom reads a file lazily: each element stays a :class:`RawDataElement` (its encoded bytes)
until something asks for its value, and a dataset whose elements are still raw, in the encoding
they will be written in, is written by copying those bytes. Converting every element (what
``Dataset.__iter__``/``iterall`` do) and encoding it again costs more than the de-identification
itself, so the engine works on the raw elements where it can:

- an element kept as is (pixel data, numbers, plain-ASCII codes and text) is carried over as the
  same raw element, when it was read in the output's transfer syntax;
- a value the engine replaces is written straight into bytes (:func:`encode`): the output's
  character set is always UTF-8 (``ISO_IR 192``), so text needs no pydicom round trip;
- values the engine must judge (UIDs to remap, codes, identity to search for) are read from the
  bytes (:func:`strings`, :func:`numbers`) and only what needs pydicom's decoding (a person name,
  text in another character set, an ambiguous or implicit VR) is converted.

The output is the same as converting every element would give; ``tests/test_deid*.py`` hold the
engine to that on implicit and explicit VR files, in-memory datasets and other character sets.
"""

from __future__ import annotations

from collections.abc import Iterator, MutableSequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement, RawDataElement, convert_raw_data_element
from pydicom.dataset import Dataset
from pydicom.filewriter import correct_ambiguous_vr_element
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag
from pydicom.valuerep import IS as ISvalue
from pydicom.valuerep import DSfloat, PersonName

__all__ = [
    "EXPLICIT_LITTLE",
    "UTF8",
    "Element",
    "Encoding",
    "can_pass",
    "encode",
    "iter_all",
    "new_dataset",
    "numbers",
    "raw_elements",
    "resolve",
    "strings",
    "text_of",
]

UTF8: MutableSequence[str] = ["UTF8"]  # pydicom's encodings for ISO_IR 192, the output's set
Element = DataElement | RawDataElement
# VRs whose value the engine can write as text bytes (UTF-8; PS3.5 6.2).
_TEXT = frozenset(
    {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI"}
    | {"UR", "UT"}
)
# Character-set-independent encodings: bytes that mean the same in any output.
_BINARY = frozenset({"OB", "OW", "OF", "OD", "OL", "OV", "US", "SS", "UL", "SL", "FL", "FD"})
_BINARY |= {"SV", "UV", "AT"}
_DTYPES = {"US": "u2", "SS": "i2", "UL": "u4", "SL": "i4", "FL": "f4", "FD": "f8"}
_DTYPES |= {"SV": "i8", "UV": "u8"}


@dataclass(frozen=True)
class Encoding:
    """The output's transfer syntax encoding: raw elements read in it can be copied."""

    implicit: bool
    little: bool


EXPLICIT_LITTLE = Encoding(implicit=False, little=True)


def new_dataset(items: dict[BaseTag, Element], enc: Encoding) -> Dataset:
    """A UTF-8 dataset of ``items`` whose raw elements pydicom writes by copying their bytes."""
    ds = Dataset(items, parent_encoding=UTF8)
    ds.set_original_encoding(enc.implicit, enc.little, UTF8)
    return ds


@lru_cache(maxsize=8192)
def _dictionary_vr(tag: int) -> str | None:
    """The data dictionary's VR of a public tag; ``None`` when unknown or ambiguous."""
    if (tag >> 16) & 1:
        return None
    try:
        vr = dictionary_VR(tag)
    except KeyError:
        return None
    return vr if len(vr) == 2 else None


def resolve(ds: Dataset, elem: Element) -> tuple[Element, str]:
    """``elem`` and its VR, converting it only where the VR needs pydicom.

    A raw element without a VR (implicit VR) takes the dictionary's; one whose VR depends on
    other elements (``US or SS``), or is unknown, is converted by pydicom, which resolves it;
    an ambiguous VR left on an element built in memory is resolved as pydicom's writer would,
    on a copy (the input is never changed).
    """
    vr = elem.VR
    if vr is None:
        vr = _dictionary_vr(int(elem.tag))
    elif len(vr) != 2 or (vr == "UN" and _dictionary_vr(int(elem.tag)) is not None):
        vr = None  # UN of a known attribute: pydicom gives it its dictionary VR
    if vr is None:
        elem = ds[elem.tag]
        vr = str(elem.VR)
        if len(vr) != 2:  # still ambiguous (a dataset built in memory): as pydicom's writer does
            elem = correct_ambiguous_vr_element(
                DataElement(elem.tag, vr, elem.value), ds, ds.original_encoding[1] is not False
            )
            vr = str(elem.VR)
    return elem, vr


def raw_elements(ds: Dataset) -> list[Element]:
    """``ds``'s top-level elements as stored, raw where they are not yet converted.

    In the order they were added: tag order for a dataset read from a file. This reads the
    dataset's element dict directly, as pydicom's own writer does (``Dataset.elements()``
    sorts the tags and looks each one up again, which costs more than the engine's work on
    most elements); a deferred element (no value read yet) is read through ``get_item``.
    """
    found = list(ds._dict.values())
    for i, elem in enumerate(found):
        if isinstance(elem, RawDataElement) and elem.value is None and elem.length:
            found[i] = ds.get_item(elem.tag)
    return found


def iter_all(ds: Dataset) -> Iterator[tuple[Dataset, Element, str]]:
    """Every element at every depth with its dataset and VR (sequences before their items)."""
    for elem in raw_elements(ds):
        vr = elem.VR
        if vr is None or len(vr) != 2 or vr == "UN":
            elem, vr = resolve(ds, elem)
        yield ds, elem, vr
        if vr == "SQ":
            for item in ds[elem.tag].value or ():
                yield from iter_all(item)


def strings(ds: Dataset, elem: Element, vr: str) -> list[str]:
    """The values of a text element as strings, padding stripped.

    Raw bytes are decoded here when they are plain ASCII (the same in every character set
    DICOM allows, ISO 2022 escapes aside); anything else goes through pydicom's decoding.
    """
    if isinstance(elem, RawDataElement):
        raw = elem.value or b""
        if raw.isascii() and b"\x1b" not in raw:
            text = raw.decode("ascii").rstrip("\x00 ")
            if vr not in ("LT", "ST", "UT", "UR"):  # single-valued VRs may hold a backslash
                return [v.strip("\x00 ") for v in text.split("\\")] if text else []
            return [text] if text else []
        key = elem._replace(VR=vr, value_tell=0), tuple(_as_list(ds._character_set))
        return list(_decoded(*key) if len(raw) <= 256 else _decode(*key))  # cache short ones
    value = elem.value
    if value is None or value == "":
        return []
    if isinstance(value, list | MultiValue | tuple):
        return [str(v) for v in value]
    return [str(value)]


def text_of(ds: Dataset, tag: int) -> str:
    """The value of a top-level text element as one string (``""`` when absent or empty),
    read from its bytes when they are plain ASCII."""
    found: Element | None = ds.get_item(tag)
    if found is None:
        return ""
    elem, vr = resolve(ds, found)
    return "\\".join(strings(ds, elem, vr))


def _as_list(charset: str | MutableSequence[str]) -> list[str]:
    return [charset] if isinstance(charset, str) else list(charset)


def _decode(raw: RawDataElement, charset: tuple[str, ...]) -> tuple[str, ...]:
    """pydicom's decoding of a raw text element in ``charset`` (the source is left as read)."""
    value = convert_raw_data_element(raw, encoding=list(charset)).value
    if value is None or value == "":
        return ()
    if isinstance(value, list | MultiValue | tuple):
        return tuple(str(v) for v in value)
    return (str(value),)


_decoded = lru_cache(maxsize=4096)(_decode)  # short values repeat across a series


def numbers(ds: Dataset, elem: Element, vr: str) -> list[Any]:
    """The values of a binary-number element (US, FL, ...) as Python numbers."""
    if isinstance(elem, RawDataElement) and vr in _DTYPES and elem.value is not None:
        order = "<" if elem.is_little_endian else ">"
        usable = len(elem.value) - len(elem.value) % np.dtype(_DTYPES[vr]).itemsize
        return np.frombuffer(elem.value[:usable], order + _DTYPES[vr]).tolist()  # type: ignore[no-any-return]
    value = ds[elem.tag].value if isinstance(elem, RawDataElement) else elem.value
    if value is None:
        return []
    return list(value) if isinstance(value, list | MultiValue | tuple) else [value]


def can_pass(elem: Element, vr: str, enc: Encoding) -> bool:
    """Whether ``elem`` may be copied to the output as its raw bytes."""
    if not isinstance(elem, RawDataElement) or elem.value is None:
        return False
    if elem.is_implicit_VR != enc.implicit or elem.is_little_endian != enc.little:
        return False
    if vr in _BINARY or vr in ("DS", "IS"):
        return True
    return vr in _TEXT and elem.value.isascii() and b"\x1b" not in elem.value


def _text(value: Any) -> str | None:
    if isinstance(value, str | PersonName | DSfloat | ISvalue):
        return str(value)
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return None


def encode(
    tag: BaseTag, vr: str, value: Any, enc: Encoding, *, undefined_length: bool = False
) -> Element:
    """``value`` as an element of the UTF-8 output: raw text bytes where the VR is text."""
    if vr in _TEXT:
        if value is None:
            parts: list[str | None] = []
        elif isinstance(value, list | MultiValue | tuple):
            parts = [_text(v) for v in value]
        else:
            parts = [_text(value)]
        if all(p is not None for p in parts):
            data = "\\".join(p for p in parts if p is not None).encode("utf-8")
            if len(data) % 2:
                data += b"\x00" if vr == "UI" else b" "
            return RawDataElement(tag, vr, len(data), data, 0, enc.implicit, enc.little)
    return DataElement(tag, vr, value, is_undefined_length=undefined_length)
