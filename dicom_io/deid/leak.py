"""The leak guard: de-identified output must hold none of the input's identifying values.

Needles are the input's identifying values: the patient's name (each component, each
ideographic/phonetic group and the whole name), patient ID, other patient IDs, accession
number, birth date (as stored and in common spellings) and, unless Retain UIDs is selected,
every UID that is not defined by the standard. Every value of the output at every depth is
searched, case-insensitively, after PN separators (``^``, ``=``) and runs of white space are
folded to one space (so ``WANG^XIAODONG`` and ``wang xiaodong`` both match). Binary values
(OB, OW, UN...: ICC profiles, encapsulated documents, waveforms, anything a modality put there)
are searched as the text they may carry (their UTF-8 and Latin-1 readings), up to
``BINARY_SCAN_BYTES`` each; only pixel data is not (its text is pixels: dicom_io.deid.burned_in).

How a needle matches depends on its length, because a short value is not identifying on its own
and occurs everywhere (a sex code ``M``, a patient ID ``12`` inside ``512``, ``Ann`` inside
``Annotated``):

- 6 characters or more (IDs, UIDs, dates, most names): anywhere in text, even glued to other
  characters (a planted ``XPID-7788123Y`` trips); in a numeric value (IS, DS, US, FD...) or a
  UID value as a whole value (a number equal to the ID trips, a longer number or UID that
  contains it does not);
- 3 to 5 characters: in text as a whole token only (``Ann`` trips on ``ann`` but not on
  ``Annotated``); never in numeric values (a patient ID ``123`` is not a leak in Rows);
- with a CJK character and 2 characters or more: anywhere in text (CJK has no word breaks);
- shorter (one or two Latin letters or digits, one CJK character): ignored. The walk still
  replaces the attributes that held them, and Clean Descriptors still cuts them out of text.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache

from pydicom.datadict import keyword_for_tag, tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset

from dicom_io.deid.raw import Element, iter_all, numbers, strings
from dicom_io.deid.text import date_spellings
from dicom_io.deid.values import BINARY_VRS, NUMERIC_VRS, is_standard_uid
from radbridge.errors import DeidentificationError

__all__ = [
    "LONG",
    "SHORTEST",
    "Needles",
    "assert_no_leak",
    "compile_needles",
    "find_leak",
    "fold",
    "identifying_values",
]

CACHED_TEXT = 256  # values up to this long are cached by content (bounded memory)
LONG = 6  # needles this long match anywhere in text
SHORTEST = 3  # Latin/digit needles shorter than this are ignored
_CJK = re.compile("[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_WHOLE_VALUES = NUMERIC_VRS | {"DS", "IS", "UI"}  # numbers and UIDs: compared value by value
_NOT_TEXT = frozenset({"SQ"})
BINARY_SCAN_BYTES = 16 << 20
# Pixel Data, Float / Double Float Pixel Data, Extended Offset Table (+ lengths): image bytes
# and offsets, never text; scanning them would cost a full read of every image for nothing.
_PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009, 0x7FE00001, 0x7FE00002})
_PRINTABLE_RUN = re.compile(r"[^\x00-\x08\x0e-\x1f\x7f]{3,}")
_SEPARATORS = re.compile(r"[\^=\\]")
_SPACES = re.compile(r"\s+")
_NUMBER = re.compile(r"[-+]?[0-9.]+(?:e[-+]?[0-9]+)?")
_PATIENT_NAME = 0x00100010
_BIRTH_DATE = 0x00100030
_IDS = frozenset({0x00100020, 0x00101000, 0x00080050})  # PatientID, OtherPatientIDs, Accession


@dataclass(frozen=True)
class Needles:
    """Needles sorted by how they match (case-folded): substrings, tokens, whole values."""

    values: frozenset[str]
    anywhere: tuple[str, ...]  # plain substring tests: as fast as the needles are many (UIDs)
    tokens: re.Pattern[str] | None
    whole: frozenset[str]
    numeric: bool = False  # whether a whole-value needle could be a number (a digit ID)


def fold(text: str) -> str:
    """PN separators and runs of white space as one space, trimmed."""
    return _fold_short(text) if len(text) <= CACHED_TEXT else _fold(text)


def _fold(text: str) -> str:
    return _SPACES.sub(" ", _SEPARATORS.sub(" ", text)).strip()


_fold_short = lru_cache(maxsize=16384)(_fold)  # short values repeat across a series


def identifying_values(
    ds: Dataset, retain_uids: bool = False, standard_uid_keywords: Iterable[str] = ()
) -> Needles:
    """The needles of ``ds``; UIDs too unless ``retain_uids`` (standard ones never)."""
    raw: set[str] = set()
    skip = frozenset(tag_for_keyword(kw) for kw in standard_uid_keywords)
    for parent, elem, vr in iter_all(ds):
        t = int(elem.tag)
        if t == _PATIENT_NAME:
            for name in strings(parent, elem, vr):
                for group in name.split("="):
                    raw.add(group)
                    raw.update(re.split(r"[\^\s]+", group))
        elif t in _IDS:
            raw.update(strings(parent, elem, vr))
        elif t == _BIRTH_DATE:
            for value in strings(parent, elem, vr):
                raw.add(value)
                raw.update(date_spellings(value.strip()))
        elif vr == "UI" and not retain_uids and t not in skip:
            raw.update(v for v in strings(parent, elem, vr) if not is_standard_uid(v))
    return compile_needles(raw)


def compile_needles(raw: Iterable[str]) -> Needles:
    """Sort needles by the matching rule of the module docstring."""
    values = frozenset(n for n in (fold(v) for v in raw) if _counts(n))
    folded = {n.casefold() for n in values}
    anywhere = tuple(sorted(n for n in folded if len(n) >= LONG or _CJK.search(n)))
    short = sorted((n for n in folded if n not in anywhere), key=len, reverse=True)
    tokens = "|".join(re.escape(n) for n in short)
    return Needles(
        values,
        anywhere,
        re.compile(rf"(?<!\w)(?:{tokens})(?!\w)") if short else None,
        frozenset(n for n in folded if len(n) >= LONG),
        any(len(n) >= LONG and _NUMBER.fullmatch(n) for n in folded),
    )


def _counts(needle: str) -> bool:
    if _CJK.search(needle):
        return len(needle) >= 2
    return len(needle) >= SHORTEST


def find_leak(out: Dataset, needles: Needles) -> DataElement | RawDataElement | None:
    """The first element of ``out`` (any depth) holding a needle, or ``None``.

    One pass folds every value; the needles are then searched once in all the text together
    (a newline between values: no needle holds one) and once in the set of whole values.
    Only when that finds something are the elements searched one by one, to name the holder.
    """
    texts: list[str] = []
    wholes: set[str] = set()
    for parent, elem, vr in iter_all(out):
        text = _folded(parent, elem, vr, needles.numeric)
        if text is None:
            continue
        if vr in _WHOLE_VALUES:
            wholes.update(text.split(" "))
        else:
            texts.append(text)
    if not _holds(needles, "\n".join(texts), wholes):
        return None
    for parent, elem, vr in iter_all(out):
        text = _folded(parent, elem, vr, needles.numeric)
        if text is None:
            continue
        whole = vr in _WHOLE_VALUES
        if _holds(needles, "" if whole else text, set(text.split(" ")) if whole else set()):
            return elem
    return None


def _holds(needles: Needles, text: str, wholes: set[str]) -> bool:
    if not wholes.isdisjoint(needles.whole):
        return True
    if any(n in text for n in needles.anywhere):
        return True
    return needles.tokens is not None and needles.tokens.search(text) is not None


def _folded(parent: Dataset, elem: Element, vr: str, numeric: bool) -> str | None:
    """An element's values as one folded, case-folded string; ``None`` for nothing to search."""
    if vr in _NOT_TEXT:
        return None
    if vr in BINARY_VRS:
        return _binary_text(elem)
    if vr in NUMERIC_VRS:
        if not numeric:
            return None  # no needle is a number: no number can be one
        values: list[object] = numbers(parent, elem, vr)
    elif isinstance(elem, RawDataElement) and elem.value is not None:
        if not elem.value.isascii():
            return _fold_all(strings(parent, elem, vr))
        if len(elem.value) <= CACHED_TEXT:
            return _folded_short(elem.value)
        return _folded_ascii(elem.value)
    else:
        values = list(strings(parent, elem, vr))
    return _fold_all(values) if values else None


