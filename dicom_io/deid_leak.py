"""The leak guard: de-identified output must hold none of the input's identifying values.

Needles are the input's identifying values: the patient's name (each component, each
ideographic/phonetic group and the whole name), patient ID, other patient IDs, accession
number, birth date (as stored and in common spellings) and, unless Retain UIDs is selected,
every UID that is not defined by the standard. Every value of the output at every depth is
searched except binary ones, case-insensitively, after PN separators (``^``, ``=``) and runs of
white space are folded to one space (so ``WANG^XIAODONG`` and ``wang xiaodong`` both match).

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
from collections.abc import Iterable
from dataclasses import dataclass

from pydicom.datadict import keyword_for_tag
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import UID

from dicom_io.deid_text import date_spellings
from dicom_io.deid_values import BINARY_VRS, NUMERIC_VRS
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

LONG = 6  # needles this long match anywhere in text
SHORTEST = 3  # Latin/digit needles shorter than this are ignored
_CJK = re.compile("[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_WHOLE_VALUES = NUMERIC_VRS | {"DS", "IS", "UI"}  # numbers and UIDs: compared value by value
_NOT_TEXT = BINARY_VRS | {"SQ"}


@dataclass(frozen=True)
class Needles:
    """Needles sorted by how they match (case-folded): substrings, tokens, whole values."""

    values: frozenset[str]
    anywhere: tuple[str, ...]  # plain substring tests: as fast as the needles are many (UIDs)
    tokens: re.Pattern[str] | None
    whole: frozenset[str]


def fold(text: str) -> str:
    """PN separators and runs of white space as one space, trimmed."""
    return re.sub(r"\s+", " ", re.sub(r"[\^=\\]", " ", text)).strip()


def identifying_values(
    ds: Dataset, retain_uids: bool = False, standard_uid_keywords: Iterable[str] = ()
) -> Needles:
    """The needles of ``ds``; UIDs too unless ``retain_uids`` (standard ones never)."""
    raw: set[str] = set()
    skip = frozenset(standard_uid_keywords)
    for elem in ds.iterall():
        kw = keyword_for_tag(elem.tag)
        if kw == "PatientName" and elem.value:
            for name in _values(elem):
                for group in str(name).split("="):
                    raw.add(group)
                    raw.update(re.split(r"[\^\s]+", group))
        elif kw in ("PatientID", "OtherPatientIDs", "AccessionNumber") and elem.value:
            raw.update(str(v) for v in _values(elem))
        elif kw == "PatientBirthDate" and elem.value:
            raw.add(str(elem.value))
            raw.update(date_spellings(str(elem.value).strip()))
        elif elem.VR == "UI" and elem.value and not retain_uids and kw not in skip:
            raw.update(str(v) for v in _values(elem) if UID(str(v)).name == str(v))
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
    )


def _counts(needle: str) -> bool:
    if _CJK.search(needle):
        return len(needle) >= 2
    return len(needle) >= SHORTEST


def _values(elem: DataElement) -> list[object]:
    value = elem.value
    return list(value) if isinstance(value, list | MultiValue) else [value]


def find_leak(out: Dataset, needles: Needles) -> DataElement | None:
    """The first element of ``out`` (any depth) holding a needle, or ``None``."""
    for elem in out.iterall():
        if elem.VR in _NOT_TEXT or elem.value is None:
            continue
        text = fold(" ".join(str(v) for v in _values(elem))).casefold()
        if elem.VR in _WHOLE_VALUES:
            if needles.whole.intersection(text.split(" ")):
                return elem
        elif any(n in text for n in needles.anywhere) or (
            needles.tokens is not None and needles.tokens.search(text)
        ):
            return elem
    return None


def assert_no_leak(out: Dataset, needles: Needles) -> None:
    """Raise :class:`DeidentificationError` naming the element (never the value) on a hit."""
    elem = find_leak(out, needles)
    if elem is not None:
        raise DeidentificationError(
            f"output still holds an identifying value in {elem.tag} "
            f"({keyword_for_tag(elem.tag) or 'unknown'})"
        )
