"""Clean Descriptors (PS3.15 E.3.5): free text kept only once identity is provably out of it.

A value is cleaned in three steps: (a) the instance's own identifying values are cut out (every
PN component, ideographic and phonetic groups included, patient IDs, accession numbers, the
birth date in common spellings); (b) identifier patterns are cut out (Chinese resident ID,
Russian SNILS and passport numbers, phone numbers, e-mail addresses); (c) if what remains still
looks like a name (capitalised Latin/Cyrillic word runs, a CJK run next to an honorific), the
whole value is dropped: anything uncertain is removed, not kept.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from pydicom.dataset import Dataset

from dicom_io.deid.raw import iter_all, strings

__all__ = [
    "clean_text",
    "date_spellings",
    "identity_terms",
    "looks_identifying",
    "strip_escapes",
]

_CJK = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_PATTERNS = [
    re.compile(r"(?<![0-9])[0-9]{17}[0-9Xx](?![0-9A-Za-z])"),  # CN resident ID (18 chars)
    re.compile(r"(?<![0-9])[0-9]{3}-[0-9]{3}-[0-9]{3}[ -]?[0-9]{2}(?![0-9])"),  # SNILS
    re.compile(r"(?<![0-9])[0-9]{11}(?![0-9])"),  # SNILS digits only / CN mobile
    re.compile(r"(?<![0-9])[0-9]{2} ?[0-9]{2} ?[0-9]{6}(?![0-9])"),  # RU passport
    re.compile(r"\+7[\s(-]*[0-9]{3}[\s)-]*[0-9]{3}[\s-]*[0-9]{2}[\s-]*[0-9]{2}(?![0-9])"),
    # RU numbers dialled with 8: mobiles 8 (9xx) and landlines 8 (495) 123-45-67
    re.compile(r"(?<![0-9])8[\s(-]*[0-9]{3}[\s)-]*[0-9]{3}[\s-]*[0-9]{2}[\s-]*[0-9]{2}(?![0-9])"),
    re.compile(r"\+86[\s-]*1[0-9]{2}[\s-]*[0-9]{4}[\s-]*[0-9]{4}(?![0-9])"),
    re.compile(r"(?<![0-9])1[3-9][0-9]{9}(?![0-9])"),  # CN mobile
    # CN landline with area code: 010-1234 5678, (0755) 1234-5678, 021 12345678
    re.compile(r"(?<![0-9])\(?0[1-9][0-9]{1,2}\)?[\s-]*[0-9]{3,4}[\s-]*[0-9]{4}(?![0-9])"),
    re.compile(r"\+[1-9][0-9]{0,2}[\s(-]*[0-9][0-9\s()-]{6,16}[0-9](?![0-9])"),  # any +CC number
    re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+"),  # e-mail
]
_UPPER = "A-ZА-ЯЁ"
_LOWER = "a-zа-яё"
_UNCERTAIN = [
    # Two or more capitalised words in a row: "Ivan Petrov", "Иванов Иван".
    re.compile(rf"(?<!\w)[{_UPPER}][{_LOWER}]+(?:[\s^-]+[{_UPPER}][{_LOWER}]+)+(?!\w)"),
    # Surname plus initials: "Иванов И.И.", "Smith J."
    re.compile(rf"(?<!\w)[{_UPPER}][{_LOWER}]+\s+[{_UPPER}]\.\s?(?:[{_UPPER}]\.)?"),
    # Honorific or role word followed by a capitalised word.
    re.compile(rf"(?i:\b(?:пациент\w*|больно\w*|patient|mr|mrs|ms|dr)\.?)\s+[{_UPPER}][{_LOWER}]+"),
    # A CJK run of 1-4 characters next to 先生/女士/患者/病人/пациент.
    re.compile(rf"[{_CJK}]{{1,4}}(?:先生|女士|小姐|患者|病人)"),
    re.compile(rf"(?:患者|病人|姓名)[:：\s]*[{_CJK}]{{2,4}}"),
    re.compile(rf"(?i:пациент\w*)\s*[{_CJK}]{{2,4}}"),
]
_DATE_FORMATS: tuple[str, ...] = ("{y}{m}{d}", "{y}-{m}-{d}", "{y}/{m}/{d}", "{y}.{m}.{d}")
_DATE_FORMATS += ("{d}.{m}.{y}", "{d}/{m}/{y}", "{m}/{d}/{y}", "{d}-{m}-{y}")


# ISO 2022 escape sequences (e.g. ESC $ ) A of ISO 2022 IR 58) that pydicom may leave inside a
# decoded value: they are encoding, not text; left in, they split names and reach the output.
_ESCAPES = re.compile(r"\x1b[\x20-\x2f]*[\x30-\x7e]")
# Russian surnames decline (Смирнова -> Смирновой, Иванов -> Ивановым): match on the stem.
_CYRILLIC_ENDING = re.compile(r"(?<=[А-Яа-яЁё]{4})[аяоеыиуюйь]$")


def strip_escapes(text: str) -> str:
    return _ESCAPES.sub("", text)


def identity_terms(ds: Dataset) -> list[str]:
    """The instance's own identifying values, longest first, for :func:`clean_text`."""
    terms: set[str] = set()
    for parent, elem, vr in iter_all(ds):
        if vr == "PN":
            for v in strings(parent, parent[elem.tag], vr):
                for comp in re.split(r"[=^]", strip_escapes(str(v))):
                    comp = comp.strip()
                    if len(comp) >= 2 or re.fullmatch(rf"[{_CJK}]", comp):
                        terms.add(comp)
                    for word in comp.split():
                        if len(word) >= 2:
                            terms.add(word)
    for kw in ("PatientID", "OtherPatientIDs", "AccessionNumber", "IssuerOfPatientID"):
        value = ds.get(kw)
        values = value if isinstance(value, list | tuple) else [value]
        for v in values:
            if v and len(str(v).strip()) >= 2:
                terms.add(str(v).strip())
    terms.update(date_spellings(str(ds.get("PatientBirthDate", "") or "")))
    return sorted(terms, key=len, reverse=True)


