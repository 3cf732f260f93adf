"""Center intake (STOW-RS parts) and jobs, on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import timedelta
from io import BytesIO
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from sqlalchemy import select, update

from dicom_io.deid import deidentify
from dicom_io.pseudonyms import Pseudonymizer
from dicom_io.store import DurableStore
from radbridge.contract import CompleteStudy
from radbridge.db import Database
from radbridge.db.tables import InstanceRow, JobRow, StudyRow, utcnow
from radbridge.errors import NotFoundError, PolicyError
from serving import jobs
from serving.intake import receive_instances, stow_response
from tests.conftest import make_instance

AGREEMENT = "demo-hospital-to-center"


def _bytes(ds: Dataset) -> bytes:
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _deid_study(n: int) -> list[bytes]:
    first = make_instance()
    p = Pseudonymizer(b"k" * 32)
    out = [deidentify(first, p).dataset]
    for i in range(1, n):
        ds = make_instance(first.StudyInstanceUID, first.SeriesInstanceUID, seed=i)
        out.append(deidentify(ds, p).dataset)
    return [_bytes(d) for d in out]


def test_identified_instances_are_refused(center_db: Database, tmp_path: Path) -> None:
    store = DurableStore(tmp_path)
    outcome = receive_instances(center_db, store, AGREEMENT, [_bytes(make_instance())])
    assert outcome.stored == [] and len(outcome.failed) == 1
    assert "PatientIdentityRemoved" in outcome.failed[0][3]
    assert list(tmp_path.rglob("*.dcm")) == []
    response = stow_response(outcome)
    assert response["00081198"]["Value"][0]["00081197"]["Value"] == [0xC000]


def test_complete_creates_one_job_and_is_idempotent(center_db: Database, tmp_path: Path) -> None:
    parts = _deid_study(3)
    store = DurableStore(tmp_path)
    outcome = receive_instances(center_db, store, AGREEMENT, parts)
    assert len(outcome.stored) == 3 and not outcome.failed
    uid = outcome.stored[0].study_uid
    req = CompleteStudy(agreement_id=AGREEMENT, instance_count=3, edge_elapsed_s=4.5)
    job, created = jobs.complete_study(center_db, uid, req)
    again, created_again = jobs.complete_study(center_db, uid, req)
    assert created and not created_again and again.id == job.id
    assert len(jobs.job_instances(center_db, job.id)) == 3
    assert jobs.pending_jobs(center_db, "any replica") == [job.id]  # created without an owner
    # Re-sending the same instances (an edge retry) stores nothing twice.
    receive_instances(center_db, store, AGREEMENT, parts)
    assert len(list(tmp_path.rglob("*.dcm"))) == 3


def test_late_instance_makes_a_new_results_version(center_db: Database, tmp_path: Path) -> None:
    parts = _deid_study(3)
    store = DurableStore(tmp_path)
    receive_instances(center_db, store, AGREEMENT, parts[:2])
    uid = receive_instances(center_db, store, AGREEMENT, parts[:1]).stored[0].study_uid
    first, _ = jobs.complete_study(
        center_db, uid, CompleteStudy(agreement_id=AGREEMENT, instance_count=2)
    )
    jobs.start_job(center_db, first.id)
    jobs.finish_job(center_db, first.id)
    assert first.version == 1
    receive_instances(center_db, store, AGREEMENT, parts[2:])  # arrives after completion
    second, created = jobs.complete_study(
        center_db, uid, CompleteStudy(agreement_id=AGREEMENT, instance_count=3)
    )
    assert created and second.id != first.id and second.version == 2
    assert len(jobs.job_instances(center_db, second.id)) == 3
    assert jobs.study_results(center_db, uid).job.version == 2


def test_incomplete_or_unknown_study(center_db: Database, tmp_path: Path) -> None:
    parts = _deid_study(1)
    outcome = receive_instances(center_db, DurableStore(tmp_path), AGREEMENT, parts)
    uid = outcome.stored[0].study_uid
    with pytest.raises(PolicyError, match="1 of 2"):
        jobs.complete_study(center_db, uid, CompleteStudy(agreement_id=AGREEMENT, instance_count=2))
    with pytest.raises(NotFoundError):
        jobs.complete_study(
            center_db, "2.25.1", CompleteStudy(agreement_id=AGREEMENT, instance_count=1)
        )
    with pytest.raises(NotFoundError, match="no job"):
        jobs.study_results(center_db, uid)


def _count(db: Database) -> tuple[int, int]:
    """(the study's instance count, instance rows) at the center."""
    with db.session() as s:
        study = s.scalars(select(StudyRow)).one()
        return study.instance_count, len(s.scalars(select(InstanceRow)).all())


def test_one_request_is_indexed_whole_with_its_duplicates_and_conflicts_answered(
    center_db: Database, tmp_path: Path
) -> None:
    store = DurableStore(tmp_path)
    parts = _deid_study(4)
    first = receive_instances(center_db, store, AGREEMENT, parts[:1])
    assert len(first.stored) == 1 and _count(center_db) == (1, 1)
    altered = bytearray(parts[0])
    altered[-1] ^= 0xFF  # other bytes under the first instance's SOP Instance UID
    outcome = receive_instances(
        center_db, store, AGREEMENT, [parts[0], bytes(altered), *parts[1:], parts[3]]
    )
    assert len(outcome.stored) == 5  # the re-send, three new, the in-request repeat
    assert [f[2] for f in outcome.failed] == [0x0111]
    assert _count(center_db) == (4, 4)
    assert len(list(tmp_path.rglob("*.dcm"))) == 4
    with center_db.session() as s:
        assert s.scalars(select(StudyRow.patient_key)).one() is not None


def test_a_request_the_store_cannot_take_is_refused_whole_and_indexes_nothing(
    center_db: Database, tmp_path: Path
) -> None:
    full = DurableStore(tmp_path, min_free_bytes=1 << 62)  # the watermark is always reached
    outcome = receive_instances(center_db, full, AGREEMENT, _deid_study(3))
    assert outcome.stored == [] and [f[2] for f in outcome.failed] == [0xA700] * 3
    with center_db.session() as s:
        assert s.scalars(select(InstanceRow)).all() == []


def test_a_request_cut_short_by_the_store_leaves_none_of_its_files(
    center_db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The disk fills up after the request's first file: that file goes too (nothing of a
    refused request stays, as a file or as a row)."""
    import errno

    import dicom_io.store

    store = DurableStore(tmp_path / "store")
    write_all, calls = dicom_io.store._write_all, []

    def fill_up(fd: int, data: bytes) -> None:
        calls.append(fd)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        write_all(fd, data)

    monkeypatch.setattr(dicom_io.store, "_write_all", fill_up)
    outcome = receive_instances(center_db, store, AGREEMENT, _deid_study(3))
    assert len(calls) == 2 and outcome.stored == []
    assert [f[2] for f in outcome.failed] == [0xA700] * 3
    assert [p for p in (tmp_path / "store").rglob("*.dcm")] == []
    assert [p for p in (tmp_path / "store").rglob("*.part")] == []
    with center_db.session() as s:
        assert s.scalars(select(InstanceRow)).all() == []


def test_a_job_held_by_a_live_replica_is_not_resumed_by_another(
    center_db: Database, tmp_path: Path
) -> None:
    """Two Api replicas on one database: the one that created a job holds it while it renews
    its lease; the other resumes it only once that lease has run out (its replica died)."""
    store = DurableStore(tmp_path)
    uid = receive_instances(center_db, store, AGREEMENT, _deid_study(2)).stored[0].study_uid
    req = CompleteStudy(agreement_id=AGREEMENT, instance_count=2)
    job, _ = jobs.complete_study(center_db, uid, req, owner="replica-a", lease_s=30)
    assert jobs.pending_jobs(center_db, "replica-b") == []  # a's, and a is alive
    assert not jobs.claim_job(center_db, job.id, "replica-b", 30)
    assert jobs.pending_jobs(center_db, "replica-a") == [job.id]  # its own
    assert jobs.renew_leases(center_db, "replica-a", 30) == 1
    with center_db.session() as s:  # a dies: it renews no more, and its lease runs out
        s.execute(
            update(JobRow)
            .where(JobRow.id == job.id)
            .values(lease_until=utcnow() - timedelta(seconds=1))
        )
    assert jobs.pending_jobs(center_db, "replica-b") == [job.id]
    assert jobs.claim_job(center_db, job.id, "replica-b", 30)
    assert not jobs.claim_job(center_db, job.id, "replica-c", 30)  # b holds it now
    assert jobs.renew_leases(center_db, "replica-a", 30) == 0  # a's hold is gone
    jobs.start_job(center_db, job.id)
    jobs.finish_job(center_db, job.id)
    assert jobs.pending_jobs(center_db, "replica-b") == []  # a finished job is nobody's
    assert not jobs.claim_job(center_db, job.id, "replica-b", 30)
