"""Table-driven de-identification: DICOM PS3.15 2024b Annex E, made safer than the table.

Every element at every depth (sequences, tags after Pixel Data) gets the action of PS3.15
Table E.1-1 under the agreement's options (:mod:`dicom_io.deid_profile`), or, when the table
does not list it, an action judged by its VR (:mod:`dicom_io.deid_walk`). UIDs are remapped with
keyed pseudonyms; patient identity is replaced by a keyed pseudonym; free text is removed or, with
Clean Descriptors, cleaned (:mod:`dicom_io.deid_text`). File meta and preamble are rebuilt.
Before returning, the output is checked for any original identifying value; a hit raises.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from pydicom.datadict import keyword_for_tag
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID

from dicom_io.deid_text import identity_terms
from dicom_io.deid_walk import NON_REMAPPED_UIDS, WalkContext, walk
from dicom_io.pseudonyms import Pseudonymizer
from radbridge.agreements import DeidOption
from radbridge.errors import DeidentificationError

__all__ = ["DEID_METHOD", "DeidOutcome", "deidentify"]

DEID_METHOD = "radbridge: PS3.15-2024b Table E.1-1 + VR rules"

# CID 7050 codes of the options, in the order they are listed in the output.
_OPTION_CODES = (
    (
        DeidOption.RETAIN_LONGITUDINAL_MODIFIED_DATES,
        "113107",
        "Retain Longitudinal Temporal Information Modified Dates Option",
    ),
    (DeidOption.RETAIN_PATIENT_CHARACTERISTICS, "113108", "Retain Patient Characteristics Option"),
    (DeidOption.RETAIN_DEVICE_IDENTITY, "113109", "Retain Device Identity Option"),
    (DeidOption.RETAIN_INSTITUTION_IDENTITY, "113112", "Retain Institution Identity Option"),
    (DeidOption.CLEAN_DESCRIPTORS, "113105", "Clean Descriptors Option"),
)
# Type 2 attributes emptied when the walk left them out.
_TYPE2_EMPTY: tuple[str, ...] = (
    "PatientBirthDate",
    "PatientSex",
    "ReferringPhysicianName",
    "StudyID",
)
_TYPE2_EMPTY += ("StudyDate", "StudyTime")


@dataclass
class DeidOutcome:
    dataset: Dataset
    pseudonyms: dict[tuple[str, str], str] = field(default_factory=dict)


def deidentify(
    ds: Dataset, pseudo: Pseudonymizer, options: Iterable[DeidOption] = ()
) -> DeidOutcome:
    """Return a de-identified copy of ``ds`` (with new file meta) and the pseudonyms issued."""
    opts = frozenset(DeidOption(o) for o in options)
    if str(ds.get("BurnedInAnnotation", "")).upper() == "YES":
        raise DeidentificationError("BurnedInAnnotation is YES: pixel data may show identity")
    needles = _identifying_values(ds)
    pid = str(ds.get("PatientID", "") or "")
    patient_pseudonym = pseudo.token("patient_id", pid, "RB")
    ctx = WalkContext(pseudo, opts, identity_terms(ds), pid, patient_pseudonym)
    out = walk(ds, ctx)

    out.PatientID = patient_pseudonym
    out.PatientName = patient_pseudonym
    for kw in _TYPE2_EMPTY:
        if kw not in out:
            setattr(out, kw, "")
    acc = str(ds.get("AccessionNumber", "") or "")
    out.AccessionNumber = pseudo.token("accession", acc, "A") if acc else ""
    if "ContentDate" in ds and "ContentDate" not in out:  # Type 1 in some IODs (e.g. DX)
        out.ContentDate = "19000101"
    if "ContentTime" in ds and "ContentTime" not in out:
        out.ContentTime = "000000"
    out.SpecificCharacterSet = "ISO_IR 192"
    out.PatientIdentityRemoved = "YES"
    out.LongitudinalTemporalInformationModified = "MODIFIED" if ctx.longitudinal else "REMOVED"
    out.DeidentificationMethod = DEID_METHOD
    out.DeidentificationMethodCodeSequence = Sequence(_method_codes(opts))

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = out.SOPClassUID
    meta.MediaStorageSOPInstanceUID = out.SOPInstanceUID
    meta.TransferSyntaxUID = ds.file_meta.TransferSyntaxUID
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "RADBRIDGE_010"
    out.file_meta = meta
    out.preamble = b"\x00" * 128
    _assert_no_leak(out, needles)
    return DeidOutcome(out, dict(pseudo.issued))


def _method_codes(opts: frozenset[DeidOption]) -> list[Dataset]:
    codes = [("113100", "Basic Application Confidentiality Profile")]
    codes += [(value, meaning) for opt, value, meaning in _OPTION_CODES if opt in opts]
    items = []
    for value, meaning in codes:
        item = Dataset()
        item.CodeValue = value
        item.CodingSchemeDesignator = "DCM"
        item.CodeMeaning = meaning
        items.append(item)
    return items


def _identifying_values(ds: Dataset) -> set[str]:
    """Original values that must not appear anywhere in the output."""
    needles: set[str] = set()
    name = ds.get("PatientName")
    if name:
        for comp in str(name).replace("=", "^").split("^"):
            if len(comp.strip()) >= 2:
                needles.add(comp.strip())
    for kw in ("PatientID", "PatientBirthDate", "AccessionNumber", "OtherPatientIDs"):
        v = ds.get(kw)
        if v and len(str(v).strip()) >= 2:
            needles.add(str(v).strip())
    for elem in ds.iterall():
        if elem.VR == "UI" and elem.value and keyword_for_tag(elem.tag) not in NON_REMAPPED_UIDS:
            values = elem.value if isinstance(elem.value, list) else [elem.value]
            for v in values:
                if UID(str(v)).name == str(v):
                    needles.add(str(v))
    return needles


def _assert_no_leak(out: Dataset, needles: set[str]) -> None:
    for elem in out.iterall():
        if elem.VR in ("OB", "OW", "OF", "OD", "OL", "OV", "UN", "SQ"):
            continue
        text = str(elem.value)
        for needle in needles:
            if needle in text:
                raise DeidentificationError(
                    f"output still holds an identifying value in {elem.tag} "
                    f"({keyword_for_tag(elem.tag) or 'unknown'})"
                )
