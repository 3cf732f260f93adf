"""The recursive, table-driven walk: every element at every depth gets exactly one action.

Listed attributes follow PS3.15 2024b Table E.1-1 (:mod:`dicom_io.deid.profile`); unlisted ones
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
unless Retain Safe Private is selected and they are on the safe-list (:mod:`dicom_io.deid.private`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Any, Literal

from pydicom.datadict import keyword_for_tag
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag

from dicom_io.deid.private import retained_private
from dicom_io.deid.profile import action_for
from dicom_io.deid.raw import (
    EXPLICIT_LITTLE,
    Element,
    Encoding,
    can_pass,
    encode,
    new_dataset,
    raw_elements,
    resolve,
    strings,
)
from dicom_io.deid.text import clean_text, identity_terms
from dicom_io.deid.values import (
    BINARY_VRS,
    NUMERIC_VRS,
    date_offset_days,
    dummy_value,
    empty_value,
    remap_uid,
    shift_dates,
)
from dicom_io.pseudonyms import Pseudonymizer
from radbridge.agreements import DeidOption

__all__ = ["KEEP", "NON_REMAPPED_UIDS", "WalkContext", "walk", "walk_items"]

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
    source: Dataset  # the instance: its identity terms are read from it when text is cleaned
    patient_id: str
    patient_pseudonym: str
    encoding: Encoding = EXPLICIT_LITTLE  # the output's
    scope: Scope = "plain"  # inside a sequence whose action was D ("dummy") or C ("clean")
    _offset: int | None = field(default=None, repr=False)
    _terms: list[str] | None = field(default=None, repr=False)

    @property
    def terms(self) -> list[str]:
        """The instance's identifying values for Clean Descriptors (computed on first use)."""
        if self._terms is None:
            self._terms = identity_terms(self.source)
        return self._terms

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
    """Return a new dataset holding the de-identified elements of ``src``, recursively.

    Elements are read and written raw where possible (:mod:`dicom_io.deid.raw`); the result is
    a UTF-8 dataset in ``ctx.encoding``.
    """
    return new_dataset(walk_items(src, ctx), ctx.encoding)


def walk_items(src: Dataset, ctx: WalkContext) -> dict[BaseTag, Element]:
    """The de-identified elements of ``src`` by tag (see :func:`walk`)."""
    out: dict[BaseTag, Element] = {}
    safe = _safe_private(src, ctx)
    for raw in raw_elements(src):
        tag = raw.tag
        t = int(tag)
        if t >> 16 in (0x0000, 0x0002) or not t & 0xFFFF:  # commands, meta, group lengths
            continue
        if (t >> 16) & 1:  # the table's private row: X, or C with Retain Safe Private
            if t not in safe or _plan(t, "UN", ctx.scope, ctx.options)[0] != "C":
                continue
            kept = src[tag]
            out[tag] = DataElement(tag, kept.VR, kept.value)
            continue
        elem, vr = resolve(src, raw)
        action, kw = _plan(t, vr, ctx.scope, ctx.options)
        if action is None:  # CS: a code or text, by its value
            action = _judge_cs(strings(src, elem, vr), kw, ctx.scope)
        if action == "X":
            continue
        value = _apply(action, src, elem, vr, kw, ctx)
        if value is not _DROP:
            out[tag] = value
    return out


_DROP: Any = object()


def _safe_private(src: Dataset, ctx: WalkContext) -> frozenset[int]:
    if DeidOption.RETAIN_SAFE_PRIVATE not in ctx.options:
        return frozenset()
    return retained_private(src)


@lru_cache(maxsize=16384)
def _plan(t: int, vr: str, scope: Scope, options: frozenset[DeidOption]) -> tuple[str | None, str]:
    """The action for a tag and VR in a scope, and its keyword; ``None`` if the value decides."""
    tag = BaseTag(t)
    kw = keyword_for_tag(tag)
    if kw in _ALWAYS_REMOVE or 0x6000 <= tag.group <= 0x60FF:
        return "X", kw
    listed = action_for(tag, options)
    if listed is not None:
        return listed, kw
    if vr == "CS":
        return None, kw
    return _judge_by_vr(vr, kw, scope), kw


def _judge_cs(values: list[str], kw: str, scope: Scope) -> str:
    if all(_CS.fullmatch(v) for v in values):
        return "K"  # a code, not text: enumerated values keep the items valid in every scope
    return _judge_by_vr("CS", kw, scope)


def _judge_by_vr(vr: str, kw: str, scope: Scope) -> str:
    if vr in ("SQ", "UI"):
        return "U" if vr == "UI" else "K"
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


def _apply(action: str, src: Dataset, elem: Element, vr: str, kw: str, ctx: WalkContext) -> Any:
    tag = elem.tag
    if action == "X":
        return _DROP
    if vr == "SQ":
        return DataElement(tag, vr, _sequence(action, src[tag].value, ctx))
    enc = ctx.encoding
    if vr == "UI" and action in ("K", "U", "C", "D"):
        # kept as-is only by a Retain UIDs pseudonymizer
        return encode(tag, vr, [remap_uid(u, ctx.pseudo) for u in strings(src, elem, vr)], enc)
    if action == "Z":
        return _constant(tag, vr, "Z", ctx)
    if action == "K" and can_pass(elem, vr, enc):
        return elem  # the same bytes: pixel data, numbers, plain-ASCII codes and text
    if action == "D" or (action == "U" and vr != "UI"):
        if kw == "PatientName":
            return encode(tag, vr, ctx.patient_pseudonym, enc)
        return _constant(tag, vr, "D", ctx)  # a dummy never depends on the original
    if isinstance(elem, RawDataElement):
        elem = src[tag]
    value = elem.value
    if action == "K":  # encapsulated pixel data keeps its undefined length
        return encode(tag, vr, value, enc, undefined_length=elem.is_undefined_length)
    cleaned = _clean(vr, value, ctx)  # C
    if cleaned is not _DROP:
        return encode(tag, vr, cleaned, enc)
    basic = action_for(tag, ())
    if basic is None:  # unlisted: removed, or a dummy inside a cleaned sequence's items
        basic = "X" if ctx.scope == "plain" else "D"
    return _apply(basic, src, elem, vr, kw, ctx)


_CONSTANTS: dict[tuple[BaseTag, str, str, Encoding], RawDataElement] = {}


def _constant(tag: BaseTag, vr: str, action: str, ctx: WalkContext) -> Element:
    """The element an empty (Z) or dummy (D) value gives; a raw element is immutable, so one
    serves every instance."""
    enc = ctx.encoding
    key = (tag, vr, action, enc)
    hit = _CONSTANTS.get(key)
    if hit is not None:
        return hit
    # never a UI here (the walk remaps UIDs first), so the pseudonymizer is not used
    value = empty_value(vr) if action == "Z" else dummy_value(vr, None, ctx.pseudo)
    elem = encode(tag, vr, value, enc)
    if isinstance(elem, RawDataElement) and len(_CONSTANTS) < 8192:
        _CONSTANTS[key] = elem
    return elem


def _sequence(action: str, items: Any, ctx: WalkContext) -> Sequence:
    """PS3.15 E.1 on a sequence: Z empties it; D and C keep its items, de-identified."""
    if action == "Z":
        return Sequence([])
    scope: Scope = "dummy" if action == "D" else "clean" if action == "C" else ctx.scope
    if ctx.scope == "dummy" and scope == "clean":
        scope = "dummy"  # a cleaned sequence inside dummy items is dummied as well
    inner = ctx if scope == ctx.scope else replace(ctx, scope=scope)
    return Sequence([walk(item, inner) for item in items or ()])


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
