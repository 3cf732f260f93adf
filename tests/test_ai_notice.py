"""The "AI analysis not performed" SR (dicom_io/ai_notice.py), checked by dciodvfy."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset

from dicom_io.ai_notice import NOTICE_CODES, Unread, ai_not_performed_sr, notice_sentences
from dicom_io.sr_parts import LANGUAGE_TAGS
from radbridge.errors import DatasetError, ModelError, NoModelError
from serving.result_objects import unread_reasons
from tests.conftest import make_instance
from tests.dciodvfy import dciodvfy, part10

DEVICE = "2.25.1234567890"


def _items(ds: Dataset) -> list[Dataset]:
    out = []
    for item in ds.get("ContentSequence", []):
        out.append(item)
        out.extend(_items(item))
    return out


def _mr_study() -> list[Dataset]:
    first = make_instance()
    first.Modality = "MR"
    second = make_instance(first.StudyInstanceUID, first.SeriesInstanceUID, seed=1)
    second.Modality = "MR"
    return [first, second]


def test_the_notice_says_why_in_every_language_and_is_valid(tmp_path: Path) -> None:
    images = _mr_study()
    sr = ai_not_performed_sr(
        images, [Unread("no_model", "MR")], ["ru", "zh", "en"], device_uid=DEVICE
    )
    print("dciodvfy notice warnings:", dciodvfy(sr, tmp_path, "notice"))
    back = pydicom.dcmread(__import__("io").BytesIO(part10(sr)))
    assert back.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33"  # Comprehensive SR
    assert (back.CompletionFlag, back.VerificationFlag, back.PreliminaryFlag) == (
        "COMPLETE",
        "UNVERIFIED",
        "PRELIMINARY",
    )
    assert back.StudyInstanceUID == images[0].StudyInstanceUID
    assert back.PatientID == images[0].PatientID  # copied from the sources, never invented
    evidence = {
        ref.ReferencedSOPInstanceUID
        for study in back.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    }
    assert evidence == {ds.SOPInstanceUID for ds in images}
    assert back.SeriesDescription.startswith("AI NOT PERFORMED")

    items = _items(back)
    texts = {}
    for item in items:
        if item.ValueType == "TEXT" and item.ConceptNameCodeSequence[0].CodeValue == "121073":
            (lang,) = [
                c.ConceptCodeSequence[0].CodeValue
                for c in item.ContentSequence
                if c.ConceptNameCodeSequence[0].CodeValue == "121049"
            ]
            texts[lang] = item.TextValue
    assert set(texts) == {LANGUAGE_TAGS[x] for x in ("ru", "zh", "en")}
    assert "MR" in texts["en"] and "radiologist's report will follow" in texts["en"]
    assert "MR" in texts["ru"] and "Заключение врача-рентгенолога" in texts["ru"]
    assert "MR" in texts["zh-Hans"] and "放射科医生的报告" in texts["zh-Hans"]
    coded = {
        (i.ConceptNameCodeSequence[0].CodeMeaning, i.ConceptCodeSequence[0].CodeMeaning)
        for i in items
        if i.ValueType == "CODE"
    }
    assert ("AI analysis", "Not performed") in coded
    assert ("Reason AI analysis not performed", NOTICE_CODES["no_model"]) in coded


@pytest.mark.parametrize("language", ["ru", "zh", "en"])
def test_every_reason_has_a_sentence_in_every_language(language: str) -> None:
    for reason in ("no_model", "unreadable", "failed"):
        (sentence,) = notice_sentences([Unread(reason, "CT")], language)  # type: ignore[arg-type]
        assert len(sentence) > 20 and "{" not in sentence


def test_reasons_are_a_closed_set_never_an_errors_text() -> None:
    """The center's exception text (which could quote anything) never reaches the hospital."""
    errors: list[BaseException] = [
        NoModelError("MR", "no model serves modality MR"),
        DatasetError("undecodable", "pixel data of 1.2.3 (Doe^John) could not be decoded"),
        ModelError("session for Doe^John exploded"),
        NoModelError("MR", "no model serves modality MR"),  # a second MR series: said once
    ]
    unread = unread_reasons(errors, "CT")
    assert unread == [
        Unread("no_model", "MR"),
        Unread("unreadable", "CT"),
        Unread("failed", "CT"),
    ]
    images = _mr_study()
    sr = ai_not_performed_sr(images, unread, ["en"], device_uid=DEVICE)
    text = " ".join(i.TextValue for i in _items(sr) if i.ValueType == "TEXT")
    assert "Doe" not in text and "1.2.3" not in text and "exploded" not in text
    assert text.count("No AI analysis was performed") == 3


def test_a_notice_needs_images_of_one_study_a_reason_and_a_language() -> None:
    images = _mr_study()
    with pytest.raises(ValueError, match="images"):
        ai_not_performed_sr([], [Unread("failed", "CT")], ["en"], device_uid=DEVICE)
    with pytest.raises(ValueError, match="one study"):
        ai_not_performed_sr(
            [images[0], make_instance()], [Unread("failed", "CT")], ["en"], device_uid=DEVICE
        )
    with pytest.raises(ValueError, match="reason"):
        ai_not_performed_sr(images, [], ["en"], device_uid=DEVICE)
