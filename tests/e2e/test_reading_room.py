"""The remote read, end to end: Orthanc (the hospital PACS) sends a chest radiograph; the AI
result arrives; a reader signs in to the reading room (/read), finds the study on the
worklist, opens it (DICOMweb through the same session), accepts the AI finding, writes the
impression in Russian and signs final; the signed TID 2000 report — one SR per report
language of the agreement — reaches Orthanc re-identified, VERIFIED and FINAL."""

from __future__ import annotations

import subprocess
import time
from io import BytesIO
from pathlib import Path

import httpx
import pydicom
import pytest
from sqlalchemy import select

from models.cxr_dicom import write_cxr_study
from radbridge.contract import tls_verify
from radbridge.db import Database
from radbridge.db.tables import AuditRow, StudyRow
from tests.e2e.stack import AGREEMENT, BIN, add_reader, stack_report, stack_with_pacs
from tests.e2e.test_results_to_pacs import _wait_for_sr
from tests.peers import OrthancPeer

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
PASSWORD = "a reader's long password"


def test_reader_signs_and_the_report_reaches_the_pacs(tmp_path: Path) -> None:
    with stack_with_pacs(tmp_path) as (pacs, stack):
        files = write_cxr_study(
            tmp_path / "study",
            seed=78,
            findings={"cardiomegaly"},
            patient_name="Li^Na=李^娜",
            patient_id="PACS-42",
            birth_date="19700101",
            n_images=1,
            accession="ACC-8001",
        )
        ids = [pacs.upload(f) for f in files]
        study = pacs.study_of(ids[0])
        pacs.send_study_to("radbridge", study)
        _wait_for_sr(pacs, study, stack)  # the AI result is home: the job has ended

        add_reader(stack, "ivanova", PASSWORD, "RB-0007")
        base = f"{stack['base']}/read"
        with httpx.Client(verify=tls_verify(stack["ca"]), timeout=30) as reader:
            r = reader.get(f"{base}/api/worklist")
            assert r.status_code == 401, r.text
            assert reader.get(f"{base}/dicomweb/studies").status_code == 401
            r = reader.post(f"{base}/api/login", json={"username": "ivanova", "password": PASSWORD})
            assert r.status_code == 204, r.text
            cookie = r.headers["set-cookie"].lower()
            assert "httponly" in cookie and "secure" in cookie and "samesite=strict" in cookie
            page = reader.get(f"{base}/")
            assert (
                page.status_code == 200
                and "connect-src 'self'" in page.headers["content-security-policy"]
            )
            rows = reader.get(f"{base}/api/worklist").json()["rows"]
            assert (
                len(rows) == 1
                and rows[0]["ai_positive"]
                and rows[0]["modality"]
                in (
                    "CR",
                    "DX",
                )
            )
            sid = rows[0]["study_id"]
            assert reader.post(f"{base}/api/studies/{sid}/claim").status_code == 200
            detail = reader.get(f"{base}/api/studies/{sid}").json()
            uid, series = detail["study_uid"], detail["series"][0]["series_uid"]
            instances = reader.get(
                f"{base}/dicomweb/studies/{uid}/series/{series}/instances"
            ).json()
            sop = instances[0]["00080018"]["Value"][0]
            frame = reader.get(
                f"{base}/dicomweb/studies/{uid}/series/{series}/instances/{sop}/frames/1"
            )
            assert frame.status_code == 200
            assert frame.headers["content-type"].startswith("multipart/related")
            decisions = {f["key"]: {"decision": "accepted"} for f in detail["ai_findings"]}
            body = {
                "decisions": decisions,
                "impression": "Кардиомегалия. Рекомендована консультация кардиолога.",
                "impression_language": "ru",
            }
            r = reader.put(f"{base}/api/studies/{sid}/report", json=body)
            assert r.status_code == 200, r.text
            r = reader.post(f"{base}/api/studies/{sid}/sign", params={"status": "final"})
            assert r.status_code == 200, r.text
            assert reader.get(f"{base}/api/worklist").json()["rows"] == []
            metrics = reader.get(f"{base}/metrics", headers=stack["operator"]).text
            assert "radbridge_review_turnaround_seconds_count" in metrics
            assert reader.get(f"{base}/metrics").status_code == 401

        reports = _wait_for_reports(pacs, study, 3, stack)
        languages = set()
        for sr in reports:
            assert str(sr.PatientID) == "PACS-42" and str(sr.AccessionNumber) == "ACC-8001"
            assert (sr.VerificationFlag, sr.PreliminaryFlag) == ("VERIFIED", "FINAL")
            assert sr.VerifyingObserverSequence[0].VerifyingObserverName.family_name == ("RB-0007")
            assert "PatientIdentityRemoved" not in sr
            texts = [str(e.value) for e in sr.iterall() if e.keyword == "TextValue"]
            assert any(t.startswith("Кардиомегалия.") for t in texts)
            languages |= {
                str(e.value)
                for e in sr.iterall()
                if e.keyword == "CodeValue" and str(e.value) in ("ru", "zh-Hans", "en")
            }
        assert languages == {"ru", "zh-Hans", "en"}

        # The patient withdraws consent: the edge asks the center to delete the study; both
        # audit trails then tell the study's whole story, in order, and both chains verify.
        data = Path(str(stack["data"]))
        pseudo = detail["study_uid"]
        withdrawn = _radbridge(stack, "consent", "withdraw", "PACS-42", "--agreement", AGREEMENT)
        assert "1 purge requests queued" in " ".join(withdrawn.split()), withdrawn
        center_db = Database(f"sqlite:///{data / 'center' / 'center.db'}")
        edge_db = Database(f"sqlite:///{data / 'edge' / 'edge.db'}")
        try:
            deadline = time.monotonic() + 120
            while _story(edge_db, pseudo)[-1:] != ["110105"] and time.monotonic() < deadline:
                time.sleep(1)
            with center_db.session() as s:
                assert s.scalars(select(StudyRow).where(StudyRow.study_uid == pseudo)).all() == []
            edge_story, center_story = _story(edge_db, pseudo), _story(center_db, pseudo)
        finally:
            center_db.dispose()
            edge_db.dispose()
        # Edge: began transferring, exported (with its legal basis), results and reports
        # delivered to the PACS, the center's deletion confirmed. Center: imported, viewed,
        # signed, deleted.
        assert edge_story[:2] == ["110102", "110106"] and edge_story[-1] == "110105", edge_story
        assert edge_story.count("110104") >= 4  # the AI SR and three reports at the PACS
        assert center_story[0] == "110107" and center_story[-1] == "110105", center_story
        assert center_story.index("110103") < center_story.index("110110")  # viewed, signed
        for node in ("edge", "center"):
            assert "intact" in _radbridge(stack, "audit", "verify", "--node", node)
        print(f"edge story {edge_story}\ncenter story {center_story}")
        print(stack_report(data, 5))


