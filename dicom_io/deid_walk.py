"""The recursive, table-driven walk: every element at every depth gets exactly one action.

Listed attributes follow PS3.15 2024b Table E.1-1 (:mod:`dicom_io.deid_profile`); unlisted ones
are judged by VR, which is safer than the table: PN emptied, DA/DT/TM removed, UI remapped,
free text removed unless on a short allowlist of technical attributes, numbers kept. Overlays
(60xx), Original/Request Attributes and Icon Image sequences are always removed (Clean Graphics
cannot prove an overlay bitmap free of text, so its ``C`` falls back to the basic ``X``).

Sequences follow PS3.15 E.1 (``K`` keeps a sequence and cleans its items): ``X`` removes it,
``Z`` leaves it with no items, ``K``/``U`` walk its items as usual, ``D`` keeps its items with
dummy values (the *dummy* scope: unlisted text, names, dates and codes get dummies of their VR;
UIDs are remapped; coded strings and numbers stay, so the items keep their structure) and ``C``
(Clean Structured Content, Clean Graphics, Clean Descriptors) keeps its items cleaned (the
*clean* scope: unlisted free text is cleaned, dates shifted or given dummies, names given
dummies). Within either scope listed attributes still follow the table. Private attributes go,
unless Retain Safe Private is selected and they are on the safe-list (:mod:`dicom_io.deid_private`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from pydicom.datadict import keyword_for_tag
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag

from dicom_io.deid_private import retained_private
from dicom_io.deid_profile import action_for
from dicom_io.deid_text import clean_text
from dicom_io.deid_values import (
    BINARY_VRS,
    NUMERIC_VRS,
    date_offset_days,
    dummy_value,
    empty_value,
    remap_uids,
    shift_dates,
)
from dicom_io.pseudonyms import Pseudonymizer
from radbridge.agreements import DeidOption

__all__ = ["KEEP", "NON_REMAPPED_UIDS", "WalkContext", "walk"]

# Unlisted attributes kept verbatim: image geometry and pixel description, coded context.
KEEP = frozenset(
    [
        "SOPClassUID",
        "Modality",
        "Manufacturer",  # device make and model: not in Table E.1-1, Type 1 in some sequences
        "ManufacturerModelName",
        "BodyPartExamined",
        "ViewPosition",
        "ImageType",
        "Laterality",
        "ImageLaterality",
        "PatientOrientation",
        "SeriesNumber",
        "InstanceNumber",
        "AcquisitionNumber",
        "SamplesPerPixel",
        "PhotometricInterpretation",
        "Rows",
        "Columns",
        "BitsAllocated",
        "BitsStored",
        "HighBit",
        "PixelRepresentation",
        "PlanarConfiguration",
        "NumberOfFrames",
        "PixelData",
        "FloatPixelData",
        "DoubleFloatPixelData",
        "PixelSpacing",
        "ImagerPixelSpacing",
        "PixelAspectRatio",
        "SliceThickness",
        "SpacingBetweenSlices",
        "ImagePositionPatient",
        "ImageOrientationPatient",
        "SliceLocation",
        "RescaleIntercept",
        "RescaleSlope",
        "RescaleType",
        "WindowCenter",
        "WindowWidth",
        "VOILUTFunction",
        "PresentationLUTShape",
        "LossyImageCompression",
        "LossyImageCompressionRatio",
        "LossyImageCompressionMethod",
        "BurnedInAnnotation",
        "RecognizableVisualFeatures",
        "PixelIntensityRelationship",
        "PixelIntensityRelationshipSign",
        "KVP",
        "ExposureTime",
        "XRayTubeCurrent",
        "Exposure",
        "DistanceSourceToDetector",
        "DistanceSourceToPatient",
        "EstimatedRadiographicMagnificationFactor",
        "FieldOfViewShape",
        "FieldOfViewDimensions",
        "ConvolutionKernel",
        "ReconstructionDiameter",
        "SmallestImagePixelValue",
        "LargestImagePixelValue",
        "SOPClassesInStudy",
        "CodeValue",
        "CodingSchemeDesignator",
        "CodingSchemeVersion",
        "CodeMeaning",
        "ReferencedSOPClassUID",
        "ReferencedFrameNumber",
    ]
)
# UIDs that name standard things (SOP classes): never treated as identifying.
NON_REMAPPED_UIDS = frozenset({"SOPClassUID", "ReferencedSOPClassUID", "SOPClassesInStudy"})
_ALWAYS_REMOVE = frozenset(
    {"OriginalAttributesSequence", "RequestAttributesSequence", "IconImageSequence"}
)
_CS = re.compile(r"[A-Z0-9_ ]{0,16}")
_CLEANABLE = frozenset({"LO", "SH", "LT", "ST", "UT", "UC", "AE", "PN", "CS"})
_FREE_TEXT = frozenset({"LO", "SH", "LT", "ST", "UT", "UC"})
Scope = Literal["plain", "dummy", "clean"]


@dataclass
class WalkContext:
    """What the walk needs: pseudonymizer, options, identity terms, the patient's pseudonym."""

    pseudo: Pseudonymizer
    options: frozenset[DeidOption]
    terms: list[str]
    patient_id: str
    patient_pseudonym: str
    scope: Scope = "plain"  # inside a sequence whose action was D ("dummy") or C ("clean")
    _offset: int | None = field(default=None, repr=False)

    @property
    def offset(self) -> int:
        """The patient's keyed date offset in days (computed once, on first use)."""
        if self._offset is None:
            self._offset = date_offset_days(self.pseudo, self.patient_id)
        return self._offset

    @property
    def longitudinal(self) -> bool:
        """Whether Retain Longitudinal Temporal Information with Modified Dates is selected."""
        return DeidOption.RETAIN_LONGITUDINAL_MODIFIED_DATES in self.options


