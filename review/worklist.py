"""The worklist: studies awaiting a read, in the order a reading room works them, and claims.

A study is on the worklist once its center job has ended (done, or failed: the read is what the
hospital pays for, with or without the AI) and until a final report is signed. Order: priority
(STAT, urgent, routine), then AI urgency (a study with a positive AI finding first), then the
SLA deadline (first received at the edge + the agreement's ``sla_minutes`` for the priority).

A study is claimed by one reader at a time; a claim lapses after :data:`CLAIM_TTL` without
activity by its holder, so a reader who walked away does not block a STAT study.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from radbridge.agreements import AgreementSet, Priority
from radbridge.db.engine import Database
from radbridge.db.tables import (
    JobRow,
    ReaderRow,
    ReadRow,
    ReportRow,
    ResultRow,
    SeriesRow,
    StudyRow,
    utcnow,
)
from radbridge.errors import NotFoundError, PolicyError
from radbridge.lifecycle import JobState
from review.readers import Reader

__all__ = [
    "CLAIM_TTL",
    "PRIORITY_RANK",
    "WorklistFilter",
    "WorklistRow",
    "claim",
    "etag",
    "release",
    "study_for",
    "worklist",
]

CLAIM_TTL = timedelta(minutes=30)
PRIORITY_RANK = {Priority.STAT.value: 0, Priority.URGENT.value: 1, Priority.ROUTINE.value: 2}
_ENDED = (JobState.DONE.value, JobState.FAILED.value)


@dataclass(frozen=True)
class WorklistFilter:
    agreement: str | None = None
    modality: str | None = None
    priority: str | None = None


@dataclass(frozen=True)
class WorklistRow:
    study_id: int
    agreement_id: str
    hospital: str
    modality: str | None
    body_part: str | None
    priority: str
    ai_positive: bool
    ai_failed: bool
    ai_summary: list[dict[str, object]]  # [{label, display{lang: name}, probability}]
    received_at: str
    deadline: str
    status: str  # unread, claimed, preliminary
    claimed_by: str | None
    mine: bool


def worklist(
    db: Database,
    agreements: AgreementSet,
    reader: Reader,
    filters: WorklistFilter = WorklistFilter(),
    now: datetime | None = None,
) -> list[WorklistRow]:
    """The reader's worklist, ordered (see the module's docstring)."""
    now = now or utcnow()
    visible = reader.visible(agreements)
    if filters.agreement is not None:
        visible = visible & {filters.agreement}
    if not visible:
        return []
    with db.session() as s:
        latest = (
            select(JobRow.study_id, func.max(JobRow.id).label("job_id"))
            .group_by(JobRow.study_id)
            .subquery()
        )
        finals = select(ReportRow.study_id).where(ReportRow.status == "final")
        q = (
            select(StudyRow, JobRow, ReadRow)
            .join(latest, latest.c.study_id == StudyRow.id)
            .join(JobRow, JobRow.id == latest.c.job_id)
            .outerjoin(ReadRow, ReadRow.study_id == StudyRow.id)
            .where(
                StudyRow.agreement_id.in_(sorted(visible)),
                JobRow.state.in_(_ENDED),
                StudyRow.id.not_in(finals),
            )
        )
        if filters.priority is not None:
            q = q.where(StudyRow.priority == filters.priority)
        found = s.execute(q).all()
        # Three more queries for the whole list, not three per row (the page polls every 5 s).
        study_ids = [study.id for study, _, _ in found]
        first_series: dict[int, tuple[str | None, str | None]] = {}
        for sid, modality, body_part in s.execute(
            select(SeriesRow.study_id, SeriesRow.modality, SeriesRow.body_part)
            .where(SeriesRow.study_id.in_(study_ids))
            .order_by(SeriesRow.id)
        ):
            first_series.setdefault(sid, (modality, body_part))
        findings: dict[int, list[dict[str, object]]] = {}
        for job_id, result in s.execute(
            select(ResultRow.job_id, ResultRow.findings).where(
                ResultRow.job_id.in_([job.id for _, job, _ in found])
            )
        ):
            findings.setdefault(job_id, []).extend(result.get("findings", []))
        claimers = {read.claimed_by for _, _, read in found if read and read.claimed_by}
        usernames = dict(
            s.execute(
                select(ReaderRow.id, ReaderRow.username).where(ReaderRow.id.in_(claimers))
            ).all()
        )
        rows: list[WorklistRow] = []
        for study, job, read in found:
            series = first_series.get(study.id)
            modality = study.modality or (series[0] if series else None)
            if filters.modality is not None and modality != filters.modality:
                continue
            agreement = agreements.get(study.agreement_id)
            assert agreement is not None
            received = job.first_received_at or study.first_received_at
            sla = agreement.sla_minutes.get(Priority(study.priority), 1440)
            summary, positive = _ai_summary(findings.get(job.id, []))
            holder = _holder(read, now, usernames)
            status = "unread"
            if read is not None and read.preliminary_at is not None:
                status = "preliminary"
            elif holder is not None:
                status = "claimed"
            rows.append(
                WorklistRow(
                    study_id=study.id,
                    agreement_id=study.agreement_id,
                    hospital=agreement.hospital.name,
                    modality=modality,
                    body_part=series[1] if series else None,
                    priority=study.priority,
                    ai_positive=positive,
                    ai_failed=job.state == JobState.FAILED.value,
                    ai_summary=summary,
                    received_at=received.isoformat(),
                    deadline=(received + timedelta(minutes=sla)).isoformat(),
                    status=status,
                    claimed_by=holder[1] if holder else None,
                    mine=holder is not None and holder[0] == reader.id,
                )
            )
    rows.sort(key=lambda r: (PRIORITY_RANK.get(r.priority, 3), not r.ai_positive, r.deadline))
    return rows


def etag(rows: list[WorklistRow]) -> str:
    """A strong validator of the list as the reader would see it (for If-None-Match)."""
    body = json.dumps([asdict(r) for r in rows], sort_keys=True, default=str)
    return '"' + hashlib.sha256(body.encode()).hexdigest()[:32] + '"'


def _ai_summary(findings: list[dict[str, Any]]) -> tuple[list[dict[str, object]], bool]:
    """The positive findings of a job's results (the best per label), most probable first."""
    best: dict[str, dict[str, object]] = {}
    for f in findings:
        key = str(f["label"])
        if key not in best or float(f["probability"]) > float(best[key]["probability"]):  # type: ignore[arg-type]
            best[key] = {
                "label": key,
                "display": f.get("display", {}),
                "probability": f["probability"],
                "present": bool(f["present"]),
            }
    present = [b for b in best.values() if b["present"]]
    present.sort(key=lambda b: -float(b["probability"]))  # type: ignore[arg-type]
    return present, bool(present)