def _radbridge(stack: dict[str, object], *args: str) -> str:
    """Run the CLI against the running stack's data; its output (fails the test on error)."""
    run = subprocess.run(
        [str(BIN / "radbridge"), *args],
        env=stack["env"],  # type: ignore[arg-type]
        cwd=stack["data"],  # type: ignore[arg-type]
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    return run.stdout


def _story(db: Database, study_uid: str) -> list[str]:
    """The DICOM event ids of a study's audit records on one node, in chain order."""
    with db.session() as s:
        return list(
            s.scalars(
                select(AuditRow.event_id)
                .where(AuditRow.study_uid == study_uid)
                .order_by(AuditRow.id)
            )
        )


def _wait_for_reports(
    pacs: OrthancPeer, study: str, count: int, stack: dict[str, object]
) -> list[pydicom.Dataset]:
    deadline = time.monotonic() + 180
    found: list[pydicom.Dataset] = []
    while time.monotonic() < deadline:
        found = []
        for inst in pacs.instances_of(study):
            tags = pacs.instance_tags(inst)
            if tags.get("Modality") == "SR" and str(tags.get("SeriesNumber")) == "920":
                found.append(pydicom.dcmread(BytesIO(pacs.instance_file(inst))))
        if len(found) >= count:
            return found
        time.sleep(1)
    pytest.fail(f"{len(found)} of {count} reports at the PACS:\n{stack_report(stack['data'])}")  # type: ignore[arg-type]
