"""Center result objects: a finished job becomes a TID 1500 SR; a later job the next version."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from dicom_io.deid import deidentify
from dicom_io.pseudonyms import Pseudonymizer
from dicom_io.store import DurableStore
from radbridge.contract import CompleteStudy
from radbridge.db import Database
from radbridge.errors import NotFoundError
from serving import jobs, result_objects
from serving.intake import receive_instances
from serving.postprocess import findings_from_logits
from serving.schemas import InstanceResult
from tests.test_intake_jobs import AGREEMENT, _deid_study
from tests.test_serving_units import _manifest


def _run_job(db: Database, uid: str, n: int) -> int:
    job, _ = jobs.complete_study(db, uid, CompleteStudy(agreement_id=AGREEMENT, instance_count=n))
    jobs.start_job(db, job.id)
    manifest = _manifest()
    for inst in jobs.job_instances(db, job.id):
        findings = findings_from_logits(np.array([2.0, -3.0], dtype=np.float32), manifest)
        jobs.save_result(
            db,
            job.id,
            inst.instance_id,
            InstanceResult(
                sop_instance_uid=inst.sop_instance_uid,
                model={"name": manifest.name, "version": manifest.version, "sha256": "0" * 64},
                input_sha256="1" * 64,
                provider="CPUExecutionProvider",
                findings=findings,
                timings_ms={},
                intended_use=manifest.intended_use,
            ),
        )
    jobs.finish_job(db, job.id)
    return job.id


def test_job_becomes_sr_and_late_instance_the_next_version(
    center_db: Database, tmp_path: Path
) -> None:
    store = DurableStore(tmp_path)
    manifests = {"chest-xray-demo:1": _manifest()}
    parts = _deid_study(3)
    uid = receive_instances(center_db, store, AGREEMENT, parts[:2]).stored[0].study_uid
    first_job = _run_job(center_db, uid, 2)
    ids = result_objects.build_for_job(center_db, store, first_job, manifests)
    assert len(ids) == 1

    listed = result_objects.list_objects(center_db, AGREEMENT, 0, 10)
    assert [o.id for o in listed] == ids and listed[0].version == 1 and listed[0].kind == "sr"
    sr = hd.sr.srread(store.path(result_objects.object_path(center_db, ids[0])))
    assert sr.StudyInstanceUID == uid and sr.VerificationFlag == "UNVERIFIED"
    assert sr.PatientIdentityRemoved == "YES"  # pseudonymous, as everything at the center
    refs = {str(e.value) for e in sr.iterall() if e.keyword == "ReferencedSOPInstanceUID"}
    sent = {
        str(pydicom.dcmread(pydicom.filebase.DicomBytesIO(p)).SOPInstanceUID) for p in parts[:2]
    }
    assert sent <= refs

    receive_instances(center_db, store, AGREEMENT, parts[2:])  # late instance
    second = result_objects.build_for_job(center_db, store, _run_job(center_db, uid, 3), manifests)
    assert result_objects.list_objects(center_db, AGREEMENT, ids[0], 10)[0].id == second[0]
    v2 = pydicom.dcmread(store.path(result_objects.object_path(center_db, second[0])))
    assert (
        v2.PredecessorDocumentsSequence[0]
        .ReferencedSeriesSequence[0]
        .ReferencedSOPSequence[0]
        .ReferencedSOPInstanceUID
        == listed[0].sop_instance_uid
    )
    assert result_objects.list_objects(center_db, AGREEMENT, 0, 10)[1].version == 2


def _ct_job(db: Database, store: DurableStore) -> tuple[int, list[pydicom.Dataset]]:
    from tests.test_result_builders import _ct_series

    p = Pseudonymizer(b"k" * 32)
    sources = [deidentify(ds, p).dataset for ds in _ct_series()]
    parts = []
    for ds in sources:
        buf = pydicom.filebase.DicomBytesIO()
        ds.save_as(buf, enforce_file_format=True)
        parts.append(buf.getvalue())
    uid = receive_instances(db, store, AGREEMENT, parts).stored[0].study_uid
    job, _ = jobs.complete_study(db, uid, CompleteStudy(agreement_id=AGREEMENT, instance_count=8))
    jobs.start_job(db, job.id)
    jobs.finish_job(db, job.id)
    return job.id, sources


def test_segmentation_objects_with_and_without_nodules(center_db: Database, tmp_path: Path) -> None:
    from models.ct_nodule_demo import MANIFEST_TEMPLATE
    from models.manifest import ModelManifest
    from models.nodules import DetectedNodule
    from serving.segmentation import SeriesSegmentation
    from tests.test_result_builders import _mask

    manifest = ModelManifest.model_validate({**MANIFEST_TEMPLATE, "sha256": "0" * 64})
    store = DurableStore(tmp_path)
    job_id, sources = _ct_job(center_db, store)
    nodule = DetectedNodule((-3.5, -2.8, -115.0), (3.0, 12.5, 11.5), 4.2, 44.1, 5, 0.9, 0.8)
    found = SeriesSegmentation([nodule], _mask(), sources, 0.9)
    ids = result_objects.save_segmentation_objects(center_db, store, job_id, found, manifest)
    kinds = [o.kind for o in result_objects.list_objects(center_db, AGREEMENT, 0, 10)]
    assert len(ids) == 2 and kinds == ["seg", "sr"]

    nothing = SeriesSegmentation([], np.zeros((8, 32, 32), dtype=bool), sources, 0.12)
    (sr_id,) = result_objects.save_segmentation_objects(center_db, store, job_id, nothing, manifest)
    sr = hd.sr.srread(store.path(result_objects.object_path(center_db, sr_id)))
    meanings = {str(e.value) for e in sr.iterall() if e.keyword == "CodeMeaning"}
    assert "Absent" in meanings and "Present" not in meanings
    assert sr.VerificationFlag == "UNVERIFIED"


def test_a_failed_job_is_listed_with_its_notice_only(center_db: Database, tmp_path: Path) -> None:
    """The hospital hears of a study the AI could not read: its notice is listed although the
    job failed; the failed run's other objects never are; a re-run drops the notice."""
    from dicom_io.ai_notice import Unread
    from radbridge.db.tables import ResultObjectRow

    store = DurableStore(tmp_path)
    parts = _deid_study(2)
    uid = receive_instances(center_db, store, AGREEMENT, parts).stored[0].study_uid
    job, _ = jobs.complete_study(
        center_db, uid, CompleteStudy(agreement_id=AGREEMENT, instance_count=2)
    )
    jobs.start_job(center_db, job.id)
    ids = result_objects.build_notice(
        center_db,
        store,
        job.id,
        [Unread("no_model", "MR")],
        ["ru", "zh", "en"],
        "Demo Reading Center",
    )
    with center_db.session() as s:  # an object of the failed run that is not the notice
        stray = ResultObjectRow(
            **{
                c: getattr(s.get(ResultObjectRow, ids[0]), c)
                for c in (
                    "agreement_id",
                    "job_id",
                    "study_uid",
                    "version",
                    "sop_class_uid",
                    "series_instance_uid",
                    "path",
                    "size",
                    "sha256",
                )
            },
            kind="sr",
            sop_instance_uid="2.25.1",
        )
        s.add(stray)
    jobs.finish_job(center_db, job.id, "NoModelError: no model serves modality MR")

    listed = result_objects.list_objects(center_db, AGREEMENT, 0, 10)
    assert [(o.id, o.kind) for o in listed] == [(ids[0], "notice")]
    notice = pydicom.dcmread(store.path(result_objects.object_path(center_db, ids[0])))
    assert notice.StudyInstanceUID == uid and notice.PatientIdentityRemoved == "YES"
    assert notice.VerificationFlag == "UNVERIFIED"
    assert "MR" in " ".join(
        i.TextValue for i in notice.ContentSequence[-1].ContentSequence if "TextValue" in i
    )
    # The same center names itself with the same Device Observer UID in every notice.
    again = result_objects.build_notice(
        center_db, store, job.id, [Unread("failed", "CT")], ["en"], "Demo Reading Center"
    )
    second = pydicom.dcmread(store.path(result_objects.object_path(center_db, again[0])))

    def device(ds: pydicom.Dataset) -> str:
        return next(i.UID for i in ds.ContentSequence if i.ValueType == "UIDREF")

    assert device(notice) == device(second)
    jobs.start_job(center_db, job.id)  # a re-run (a late instance): the notice goes
    assert result_objects.list_objects(center_db, AGREEMENT, 0, 10) == []


