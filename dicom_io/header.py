"""Parse and validate just the header fields the index needs, from encoded bytes."""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field
from io import BytesIO

import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.valuerep import IS

from dicom_io.structure import Walked
from radbridge.errors import DatasetError

__all__ = ["InstanceHeader", "header_from_walk", "parse_header"]

_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


@dataclass(frozen=True)
class InstanceHeader:
    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    transfer_syntax_uid: str
    modality: str | None
    body_part: str | None
    identity_removed: bool = False  # (0012,0062) PatientIdentityRemoved == "YES"
    # (0020,1208) Number of Study Related Instances, when the sender states it: the study is
    # complete once that many instances are in, without waiting for the quiet period.
    expected_study_instances: int | None = None
    # (0040,1003) Requested Procedure Priority, top level or in the Request Attributes
    # Sequence, mapped to the agreement's priorities: STAT -> "stat", HIGH -> "urgent",
    # MEDIUM / ROUTINE / LOW -> "routine"; None when the sender did not say.
    priority: str | None = None
    # (0010,0020) Patient ID; never in the repr (logs, errors): at the edge it identifies.
    patient_id: str | None = field(default=None, repr=False)


def parse_header(encoded: bytes, declared_sop_class: str | None = None) -> InstanceHeader:
    """Parse a Part 10 byte stream up to (not including) the pixel data.

    Raises ``DatasetError`` with reason ``unparseable``, ``missing_uid``, ``invalid_uid`` or
    ``sop_class_mismatch`` (when ``declared_sop_class`` disagrees with the dataset).
    """
    try:
        ds = pydicom.dcmread(BytesIO(encoded), stop_before_pixels=True, force=False)
        values = {
            kw: ds.get(kw)
            for kw in (
                "SOPClassUID",
                "SOPInstanceUID",
                "StudyInstanceUID",
                "SeriesInstanceUID",
                "Modality",
                "BodyPartExamined",
                "PatientIdentityRemoved",
                "NumberOfStudyRelatedInstances",
                "PatientID",
            )
        }
        requested = _requested_priority(ds)
        tsuid = str(ds.file_meta.TransferSyntaxUID)
    except (InvalidDicomError, EOFError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise DatasetError(
            "unparseable", f"dataset cannot be parsed: {type(exc).__name__}"
        ) from None
    return _header(values, requested, tsuid, declared_sop_class)


_TAGS = {
    "SOPClassUID": 0x00080016,
    "SOPInstanceUID": 0x00080018,
    "StudyInstanceUID": 0x0020000D,
    "SeriesInstanceUID": 0x0020000E,
    "Modality": 0x00080060,
    "BodyPartExamined": 0x00180015,
    "PatientIdentityRemoved": 0x00120062,
    "NumberOfStudyRelatedInstances": 0x00201208,
    "PatientID": 0x00100020,
}


def header_from_walk(
    walked: Walked, declared_sop_class: str | None = None
) -> InstanceHeader | None:
    """The same header as :func:`parse_header`, from the raw values the structure walk kept
    (``check_structure``), without parsing the data set again; None where only pydicom can
    say what it would read (a value with a backslash, read as several; a Patient ID outside
    ASCII, decoded by the Specific Character Set): the caller parses those with
    :func:`parse_header`. tests/test_header.py compares both over the pydicom-data corpus."""
    raw = [*walked.values.values(), *walked.request_priorities]
    if any(b"\\" in value or not value.isascii() for value in raw):
        return None
    values: dict[str, object] = {}
    for kw, tag in _TAGS.items():
        value = walked.values.get(tag)
        values[kw] = None if value is None else _text(value)
    count = values["NumberOfStudyRelatedInstances"]
    if count:
        with contextlib.suppress(TypeError, ValueError):  # else kept as text, then ignored
            values["NumberOfStudyRelatedInstances"] = IS(str(count).strip())
    priorities = [walked.values.get(0x00401003), *walked.request_priorities]
    found: list[object] = [_text(p) for p in priorities if p is not None]
    return _header(values, _highest(found), walked.transfer_syntax, declared_sop_class)


def _text(raw: bytes) -> str:
    return raw.rstrip(b"\x00 ").decode("ascii")


def _header(
    values: dict[str, object], requested: str | None, tsuid: str, declared_sop_class: str | None
) -> InstanceHeader:
    uids = {}
    for kw in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        v = values[kw]
        if v is None or str(v).strip() == "":
            raise DatasetError("missing_uid", f"{kw} is missing")
        s = str(v).strip()
        if len(s) > 64 or not _UID.match(s):
            raise DatasetError("invalid_uid", f"{kw} is not a valid UID")
        uids[kw] = s
    if declared_sop_class and uids["SOPClassUID"] != declared_sop_class:
        raise DatasetError(
            "sop_class_mismatch", "SOP Class UID of the dataset differs from the request's"
        )
    modality = str(values["Modality"]).strip() if values["Modality"] else None
    body = str(values["BodyPartExamined"]).strip() if values["BodyPartExamined"] else None
    expected = _positive_int(values["NumberOfStudyRelatedInstances"])
    return InstanceHeader(
        sop_class_uid=uids["SOPClassUID"],
        sop_instance_uid=uids["SOPInstanceUID"],
        study_uid=uids["StudyInstanceUID"],
        series_uid=uids["SeriesInstanceUID"],
        transfer_syntax_uid=tsuid,
        modality=modality,
        body_part=body,
        identity_removed=str(values["PatientIdentityRemoved"] or "").upper() == "YES",
        expected_study_instances=expected,
        priority=requested,
        patient_id=str(values["PatientID"]).strip() or None if values["PatientID"] else None,
    )


# PS3.3 C.4.11 / C.7.3.1: the defined terms of Requested Procedure Priority.
_PRIORITIES = {
    "STAT": "stat",
    "HIGH": "urgent",
    "MEDIUM": "routine",
    "ROUTINE": "routine",
    "LOW": "routine",
}
_RANK = {"stat": 0, "urgent": 1, "routine": 2}


def _requested_priority(ds: pydicom.Dataset) -> str | None:
    """The highest Requested Procedure Priority the instance states (top level, or in any
    item of the Request Attributes Sequence); unknown terms are ignored."""
    found = [ds.get("RequestedProcedurePriority")]
    for item in ds.get("RequestAttributesSequence") or []:
        found.append(item.get("RequestedProcedurePriority"))
    return _highest(found)


def _highest(found: list[object]) -> str | None:
    mapped = [_PRIORITIES.get(str(v).strip().upper()) for v in found if v]
    known = [m for m in mapped if m is not None]
    return min(known, key=_RANK.__getitem__) if known else None


def _positive_int(value: object) -> int | None:
    try:
        n = int(str(value).strip()) if value not in (None, "") else 0
    except (TypeError, ValueError):
        return None  # a malformed count is ignored: the quiet period still completes the study
    return n if n > 0 else None
