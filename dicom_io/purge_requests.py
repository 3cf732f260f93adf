"""The edge's outbox of purge requests: studies the center must delete now (a withdrawn
consent). A request is written to the database first and sent until the center confirms it
(``POST /v1/studies/{uid}/purge``; idempotent there), with backoff; 409 (the study's job still
runs) and an unreachable center are retried, never dropped."""

from __future__ import annotations

import logging
import threading
from datetime import datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from radbridge.audit import AuditTrail
from radbridge.contract import CenterClient, PurgeStudy, backoff_s
from radbridge.db.engine import Database
from radbridge.db.tables import PurgeRequestRow, utcnow
from radbridge.errors import CenterError

__all__ = ["PurgeOutbox", "enqueue_purge", "pending_purges"]

log = logging.getLogger(__name__)


def enqueue_purge(db: Database, agreement_id: str, study_uid: str, reason: str) -> int:
    """Queue a purge of the center's study ``study_uid`` (pseudonymous); 1 if new, 0 if it
    was queued before."""
    try:
        with db.session() as s:
            s.add(
                PurgeRequestRow(
                    agreement_id=agreement_id,
                    study_uid=study_uid,
                    reason=reason,
                    state="pending",
                    attempts=0,
                )
            )
    except IntegrityError:
        return 0
    return 1


def pending_purges(db: Database) -> int:
    with db.session() as s:
        rows = s.scalars(select(PurgeRequestRow.id).where(PurgeRequestRow.state == "pending"))
        return len(rows.all())


class PurgeOutbox:
    def __init__(
        self,
        db: Database,
        center: CenterClient,
        *,
        retry_base_s: float = 5.0,
        retry_max_s: float = 600.0,
        audit: AuditTrail | None = None,
    ) -> None:
        self.db, self._center, self._audit = db, center, audit
        self._retry_base_s, self._retry_max_s = retry_base_s, retry_max_s

    def run(self, stop: threading.Event, interval_s: float) -> None:
        while not stop.is_set():
            try:
                self.tick()
            except Exception as exc:  # the loop must survive anything; requests stay queued
                log.error("purge outbox tick failed: %s", type(exc).__name__)
            stop.wait(interval_s)

    def close(self) -> None:
        self._center.close()

    def tick(self, now: datetime | None = None) -> int:
        """Send every request that is due; returns how many the center confirmed."""
        now = now or utcnow()
        with self.db.session() as s:
            due = s.scalars(
                select(PurgeRequestRow).where(
                    PurgeRequestRow.state == "pending",
                    (PurgeRequestRow.next_attempt_at.is_(None))
                    | (PurgeRequestRow.next_attempt_at <= now),
                )
            ).all()
        done = 0
        for request in due:
            body = PurgeStudy(agreement_id=request.agreement_id, reason=request.reason)  # type: ignore[arg-type]
            try:
                answer = self._center.purge(request.study_uid, body)
            except CenterError as exc:
                attempts = request.attempts + 1
                delay = backoff_s(
                    attempts, self._retry_base_s, self._retry_max_s, exc.retry_after_s
                )
                log.warning("purge request %s failed (%s); retry in %.0fs", request.id, exc, delay)
                with self.db.session() as s:
                    s.execute(
                        update(PurgeRequestRow)
                        .where(PurgeRequestRow.id == request.id)
                        .values(
                            attempts=attempts,
                            next_attempt_at=utcnow() + timedelta(seconds=delay),
                            last_error=str(exc)[:500],
                        )
                    )
                continue
            with self.db.session() as s:
                s.execute(
                    update(PurgeRequestRow)
                    .where(PurgeRequestRow.id == request.id)
                    .values(state="done", done_at=utcnow(), last_error=None)
                )
            if self._audit is not None:
                self._audit.record(
                    "study-deleted",
                    agreement_id=request.agreement_id,
                    study_uid=request.study_uid,
                    details={
                        "where": "center",
                        "reason": request.reason,
                        "center_held_it": answer.purged,
                        "files": answer.files,
                    },
                )
            done += 1
        return done
