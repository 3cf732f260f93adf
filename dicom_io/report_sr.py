"""A radiologist's signed report as a DICOM Comprehensive SR (TID 2000 Basic Diagnostic Imaging
Report), built from highdicom's content items (highdicom has no TID 2000 template class).

The tree, in the document's language (TID 1204 at the root, mandatory in TID 2000)::

    CONTAINER (18748-4, LN, "Diagnostic imaging report")
      HAS CONCEPT MOD  Language of Content Item and Descendants = ru | zh-Hans | en
      HAS OBS CONTEXT  Observer Type = Person; Person Observer Name = the reader's identifier;
                       Person Observer's Organization Name = the reading center  (TID 1002)
      HAS CONCEPT MOD  Procedure reported = chest X-ray | CT of chest | ...
      CONTAINS CONTAINER Findings (121070)                                      (TID 2001)
        CONTAINS CODE Finding (121071) = the finding's SNOMED CT / RadLex code, its meaning
                 in the document's language
          HAS PROPERTIES  AI result assessment = accepted | rejected | modified  (AI findings)
                          reason (rejected, modified), Algorithm Name (111001),
                          Algorithm Version (111003), Tracking Unique Identifier (112040),
                          the AI SR it came from (a COMPOSITE reference)
      CONTAINS CONTAINER Impressions (121072)
        CONTAINS TEXT Impression (121073) = the reader's words, with their own TID 1204
                 language modifier where they differ from the document's
      CONTAINS CONTAINER Communication of critical results (local code)
        CONTAINS TEXT one line per recorded communication

Header: VERIFIED / FINAL / COMPLETE with the verifying observer for a final report (UNVERIFIED /
PRELIMINARY for a preliminary one); the AI result SRs and the report's previous version in the
Predecessor Documents Sequence; the images in the Current Requested Procedure Evidence
Sequence; UTF-8 (ISO_IR 192). The reader is named by an identifier and role, not by name: what
returns to the hospital carries the minimum of the reader's personal data.

The per-finding assessment follows the idea of IHE AI Results Assessment (accepted, rejected,
modified, with who, when and which AI result); its final code values were not available here,
so the assessment concepts use the local scheme ``99RADBRIDGE`` (listed in :data:`LOCAL_CODES`)
rather than guessed standard codes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

import highdicom as hd
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

__all__ = [
    "LOCAL_CODES",
    "REPORT_SERIES_NUMBER",
    "AIAssessment",
    "ReportFinding",
    "ReportSpec",
    "report_sr",
]

REPORT_SERIES_NUMBER = 920
LOCAL = "99RADBRIDGE"
LOCAL_CODES = {
    "ASSESSMENT": "AI result assessment",
    "ACCEPTED": "Accepted",
    "REJECTED": "Rejected",
    "MODIFIED": "Modified",
    "REASON": "Reason for the assessment",
    "AIRESULT": "AI result assessed",
    "CRITCOMM": "Communication of critical results",
    "COMMUNICATED": "Critical result communicated",
}
_REPORT_TITLE = Code("18748-4", "LN", "Diagnostic imaging report")
_FINDINGS = codes.DCM.Findings  # 121070
_FINDING = codes.DCM.Finding  # 121071
_IMPRESSIONS = codes.DCM.Impressions  # 121072
_IMPRESSION = codes.DCM.Impression  # 121073
_LANGUAGE = codes.DCM.LanguageOfContentItemAndDescendants  # 121049
_OBSERVER_TYPE = codes.DCM.ObserverType  # 121005
_PERSON = codes.DCM.Person  # 121006
_OBSERVER_NAME = codes.DCM.PersonObserverName  # 121008
_OBSERVER_ORG = codes.DCM.PersonObserverOrganizationName  # 121009
_PROCEDURE_REPORTED = codes.DCM.ProcedureReported  # 121058
_ALGORITHM_NAME = codes.DCM.AlgorithmName  # 111001
_ALGORITHM_VERSION = codes.DCM.AlgorithmVersion  # 111003
_TRACKING_UID = codes.DCM.TrackingUniqueIdentifier  # 112040
_R = hd.sr.RelationshipTypeValues


def _local(value: str) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(value, LOCAL, LOCAL_CODES[value])


@dataclass(frozen=True)
class AIAssessment:
    """What the reader decided about one AI finding, and which AI result it was."""

    decision: Literal["accepted", "rejected", "modified"]
    reason: str | None
    ai_sr_sop_class_uid: str
    ai_sr_sop_instance_uid: str
    tracking_uid: str | None
    model_name: str
    model_version: str


@dataclass(frozen=True)
class ReportFinding:
    """One line of the Findings section: a code with its meaning in the document's language."""

    code: Coded
    term: str
    assessment: AIAssessment | None = None  # None: the reader added it

    def __post_init__(self) -> None:
        if not self.term.strip():
            raise ValueError("ReportFinding.term must not be empty")
        a = self.assessment
        if a is not None and a.decision != "accepted" and not (a.reason or "").strip():
            raise ValueError(f"a {a.decision} AI finding needs a reason")


