"""Spine de-identification: an allowlist stricter than the PS3.15 Basic Profile.

Everything not on the allowlist is removed, private tags included; UIDs are remapped with keyed
pseudonyms; patient identity, dates, times and free text are removed or replaced. The full
table-driven PS3.15 engine (Table E.1-1, options, Clean Descriptors) replaces this in issue 4.
Before returning, the output is checked for any original identifying value; a hit raises.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from pydicom.datadict import keyword_for_tag
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID

from dicom_io.pseudonyms import Pseudonymizer
from radbridge.agreements import DeidOption
from radbridge.errors import DeidentificationError

__all__ = ["DEID_METHOD", "DeidOutcome", "deidentify"]

DEID_METHOD = "radbridge allowlist, superset of PS3.15 Basic Profile"

# Attributes kept verbatim: image geometry and pixel description, coded acquisition context.
_KEEP = frozenset(
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
# Sequences kept (their items are filtered with the same rules).
_KEEP_SEQ = frozenset(
    [
        "AnatomicRegionSequence",
        "ViewCodeSequence",
        "ReferencedImageSequence",
        "SourceImageSequence",
        "DerivationCodeSequence",
        "ReferencedSeriesSequence",
        "ReferencedInstanceSequence",
    ]
)
# UIDs of the dataset's own identity and references: remapped, never dropped.
_NON_REMAPPED_UIDS = frozenset({"SOPClassUID", "ReferencedSOPClassUID", "SOPClassesInStudy"})
_CHARACTERISTICS = ("PatientSex", "PatientAge", "PatientSize", "PatientWeight")


@dataclass
class DeidOutcome:
    dataset: Dataset
    pseudonyms: dict[tuple[str, str], str] = field(default_factory=dict)


def deidentify(
    ds: Dataset, pseudo: Pseudonymizer, options: Iterable[DeidOption] = ()
) -> DeidOutcome:
    """Return a de-identified copy of ``ds`` (with new file meta) and the pseudonyms issued."""
    opts = set(options)
    if str(ds.get("BurnedInAnnotation", "")).upper() == "YES":
        raise DeidentificationError("BurnedInAnnotation is YES: pixel data may show identity")
    needles = _identifying_values(ds)
    out = Dataset()
    _copy_allowed(ds, out, pseudo)

    pid = str(ds.get("PatientID", "") or "")
    patient_pseudonym = pseudo.token("patient_id", pid, "RB")
    out.PatientID = patient_pseudonym
    out.PatientName = patient_pseudonym
    out.PatientBirthDate = ""
    out.PatientSex = ""
    if DeidOption.RETAIN_PATIENT_CHARACTERISTICS in opts:
        for kw in _CHARACTERISTICS:
            if kw in ds:
                setattr(out, kw, ds.data_element(kw).value)  # type: ignore[union-attr]
    acc = str(ds.get("AccessionNumber", "") or "")
    out.AccessionNumber = pseudo.token("accession", acc, "A") if acc else ""
    out.ReferringPhysicianName = ""
    out.StudyID = ""
    out.StudyDate = ""
    out.StudyTime = ""
    if "ContentDate" in ds:  # Type 1 in some IODs (e.g. DX): a dummy value, not the date
        out.ContentDate = "19000101"
        out.ContentTime = "000000"
    out.SpecificCharacterSet = "ISO_IR 192"
    out.PatientIdentityRemoved = "YES"
    out.LongitudinalTemporalInformationModified = "REMOVED"
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


def _copy_allowed(src: Dataset, dst: Dataset, pseudo: Pseudonymizer) -> None:
    for elem in src:
        if elem.tag.is_private or elem.tag.group == 0x0002:
            continue
        kw = keyword_for_tag(elem.tag)
        if elem.VR == "SQ":
            if kw in _KEEP_SEQ:
                items = []
                for item in elem.value:
                    new = Dataset()
                    _copy_allowed(item, new, pseudo)
                    items.append(new)
                dst.add_new(elem.tag, "SQ", Sequence(items))
            continue
        if elem.VR == "UI" and kw not in _NON_REMAPPED_UIDS:
            dst.add_new(elem.tag, "UI", _remap_uids(elem.value, pseudo))
            continue
        if kw in _KEEP:
            dst.add(elem)


def _remap_uids(value: object, pseudo: Pseudonymizer) -> object:
    if value is None or value == "":
        return value
    if isinstance(value, str):
        return _remap_one(value, pseudo)
    return [_remap_one(str(v), pseudo) for v in value]  # type: ignore[attr-defined]


def _remap_one(uid: str, pseudo: Pseudonymizer) -> str:
    if UID(uid).name != uid:  # a UID defined by the standard (SOP class, syntax, ...): keep
        return uid
    return pseudo.uid(uid)


def _method_codes(opts: set[DeidOption]) -> list[Dataset]:
    codes = [("113100", "Basic Application Confidentiality Profile")]
    if DeidOption.RETAIN_PATIENT_CHARACTERISTICS in opts:
        codes.append(("113108", "Retain Patient Characteristics Option"))
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
        if elem.VR == "UI" and elem.value and keyword_for_tag(elem.tag) not in _NON_REMAPPED_UIDS:
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
