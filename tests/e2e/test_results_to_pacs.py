"""The loop closed: Orthanc as the hospital PACS sends a study, and gets the AI result back.

A study no model reads (a head CT at a chest center) comes back too, as an SR saying so.

Orthanc is told over its REST API to C-STORE a chest radiograph study (real patient identity)
to the edge; `radbridge up` de-identifies, forwards, infers, builds the TID 1500 SR at the
center; the edge pulls it, re-identifies it and C-STOREs it to Orthanc. Queried back over
Orthanc's REST API, the SR must carry the hospital's own patient and study, reference the
instances Orthanc holds, and code the model's findings.
"""

from __future__ import annotations

import time
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import yaml

from models.ct_dicom import write_ct_series
from models.ct_phantoms import chest_ct
from models.cxr_dicom import write_cxr_study
from tests.e2e.stack import stack_report, stack_with_pacs
from tests.peers import OrthancPeer

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
PATIENT = {"name": "Wang^Xiuying=王^秀英", "id": "PACS-88-1203", "birth": "19630704"}


def test_orthanc_sends_a_study_and_receives_the_sr(tmp_path: Path) -> None:
    with stack_with_pacs(tmp_path) as (pacs, stack):
        files = write_cxr_study(
            tmp_path / "study",
            seed=77,
            findings={"cardiomegaly"},
            patient_name=PATIENT["name"],
            patient_id=PATIENT["id"],
            birth_date=PATIENT["birth"],
            n_images=2,
            accession="ACC-7001",
        )
        originals = [pydicom.dcmread(f) for f in files]
        ids = [pacs.upload(f) for f in files]
        study = pacs.study_of(ids[0])
        pacs.send_study_to("radbridge", study)
        # And a chest CT with one nodule: it comes back as a SEG plus its SR.
        phantom = chest_ct(np.random.default_rng([20261123, 7]), n_nodules=1)
        ct_files = write_ct_series(
            tmp_path / "ct",
            phantom,
            seed=8,
            patient_name=PATIENT["name"],
            patient_id=PATIENT["id"],
            birth_date=PATIENT["birth"],
            accession="ACC-7002",
        )
        ct_ids = [pacs.upload(f) for f in ct_files]
        ct_study = pacs.study_of(ct_ids[0])
        pacs.send_study_to("radbridge", ct_study)
        # And a head CT, which no model of this center reads: the hospital must hear so.
        head_files = _head_ct(ct_files[:4], tmp_path / "head")
        head_ids = [pacs.upload(f) for f in head_files]
        head_study = pacs.study_of(head_ids[0])
        pacs.send_study_to("radbridge", head_study)

        sr = _wait_for_sr(pacs, study, stack)
        # The hospital's own identity and UIDs, not the pseudonyms the center saw.
        assert str(sr.PatientID) == PATIENT["id"]
        assert str(sr.PatientName) == str(originals[0].PatientName)
        assert str(sr.PatientBirthDate) == PATIENT["birth"]
        assert str(sr.AccessionNumber) == "ACC-7001"
        assert sr.StudyInstanceUID == originals[0].StudyInstanceUID
        assert "PatientIdentityRemoved" not in sr
        assert sr.VerificationFlag == "UNVERIFIED"
        # Every image reference resolves to an instance Orthanc holds.
        held = {str(pacs.instance_tags(i)["SOPInstanceUID"]) for i in ids}
        refs = {str(e.value) for e in sr.iterall() if e.keyword == "ReferencedSOPInstanceUID"}
        assert held <= refs and refs - held <= {str(sr.SOPInstanceUID)}
        # The coded findings are the model's, with the manifest's codes.
        manifest = yaml.safe_load(
            (
                Path(stack["env"]["RADBRIDGE_MODEL_REPOSITORY"])
                / "chest-xray-demo"
                / "1"  # type: ignore[index]
                / "manifest.yaml"
            ).read_text()
        )
        wanted = {label["snomed"] for label in manifest["labels"] if label.get("snomed")}
        coded = {str(e.value) for e in sr.iterall() if e.keyword == "CodeValue"}
        assert wanted <= coded
        texts = [str(e.value) for e in sr.iterall() if e.keyword == "TextValue"]
        assert any("not for diagnostic use" in t for t in texts)

        # The CT: a SEG over the slices Orthanc holds, and its SR, both re-identified.
        seg = _wait_for_sr(pacs, ct_study, stack, modality="SEG")
        ct_sr = _wait_for_sr(pacs, ct_study, stack)
        ct_held = {str(pacs.instance_tags(i)["SOPInstanceUID"]) for i in ct_ids}
        for obj in (seg, ct_sr):
            assert str(obj.PatientID) == PATIENT["id"]
            assert str(obj.AccessionNumber) == "ACC-7002"
            assert str(obj.StudyInstanceUID) == str(
                pydicom.dcmread(ct_files[0], stop_before_pixels=True).StudyInstanceUID
            )
        seg_refs = {str(e.value) for e in seg.iterall() if e.keyword == "ReferencedSOPInstanceUID"}
        assert seg_refs and seg_refs <= ct_held
        sr_refs = {str(e.value) for e in ct_sr.iterall() if e.keyword == "ReferencedSOPInstanceUID"}
        assert str(seg.SOPInstanceUID) in sr_refs

        # The head CT: no AI result will come, and an SR says so, in the agreement's languages.
        notice = _wait_for_sr(pacs, head_study, stack)
        assert notice.SeriesDescription.startswith("AI NOT PERFORMED")
        assert str(notice.PatientID) == PATIENT["id"] and "PatientIdentityRemoved" not in notice
        head_held = {str(pacs.instance_tags(i)["SOPInstanceUID"]) for i in head_ids}
        refs = {str(e.value) for e in notice.iterall() if e.keyword == "ReferencedSOPInstanceUID"}
        assert head_held <= refs
        said = " ".join(str(e.value) for e in notice.iterall() if e.keyword == "TextValue")
        assert "no AI model in service reads CT studies" in said
        assert "Анализ ИИ не выполнен" in said and "未进行AI分析" in said


def _head_ct(files: list[Path], folder: Path) -> list[Path]:
    """A few slices re-labelled as a new head CT study (new UIDs, same patient)."""
    folder.mkdir()
    study, series = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    out = []
    for i, f in enumerate(files):
        ds = pydicom.dcmread(f)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        ds.BodyPartExamined = "HEAD"
        ds.AccessionNumber = "ACC-7003"
        out.append(folder / f"{i}.dcm")
        ds.save_as(out[-1], enforce_file_format=True)
    return out


def _wait_for_sr(
    pacs: OrthancPeer, study: str, stack: dict[str, Any], modality: str = "SR"
) -> pydicom.Dataset:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        for inst in pacs.instances_of(study):
            tags = pacs.instance_tags(inst)
            if tags.get("Modality") == modality:
                return pydicom.dcmread(BytesIO(pacs.instance_file(inst)))
        time.sleep(2)
    pytest.fail(f"no SR reached the PACS in time:\n{stack_report(Path(str(stack['data'])))}")
    raise AssertionError  # unreachable