@dataclass(frozen=True)
class ReportSpec:
    """Everything a signed report says, in one language (``language``: ru, zh-Hans or en)."""

    language: str
    findings: Sequence[ReportFinding]
    impression: str
    impression_language: str
    observer_id: str
    observer_role: str
    organization: str
    signed_at: datetime
    final: bool
    version: int = 1
    communications: Sequence[str] = field(default_factory=tuple)
    institution: str | None = None

    def __post_init__(self) -> None:
        if self.signed_at.tzinfo is None:
            raise ValueError("ReportSpec.signed_at must carry its time zone")
        if self.version < 1:
            raise ValueError("ReportSpec.version starts at 1")
        if not self.observer_id.strip():
            raise ValueError("ReportSpec.observer_id must not be empty")


def report_sr(
    sources: Sequence[pydicom.Dataset],
    spec: ReportSpec,
    *,
    ai_results: Sequence[pydicom.Dataset] = (),
    previous: pydicom.Dataset | None = None,
    series_instance_uid: str | None = None,
    instance_number: int = 1,
) -> pydicom.Dataset:
    """The Comprehensive SR of ``spec`` about ``sources`` (the study's images, headers only
    suffice). ``ai_results``: the AI result SRs the assessments point at (evidence and
    predecessors); ``previous``: the report's previous version, for an addendum."""
    if not sources:
        raise ValueError("a report needs the images it is about")
    studies = {str(ds.StudyInstanceUID) for ds in sources}
    if len(studies) != 1:
        raise ValueError(f"the images must belong to one study, got {len(studies)}")
    root = hd.sr.ContainerContentItem(name=_REPORT_TITLE, template_id="2000")
    items: list[hd.sr.ContentItem] = [
        hd.sr.CodeContentItem(
            name=_LANGUAGE,
            value=language_concept(spec.language),
            relationship_type=_R.HAS_CONCEPT_MOD,
        ),
        hd.sr.CodeContentItem(
            name=_OBSERVER_TYPE, value=_PERSON, relationship_type=_R.HAS_OBS_CONTEXT
        ),
        hd.sr.PnameContentItem(
            name=_OBSERVER_NAME, value=_pn(spec.observer_id), relationship_type=_R.HAS_OBS_CONTEXT
        ),
        hd.sr.TextContentItem(
            name=_OBSERVER_ORG, value=spec.organization, relationship_type=_R.HAS_OBS_CONTEXT
        ),
        hd.sr.CodeContentItem(
            name=_PROCEDURE_REPORTED,
            value=procedure_code(sources[0]),
            relationship_type=_R.HAS_CONCEPT_MOD,
        ),
        _section(_FINDINGS, [_finding(f) for f in spec.findings]),
        _section(_IMPRESSIONS, [_impression(spec)]),
    ]
    if spec.communications:
        lines = [
            hd.sr.TextContentItem(
                name=_local("COMMUNICATED"), value=line, relationship_type=_R.CONTAINS
            )
            for line in spec.communications
        ]
        items.append(_section(_local("CRITCOMM"), lines))
    root.ContentSequence = hd.sr.ContentSequence(items)
    status = "FINAL" if spec.final else "PRELIMINARY"
    with expected_warnings():
        sr = hd.sr.ComprehensiveSR(
            evidence=[with_type2(ds) for ds in (*sources, *ai_results)],
            content=hd.sr.ContentSequence([root], is_root=True),
            series_instance_uid=series_instance_uid or hd.UID(),
            series_number=REPORT_SERIES_NUMBER,
            sop_instance_uid=hd.UID(),
            instance_number=instance_number,
            manufacturer="radbridge",
            is_complete=True,
            is_final=spec.final,
            is_verified=spec.final,
            verifying_observer_name=_pn(spec.observer_id) if spec.final else None,
            verifying_organization=spec.organization if spec.final else None,
            previous_versions=[*ai_results, *([previous] if previous is not None else [])] or None,
            institution_name=spec.institution,
            series_description=fit_lo(f"REPORT {status} v{spec.version} ({spec.language})"),
            specific_character_set=CHARSET,
        )
    stamp = spec.signed_at
    sr.ContentDate = stamp.strftime("%Y%m%d")  # type: ignore[assignment]
    sr.ContentTime = stamp.strftime("%H%M%S")  # type: ignore[assignment]
    sr.TimezoneOffsetFromUTC = stamp.strftime("%z")
    if spec.final:
        observer = sr.VerifyingObserverSequence[0]
        observer.VerificationDateTime = stamp.strftime("%Y%m%d%H%M%S%z")
        code = pydicom.Dataset()
        code.CodeValue = spec.observer_id[:16]
        code.CodingSchemeDesignator = LOCAL
        code.CodeMeaning = fit_lo(spec.observer_role)
        observer.VerifyingObserverIdentificationCodeSequence = [code]
    return sr


