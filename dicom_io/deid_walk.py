"""The recursive, table-driven walk: every element at every depth gets exactly one action.

Listed attributes follow PS3.15 2024b Table E.1-1 (:mod:`dicom_io.deid_profile`); unlisted ones
are judged by VR, which is safer than the table: PN emptied, DA/DT/TM removed, UI remapped,
free text removed unless on a short allowlist of technical attributes, numbers kept. Overlays
(60xx), Original/Request Attributes and Icon Image sequences are always removed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from pydicom.datadict import keyword_for_tag
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag

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


@dataclass
class WalkContext:
    """What the walk needs: pseudonymizer, options, identity terms, the patient's pseudonym."""

    pseudo: Pseudonymizer
    options: frozenset[DeidOption]
    terms: list[str]
    patient_id: str
    patient_pseudonym: str
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
    for elem in src:
        tag = elem.tag
        if tag.group in (0x0000, 0x0002) or tag.element == 0:  # commands, meta, group lengths
            continue
        kw = keyword_for_tag(tag)
        value = _apply(_action(tag, elem, kw, ctx), tag, elem, kw, ctx)
        if value is not _DROP:
            dst.add(DataElement(tag, elem.VR, value))
    return dst


_DROP = object()


def _action(tag: BaseTag, elem: DataElement, kw: str, ctx: WalkContext) -> str:
    if kw in _ALWAYS_REMOVE or 0x6000 <= tag.group <= 0x60FF:
        return "X"
    listed = action_for(tag, ctx.options)
    return listed if listed is not None else _judge_by_vr(elem, kw)


def _judge_by_vr(elem: DataElement, kw: str) -> str:
    vr = elem.VR
    if kw in KEEP or vr in ("SQ", "UI"):
        return "U" if vr == "UI" else "K"
    if vr == "PN":
        return "Z"
    if vr == "CS":
        values = list(elem.value) if isinstance(elem.value, list | MultiValue) else [elem.value]
        return "K" if all(_CS.fullmatch(str(v or "")) for v in values) else "X"
    if vr in NUMERIC_VRS or vr in ("DS", "IS"):
        return "K"
    if vr in BINARY_VRS:
        return "K" if kw and vr != "UN" else "X"
    return "X"  # DA, DT, TM, free text, anything unknown


def _apply(action: str, tag: BaseTag, elem: DataElement, kw: str, ctx: WalkContext) -> Any:
    vr, value = elem.VR, elem.value
    if action == "X":
        return _DROP
    if vr == "SQ":
        if action in ("Z", "D"):
            return Sequence([])
        return Sequence([walk(item, ctx) for item in value])
    if vr == "UI" and action in ("K", "U", "C", "D"):
        return remap_uids(value, ctx.pseudo)  # UIDs are never retained (no Retain UIDs option)
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
        return _apply(basic or "X", tag, elem, kw, ctx)
    return dummy_value(vr, value, ctx.pseudo)  # U on a non-UI value: replace it


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