def _binary_text(elem: Element) -> str | None:
    """The text a binary value may carry: its runs of printable characters, read as UTF-8 and
    as Latin-1 (a name can be stored either way), folded; ``None`` for pixel data."""
    if int(elem.tag) in _PIXEL_TAGS:
        return None
    raw = elem.value
    if isinstance(raw, (list, tuple)):  # multi-frame fragments or a value list
        raw = b"".join(r for r in raw if isinstance(r, bytes))
    if not isinstance(raw, bytes | bytearray) or not raw:
        return None
    raw = bytes(raw[:BINARY_SCAN_BYTES])
    runs = _PRINTABLE_RUN.findall(raw.decode("utf-8", errors="replace").replace("\ufffd", "\x00"))
    runs += _PRINTABLE_RUN.findall(raw.decode("latin-1"))
    return fold(" ".join(runs)).casefold() if runs else None


def _folded_ascii(raw: bytes) -> str | None:
    text = raw.decode("ascii").strip("\x00 ")
    return fold(text).casefold() if text else None


_folded_short = lru_cache(maxsize=8192)(_folded_ascii)  # values repeat across a series


def _fold_all(values: Sequence[object]) -> str | None:
    return fold(" ".join(str(v) for v in values)).casefold() if values else None


def assert_no_leak(out: Dataset, needles: Needles) -> None:
    """Raise :class:`DeidentificationError` naming the element (never the value) on a hit."""
    elem = find_leak(out, needles)
    if elem is not None:
        raise DeidentificationError(
            f"output still holds an identifying value in {elem.tag} "
            f"({keyword_for_tag(elem.tag) or 'unknown'})"
        )
