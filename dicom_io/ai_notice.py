"""The SR that tells the hospital the reading center's AI did not read a study, and why.

A study whose job fails (no model serves its modality or body part, images the AI cannot
read, a failure in the service) would otherwise leave the hospital waiting for an AI result
that never comes. Instead it gets this Comprehensive SR, in every report language of the
agreement, delivered like any AI result (re-identified at the edge)::

    CONTAINER (18748-4, LN, "Diagnostic imaging report")
      HAS CONCEPT MOD  Language of Content Item and Descendants = en
      HAS OBS CONTEXT  Observer Type = Device; Device Observer UID, Name = radbridge (TID 1004)
      HAS CONCEPT MOD  Procedure reported (from the study's modality and body part)
      CONTAINS CONTAINER Impressions (121072)
        CONTAINS CODE  AI analysis (local) = Not performed (local): the machine-readable part
          HAS PROPERTIES CODE Reason (local) = No model | Images unreadable | Service failure
        CONTAINS TEXT  Impression (121073) = the sentence, once per report language, each with
                 its own TID 1204 language modifier (ru, zh-Hans, en)

The sentences come from ``data/ai_notices.yaml``: a closed set, never an exception's text, so
nothing of the study (or of the center's internals) is quoted back. UNVERIFIED, PRELIMINARY,
COMPLETE: no person has verified it; the radiologist's signed report follows (the study is
on the worklist whether or not the AI read it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Literal

import highdicom as hd
import pydicom
import yaml
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from dicom_io.sr_parts import (
    CHARSET,
    LANGUAGE_TAGS,
    expected_warnings,
    fit_lo,
    language_concept,
    procedure_code,
    with_type2,
)

__all__ = [
    "NOTICE_CODES",
    "NOTICE_SERIES_NUMBER",
    "Unread",
    "UnreadReason",
    "ai_not_performed_sr",
    "notice_sentences",
]

NOTICE_SERIES_NUMBER = 901  # beside the AI result SRs (900)
UnreadReason = Literal["no_model", "unreadable", "failed"]
_LOCAL = "99RADBRIDGE"
NOTICE_CODES = {
    "AIANALYSIS": "AI analysis",
    "NOTPERFORMED": "Not performed",
    "REASON": "Reason AI analysis not performed",
    "no_model": "No AI model in service for these images",
    "unreadable": "Images not readable by the AI service",
    "failed": "AI service failure",
}
_REPORT_TITLE = Code("18748-4", "LN", "Diagnostic imaging report")
_R = hd.sr.RelationshipTypeValues


@dataclass(frozen=True)
class Unread:
    """Why (part of) a study was not read: the reason and the modality code it concerns."""

    reason: UnreadReason
    modality: str


@cache
def _sentences() -> dict[str, dict[str, str]]:
    text = resources.files("dicom_io").joinpath("data/ai_notices.yaml").read_text("utf-8")
    table: dict[str, dict[str, str]] = yaml.safe_load(text)
    return table


def notice_sentences(unread: Sequence[Unread], language: str) -> list[str]:
    """The sentences of ``unread`` in ``language`` (ru, zh, en), each once, in order."""
    table = _sentences()[language]
    out: list[str] = []
    for u in unread:
        sentence = table[u.reason].format(modality=u.modality or "?")
        if sentence not in out:
            out.append(sentence)
    return out


def ai_not_performed_sr(
    sources: Sequence[pydicom.Dataset],
    unread: Sequence[Unread],
    languages: Sequence[str],
    *,
    device_uid: str,
    version: int = 1,
    series_instance_uid: str | None = None,
) -> pydicom.Dataset:
    """The notice about ``sources`` (the study's images; headers suffice) in ``languages``.

    Raises:
        ValueError: No sources, sources of several studies, no reason or no language.
    """
    if not sources:
        raise ValueError("a notice needs the images it is about")
    if len({str(ds.StudyInstanceUID) for ds in sources}) != 1:
        raise ValueError("the images must belong to one study")
    if not unread or not languages:
        raise ValueError("a notice needs a reason and at least one language")
    status = hd.sr.CodeContentItem(
        name=_local("AIANALYSIS"), value=_local("NOTPERFORMED"), relationship_type=_R.CONTAINS
    )
    status.ContentSequence = hd.sr.ContentSequence(
        [
            hd.sr.CodeContentItem(
                name=_local("REASON"), value=_local(reason), relationship_type=_R.HAS_PROPERTIES
            )
            for reason in dict.fromkeys(u.reason for u in unread)
        ]
    )
    impressions: list[hd.sr.ContentItem] = [status]
    for language in languages:
        for sentence in notice_sentences(unread, language):
            item = hd.sr.TextContentItem(
                name=codes.DCM.Impression, value=sentence, relationship_type=_R.CONTAINS
            )
            item.ContentSequence = hd.sr.LanguageOfContentItemAndDescendants(
                language_concept(LANGUAGE_TAGS[language])
            )
            impressions.append(item)
    section = hd.sr.ContainerContentItem(name=codes.DCM.Impressions, relationship_type=_R.CONTAINS)
    section.ContentSequence = hd.sr.ContentSequence(impressions)
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=device_uid, name="radbridge", manufacturer_name="radbridge"
    )
    context = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device, observer_identifying_attributes=device
    )
    root = hd.sr.ContainerContentItem(name=_REPORT_TITLE, template_id="2000")
    root.ContentSequence = hd.sr.ContentSequence(
        [
            hd.sr.CodeContentItem(
                name=codes.DCM.LanguageOfContentItemAndDescendants,
                value=language_concept("en"),
                relationship_type=_R.HAS_CONCEPT_MOD,
            ),
            *context,
            hd.sr.CodeContentItem(
                name=codes.DCM.ProcedureReported,
                value=procedure_code(sources[0]),
                relationship_type=_R.HAS_CONCEPT_MOD,
            ),
            section,
        ]
    )
    with expected_warnings():
        return hd.sr.ComprehensiveSR(
            evidence=[with_type2(ds) for ds in sources],
            content=hd.sr.ContentSequence([root], is_root=True),
            series_instance_uid=series_instance_uid or hd.UID(),
            series_number=NOTICE_SERIES_NUMBER,
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer="radbridge",
            is_complete=True,
            is_final=False,
            is_verified=False,
            series_description=fit_lo(f"AI NOT PERFORMED v{version}: radiologist report follows"),
            specific_character_set=CHARSET,
        )


def _local(value: str) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(value.upper().replace("_", ""), _LOCAL, NOTICE_CODES[value])
