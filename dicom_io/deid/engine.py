"""Table-driven de-identification: DICOM PS3.15 2024b Annex E, made safer than the table.

Every element at every depth (sequences, tags after Pixel Data) gets the action of PS3.15
Table E.1-1 under the agreement's options (:mod:`dicom_io.deid.profile`), or, when the table
does not list it, an action judged by its VR (:mod:`dicom_io.deid.walk`). UIDs are remapped with
keyed pseudonyms; patient identity is replaced by a keyed pseudonym; free text is removed or, with
Clean Descriptors, cleaned (:mod:`dicom_io.deid.text`). File meta and preamble are rebuilt.
An instance whose pixels may show identity is quarantined or, when the agreement asks and it is
safe, masked (:mod:`dicom_io.deid.burned_in`). Before returning, the output is checked for any
original identifying value (:mod:`dicom_io.deid.leak`); a hit raises.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Literal

from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID

from dicom_io.deid.burned_in import BurnedInAnnotationError, burned_in_risk, plan_mask, quarantine
from dicom_io.deid.leak import assert_no_leak, identifying_values
from dicom_io.deid.ocr import needs_scan, scan_text
from dicom_io.deid.raw import EXPLICIT_LITTLE, Element, Encoding, encode, new_dataset, text_of
from dicom_io.deid.walk import NON_REMAPPED_UIDS, WalkContext, walk_items
from dicom_io.pseudonyms import Pseudonymizer
from radbridge.agreements import DeidOption
from radbridge.errors import DeidentificationError

__all__ = ["DEID_METHOD", "BurnedInAnnotationError", "DeidOutcome", "deidentify"]

DEID_METHOD = "radbridge: pseudonymized, PS3.15-2024b Table E.1-1 + VR rules"

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
    (DeidOption.RETAIN_UIDS, "113110", "Retain UIDs Option"),
    (DeidOption.RETAIN_SAFE_PRIVATE, "113111", "Retain Safe Private Option"),
    (DeidOption.CLEAN_STRUCTURED_CONTENT, "113104", "Clean Structured Content Option"),
    (DeidOption.CLEAN_GRAPHICS, "113103", "Clean Graphics Option"),
)
_CLEAN_PIXEL_DATA = ("113101", "Clean Pixel Data Option")  # declared when pixels were masked
# Type 2 attributes emptied when the walk left them out.
_TYPE2_EMPTY: tuple[str, ...] = (
    "PatientBirthDate",
    "PatientSex",
    "ReferringPhysicianName",
    "StudyID",
)
_TYPE2_EMPTY += ("StudyDate", "StudyTime")
# Type 2 attributes the VR rule removes as free text (Frame of Reference module): emptied when
# the input had them, so the output stays a valid IOD.
_TYPE2_EMPTY_IF_PRESENT = ("PositionReferenceIndicator",)


@dataclass
class DeidOutcome:
    dataset: Dataset
    pseudonyms: dict[tuple[str, str], str] = field(default_factory=dict)


def deidentify(
    ds: Dataset,
    pseudo: Pseudonymizer,
    options: Iterable[DeidOption] = (),
    *,
    burned_in: Literal["quarantine", "mask"] = "quarantine",
    top_band_rows: int = 0,
    text_in_pixels: Literal["off", "mask", "quarantine"] = "off",
) -> DeidOutcome:
    """Return a de-identified copy of ``ds`` (with new file meta) and the pseudonyms issued.

    Raises :class:`BurnedInAnnotationError` for an instance to keep at the edge (its pixels may
    show identity and were not masked) and :class:`DeidentificationError` for anything else
    that cannot be guaranteed.
    """
    opts = frozenset(DeidOption(o) for o in options)
    if (DeidOption.RETAIN_UIDS in opts) != pseudo.retain_uids:
        raise DeidentificationError(
            "Retain UIDs is selected for the agreement or for its pseudonymizer, not both; "
            "use Pseudonymizer.for_agreement"
        )
    risk = burned_in_risk(ds)
    mask = None
    if risk is not None:
        if burned_in != "mask":
            raise quarantine(risk, "the agreement quarantines such instances at the edge")
        mask = plan_mask(ds, risk, top_band_rows)
    elif text_in_pixels != "off" and needs_scan(ds):
        mask = scan_text(ds, text_in_pixels)  # text read in the pixels: masked or quarantined
    needles = identifying_values(ds, pseudo.retain_uids, NON_REMAPPED_UIDS)
    pid = text_of(ds, 0x00100020)
    patient_pseudonym = pseudo.token("patient_id", pid, "RB")
    ctx = WalkContext(pseudo, opts, ds, pid, patient_pseudonym, _encoding(ds))
    items = walk_items(ds, ctx)

    def put(keyword: str, value: object) -> None:
        tag = _tag(keyword)
        items[tag] = encode(tag, dictionary_VR(tag), value, ctx.encoding)

    put("PatientID", patient_pseudonym)
    put("PatientName", patient_pseudonym)
    for kw in _TYPE2_EMPTY:
        if _tag(kw) not in items:
            put(kw, "")
    for kw in _TYPE2_EMPTY_IF_PRESENT:
        if kw in ds and _tag(kw) not in items:
            put(kw, "")
    acc = text_of(ds, 0x00080050)
    put("AccessionNumber", pseudo.token("accession", acc, "A") if acc else "")
    for kw, dummy in (("ContentDate", "19000101"), ("ContentTime", "000000")):
        if kw in ds and _tag(kw) not in items:  # Type 1 in some IODs (e.g. DX)
            put(kw, dummy)
    put("SpecificCharacterSet", "ISO_IR 192")
    put("PatientIdentityRemoved", "YES")
    put("LongitudinalTemporalInformationModified", "MODIFIED" if ctx.longitudinal else "REMOVED")
    put("DeidentificationMethod", DEID_METHOD)
    codes = _tag("DeidentificationMethodCodeSequence")
    items[codes] = DataElement(
        codes,
        "SQ",
        Sequence(
            new_dataset(dict(item), ctx.encoding)
            for item in _method_codes(opts, mask is not None, ctx.encoding)
        ),
    )
    out = new_dataset(items, ctx.encoding)
    if mask is not None:
        mask.apply(out)

    out.file_meta = _file_meta(
        text_of(out, 0x00080016),  # SOP Class and Instance UIDs, read raw: they stay raw in out
        text_of(out, 0x00080018),
        str(ds.file_meta.TransferSyntaxUID),
    )
    out.preamble = b"\x00" * 128
    assert_no_leak(out, needles)
    return DeidOutcome(out, dict(pseudo.issued))


def _file_meta(sop_class: str, sop_instance: str, syntax: str) -> FileMetaDataset:
    """File Meta Information, built of raw elements (group 0002 is explicit VR little endian)."""
    items: dict[BaseTag, Element] = {}
    for keyword, value in (
        ("MediaStorageSOPClassUID", sop_class),
        ("MediaStorageSOPInstanceUID", sop_instance),
        ("TransferSyntaxUID", syntax),
        ("ImplementationClassUID", PYDICOM_IMPLEMENTATION_UID),
        ("ImplementationVersionName", "RADBRIDGE_010"),
    ):
        tag = _tag(keyword)
        items[tag] = encode(tag, dictionary_VR(tag), value, EXPLICIT_LITTLE)
    return FileMetaDataset(items)


def _encoding(ds: Dataset) -> Encoding:
    """The output's encoding: the input's transfer syntax is kept."""
    try:
        ts = ds.file_meta.TransferSyntaxUID
        return Encoding(bool(ts.is_implicit_VR), bool(ts.is_little_endian))
    except (AttributeError, ValueError):  # no or an unknown transfer syntax: as it was read
        implicit, little = ds.original_encoding
        return Encoding(bool(implicit), little is not False)


@lru_cache(maxsize=256)
def _method_codes(
    opts: frozenset[DeidOption], masked: bool, enc: Encoding
) -> tuple[dict[BaseTag, Element], ...]:
    """The items of De-identification Method Code Sequence (CID 7050), encoded once."""
    codes = [("113100", "Basic Application Confidentiality Profile")]
    codes += [(value, meaning) for opt, value, meaning in _OPTION_CODES if opt in opts]
    codes += [_CLEAN_PIXEL_DATA] if masked else []
    items = []
    for value, meaning in codes:
        item: dict[BaseTag, Element] = {}
        for kw, text in (
            ("CodeValue", value),
            ("CodingSchemeDesignator", "DCM"),
            ("CodeMeaning", meaning),
        ):
            tag = _tag(kw)
            item[tag] = encode(tag, dictionary_VR(tag), text, enc)
        items.append(item)
    return tuple(items)


@lru_cache(maxsize=256)
def _tag(keyword: str) -> BaseTag:
    tag = tag_for_keyword(keyword)
    if tag is None:
        raise KeyError(keyword)
    return BaseTag(tag)
