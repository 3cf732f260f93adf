"""The signed report as a TID 2000 Comprehensive SR (dicom_io/report_sr.py), checked by dciodvfy."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset

from dicom_io.report_sr import AIAssessment, ReportFinding, ReportSpec, report_sr
from dicom_io.result_builders import AlgorithmInfo, ImageFinding, classification_sr
from dicom_io.sr_parts import Coded
from tests.conftest import make_instance
from tests.dciodvfy import dciodvfy, part10

PNEUMONIA = Coded("233604007", "SCT", "Pneumonia")
EFFUSION = Coded("60046008", "SCT", "Pleural effusion")
ALGO = AlgorithmInfo("cxr-demo", "1", "radbridge", "ab" * 32, "Demo model: not for diagnostic use")
MSK = timezone(timedelta(hours=3))


def _study() -> tuple[list[Dataset], Dataset]:
    first = make_instance()
    images = [first, make_instance(first.StudyInstanceUID, first.SeriesInstanceUID, seed=1)]
    finding = ImageFinding(
        str(first.SOPInstanceUID), PNEUMONIA, 0.9, 0.5, True, {"en": "Pneumonia"}
    )
    return images, classification_sr(images, [finding], ALGO)


def _spec(ai_sr: Dataset, *, final: bool = True, language: str = "ru") -> ReportSpec:
    accepted = AIAssessment(
        "accepted",
        None,
        str(ai_sr.SOPClassUID),
        str(ai_sr.SOPInstanceUID),
        "1.2.3.4",
        "cxr-demo",
        "1",
    )
    return ReportSpec(
        language=language,
        findings=[
            ReportFinding(PNEUMONIA, "Пневмония", accepted),
            ReportFinding(EFFUSION, "Плевральный выпот"),
        ],
        impression="Правосторонняя пневмония.",
        impression_language="ru",
        observer_id="RB-0001",
        observer_role="Radiologist",
        organization="Demo Reading Center",
        signed_at=datetime(2026, 12, 6, 10, 30, tzinfo=MSK),
        final=final,
        communications=["Pneumothorax: called Dr. on duty 10:20 UTC+03:00, phone"],
    )


def _items(ds: Dataset) -> list[Dataset]:
    out = []
    for item in ds.get("ContentSequence", []):
        out.append(item)
        out.extend(_items(item))
    return out


def test_final_report_is_verified_and_valid(tmp_path: Path) -> None:
    images, ai_sr = _study()
    sr = report_sr(images, _spec(ai_sr), ai_results=[ai_sr])
    print("dciodvfy report warnings:", dciodvfy(sr, tmp_path, "report"))
    back = pydicom.dcmread(__import__("io").BytesIO(part10(sr)))
    assert back.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33"  # Comprehensive SR
    assert (back.CompletionFlag, back.VerificationFlag, back.PreliminaryFlag) == (
        "COMPLETE",
        "VERIFIED",
        "FINAL",
    )
    assert back.SpecificCharacterSet == "ISO_IR 192"
    observer = back.VerifyingObserverSequence[0]
    assert observer.VerifyingObserverName.family_name == "RB-0001"  # an identifier, not a name
    assert observer.VerificationDateTime.endswith("+0300")
    assert back.ContentTemplateSequence[0].TemplateIdentifier == "2000"
    predecessor = back.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0]
    assert predecessor.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == ai_sr.SOPInstanceUID
    evidence = back.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert {r.ReferencedSOPInstanceUID for r in evidence.ReferencedSOPSequence} >= {
        i.SOPInstanceUID for i in images
    }
    items = _items(back)
    meanings = [i.ConceptNameCodeSequence[0].CodeMeaning for i in items]
    assert "Language of Content Item and Descendants" in meanings
    codes = [i.ConceptCodeSequence[0] for i in items if "ConceptCodeSequence" in i]
    assert ("ru", "RFC5646") in {(c.CodeValue, c.CodingSchemeDesignator) for c in codes}
    finding = next(c for c in codes if c.CodeValue == "233604007")
    assert finding.CodeMeaning == "Пневмония"  # the term in the document's language
    assert "ACCEPTED" in {c.CodeValue for c in codes}
    composite = [i for i in items if i.ValueType == "COMPOSITE"]
    assert composite[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == ai_sr.SOPInstanceUID
    texts = [i.TextValue for i in items if i.ValueType == "TEXT"]
    assert "Правосторонняя пневмония." in texts
    assert any("Pneumothorax" in t for t in texts)


def test_preliminary_report_is_unverified(tmp_path: Path) -> None:
    images, ai_sr = _study()
    sr = report_sr(images, _spec(ai_sr, final=False), ai_results=[ai_sr])
    dciodvfy(sr, tmp_path, "preliminary")
    assert (sr.VerificationFlag, sr.PreliminaryFlag) == ("UNVERIFIED", "PRELIMINARY")
    assert "VerifyingObserverSequence" not in sr


def test_chinese_report_marks_the_russian_impression(tmp_path: Path) -> None:
    images, ai_sr = _study()
    sr = report_sr(images, _spec(ai_sr, language="zh-Hans"), ai_results=[ai_sr])
    dciodvfy(sr, tmp_path, "zh")
    impression = next(
        i for i in _items(sr) if i.ValueType == "TEXT" and i.TextValue.startswith("Правосторонняя")
    )
    modifier = impression.ContentSequence[0].ConceptCodeSequence[0]
    assert (modifier.CodeValue, modifier.CodingSchemeDesignator) == ("ru", "RFC5646")


def test_rejected_ai_finding_needs_a_reason() -> None:
    _, ai_sr = _study()
    rejected = AIAssessment(
        "rejected", " ", str(ai_sr.SOPClassUID), str(ai_sr.SOPInstanceUID), None, "cxr-demo", "1"
    )
    with pytest.raises(ValueError, match="needs a reason"):
        ReportFinding(PNEUMONIA, "Pneumonia", rejected)


def test_signed_at_needs_a_time_zone() -> None:
    _, ai_sr = _study()
    spec = _spec(ai_sr)
    with pytest.raises(ValueError, match="time zone"):
        ReportSpec(**{**spec.__dict__, "signed_at": datetime(2026, 12, 6, 10, 30)})
    assert spec.signed_at.astimezone(UTC).hour == 7
