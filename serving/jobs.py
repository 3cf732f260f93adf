"""Center jobs and results in the center database (pseudonymous UIDs only)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, or_, select, update

from radbridge.contract import CompleteStudy
from radbridge.db.engine import Database
from radbridge.db.tables import (
    InstanceRow,
    JobRow,
    ResultObjectRow,
    ResultRow,
    SeriesRow,
    StudyRow,
    utcnow,
)
from radbridge.errors import NotFoundError, PolicyError
from radbridge.lifecycle import CenterStudyState, JobState
from serving.schemas import InstanceResult, JobOut, StudyResults

__all__ = [
    "JobInstance",
    "backlog",
    "claim_job",
    "complete_study",
    "finish_job",
    "job_instances",
    "pending_jobs",
    "renew_leases",
    "save_result",
    "start_job",
    "study_instances",
    "study_results",
]

DEMO_NOTICE = "demo model — not for diagnostic use"


@dataclass(frozen=True)
class JobInstance:
    instance_id: int
    sop_instance_uid: str
    path: str
    modality: str | None
    body_part: str | None
    series_id: int = 0


def _find_study(
    s: Any,
    study_uid: str,
    agreement_id: str | None = None,
    agreements: frozenset[str] | None = None,
) -> StudyRow:
    """The study; another tenant's (outside ``agreements``) answers as a missing one."""
    q = select(StudyRow).where(StudyRow.study_uid == study_uid)
    if agreement_id:
        q = q.where(StudyRow.agreement_id == agreement_id)
    if agreements is not None:
        q = q.where(StudyRow.agreement_id.in_(sorted(agreements)))
    study = s.scalars(q).first()
    if study is None:
        raise NotFoundError("unknown study")
    return study


def complete_study(
    db: Database,
    study_uid: str,
    req: CompleteStudy,
    owner: str | None = None,
    lease_s: float = 0.0,
) -> tuple[JobRow, bool]:
    """Create the study's inference job (idempotent). Returns (job, created). A job created is
    held by ``owner`` for ``lease_s`` (the replica that will run it; see :func:`claim_job`)."""
    with db.session() as s:
        study = _find_study(s, study_uid, req.agreement_id)
        if study.instance_count < req.instance_count:
            raise PolicyError(
                f"study incomplete: {study.instance_count} of {req.instance_count} "
                "instances received"
            )
        latest = s.scalars(
            select(JobRow).where(JobRow.study_id == study.id).order_by(JobRow.id.desc())
        ).first()
        if latest is not None and _covers(latest, study):
            return latest, False
        study.state = CenterStudyState.COMPLETE
        study.priority = req.priority.value  # the worklist's order and SLA clock
        # A completion after a late instance is a new version of the study's results; the
        # earlier job and its results stay as they were.
        study.version = (study.version or 0) + 1
        job = JobRow(
            study_id=study.id,
            version=study.version,
            state=JobState.QUEUED,
            priority=req.priority.value,
            first_received_at=utcnow() - timedelta(seconds=req.edge_elapsed_s),
            created_at=utcnow(),
            owner=owner,
            lease_until=utcnow() + timedelta(seconds=lease_s) if owner else None,
        )
        s.add(job)
        s.flush()
        return job, True


def _covers(job: JobRow, study: StudyRow) -> bool:
    """Does ``job`` already see every instance of ``study``?

    A queued job reads its instances when it starts, so it sees late ones; a running or
    finished job saw only what had arrived before it started (or was created).
    """
    if job.state == JobState.QUEUED:
        return True
    since = job.started_at or job.created_at
    return since >= study.last_received_at


_UNFINISHED = (JobState.QUEUED, JobState.RUNNING)


def _free(owner: str, now: datetime) -> Any:
    """A job ``owner`` may take: unowned, its own, or its owner's lease run out."""
    return or_(
        JobRow.owner.is_(None),
        JobRow.owner == owner,
        JobRow.lease_until.is_(None),
        JobRow.lease_until < now,
    )


def pending_jobs(db: Database, owner: str) -> list[int]:
    """Queued or running jobs ``owner`` may resume: no live replica holds them (their replica
    died, or they were created without an owner)."""
    with db.session() as s:
        return list(
            s.scalars(
                select(JobRow.id).where(JobRow.state.in_(_UNFINISHED), _free(owner, utcnow()))
            )
        )


def claim_job(db: Database, job_id: int, owner: str, lease_s: float) -> bool:
    """Take the job for ``owner`` for ``lease_s`` if no other live replica holds it (one
    conditional UPDATE: of two replicas resuming it at once, one wins)."""
    now = utcnow()
    with db.session() as s:
        res = s.execute(
            update(JobRow)
            .where(JobRow.id == job_id, JobRow.state.in_(_UNFINISHED), _free(owner, now))
            .values(owner=owner, lease_until=now + timedelta(seconds=lease_s))
        )
        return bool(res.rowcount)  # type: ignore[attr-defined]


