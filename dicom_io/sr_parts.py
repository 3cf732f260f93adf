"""Building blocks shared by the SR writers (the AI results of
:mod:`dicom_io.result_builders` and the signed report of :mod:`dicom_io.report_sr`): coded
concepts, the TID 1204 language codes, the procedure reported, the Long String fit, the Type 2
study/patient attributes and highdicom's expected warnings."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import highdicom as hd
import pydicom
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

__all__ = [
    "CHARSET",
    "LANGUAGE_TAGS",
    "Coded",
    "expected_warnings",
    "fit_lo",
    "language_concept",
    "procedure_code",
    "with_type2",
]

CHARSET = "ISO_IR 192"  # UTF-8: the intended-use text and display names are not ASCII
# Procedure reported (TID 1500 row 4; CID 100 or any SNOMED CT procedure).
_CHEST_XRAY = Code("168731009", "SCT", "Chest X-ray")
_CHEST_CT = Code("169069000", "SCT", "CT of chest")
_CHEST_PARTS = {"CHEST", "THORAX", "LUNG"}
_LANGUAGES = {  # RFC 5646 tags (CID 5000 "Languages") for TID 1204
    "en": "English",
    "en-US": "English (United States)",
    "ru": "Russian",
    "zh": "Chinese",
    "zh-CN": "Chinese (China)",
    "zh-Hans": "Chinese (Simplified)",
}
# An agreement's report languages as RFC 5646 tags (HTML lang, TID 1204 in every SR).
LANGUAGE_TAGS = {"ru": "ru", "zh": "zh-Hans", "en": "en"}
# Type 2 Patient/General Study attributes highdicom copies from the first source; an absent
# one (de-identification adds them, other producers may not) is given empty, never invented.
_TYPE2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)
_LO_MAX = 64  # Long String: SeriesDescription, ContentDescription
_SINGLE_COMPONENT_NAME = r'The string ".*" is unlikely to represent the intended person name'


@dataclass(frozen=True)
class Coded:
    """A coded concept (SCT, RADLEX, DCM, ...); ``meaning`` is the English code meaning."""

    value: str
    scheme: str
    meaning: str

    def __post_init__(self) -> None:
        if not (self.value and self.scheme and self.meaning):
            raise ValueError("Coded needs a value, a scheme designator and a meaning")

    def concept(self) -> hd.sr.CodedConcept:
        return hd.sr.CodedConcept(self.value, self.scheme, self.meaning)


def language_concept(tag: str) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(tag, "RFC5646", _LANGUAGES.get(tag, tag))


def procedure_code(source: pydicom.Dataset) -> Code:
    """Procedure reported, from the source's modality and body part."""
    modality = str(source.get("Modality", "")).upper()
    chest = str(source.get("BodyPartExamined", "")).upper() in _CHEST_PARTS
    if modality in ("CR", "DX"):
        return _CHEST_XRAY if chest else codes.cid100.XRUnspecifiedBodyRegion
    if modality == "CT":
        return _CHEST_CT if chest else codes.cid100.CTUnspecifiedBodyRegion
    if modality == "MR":
        return codes.cid100.MRIUnspecifiedBodyRegion
    return codes.cid100.ImagingProcedure


def fit_lo(text: str) -> str:
    """A Long String value: at most 64 characters, no backslash or control characters."""
    text = " ".join(text.replace("\\", "/").split())
    return text if len(text) <= _LO_MAX else text[: _LO_MAX - 1] + "…"


def with_type2(ds: pydicom.Dataset) -> pydicom.Dataset:
    """``ds``, or a shallow copy with the missing Type 2 study/patient attributes empty."""
    missing = [keyword for keyword in _TYPE2 if keyword not in ds]
    if not missing:
        return ds
    out = pydicom.Dataset()
    out.update(ds)
    for keyword in missing:
        setattr(out, keyword, "")
    return out


@contextmanager
def expected_warnings() -> Iterator[None]:
    """Silence highdicom's single-component PatientName warning: pseudonyms look like that."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_SINGLE_COMPONENT_NAME, category=UserWarning)
        yield
