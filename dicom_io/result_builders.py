"""AI results as DICOM objects for the hospital PACS, following the IHE AI Results (AIR) profile.

Two builders, both on highdicom's IOD and template classes (no tag-by-tag assembly):

* ``classification_sr``: image-level findings (finding code, Present/Absent, probability) as a
  Comprehensive 3D SR with a TID 1500 Measurement Report;
* ``nodule_seg_and_sr``: a binary DICOM SEG of pulmonary nodules and a TID 1500 SR with the
  diameter, volume and centre of every nodule, referencing the SEG segment.

Every object identifies the algorithm (name, version, manufacturer and a Device UID that changes
when the model is retrained), is UNVERIFIED (and PRELIMINARY) until a radiologist verifies it,
and carries the algorithm's intended-use statement. Objects are built on whatever UIDs the
source datasets carry: at the reading center those are pseudonymous, and the edge re-identifies
the result later. Patient and study identity is copied from the sources, never invented here.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
import pydicom
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from dicom_io.sr_parts import (
    CHARSET,
    Coded,
    expected_warnings,
    fit_lo,
    language_concept,
    procedure_code,
    with_type2,
)
from dicom_io.volume import sorted_along

__all__ = [
    "AlgorithmInfo",
    "ImageFinding",
    "Nodule",
    "classification_sr",
    "nodule_seg_and_sr",
]

SR_SERIES_NUMBER = 900
SEG_SERIES_NUMBER = 910
NODULE_SR_SERIES_NUMBER = 911


# Fixed namespace for the name-based (UUID v5) device UIDs; never change it, or every deployed
# model gets a new Device UID.
_DEVICE_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:radbridge:ai-algorithm-device")
_SHA256 = re.compile(r"[0-9a-f]{64}")

# --- Codes. Value sets named where the standard gives one (PS3.16). -------------------------
_PRESENT = codes.cid241.Present  # SCT 52101004
# CID 241 "Present-Absent" uses SCT 272519000 "Absent", not 2667000 "Absent (qualifier value)":
# consumers match against the DICOM value set, so we use the code it lists.
_ABSENT = codes.cid241.Absent
_PROBABILITY = codes.DCM.Probability  # DCM 122157
_NO_UNITS = codes.UCUM.NoUnits  # UCUM "1" ("no units", CID 7181): a probability is unitless.
_DIAMETER = codes.SCT.Diameter  # SCT 81827009 (CID 7470)
_VOLUME = codes.SCT.Volume  # SCT 118565006 (CID 7472)
_MM = codes.UCUM.Millimeter
_MM3 = codes.UCUM.CubicMillimeter
_CENTER = codes.DCM.Center  # DCM 111010 (CID 219 "Geometry Graphical Representation")
# Segmented property: CID 7150 category "Morphologically abnormal structure" with CID 7151
# type SCT 27925004 "Nodule" and anatomic region "Lung". The clinical-finding concepts for a
# lung nodule (427359005 "Solitary nodule of lung", 786838002) are disorders, not morphologic
# abnormalities, and are in no DICOM segmentation value set, so they would contradict the
# category; "Nodule" + region "Lung" is the post-coordinated form the standard lists.
_ABNORMAL_STRUCTURE = codes.cid7150.MorphologicallyAbnormalStructure  # SCT 49755003
_NODULE = codes.cid7151.Nodule  # SCT 27925004
_LUNG = codes.SCT.Lung  # SCT 39607008
_AI_FAMILY = codes.cid7162.ArtificialIntelligence  # DCM 123110
_FINDING = codes.DCM.Finding  # DCM 121071
_COMMENT = codes.DCM.Comment  # DCM 121106
# TID 1500 row 12, "Qualitative Evaluations" (not in pydicom's code dictionary).
_QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")
_REPORT_LANGUAGE = Code("en-US", "RFC5646", "English (United States)")


@dataclass(frozen=True)
class AlgorithmInfo:
    """The model that produced a result (TID 4019, TID 1004 device observer, SEG algorithm)."""

    name: str
    version: str
    manufacturer: str
    model_sha256: str
    intended_use: str

    def __post_init__(self) -> None:
        for label in ("name", "version", "manufacturer", "intended_use"):
            if not str(getattr(self, label)).strip():
                raise ValueError(f"AlgorithmInfo.{label} must not be empty")
        sha = self.model_sha256.strip().lower()
        if not _SHA256.fullmatch(sha):
            raise ValueError("AlgorithmInfo.model_sha256 must be 64 hexadecimal digits")
        object.__setattr__(self, "model_sha256", sha)

    @property
    def device_uid(self) -> str:
        """Device UID under 2.25: a UUID v5 of name, version and weights digest.

        Deterministic, so every run of the same model reports the same device; any change of
        the weights (retraining), the name or the version gives a new device.
        """
        key = "\x1f".join((self.name, self.version, self.model_sha256))
        return str(hd.UID.from_uuid(str(uuid.uuid5(_DEVICE_NAMESPACE, key))))


@dataclass(frozen=True)
class ImageFinding:
    """One image-level classification output; ``display`` maps language tags to names."""

    sop_instance_uid: str
    finding: Coded
    probability: float
    threshold: float
    present: bool
    display: dict[str, str]

    def __post_init__(self) -> None:
        for label in ("probability", "threshold"):
            v = float(getattr(self, label))
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"ImageFinding.{label} must be within [0, 1], got {v}")


@dataclass(frozen=True)
class Nodule:
    """One nodule of the SEG: centre in patient coordinates (mm), size, and its segment."""

    centre_mm: tuple[float, float, float]
    diameter_mm: float
    volume_mm3: float
    segment_number: int

    def __post_init__(self) -> None:
        if len(self.centre_mm) != 3:
            raise ValueError("Nodule.centre_mm must have three coordinates (x, y, z)")
        if self.diameter_mm <= 0 or self.volume_mm3 <= 0:
            raise ValueError("Nodule diameter and volume must be positive")
        if self.segment_number < 1:
            raise ValueError("Nodule.segment_number starts at 1")


def classification_sr(
    sources: Sequence[pydicom.Dataset],
    findings: Sequence[ImageFinding],
    algo: AlgorithmInfo,
    *,
    series_number: int = SR_SERIES_NUMBER,
    instance_number: int = 1,
    version: int = 1,
    previous: pydicom.Dataset | None = None,
) -> pydicom.Dataset:
    """TID 1500 Comprehensive 3D SR with one image-level group (TID 1501) per finding.

    Each group holds: tracking identifier and UID, the finding code as "Finding", a qualitative
    evaluation (finding -> Present/Absent), the probability as a TID 300 measurement (unit "1")
    with its algorithm identification (threshold as parameter) and source image, and the
    finding's display names as TEXT evaluations, one per language, each with its TID 1204
    language. ``previous`` (an earlier version for the same study) goes in the Predecessor
    Documents Sequence; the new object always gets new Series/SOP Instance UIDs.
    """
    if not sources:
        raise ValueError("classification_sr needs the source images")
    if not findings:
        raise ValueError("classification_sr needs at least one finding")
    sources = [with_type2(ds) for ds in sources]
    _check_one_study(sources)
    _check_version(sources, version, previous)
    by_uid = {str(ds.SOPInstanceUID): ds for ds in sources}
    groups = []
    for number, finding in enumerate(findings, start=1):
        source = by_uid.get(str(finding.sop_instance_uid))
        if source is None:
            raise ValueError(f"finding {number} refers to an image not among the sources")
        concept = finding.finding.concept()
        probability = hd.sr.Measurement(
            name=_PROBABILITY,
            value=float(finding.probability),
            unit=_NO_UNITS,
            algorithm_id=_algorithm_id(algo, [f"decision threshold={finding.threshold:g}"]),
            referenced_images=[hd.sr.SourceImageForMeasurement.from_source_image(source)],
        )
        group = hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=hd.UID(), identifier=f"AI finding {number}: {finding.finding.meaning}"
            ),
            finding_type=concept,
            algorithm_id=_algorithm_id(algo),
            measurements=[probability],
            qualitative_evaluations=[
                hd.sr.QualitativeEvaluation(
                    name=concept, value=_PRESENT if finding.present else _ABSENT
                )
            ],
            source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(source)],
        )
        _add_display_names(group, finding.display)
        groups.append(group)
    report = _report(algo, sources[0], groups)
    return _sr(
        sources,
        report,
        algo,
        series_number=series_number,
        instance_number=instance_number,
        version=version,
        previous=previous,
    )


def nodule_seg_and_sr(
    sources: Sequence[pydicom.Dataset],
    mask: np.ndarray,
    nodules: Sequence[Nodule],
    algo: AlgorithmInfo,
    *,
    version: int = 1,
    previous_sr: pydicom.Dataset | None = None,
) -> tuple[pydicom.Dataset, pydicom.Dataset]:
    """A binary SEG with one "Pulmonary nodule" segment, and a TID 1500 SR about each nodule.

    ``mask`` is (frames, rows, columns), frame i belonging to the i-th source once the sources
    are sorted by position along the slice normal. Per nodule the SR holds two volumetric ROI
    groups (TID 1411) sharing one tracking identifier and UID: one references the SEG segment
    and holds diameter (mm) and volume (mm3); one holds the centre as a SCOORD3D POINT in the
    sources' frame of reference, geometric purpose "Center". TID 1411 takes exactly one ROI
    reference per group, and highdicom refuses coordinates on measurements inside ROI groups,
    so the centre cannot sit in the segment's group; the shared tracking UID is how TID 1500
    ties groups about one finding together, and a viewer can navigate to the point.
    Returns ``(seg, sr)``.
    """
    ordered = _sorted_by_position([with_type2(ds) for ds in sources])
    _check_one_study(ordered)
    _check_version(ordered, version, previous_sr)
    pixels = np.asarray(mask)
    rows, columns = int(ordered[0].Rows), int(ordered[0].Columns)
    if pixels.shape != (len(ordered), rows, columns):
        raise ValueError(
            f"mask shape {pixels.shape} does not match the sources "
            f"({len(ordered)}, {rows}, {columns})"
        )
    if pixels.dtype != np.bool_:
        if not np.isin(pixels, (0, 1)).all():
            raise ValueError("mask must be binary (bool or 0/1)")
        pixels = pixels.astype(bool)
    if not nodules:
        raise ValueError("nodule_seg_and_sr needs at least one nodule")
    for nodule in nodules:
        if nodule.segment_number != 1:
            raise ValueError("the SEG has one segment (1); every nodule must reference it")

    segment = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label="Pulmonary nodule",
        segmented_property_category=_ABNORMAL_STRUCTURE,
        segmented_property_type=_NODULE,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name=algo.name,
            family=_AI_FAMILY,
            version=algo.version,
            source=algo.manufacturer,
        ),
        tracking_uid=hd.UID(),
        tracking_id="AI pulmonary nodules",
        anatomic_regions=[_LUNG],
    )
    with expected_warnings():
        seg = hd.seg.Segmentation(
            source_images=ordered,
            pixel_array=pixels,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=[segment],
            series_instance_uid=hd.UID(),
            series_number=SEG_SERIES_NUMBER,
            sop_instance_uid=hd.UID(),
            instance_number=version,
            manufacturer=algo.manufacturer,
            manufacturer_model_name=algo.name,
            software_versions=algo.version,
            # Enhanced General Equipment has no Device UID attribute; the serial number is the
            # closest, and the Device UID is what tells one trained model from another.
            device_serial_number=algo.device_uid,
            # The SEG IOD has no Verification Flag: its unverified status (and the intended
            # use) is stated in Content Label/Description and Series Description, which PACS
            # viewers show in the series list and overlay legend; the companion SR carries the
            # formal VerificationFlag UNVERIFIED.
            content_label="AI_RESULT",
            content_description=fit_lo(f"UNVERIFIED AI result: {algo.intended_use}"),
            series_description=_series_description(version, algo),
            specific_character_set=CHARSET,
        )

    series = hd.sr.SourceSeriesForSegmentation(str(ordered[0].SeriesInstanceUID))
    frame_of_reference = str(ordered[0].FrameOfReferenceUID)
    groups: list[hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations] = []
    for number, nodule in enumerate(nodules, start=1):
        tracking_uid, label = hd.UID(), f"AI nodule {number}"
        groups.append(
            hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(uid=tracking_uid, identifier=label),
                referenced_segment=hd.sr.ReferencedSegment(
                    sop_class_uid=str(seg.SOPClassUID),
                    sop_instance_uid=str(seg.SOPInstanceUID),
                    segment_number=nodule.segment_number,
                    source_series=series,
                ),
                finding_category=_ABNORMAL_STRUCTURE,
                finding_type=_NODULE,
                finding_sites=[hd.sr.FindingSite(anatomic_location=_LUNG)],
                algorithm_id=_algorithm_id(algo),
                measurements=[
                    hd.sr.Measurement(name=_DIAMETER, value=float(nodule.diameter_mm), unit=_MM),
                    hd.sr.Measurement(name=_VOLUME, value=float(nodule.volume_mm3), unit=_MM3),
                ],
            )
        )
        groups.append(
            hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(uid=tracking_uid, identifier=label),
                referenced_volume_surface=hd.sr.VolumeSurface(
                    graphic_type=hd.sr.GraphicTypeValues3D.POINT,
                    graphic_data=np.array([nodule.centre_mm], dtype=float),
                    frame_of_reference_uid=frame_of_reference,
                    source_series=series,
                ),
                geometric_purpose=_CENTER,
                finding_category=_ABNORMAL_STRUCTURE,
                finding_type=_NODULE,
                finding_sites=[hd.sr.FindingSite(anatomic_location=_LUNG)],
                algorithm_id=_algorithm_id(algo),
            )
        )
    report = _report(algo, ordered[0], groups)
    sr = _sr(
        [*ordered, seg],
        report,
        algo,
        series_number=NODULE_SR_SERIES_NUMBER,
        instance_number=version,
        version=version,
        previous=previous_sr,
    )
    return seg, sr


# --- helpers -------------------------------------------------------------------------------


def _algorithm_id(
    algo: AlgorithmInfo, parameters: Sequence[str] | None = None
) -> hd.sr.AlgorithmIdentification:
    """TID 4019: name, version, manufacturer (and run parameters)."""
    return hd.sr.AlgorithmIdentification(
        name=algo.name,
        version=algo.version,
        manufacturer=algo.manufacturer,
        parameters=list(parameters) if parameters else None,
    )


def _report(
    algo: AlgorithmInfo,
    source: pydicom.Dataset,
    groups: Sequence[
        hd.sr.MeasurementsAndQualitativeEvaluations
        | hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
    ],
) -> hd.sr.MeasurementReport:
    """TID 1500 with the device observer, English content and the intended-use statement."""
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=algo.device_uid,
        name=algo.name,
        manufacturer_name=algo.manufacturer,
        model_name=algo.version,
    )
    context = hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device, observer_identifying_attributes=device
        )
    )
    report = hd.sr.MeasurementReport(
        observation_context=context,
        procedure_reported=procedure_code(source),
        imaging_measurements=list(groups),
        language_of_content_item_and_descendants=hd.sr.LanguageOfContentItemAndDescendants(
            hd.sr.CodedConcept.from_code(_REPORT_LANGUAGE)
        ),
    )
    # The intended use ("demo model — not for diagnostic use") as a TEXT item of the report's
    # "Qualitative Evaluations" container (TID 1500 rows 12 and 14), which highdicom's template
    # class does not offer. SR viewers render the whole content tree, so the statement is
    # shown with the findings, in full; the Series Description carries it too (the series
    # list is what a PACS shows before anyone opens the report), but is capped at 64 chars.
    statement = hd.sr.TextContentItem(
        name=_COMMENT,
        value=algo.intended_use,
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )
    evaluations = hd.sr.ContainerContentItem(
        name=_QUALITATIVE_EVALUATIONS,
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )
    evaluations.ContentSequence = hd.sr.ContentSequence([statement])
    report[0].ContentSequence.append(evaluations)
    return report


def _add_display_names(
    group: hd.sr.MeasurementsAndQualitativeEvaluations, display: dict[str, str]
) -> None:
    """Display names as TEXT qualitative evaluations (TID 1501 row 12), one per language.

    The finding's CodeMeaning stays the coding scheme's English meaning (a code's meaning is
    not ours to translate, and the report language is English); each translated name is a
    TEXT item "Finding" whose TID 1204 language modifier names its language, which SR viewers
    show next to the coded finding. highdicom's group class only takes CODE evaluations, so the
    items (highdicom content items) are appended to the group's container.
    """
    container = group[0]
    for tag, text in display.items():
        if not text:
            continue
        item = hd.sr.TextContentItem(
            name=_FINDING,
            value=text,
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        )
        item.ContentSequence = hd.sr.LanguageOfContentItemAndDescendants(language_concept(tag))
        container.ContentSequence.append(item)


def _sr(
    evidence: Sequence[pydicom.Dataset],
    report: hd.sr.MeasurementReport,
    algo: AlgorithmInfo,
    *,
    series_number: int,
    instance_number: int,
    version: int,
    previous: pydicom.Dataset | None,
) -> pydicom.Dataset:
    with expected_warnings():
        return hd.sr.Comprehensive3DSR(
            evidence=list(evidence),
            content=report,
            series_instance_uid=hd.UID(),
            series_number=series_number,
            sop_instance_uid=hd.UID(),
            instance_number=instance_number,
            manufacturer=algo.manufacturer,
            is_complete=True,
            is_final=False,
            is_verified=False,
            previous_versions=[previous] if previous is not None else None,
            series_description=_series_description(version, algo),
            manufacturer_model_name=algo.name,
            software_versions=algo.version,
            device_serial_number=algo.device_uid,
            specific_character_set=CHARSET,
        )


def _series_description(version: int, algo: AlgorithmInfo) -> str:
    return fit_lo(f"AI RESULT UNVERIFIED v{version}: {algo.intended_use}")


def _check_one_study(sources: Sequence[pydicom.Dataset]) -> None:
    studies = {str(ds.StudyInstanceUID) for ds in sources}
    if len(studies) != 1:
        raise ValueError(f"sources must belong to one study, got {len(studies)}")


def _check_version(
    sources: Sequence[pydicom.Dataset], version: int, previous: pydicom.Dataset | None
) -> None:
    if version < 1:
        raise ValueError("version starts at 1")
    if previous is None:
        return
    if version < 2:
        raise ValueError("a result that replaces a previous one must have version >= 2")
    if str(previous.get("Modality", "")) != "SR":
        raise ValueError("the previous version must be an SR")
    if str(previous.StudyInstanceUID) != str(sources[0].StudyInstanceUID):
        raise ValueError("the previous version belongs to another study")


def _sorted_by_position(sources: Sequence[pydicom.Dataset]) -> list[pydicom.Dataset]:
    """Single-frame slices of one series and frame of reference, sorted along the normal."""
    if not sources:
        raise ValueError("nodule_seg_and_sr needs the source images")
    for keyword in ("SeriesInstanceUID", "FrameOfReferenceUID", "ImageOrientationPatient"):
        values = {str(ds.get(keyword)) for ds in sources}
        if len(values) != 1 or "None" in values:
            raise ValueError(f"sources must share one {keyword}")
    orientation = np.asarray(sources[0].ImageOrientationPatient, dtype=float)
    return sorted_along(sources, np.cross(orientation[:3], orientation[3:]))