def renew_leases(db: Database, owner: str, lease_s: float) -> int:
    """Extend ``owner``'s hold on its unfinished jobs (called while the replica is alive)."""
    with db.session() as s:
        res = s.execute(
            update(JobRow)
            .where(JobRow.owner == owner, JobRow.state.in_(_UNFINISHED))
            .values(lease_until=utcnow() + timedelta(seconds=lease_s))
        )
        return int(res.rowcount or 0)  # type: ignore[attr-defined]


def backlog(db: Database) -> int:
    """Instances of studies whose job is queued or running: the center's inference queue."""
    with db.session() as s:
        n = s.scalar(
            select(func.count(InstanceRow.id))
            .join(SeriesRow, InstanceRow.series_id == SeriesRow.id)
            .join(JobRow, JobRow.study_id == SeriesRow.study_id)
            .where(JobRow.state.in_([JobState.QUEUED, JobState.RUNNING]))
        )
        return int(n or 0)


def start_job(db: Database, job_id: int) -> tuple[str, str | None, str, datetime | None]:
    """Mark running; returns (agreement_id, modality, priority, first_received_at)."""
    with db.session() as s:
        job = s.get(JobRow, job_id)
        if job is None:
            raise NotFoundError("unknown job")
        job.state, job.started_at = JobState.RUNNING, utcnow()
        study = s.get(StudyRow, job.study_id)
        assert study is not None
        s.query(ResultRow).filter(ResultRow.job_id == job_id).delete()
        # Objects of an interrupted run were never listed (only finished jobs' are): drop them.
        s.query(ResultObjectRow).filter(ResultObjectRow.job_id == job_id).delete()
        return study.agreement_id, study.modality, job.priority, job.first_received_at


def job_instances(db: Database, job_id: int) -> list[JobInstance]:
    with db.session() as s:
        job = s.get(JobRow, job_id)
        if job is None:
            raise NotFoundError("unknown job")
        return _instances(s, job.study_id)


def study_instances(
    db: Database, agreement_id: str, study_uid: str, count: int
) -> list[JobInstance] | None:
    """The study's instances, as its job will read them, if it holds exactly ``count``."""
    with db.session() as s:
        study = s.scalars(
            select(StudyRow).where(
                StudyRow.study_uid == study_uid, StudyRow.agreement_id == agreement_id
            )
        ).first()
        if study is None or study.instance_count != count:
            return None
        return _instances(s, study.id)


def _instances(s: Any, study_id: int) -> list[JobInstance]:
    rows = s.execute(
        select(InstanceRow, SeriesRow)
        .join(SeriesRow, InstanceRow.series_id == SeriesRow.id)
        .where(SeriesRow.study_id == study_id)
        .order_by(InstanceRow.id)
    ).all()
    return [
        JobInstance(i.id, i.sop_instance_uid, i.path, se.modality, se.body_part, se.id)
        for i, se in rows
    ]


def save_result(db: Database, job_id: int, instance_id: int, result: InstanceResult) -> None:
    with db.session() as s:
        s.add(
            ResultRow(
                job_id=job_id,
                instance_id=instance_id,
                model_name=result.model["name"],
                model_version=result.model["version"],
                model_sha256=result.model["sha256"],
                input_sha256=result.input_sha256,
                findings={
                    "findings": [f.model_dump() for f in result.findings],
                    "intended_use": result.intended_use,
                    "nodules": result.nodules,
                },
                timings_ms=result.timings_ms,
                provider=result.provider,
            )
        )


def finish_job(db: Database, job_id: int, error: str | None = None) -> None:
    with db.session() as s:
        job = s.get(JobRow, job_id)
        assert job is not None
        job.state = JobState.FAILED if error else JobState.DONE
        job.error = error
        job.finished_at = utcnow()


def study_results(
    db: Database, study_uid: str, agreements: frozenset[str] | None = None
) -> StudyResults:
    """The latest job of a study and its per-instance results (only of ``agreements``)."""
    with db.session() as s:
        study = _find_study(s, study_uid, agreements=agreements)
        job = s.scalars(
            select(JobRow).where(JobRow.study_id == study.id).order_by(JobRow.id.desc())
        ).first()
        if job is None:
            raise NotFoundError("study has no job yet")
        rows = s.execute(
            select(ResultRow, InstanceRow)
            .join(InstanceRow, ResultRow.instance_id == InstanceRow.id)
            .where(ResultRow.job_id == job.id)
            .order_by(ResultRow.id)
        ).all()
        results = [
            InstanceResult(
                sop_instance_uid=inst.sop_instance_uid,
                model={"name": r.model_name, "version": r.model_version, "sha256": r.model_sha256},
                input_sha256=r.input_sha256,
                provider=r.provider,
                findings=r.findings["findings"],
                timings_ms=r.timings_ms,
                intended_use=r.findings.get("intended_use", ""),
                nodules=r.findings.get("nodules") or [],
            )
            for r, inst in rows
        ]
        return StudyResults(
            study_uid=study.study_uid,
            job=JobOut(
                job_id=job.id,
                study_uid=study.study_uid,
                version=job.version,
                state=job.state,
                created_at=job.created_at,
                finished_at=job.finished_at,
                error=job.error,
            ),
            results=results,
            notice="; ".join(sorted({r.intended_use for r in results})) or DEMO_NOTICE,
        )