def date_spellings(value: str) -> set[str]:
    """Common spellings of a DA value (``19650412``: ``1965-04-12``, ``12.04.1965``, ...)."""
    if not re.fullmatch(r"[0-9]{8}", value):
        return set()
    y, m, d = value[:4], value[4:6], value[6:]
    out = {f.format(y=y, m=m, d=d) for f in _DATE_FORMATS}
    out.add(f"{y}年{int(m)}月{int(d)}日")
    out.add(f"{y}年{m}月{d}日")
    return out


def _term_pattern(term: str) -> re.Pattern[str]:
    if len(term) >= 5:
        term = _CYRILLIC_ENDING.sub("", term)
    escaped = re.escape(term)
    if re.search(rf"[{_CJK}]", term):
        return re.compile(escaped)
    right = r"\w*" if len(term) >= 4 else r"(?!\w)"  # long terms: inflected forms, whole word
    return re.compile(rf"(?<!\w){escaped}{right}", re.IGNORECASE)


def looks_identifying(text: str) -> bool:
    """True when ``text`` still holds something that may be a name (uncertain content)."""
    return any(p.search(text) for p in _UNCERTAIN)


def clean_text(value: str, terms: Iterable[str]) -> str | None:
    """Return ``value`` with identity cut out, or ``None`` when it must be removed entirely."""
    value = strip_escapes(value)
    text = value
    for term in terms:
        text = _term_pattern(term).sub(" ", text)
    for pattern in _PATTERNS:
        text = pattern.sub(" ", text)
    text = re.sub(r"[=^]+", " ", text) if text != value else text
    text = re.sub(r"[ \t]{2,}", " ", text).strip(" \t,;:")
    if looks_identifying(text):
        return None
    return text