def _pn(identifier: str) -> str:
    """An identifier as a Person Name: one component, marked as such by the trailing caret."""
    return identifier.replace("^", " ") + "^"


def _section(
    name: Code | hd.sr.CodedConcept, children: Sequence[hd.sr.ContentItem]
) -> hd.sr.ContentItem:
    section = hd.sr.ContainerContentItem(name=name, relationship_type=_R.CONTAINS)
    if children:
        section.ContentSequence = hd.sr.ContentSequence(children)
    return section


def _finding(f: ReportFinding) -> hd.sr.ContentItem:
    item = hd.sr.CodeContentItem(
        name=_FINDING,
        value=hd.sr.CodedConcept(f.code.value, f.code.scheme, fit_lo(f.term)),
        relationship_type=_R.CONTAINS,
    )
    a = f.assessment
    if a is None:
        return item
    props: list[hd.sr.ContentItem] = [
        hd.sr.CodeContentItem(
            name=_local("ASSESSMENT"),
            value=_local(a.decision.upper()),
            relationship_type=_R.HAS_PROPERTIES,
        )
    ]
    if a.reason:
        props.append(
            hd.sr.TextContentItem(
                name=_local("REASON"), value=a.reason, relationship_type=_R.HAS_PROPERTIES
            )
        )
    props += [
        hd.sr.TextContentItem(
            name=_ALGORITHM_NAME, value=a.model_name, relationship_type=_R.HAS_PROPERTIES
        ),
        hd.sr.TextContentItem(
            name=_ALGORITHM_VERSION, value=a.model_version, relationship_type=_R.HAS_PROPERTIES
        ),
    ]
    if a.tracking_uid:
        props.append(
            hd.sr.UIDRefContentItem(
                name=_TRACKING_UID, value=a.tracking_uid, relationship_type=_R.HAS_PROPERTIES
            )
        )
    props.append(
        hd.sr.CompositeContentItem(
            name=_local("AIRESULT"),
            referenced_sop_class_uid=a.ai_sr_sop_class_uid,
            referenced_sop_instance_uid=a.ai_sr_sop_instance_uid,
            relationship_type=_R.HAS_PROPERTIES,
        )
    )
    item.ContentSequence = hd.sr.ContentSequence(props)
    return item


def _impression(spec: ReportSpec) -> hd.sr.ContentItem:
    item = hd.sr.TextContentItem(
        name=_IMPRESSION, value=spec.impression or "-", relationship_type=_R.CONTAINS
    )
    if spec.impression_language != spec.language:
        item.ContentSequence = hd.sr.ContentSequence(
            [
                hd.sr.CodeContentItem(
                    name=_LANGUAGE,
                    value=language_concept(spec.impression_language),
                    relationship_type=_R.HAS_CONCEPT_MOD,
                )
            ]
        )
    return item