def test_an_interrupted_runs_objects_are_discarded_rows_and_files(
    center_db: Database, tmp_path: Path
) -> None:
    from dicom_io.ai_notice import Unread

    store = DurableStore(tmp_path)
    uid = receive_instances(center_db, store, AGREEMENT, _deid_study(1)).stored[0].study_uid
    job, _ = jobs.complete_study(
        center_db, uid, CompleteStudy(agreement_id=AGREEMENT, instance_count=1)
    )
    jobs.start_job(center_db, job.id)
    (oid,) = result_objects.build_notice(
        center_db, store, job.id, [Unread("failed", "DX")], ["en"], "Demo Reading Center"
    )
    written = store.path(result_objects.object_path(center_db, oid))
    assert written.is_file()
    # The center is killed here; the resumed run first discards what the cut one wrote.
    assert result_objects.discard_unlisted(center_db, store, job.id) == 1
    assert not written.exists()
    assert result_objects.discard_unlisted(center_db, store, job.id) == 0
    with pytest.raises(NotFoundError):
        result_objects.object_path(center_db, oid)


def test_an_unfinished_jobs_object_holds_back_the_later_ones(
    center_db: Database, tmp_path: Path
) -> None:
    """Version 1's objects are written but its job is not finished when version 2's job ends:
    the listing stops before version 1's object (the edge's cursor would pass it for ever) and
    gives both, in order, once version 1's job is done."""
    from radbridge.db.tables import JobRow

    store = DurableStore(tmp_path)
    manifests = {"chest-xray-demo:1": _manifest()}
    parts = _deid_study(3)
    uid = receive_instances(center_db, store, AGREEMENT, parts[:2]).stored[0].study_uid
    first_job = _run_job(center_db, uid, 2)
    first = result_objects.build_for_job(center_db, store, first_job, manifests)
    with center_db.session() as s:  # its objects written, its job not finished yet
        s.query(JobRow).filter_by(id=first_job).update({"state": "running"})
    receive_instances(center_db, store, AGREEMENT, parts[2:])
    second = result_objects.build_for_job(center_db, store, _run_job(center_db, uid, 3), manifests)
    assert second[0] > first[0]
    assert result_objects.list_objects(center_db, AGREEMENT, 0, 10) == []
    with center_db.session() as s:
        s.query(JobRow).filter_by(id=first_job).update({"state": "done"})
    listed = [o.id for o in result_objects.list_objects(center_db, AGREEMENT, 0, 10)]
    assert listed == [*first, *second]
