"""Re-identification of results returning to the hospital (SR, SEG), at the edge only.

A result object is built at the center on pseudonymous data. Before it is stored to the
hospital's PACS the edge must make it about the hospital's own patient again:

1. every UID the center got from us (study, series, instance, frame of reference, anything
   referenced anywhere in nested sequences) is replaced by the original from the identity map;
2. the Patient and General Study modules are copied from an original instance of the study the
   edge holds (not reversed from tokens: the original is the source of truth, dates unshifted);
3. the de-identification markers are removed, since the object now carries identity.

UIDs the center minted itself (the result's own SOP Instance / Series UIDs) are left as they
are. A result whose study, or any referenced instance, is unknown to this edge is refused with
``ReidentificationError``: its references would not resolve in the PACS.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from dicom_io.identity_map import originals_for
from radbridge.db.engine import Database
from radbridge.errors import ReidentificationError

__all__ = ["PATIENT_STUDY_KEYWORDS", "ReidOutcome", "reidentify"]

# Patient module (PS3.3 C.7.1.1) and General Study module (C.7.2.1) attributes that carry the
# hospital's identity or its unshifted context; copied from the original when present there.
PATIENT_STUDY_KEYWORDS = (
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "IssuerOfPatientIDQualifiersSequence",
    "OtherPatientIDsSequence",
    "PatientBirthDate",
    "PatientBirthTime",
    "PatientSex",
    "PatientAge",
    "PatientSize",
    "PatientWeight",
    "EthnicGroup",
    "PatientComments",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "IssuerOfAccessionNumberSequence",
    "StudyID",
    "StudyDescription",
    "ReferringPhysicianName",
    "ReferringPhysicianIdentificationSequence",
    "InstitutionName",
)
_MARKERS = (
    "PatientIdentityRemoved",
    "DeidentificationMethod",
    "DeidentificationMethodCodeSequence",
    "LongitudinalTemporalInformationModified",
)
# References that must resolve in the PACS: every one must be a UID this edge issued.
_MUST_RESOLVE = ("StudyInstanceUID", "ReferencedSOPInstanceUID", "SeriesInstanceUID")


@dataclass(frozen=True)
class ReidOutcome:
    dataset: Dataset
    restored_uids: int
    minted_uids: int  # UIDs of the result object itself, kept as the center made them


def reidentify(
    ds: Dataset,
    agreement_id: str,
    db: Database,
    original: Dataset,
    companions: frozenset[str] = frozenset(),
) -> ReidOutcome:
    """Return ``ds`` (modified in place) re-identified with this edge's identity map.

    ``original`` is any original instance of the study (header only is enough);
    ``companions`` are UIDs of other result objects delivered with this one (an SR that
    references its SEG), which may be referenced without being in the identity map.
    """
    elements = list(_uid_elements(ds))
    seen = {v for _, elem in elements for v in _values(elem)}
    mapping = originals_for(db, agreement_id, "uid", seen)
    study = str(ds.get("StudyInstanceUID", ""))
    if mapping.get(study) != str(original.StudyInstanceUID):
        raise ReidentificationError(
            f"result for agreement {agreement_id} refers to a study this edge did not send"
        )
    unresolved = 0
    restored = 0
    for nested, elem in elements:
        values = [mapping.get(v, v) for v in _values(elem)]
        restored += sum(1 for v in _values(elem) if v in mapping)
        if nested and elem.keyword in _MUST_RESOLVE:
            unresolved += sum(1 for v in _values(elem) if v not in mapping and v not in companions)
        elem.value = values if elem.VM > 1 else values[0]
    if unresolved:
        raise ReidentificationError(
            f"result for agreement {agreement_id} references {unresolved} instance(s) or "
            "series this edge did not send"
        )
    for keyword in PATIENT_STUDY_KEYWORDS:
        if keyword in original:
            ds[keyword] = original[keyword]
        elif keyword in ds:
            del ds[keyword]
    for keyword in _MARKERS:
        if keyword in ds:
            del ds[keyword]
    minted = len(seen) - len(mapping)
    return ReidOutcome(ds, restored, minted)


def _uid_elements(ds: Dataset, nested: bool = False) -> Iterator[tuple[bool, DataElement]]:
    """Every UI element with a value, with whether it sits inside a sequence item.

    File meta is skipped: it describes the file, and is rewritten when the object is sent.
    """
    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value:
                yield from _uid_elements(item, nested=True)
        elif elem.VR == "UI" and elem.value not in (None, ""):
            yield nested, elem


def _values(elem: DataElement) -> list[str]:
    v = elem.value
    if isinstance(v, MultiValue | list):
        return [str(x) for x in v]
    return [str(v)]
