"""The study/series/instance index both nodes keep: find-or-create within one session."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from radbridge.db.tables import InstanceRow, SeriesRow, StudyRow, utcnow

__all__ = ["find_instance", "instance_digests", "record_instance", "series_for", "study_for"]

_IN_LIMIT = 500  # UIDs per IN (...) list: SQLite's default bound on parameters is far above


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


def instance_digests(
    s: Session, series_ids: list[int], sop_instance_uids: list[str]
) -> dict[tuple[int, str], str]:
    """The sha256 of each of ``sop_instance_uids`` already indexed in one of ``series_ids``,
    keyed by (series id, SOP Instance UID): one query per 500 UIDs, not one per instance."""
    found: dict[tuple[int, str], str] = {}
    if not series_ids:
        return found
    unique = sorted(set(sop_instance_uids))
    for start in range(0, len(unique), _IN_LIMIT):
        rows = s.execute(
            select(InstanceRow.series_id, InstanceRow.sop_instance_uid, InstanceRow.sha256).where(
                InstanceRow.series_id.in_(series_ids),
                InstanceRow.sop_instance_uid.in_(unique[start : start + _IN_LIMIT]),
            )
        )
        for series_id, uid, digest in rows:
            found[(series_id, uid)] = digest
    return found


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
