"""The edge's receive path: durable write of the original, then its index rows.

Order matters: the file is fsynced and renamed into the store, then the index row is committed;
only then may the SCP answer 0x0000. A failure between the two leaves a file without a row,
which is harmless (it is re-written on the SCU's retry) and never a row without a file.
"""

from __future__ import annotations

import hashlib
import threading

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from dicom_io.header import InstanceHeader
from dicom_io.store import DurableStore
from radbridge.db.engine import Database
from radbridge.db.tables import InstanceRow, SeriesRow, StudyRow, utcnow
from radbridge.lifecycle import EdgeStudyState

__all__ = ["IngestOutcome", "Ingestor"]


class IngestOutcome:
    STORED = "stored"
    DUPLICATE = "duplicate"  # identical re-send: idempotent success
    NEW_VERSION = "new_version"  # same SOP Instance UID, different bytes: kept beside the old


class Ingestor:
    def __init__(self, db: Database, store: DurableStore) -> None:
        self.db = db
        self.store = store
        self._lock = threading.Lock()  # serialises index updates of one gateway process

    def ingest(self, agreement_id: str, header: InstanceHeader, encoded: bytes) -> str:
        digest = hashlib.sha256(encoded).hexdigest()
        with self._lock:
            for attempt in range(3):
                try:
                    return self._ingest_once(agreement_id, header, encoded, digest)
                except IntegrityError:  # another replica created the same study/series first
                    if attempt == 2:
                        raise
        raise AssertionError("unreachable")

    def _ingest_once(
        self, agreement_id: str, header: InstanceHeader, encoded: bytes, digest: str
    ) -> str:
        with self.db.session() as s:
            study = _study(s, agreement_id, header)
            series = _series(s, study, header)
            existing = s.scalars(
                select(InstanceRow).where(
                    InstanceRow.series_id == series.id,
                    InstanceRow.sop_instance_uid == header.sop_instance_uid,
                )
            ).first()
            if existing is not None and existing.sha256 == digest:
                return IngestOutcome.DUPLICATE
            relpath = (
                f"{agreement_id}/{header.study_uid}/{header.series_uid}/"
                f"{header.sop_instance_uid}.{digest[:12]}.dcm"
            )
            stored = self.store.write(relpath, encoded)
            now = utcnow()
            if existing is None:
                s.add(
                    InstanceRow(
                        series_id=series.id,
                        sop_instance_uid=header.sop_instance_uid,
                        sop_class_uid=header.sop_class_uid,
                        transfer_syntax_uid=header.transfer_syntax_uid,
                        path=stored.relpath,
                        size=stored.size,
                        sha256=stored.sha256,
                        received_at=now,
                    )
                )
                study.instance_count += 1
                outcome = IngestOutcome.STORED
            else:  # the previous file stays in the store; the row points at the newest
                existing.path, existing.size, existing.sha256 = (
                    stored.relpath,
                    stored.size,
                    stored.sha256,
                )
                existing.received_at = now
                outcome = IngestOutcome.NEW_VERSION
            study.last_received_at = now
            if study.state != EdgeStudyState.BLOCKED:
                study.state = EdgeStudyState.RECEIVING
            study.next_attempt_at = None
            return outcome


def _study(s: Session, agreement_id: str, h: InstanceHeader) -> StudyRow:
    study = s.scalars(
        select(StudyRow).where(
            StudyRow.agreement_id == agreement_id, StudyRow.study_uid == h.study_uid
        )
    ).first()
    if study is None:
        now = utcnow()
        study = StudyRow(
            agreement_id=agreement_id,
            study_uid=h.study_uid,
            state=EdgeStudyState.RECEIVING,
            modality=h.modality,
            instance_count=0,
            first_received_at=now,
            last_received_at=now,
            attempts=0,
        )
        s.add(study)
        s.flush()
    return study


def _series(s: Session, study: StudyRow, h: InstanceHeader) -> SeriesRow:
    series = s.scalars(
        select(SeriesRow).where(
            SeriesRow.study_id == study.id, SeriesRow.series_uid == h.series_uid
        )
    ).first()
    if series is None:
        series = SeriesRow(
            study_id=study.id, series_uid=h.series_uid, modality=h.modality, body_part=h.body_part
        )
        s.add(series)
        s.flush()
    return series