def _holder(
    read: ReadRow | None, now: datetime, usernames: dict[int, str]
) -> tuple[int, str] | None:
    """(reader id, username) of a live claim, or None."""
    if read is None or read.claimed_by is None or read.claimed_at is None:
        return None
    if now - read.claimed_at >= CLAIM_TTL:
        return None
    return (read.claimed_by, usernames.get(read.claimed_by, "?"))


def _usernames(s: Session, read: ReadRow | None) -> dict[int, str]:
    if read is None or read.claimed_by is None:
        return {}
    name = s.scalar(select(ReaderRow.username).where(ReaderRow.id == read.claimed_by))
    return {read.claimed_by: name} if name else {}


def study_for(s: Session, study_id: int, reader: Reader, agreements: AgreementSet) -> StudyRow:
    """The study, if the reader may see it; another agreement's answers as a missing one."""
    study = s.get(StudyRow, study_id)
    if study is None or study.agreement_id not in reader.visible(agreements):
        raise NotFoundError("no study with that id")
    return study


def claim(
    db: Database,
    study_id: int,
    reader: Reader,
    agreements: AgreementSet,
    now: datetime | None = None,
) -> bool:
    """Claim the study for ``reader`` (or refresh their claim). Returns True when the read was
    opened now for the first time. :class:`PolicyError` when another reader holds it.

    The claim is a compare-and-swap (an UPDATE whose WHERE says "free, mine or lapsed"), so two
    readers clicking at once cannot both hold the study, on SQLite or PostgreSQL."""
    now = now or utcnow()
    with db.session() as s:
        study_for(s, study_id, reader, agreements)
        known = s.scalar(select(ReadRow.id).where(ReadRow.study_id == study_id))
    if known is None:
        try:
            with db.session() as s:
                s.add(ReadRow(study_id=study_id))
        except IntegrityError:
            pass  # another request made it meanwhile
    with db.session() as s:
        taken = s.execute(
            update(ReadRow)
            .where(
                ReadRow.study_id == study_id,
                or_(
                    ReadRow.claimed_by.is_(None),
                    ReadRow.claimed_by == reader.id,
                    ReadRow.claimed_at <= now - CLAIM_TTL,
                ),
            )
            .values(claimed_by=reader.id, claimed_at=now)
        )
        if taken.rowcount != 1:  # type: ignore[attr-defined]
            read = s.scalar(select(ReadRow).where(ReadRow.study_id == study_id))
            holder = _holder(read, now, _usernames(s, read))
            raise PolicyError(
                f"the study is being read by {holder[1] if holder else 'another reader'}"
            )
        opened = s.execute(
            update(ReadRow)
            .where(ReadRow.study_id == study_id, ReadRow.opened_at.is_(None))
            .values(opened_at=now)
        )
        return bool(opened.rowcount)  # type: ignore[attr-defined]


def release(db: Database, study_id: int, reader: Reader, agreements: AgreementSet) -> None:
    with db.session() as s:
        study = study_for(s, study_id, reader, agreements)
        read = s.scalar(select(ReadRow).where(ReadRow.study_id == study.id))
        if read is not None and read.claimed_by == reader.id:
            read.claimed_by, read.claimed_at = None, None
