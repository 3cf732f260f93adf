"""The study/series/instance index both nodes keep: find-or-create within one session."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from radbridge.db.tables import InstanceRow, SeriesRow, StudyRow, utcnow

__all__ = ["find_instance", "record_instance", "series_for", "study_for"]


def study_for(
    s: Session, agreement_id: str, study_uid: str, modality: str | None, initial_state: str
) -> StudyRow:
    """The study row of ``study_uid`` under ``agreement_id``, created in ``initial_state``."""
    study = s.scalars(
        select(StudyRow).where(
            StudyRow.agreement_id == agreement_id, StudyRow.study_uid == study_uid
        )
    ).first()
    if study is None:
        now = utcnow()
        study = StudyRow(
            agreement_id=agreement_id,
            study_uid=study_uid,
            state=initial_state,
            modality=modality,
            instance_count=0,
            first_received_at=now,
            last_received_at=now,
            attempts=0,
        )
        s.add(study)
        s.flush()
    return study


def series_for(
    s: Session, study: StudyRow, series_uid: str, modality: str | None, body_part: str | None
) -> SeriesRow:
    series = s.scalars(
        select(SeriesRow).where(SeriesRow.study_id == study.id, SeriesRow.series_uid == series_uid)
    ).first()
    if series is None:
        series = SeriesRow(
            study_id=study.id, series_uid=series_uid, modality=modality, body_part=body_part
        )
        s.add(series)
        s.flush()
    return series


def find_instance(s: Session, series: SeriesRow, sop_instance_uid: str) -> InstanceRow | None:
    return s.scalars(
        select(InstanceRow).where(
            InstanceRow.series_id == series.id, InstanceRow.sop_instance_uid == sop_instance_uid
        )
    ).first()


def record_instance(
    s: Session,
    study: StudyRow,
    series: SeriesRow,
    existing: InstanceRow | None,
    *,
    sop_instance_uid: str,
    sop_class_uid: str,
    transfer_syntax_uid: str,
    relpath: str,
    size: int,
    sha256: str,
) -> bool:
    """Index a stored file: a new row (study count +1) or the existing row re-pointed.

    Returns True when a new instance was added.
    """
    now = utcnow()
    study.last_received_at = now
    if existing is not None:
        # The earlier file stays in the store; the row points at the newest and counts versions.
        existing.path, existing.size, existing.sha256 = relpath, size, sha256
        existing.transfer_syntax_uid = transfer_syntax_uid
        existing.received_at = now
        existing.version += 1
        return False
    s.add(
        InstanceRow(
            series_id=series.id,
            sop_instance_uid=sop_instance_uid,
            sop_class_uid=sop_class_uid,
            transfer_syntax_uid=transfer_syntax_uid,
            path=relpath,
            size=size,
            sha256=sha256,
            received_at=now,
            version=1,
        )
    )
    # In SQL, not in Python: two replicas adding to the same study must not lose a count.
    study.instance_count = StudyRow.instance_count + 1  # type: ignore[assignment]
    return True
