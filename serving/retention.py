"""Retention at the reading center: what it keeps of a study, and for how long.

A study's retention clock starts when its read went home: the edge fetched the final report
(``reads.sent_at``, set as it fetches it; every earlier result object of the agreement was
listed to the edge before it). Then, per agreement (``retention`` in the agreements file):

- after ``images_hours`` the images go: their files, instance and series rows (and the AI's
  per-instance findings, which name the instances); the study row stays as ``images-purged``;
- after ``reports_hours`` the rest goes: report and result-object files, and the study's rows
  (jobs, results, result objects, the read, its reports), so nothing of it is left.

A study the edge never completed has no read and no job: instances sent during its quiet period
by an edge that then stopped, blocked it, or held it for consent. It goes whole
``incomplete_hours`` after its last instance (reason "never completed"), so pseudonymous images
do not stay at the center without a purpose.

The edge may also ask for a study to be purged now (a withdrawn consent): :func:`purge_now`.

Each purge is crash-safe: the study is first marked (``purging-images`` / ``purging``) in its
own transaction, by compare-and-swap so two replicas never purge one study twice; then its files
are deleted (a missing file is fine); then its rows, with the audit record (110105 DICOM Study
Deleted) in the same database. A purge cut short is found by its mark and finished on the next
run. Rows go only after their files, so no row ever points to a deleted file for long; a file
without a row is impossible after a finished purge.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Literal

from sqlalchemy import delete, func, or_, select, update
from sqlalchemy.orm import Session

from dicom_io.store import DurableStore
from radbridge.agreements import AgreementSet
from radbridge.audit import AuditTrail
from radbridge.db.engine import Database
from radbridge.db.tables import (
    InstanceRow,
    JobRow,
    ReadRow,
    ResultObjectRow,
    SeriesRow,
    StudyRow,
    utcnow,
)
from radbridge.errors import NotFoundError, PolicyError
from radbridge.lifecycle import CenterStudyState, JobState

__all__ = ["Due", "disk_usage", "due", "purge", "purge_now", "run"]

log = logging.getLogger(__name__)

What = Literal["images", "study"]
_MARK: dict[str, str] = {
    "images": CenterStudyState.PURGING_IMAGES.value,
    "study": CenterStudyState.PURGING.value,
}


@dataclass(frozen=True)
class Due:
    """A purge that is due: ``what`` of study ``study_id``, and why."""

    study_id: int
    agreement_id: str
    study_uid: str  # pseudonymous, as the center knows it
    what: What
    reason: str  # "retention" or "edge-request" (e.g. a withdrawn consent)
    files: int
    bytes: int


def due(db: Database, agreements: AgreementSet, now: datetime | None = None) -> list[Due]:
    """Every purge due at ``now``: studies past their agreement's retention, and purges that
    were started and not finished (whatever their cause)."""
    now = now or utcnow()
    out: list[Due] = []
    with db.session() as s:
        # Only a study whose read went home, or one a purge was started on, can be due: the
        # rest of the center's studies are not loaded at all.
        rows: list[tuple[StudyRow, datetime | None]] = [
            (study, sent_at)
            for study, sent_at in s.execute(
                select(StudyRow, ReadRow.sent_at)
                .outerjoin(ReadRow, ReadRow.study_id == StudyRow.id)
                .where(or_(ReadRow.sent_at.is_not(None), StudyRow.state.in_(list(_MARK.values()))))
            ).all()
        ]
        never: set[int] = set()
        never_completed = s.scalars(
            select(StudyRow).where(
                StudyRow.state == CenterStudyState.RECEIVING,
                ~select(JobRow.id).where(JobRow.study_id == StudyRow.id).exists(),
            )
        ).all()
        for study in never_completed:
            agreement = agreements.get(study.agreement_id)
            if agreement is None:
                continue
            idle = timedelta(hours=agreement.retention.incomplete_hours)
            if now >= study.last_received_at + idle:
                rows.append((study, None))
                never.add(study.id)
        for study, sent_at in rows:
            what: What | None = None
            reason = "retention"
            if study.id in never:
                what, reason = "study", "never completed"
            elif study.state == CenterStudyState.PURGING:
                what, reason = "study", "unfinished purge"
            elif study.state == CenterStudyState.PURGING_IMAGES:
                what, reason = "images", "unfinished purge"
            elif sent_at is not None:
                agreement = agreements.get(study.agreement_id)
                if agreement is None:
                    continue  # an agreement no longer in the file: kept until a person decides
                keep = agreement.retention
                if now >= sent_at + timedelta(hours=keep.reports_hours):
                    what = "study"
                elif now >= sent_at + timedelta(hours=keep.images_hours) and (
                    study.state != CenterStudyState.IMAGES_PURGED
                ):
                    what = "images"
            if what is not None:
                files, size = _files(s, study.id, what)
                item = Due(study.id, study.agreement_id, study.study_uid, what, reason, 0, 0)
                out.append(replace(item, files=len(files), bytes=size))
    return out


def purge(db: Database, store: DurableStore, audit: AuditTrail, item: Due) -> bool:
    """Carry out one due purge; False when another worker took it first (or it is gone)."""
    mark = _MARK[item.what]
    # A new purge takes a study no purge holds; an unfinished one is finished where it stands.
    unfinished = item.reason == "unfinished purge"
    with db.session() as s:
        taken = s.execute(
            update(StudyRow)
            .where(
                StudyRow.id == item.study_id,
                StudyRow.state == mark
                if unfinished
                else StudyRow.state.not_in(list(_MARK.values())),
            )
            .values(state=mark)
        )
        if taken.rowcount != 1:  # type: ignore[attr-defined]
            return False
    with db.session() as s:
        paths, _ = _files(s, item.study_id, item.what)
    for path in paths:
        store.delete(path)  # a file already gone (a purge cut short) is fine
    _prune_dirs(store, paths)
    with db.session() as s:
        if item.what == "images":
            series = select(SeriesRow.id).where(SeriesRow.study_id == item.study_id)
            s.execute(delete(InstanceRow).where(InstanceRow.series_id.in_(series)))
            s.execute(delete(SeriesRow).where(SeriesRow.study_id == item.study_id))
            s.execute(
                update(StudyRow)
                .where(StudyRow.id == item.study_id)
                .values(state=CenterStudyState.IMAGES_PURGED.value, instance_count=0)
            )
        else:
            # ON DELETE CASCADE takes the series, instances, jobs, results, result objects,
            # the read and its reports with the study.
            s.execute(delete(StudyRow).where(StudyRow.id == item.study_id))
    audit.record(
        "study-deleted",
        agreement_id=item.agreement_id,
        study_uid=item.study_uid,
        details={
            "what": item.what,
            "reason": item.reason,
            "files": item.files,
            "bytes": item.bytes,
        },
    )
    log.info(
        "purged %s of study %s (%s): %d files, %d bytes",
        item.what,
        item.study_id,
        item.reason,
        item.files,
        item.bytes,
    )
    return True


def run(
    db: Database,
    store: DurableStore,
    audit: AuditTrail,
    agreements: AgreementSet,
    now: datetime | None = None,
    *,
    dry_run: bool = False,
) -> list[Due]:
    """One retention pass: the purges due, carried out unless ``dry_run``."""
    items = due(db, agreements, now)
    if dry_run:
        return items
    return [item for item in items if purge(db, store, audit, item)]


def purge_now(
    db: Database,
    store: DurableStore,
    audit: AuditTrail,
    agreement_id: str,
    study_uid: str,
    reason: str = "edge-request",
) -> Due | None:
    """Purge a study of ``agreement_id`` at once (the edge asked: e.g. a withdrawn consent).
    None when the center holds no such study (already purged: the request is idempotent);
    :class:`PolicyError` while its job is queued or running (the edge asks again later)."""
    with db.session() as s:
        study = s.scalars(
            select(StudyRow).where(
                StudyRow.agreement_id == agreement_id, StudyRow.study_uid == study_uid
            )
        ).first()
        if study is None:
            return None
        busy = s.scalar(
            select(func.count(JobRow.id)).where(
                JobRow.study_id == study.id,
                JobRow.state.in_((JobState.QUEUED.value, JobState.RUNNING.value)),
            )
        )
        if busy:
            raise PolicyError("the study's inference job is still running: ask again later")
        files, size = _files(s, study.id, "study")
        item = Due(study.id, agreement_id, study_uid, "study", reason, len(files), size)
    if not purge(db, store, audit, item):
        raise NotFoundError("the study is being purged already")
    return item


def disk_usage(db: Database) -> dict[str, int]:
    """Bytes the center's store holds per agreement (images and result objects)."""
    with db.session() as s:
        images = s.execute(
            select(StudyRow.agreement_id, func.coalesce(func.sum(InstanceRow.size), 0))
            .join(SeriesRow, SeriesRow.study_id == StudyRow.id)
            .join(InstanceRow, InstanceRow.series_id == SeriesRow.id)
            .group_by(StudyRow.agreement_id)
        ).all()
        objects = s.execute(
            select(
                ResultObjectRow.agreement_id, func.coalesce(func.sum(ResultObjectRow.size), 0)
            ).group_by(ResultObjectRow.agreement_id)
        ).all()
    out: dict[str, int] = {}
    for agreement_id, size in [*images, *objects]:
        out[agreement_id] = out.get(agreement_id, 0) + int(size)
    return out


def _files(s: Session, study_id: int, what: What) -> tuple[list[str], int]:
    """(paths, total bytes) of the files a purge of ``what`` deletes."""
    rows = list(
        s.execute(
            select(InstanceRow.path, InstanceRow.size)
            .join(SeriesRow, InstanceRow.series_id == SeriesRow.id)
            .where(SeriesRow.study_id == study_id)
        ).all()
    )
    if what == "study":
        rows += s.execute(
            select(ResultObjectRow.path, ResultObjectRow.size)
            .join(JobRow, ResultObjectRow.job_id == JobRow.id)
            .where(JobRow.study_id == study_id)
        ).all()
    return [r[0] for r in rows], sum(int(r[1]) for r in rows)


def _prune_dirs(store: DurableStore, paths: list[str]) -> None:
    """Remove the folders the purge emptied (they are named by pseudonymous UIDs)."""
    root = store.root.resolve()
    for folder in sorted({store.path(p).parent.resolve() for p in paths}, reverse=True):
        while folder != root and root in folder.parents:
            try:
                folder.rmdir()
            except OSError:
                break  # not empty (another study's, or more to come) or already gone
            folder = folder.parent