def walk(src: Dataset, ctx: WalkContext) -> Dataset:
    """Return a new dataset holding the de-identified elements of ``src``, recursively."""
    dst = Dataset()
    safe = _safe_private(src, ctx)
    for elem in src:
        tag = elem.tag
        if tag.group in (0x0000, 0x0002) or tag.element == 0:  # commands, meta, group lengths
            continue
        kw = keyword_for_tag(tag)
        action = _action(tag, elem, kw, ctx)
        if tag.is_private:  # the table's private row: X, or C with Retain Safe Private
            action = "K" if action == "C" and int(tag) in safe else "X"
        value = _apply(action, tag, elem, kw, ctx)
        if value is not _DROP:
            dst.add(DataElement(tag, elem.VR, value))
    return dst


_DROP = object()


def _safe_private(src: Dataset, ctx: WalkContext) -> frozenset[int]:
    if DeidOption.RETAIN_SAFE_PRIVATE not in ctx.options:
        return frozenset()
    return retained_private(src)


def _action(tag: BaseTag, elem: DataElement, kw: str, ctx: WalkContext) -> str:
    if kw in _ALWAYS_REMOVE or 0x6000 <= tag.group <= 0x60FF:
        return "X"
    listed = action_for(tag, ctx.options)
    return listed if listed is not None else _judge_by_vr(elem, kw, ctx.scope)


def _judge_by_vr(elem: DataElement, kw: str, scope: Scope) -> str:
    vr = elem.VR
    if vr in ("SQ", "UI"):
        return "U" if vr == "UI" else "K"
    if vr == "CS":
        values = list(elem.value) if isinstance(elem.value, list | MultiValue) else [elem.value]
        if all(_CS.fullmatch(str(v or "")) for v in values):
            return "K"  # a code, not text: enumerated values keep the items valid in every scope
    if vr in NUMERIC_VRS or vr in ("DS", "IS"):
        return "K"
    if scope == "dummy":  # D on the enclosing sequence: nothing of the original text stays
        return "X" if vr in BINARY_VRS else "D"
    if kw in KEEP:
        return "K"
    if scope == "clean":
        if vr in _FREE_TEXT or vr in ("DA", "DT", "TM"):
            return "C"
        if vr == "PN":
            return "D"
        return "X"
    if vr == "PN":
        return "Z"
    if vr in BINARY_VRS:
        return "K" if kw and vr != "UN" else "X"
    return "X"  # DA, DT, TM, free text, non-code CS, anything unknown


def _apply(action: str, tag: BaseTag, elem: DataElement, kw: str, ctx: WalkContext) -> Any:
    vr, value = elem.VR, elem.value
    if action == "X":
        return _DROP
    if vr == "SQ":
        return _sequence(action, value, ctx)
    if vr == "UI" and action in ("K", "U", "C", "D"):
        return remap_uids(value, ctx.pseudo)  # kept as-is only by a Retain UIDs pseudonymizer
    if action == "Z":
        return empty_value(vr)
    if action == "D":
        if kw == "PatientName":
            return ctx.patient_pseudonym
        return dummy_value(vr, value, ctx.pseudo)
    if action == "K":
        return value
    if action == "C":
        cleaned = _clean(vr, value, ctx)
        if cleaned is not _DROP:
            return cleaned
        basic = action_for(tag, ())
        if basic is None:  # unlisted: removed, or a dummy inside a cleaned sequence's items
            basic = "X" if ctx.scope == "plain" else "D"
        return _apply(basic, tag, elem, kw, ctx)
    return dummy_value(vr, value, ctx.pseudo)  # U on a non-UI value: replace it


def _sequence(action: str, items: Any, ctx: WalkContext) -> Sequence:
    """PS3.15 E.1 on a sequence: Z empties it; D and C keep its items, de-identified."""
    if action == "Z":
        return Sequence([])
    scope: Scope = "dummy" if action == "D" else "clean" if action == "C" else ctx.scope
    if ctx.scope == "dummy" and scope == "clean":
        scope = "dummy"  # a cleaned sequence inside dummy items is dummied as well
    inner = ctx if scope == ctx.scope else replace(ctx, scope=scope)
    return Sequence([walk(item, inner) for item in items])


def _clean(vr: str, value: Any, ctx: WalkContext) -> Any:
    if vr in ("DA", "DT"):
        return shift_dates(vr, value, ctx.offset) if ctx.longitudinal else _DROP
    if vr == "TM":
        return value if ctx.longitudinal else _DROP
    if vr not in _CLEANABLE or value is None:
        return _DROP
    multi = isinstance(value, list | MultiValue)
    values = list(value) if multi else [value]
    out = []
    for v in values:
        cleaned = clean_text(str(v), ctx.terms)
        if cleaned is None:
            return _DROP
        out.append(cleaned)
    return out if multi else out[0]
