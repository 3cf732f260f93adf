"""Replacement values for de-identification: dummies by VR, keyed date shifting, UID remapping."""

from __future__ import annotations

from datetime import date, timedelta
from functools import lru_cache
from typing import Any

from pydicom.uid import UID

from dicom_io.pseudonyms import Pseudonymizer

__all__ = [
    "BINARY_VRS",
    "NUMERIC_VRS",
    "PLACEHOLDER",
    "TEXT_VRS",
    "date_offset_days",
    "dummy_value",
    "empty_value",
    "is_standard_uid",
    "remap_uid",
    "remap_uids",
    "shift_dates",
]

NUMERIC_VRS = frozenset({"US", "SS", "UL", "SL", "FL", "FD", "SV", "UV", "AT"})
BINARY_VRS = frozenset({"OB", "OW", "OF", "OD", "OL", "OV", "UN"})
TEXT_VRS = frozenset({"LO", "SH", "LT", "ST", "UT", "UC", "UR", "AE", "AS", "CS"})
# Neutral placeholders: the data set is de-identified (pseudonymized: the edge can re-identify
# it), never "anonymized", and its values must not claim otherwise (DeidentificationMethod,
# PatientIdentityRemoved and the CID 7050 options say what was done).
PLACEHOLDER = "REMOVED"
_DUMMY = {
    "DA": "19000101",
    "TM": "000000",
    "DT": "19000101000000",
    "PN": PLACEHOLDER,
    "DS": "0",
    "IS": "0",
    "AS": "000Y",
}
_MAX_SHIFT_DAYS = 3650


def empty_value(vr: str) -> Any:
    """A zero-length value of ``vr`` (action Z)."""
    if vr == "SQ":
        return []
    if vr in NUMERIC_VRS:
        return None
    if vr in BINARY_VRS:
        return b""
    return ""


def dummy_value(vr: str, original: Any, pseudo: Pseudonymizer) -> Any:
    """A dummy value of ``vr`` (action D); UIDs become keyed pseudonyms."""
    if vr == "UI":
        return remap_uids(original, pseudo)
    if vr == "SQ":
        return []  # the walk gives D on a sequence its items with dummies; this is a fallback
    if vr in NUMERIC_VRS:
        return 0
    if vr in BINARY_VRS:
        return b""
    return _DUMMY.get(vr, PLACEHOLDER)


def remap_uids(value: Any, pseudo: Pseudonymizer) -> Any:
    """Replace each non-standard UID with its keyed pseudonym; standard UIDs stay."""
    if value is None or value == "":
        return value
    if isinstance(value, str):
        return remap_uid(value, pseudo)
    return [remap_uid(str(v), pseudo) for v in value]


def remap_uid(uid: str, pseudo: Pseudonymizer) -> str:
    """One UID's keyed pseudonym; a UID defined by the standard (a SOP class...) stays."""
    if not uid or is_standard_uid(uid):
        return uid
    return pseudo.uid(uid)


@lru_cache(maxsize=4096)
def is_standard_uid(uid: str) -> bool:
    """Whether ``uid`` is defined by the standard (pydicom's UID dictionary names it)."""
    return UID(uid).name != uid


def date_offset_days(pseudo: Pseudonymizer, patient_id: str) -> int:
    """A keyed per-patient offset in [-3650, -1] days, identical for all studies of a patient."""
    token = pseudo.token("date_offset", patient_id, "")
    return -(int.from_bytes(token.encode("ascii"), "big") % _MAX_SHIFT_DAYS + 1)


def _shift_one(text: str, days: int) -> str:
    head, tail = text[:8], text[8:]
    try:
        day = date(int(head[:4]), int(head[4:6]), int(head[6:8]))
    except ValueError:
        return _DUMMY["DA"] + (tail and "000000")
    return (day + timedelta(days=days)).strftime("%Y%m%d") + tail


def shift_dates(vr: str, value: Any, days: int) -> Any:
    """Shift DA/DT values (ranges and multiple values too) by ``days``; TM is kept."""
    if vr == "TM" or value is None or value == "":
        return value
    values = [str(value)] if isinstance(value, str) else [str(v) for v in value]
    out = []
    for v in values:
        if vr == "DT":  # DT may carry a "-hhmm" UTC offset: shift the date part only
            out.append(_shift_one(v.strip(), days) if v.strip() else "")
            continue
        out.append("-".join(_shift_one(p, days) if p else "" for p in v.strip().split("-")))
    return out[0] if isinstance(value, str) else out
