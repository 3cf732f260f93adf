"""The edge's inbox: fetch result objects (SR, SEG), re-identify them, C-STORE them to the PACS.

The database is the outbox, as for forwarding. ``poll()`` lists the center's new result objects
per active agreement (after the highest center object id already known) and inserts one
``deliveries`` row each, idempotently (unique on agreement + center object id), so replicas
may poll side by side. ``run()`` keeps one listener per active agreement whose listing waits at
the center (``wait_s``, a long poll) until the first new object is built, then wakes ``tick()``:
a finished job reaches the PACS without waiting for a poll interval.

``tick()`` claims each due row and attempts it (``dicom_io.delivery_step``: download, sha256
and signature checked, re-identified from the identity map and an original instance of the
study, C-STOREd to the agreement's return destination): up to ``DELIVERY_THREADS`` objects
side by side, each on its own association (a study's SEG and SR reach the PACS together).
Failures are retried with exponential backoff; ``ReidentificationError`` (the result cannot be
tied to what this edge sent) and a refused signature are final. A delivered object is never
sent again unless a person asks (``resend``).

Claims. There is no "delivering" state: a claim is a compare-and-swap on ``attempts`` (the
attempt counter goes up by one) that also moves ``next_attempt_at`` to a lease in the future.
Of two replicas that picked the same row exactly one claim succeeds; a replica that dies
mid-attempt leaves the row due again once the lease runs out.

Maximum age. Each delivery gets at least one attempt (also a manual resend, or a fresh row
polled after a long outage); once ``now - result_ready_at > max_age_s`` a failed attempt does
not schedule another but makes the row ``dead``, and a retrying row found past the age is made
dead without another attempt.

Nothing here logs or stores identity: messages name delivery ids, center object ids, agreement
ids and DIMSE statuses only; the center's own answers carry only pseudonymous data.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime, timedelta

from sqlalchemy import ColumnElement, case, func, select, update

from dicom_io.delivery_step import (
    PACS_OK_STATUSES,
    PAGE_SIZE,
    AttemptFailed,
    DeliveryStep,
    Sent,
    unknown_study,
)
from dicom_io.store import DurableStore
from radbridge.agreements import Agreement, AgreementSet
from radbridge.audit import AuditTrail
from radbridge.clock import WallClock
from radbridge.contract import CenterClient, ResultObject, backoff_s
from radbridge.db.engine import Database
from radbridge.db.tables import DeliveryRow, StudyRow, utcnow
from radbridge.errors import (
    NotFoundError,
    ReidentificationError,
    redacted,
)
from radbridge.lifecycle import DeliveryState
from radbridge.metrics import EdgeMetrics, safe_label
from radbridge.signing import ResultVerifier

__all__ = ["PACS_OK_STATUSES", "Deliverer", "ResultObject", "resend_delivery"]

log = logging.getLogger("radbridge.edge.delivery")

_STOP_CHECK_S = 0.25  # run() notices stop this soon
BATCH = 200  # due deliveries considered per tick
DELIVERY_THREADS = 4  # objects delivered at once, each on its own association to the PACS
_PRIORITY_ORDER = {"stat": 0, "urgent": 1}


class Deliverer:
    """The edge's inbox of result objects: listens for the center's new ones, queues a row
    each, and attempts the due rows side by side (claims, retries, maximum age); each attempt
    is a ``DeliveryStep``."""

    def __init__(
        self,
        db: Database,
        store: DurableStore,
        agreements: Callable[[], AgreementSet],
        center: CenterClient,
        calling_ae: str,
        metrics: EdgeMetrics,
        *,
        timeout_s: float = 60.0,
        retry_base_s: float = 2.0,
        retry_max_s: float = 300.0,
        max_age_s: float = 7 * 86_400.0,
        results: ResultVerifier,
        edge_id: str,
        audit: AuditTrail | None = None,
        wait_s: float = 0.0,
    ) -> None:
        """``results`` verifies the center's signature of each object before anything else
        is done with it; ``edge_id`` is this edge as the center's signatures name it.
        ``wait_s`` > 0: ``run()`` listens (long polls) instead of listing every interval."""
        self._wait_s = wait_s
        self._wake = threading.Event()  # a listener queued something: tick now
        self._closing = False
        self._listeners: dict[str, threading.Thread] = {}
        self._audit = audit  # DICOM Instances Transferred per delivery, refusals as alerts
        self.db, self.store, self._agreements = db, store, agreements
        self._metrics = metrics
        self._retry_base_s, self._retry_max_s = retry_base_s, retry_max_s
        self._max_age = timedelta(seconds=max_age_s)
        # A claimed row is due again after this long: longer than one attempt can take
        # (listing, download, association, store: each bounded by timeout_s).
        self._lease = timedelta(seconds=max(60.0, 5 * timeout_s))
        self._center = center
        self._step = DeliveryStep(db, store, center, results, edge_id, calling_ae, timeout_s)
        self._poll_failing: set[str] = set()
        self._clock = WallClock()
        # Objects are delivered side by side (a study's SEG and SR on two associations): the
        # waits of one (listing, download, the PACS's answer) overlap the work of the other.
        self._delivering = ThreadPoolExecutor(
            DELIVERY_THREADS, thread_name_prefix="radbridge-deliver"
        )

    def run(self, stop: threading.Event, interval_s: float) -> None:
        """Deliver until ``stop``: ``tick()`` every ``interval_s`` (retries fall due) and at
        once when a listener queued new objects; without ``wait_s``, ``poll()`` before each."""
        next_tick = 0.0
        while not stop.is_set():
            if self._wait_s > 0:
                self._keep_listening(stop, interval_s)
            if self._wake.is_set() or time.monotonic() >= next_tick:
                self._wake.clear()  # a wake-up after this runs the loop again
                steps = (self.tick,) if self._wait_s > 0 else (self.poll, self.tick)
                for step in steps:
                    self._survive(step)
                next_tick = time.monotonic() + interval_s
            self._wake.wait(min(interval_s, _STOP_CHECK_S))

    def _survive(self, step: Callable[[], object]) -> None:
        try:
            step()
        except Exception as exc:  # the loop must survive anything; rows stay queued
            log.error("delivery %s failed: %s", getattr(step, "__name__", step), redacted(exc))

    def _keep_listening(self, stop: threading.Event, interval_s: float) -> None:
        """One listener thread per active agreement (agreements may change while running)."""
        today = utcnow().date()
        for agreement in self._agreements().agreements:
            thread = self._listeners.get(agreement.id)
            if agreement.is_active(today) and (thread is None or not thread.is_alive()):
                thread = threading.Thread(
                    target=self._listen,
                    args=(agreement.id, stop, interval_s),
                    name=f"radbridge-results-{agreement.id}"[:60],
                    daemon=True,
                )
                self._listeners[agreement.id] = thread
                thread.start()

    def _listen(self, agreement_id: str, stop: threading.Event, interval_s: float) -> None:
        """List the agreement's new objects with a long poll, queue them, wake ``tick()``.
        A failed listing, or a center that answered at once with nothing (an older center, a
        proxy's timeout), waits ``interval_s``: never a busy loop."""
        while not stop.is_set():
            agreement = self._agreements().get(agreement_id)
            if agreement is None or not agreement.is_active(utcnow().date()):
                return
            t0 = time.monotonic()
            added = 0
            try:
                added = self._poll_agreement(agreement_id, wait_s=self._wait_s)
            except Exception as exc:  # e.g. the database went away; the cursor is in it
                log.error("result listener of %s failed: %s", agreement_id, redacted(exc))
            if added:
                self._update_counts()
                self._wake.set()
            elif time.monotonic() - t0 < self._wait_s / 2:
                stop.wait(interval_s)

    def recover(self) -> int:
        """Make deliveries a killed process had in flight due now (not after their lease):
        called at start, before ``run``, by the one gateway that owns this database. The PACS
        may hold the object already; a C-STORE of the same SOP Instance UID again is what
        the hospital gets then, never a second object."""
        with self.db.session() as s:
            res = s.execute(
                update(DeliveryRow)
                .where(
                    DeliveryRow.state == DeliveryState.PENDING, DeliveryRow.claimed_at.is_not(None)
                )
                .values(next_attempt_at=None, claimed_at=None)
            )
            return int(res.rowcount or 0)  # type: ignore[attr-defined]

    def close(self) -> None:
        self._closing = True  # a listing cut by this close is no failure worth a warning
        self._delivering.shutdown(wait=True)
        self._center.close()

    def resend(self, delivery_id: int) -> None:
        """Put a dead (or delivered) delivery back in the queue, due now."""
        resend_delivery(self.db, delivery_id)
        self._update_counts()

    # -- poll -----------------------------------------------------------------------------

    def poll(self) -> int:
        """Queue the center's new result objects of every active agreement; returns how many."""
        today = utcnow().date()
        added = 0
        for agreement in self._agreements().agreements:
            if agreement.is_active(today):
                added += self._poll_agreement(agreement.id)
        if added:
            self._update_counts()
        return added

    def _poll_agreement(self, agreement_id: str, wait_s: float = 0.0) -> int:
        with self.db.session() as s:
            after = s.scalar(
                select(func.max(DeliveryRow.center_object_id)).where(
                    DeliveryRow.agreement_id == agreement_id
                )
            )
        after = int(after or 0)
        added = 0
        while True:
            try:
                page = self._step.list(agreement_id, after, PAGE_SIZE, wait_s)
                wait_s = 0.0  # only the first page waits
            except AttemptFailed as exc:
                self._metrics.delivery_failures.labels(agreement_id, exc.reason).inc()
                if agreement_id not in self._poll_failing and not self._closing:
                    log.warning("result listing for agreement %s failed: %s", agreement_id, exc)
                    self._poll_failing.add(agreement_id)
                return added
            if agreement_id in self._poll_failing:
                log.info("result listing for agreement %s works again", agreement_id)
                self._poll_failing.discard(agreement_id)
            page = [o for o in page if o.id > after]
            added += self._queue(agreement_id, page)
            if len(page) < PAGE_SIZE:
                return added
            after = page[-1].id

    def _queue(self, agreement_id: str, objects: list[ResultObject]) -> int:
        if not objects:
            return 0
        now = utcnow()
        insert = self.db.insert_or_skip(DeliveryRow, ["agreement_id", "center_object_id"])
        added = 0
        for obj in objects:
            study_id = self._step.resolve_study(agreement_id, obj.study_uid)
            row = {
                "agreement_id": agreement_id,
                "center_object_id": obj.id,
                "study_id": study_id,
                "version": obj.version,
                "kind": obj.kind,
                "sop_instance_uid": obj.sop_instance_uid,
                "state": DeliveryState.PENDING if study_id is not None else DeliveryState.DEAD,
                "attempts": 0,
                "next_attempt_at": None,
                "last_error": None if study_id is not None else unknown_study(obj.id),
                "result_ready_at": obj.created_at,
                "created_at": now,
            }
            with self.db.session() as s:
                inserted = bool(s.execute(insert.values(row)).rowcount)  # type: ignore[attr-defined]
            if not inserted:
                continue  # another replica queued it first
            added += 1
            if study_id is None:
                self._metrics.delivery_failures.labels(agreement_id, "reidentification").inc()
                log.warning(
                    "result object %d of agreement %s is dead: %s",
                    obj.id,
                    agreement_id,
                    unknown_study(obj.id),
                )
            else:
                log.info(
                    "result object %d (%s v%d) of agreement %s queued for the PACS",
                    obj.id,
                    obj.kind,
                    obj.version,
                    agreement_id,
                )
        return added

    # -- tick -----------------------------------------------------------------------------

    def tick(self, now: datetime | None = None) -> int:
        """Deliver every due result object; returns how many the PACS stored."""
        now = now or utcnow()
        step = self._clock.stepped_back(now)
        if step is not None:
            self._shift_waits(step, now)
        agreements = self._agreements()
        priority = case(_PRIORITY_ORDER, value=StudyRow.priority, else_=2)
        with self.db.session() as s:
            due = s.scalars(
                select(DeliveryRow)
                .outerjoin(StudyRow, DeliveryRow.study_id == StudyRow.id)
                .where(DeliveryRow.state == DeliveryState.PENDING, _due(now))
                .order_by(priority, DeliveryRow.id)
                .limit(BATCH)
            ).all()
        attempts: list[Future[int]] = []
        for d in due:
            agreement = agreements.get(d.agreement_id)
            if agreement is None:
                continue  # no longer configured: stays pending, visible in gateway status
            expired = d.attempts > 0 and now - d.result_ready_at > self._max_age
            if expired and self._expire_unclaimed(d, now):
                continue
            attempts.append(self._delivering.submit(self._claim_and_attempt, d, agreement, now))
        done = sum(a.result() for a in attempts)
        self._update_counts()
        return done

    def _shift_waits(self, step: timedelta, now: datetime) -> None:
        """The wall clock stepped back by ``step``: every retry still waiting falls due as far
        back (``radbridge.clock``). A delivery in flight keeps its lease."""
        moved = 0
        with self.db.session() as s:
            waiting = s.execute(
                select(DeliveryRow.id, DeliveryRow.next_attempt_at).where(
                    DeliveryRow.state == DeliveryState.PENDING,
                    DeliveryRow.claimed_at.is_(None),
                    DeliveryRow.next_attempt_at > now,
                )
            ).all()
            for delivery_id, due in waiting:
                assert due is not None  # selected for being after now
                res = s.execute(
                    update(DeliveryRow)
                    .where(
                        DeliveryRow.id == delivery_id,
                        DeliveryRow.next_attempt_at == due,
                        DeliveryRow.claimed_at.is_(None),
                    )
                    .values(next_attempt_at=due - step)
                )
                moved += int(res.rowcount or 0)  # type: ignore[attr-defined]
        self._metrics.clock_steps_back.inc()
        log.warning(
            "the wall clock stepped back %.0f s: %d deliveries fall due as far back",
            step.total_seconds(),
            moved,
        )

    def _claim_and_attempt(self, d: DeliveryRow, agreement: Agreement, now: datetime) -> int:
        """On a delivery thread: claimed just before the attempt, so a long queue of due
        objects never outlives its leases."""
        return self._attempt(d, agreement, now) if self._claim(d, now) else 0

    def _claim(self, d: DeliveryRow, now: datetime) -> bool:
        with self.db.session() as s:
            res = s.execute(
                update(DeliveryRow)
                .where(
                    DeliveryRow.id == d.id,
                    DeliveryRow.state == DeliveryState.PENDING,
                    DeliveryRow.attempts == d.attempts,
                    _due(now),
                )
                .values(
                    attempts=d.attempts + 1,
                    next_attempt_at=max(now, utcnow()) + self._lease,
                    claimed_at=utcnow(),
                )
            )
            return bool(res.rowcount)  # type: ignore[attr-defined]

    def _attempt(self, d: DeliveryRow, agreement: Agreement, now: datetime) -> int:
        attempts = d.attempts + 1  # counted by the claim
        try:
            sent = self._step.deliver(d, agreement)
        except ReidentificationError as exc:
            self._dead(d, f"re-identification refused: {exc}", "reidentification")
            return 0
        except Exception as exc:  # never let one object stop the queue, never log its values
            failed = (
                exc
                if isinstance(exc, AttemptFailed)
                else AttemptFailed(
                    "reidentification",
                    f"unexpected {type(exc).__name__} while preparing the object",
                )
            )
            if failed.permanent:
                self._dead(d, str(failed), failed.reason)
                if failed.reason == "signature" and self._audit is not None:
                    self._audit.record(
                        "result-refused",
                        outcome=8,
                        agreement_id=d.agreement_id,
                        details={"reason": str(failed), "center_object_id": d.center_object_id},
                    )
            elif now - d.result_ready_at > self._max_age:
                self._metrics.delivery_failures.labels(d.agreement_id, failed.reason).inc()
                too_old = _too_old(self._max_age, attempts)
                self._dead(d, f"{too_old}; last error: {failed}", "expired")
            else:
                self._retry(d, attempts, str(failed), failed.reason, now)
            return 0
        self._delivered(d, sent)
        return 1

    # -- outcomes -------------------------------------------------------------------------

    def _delivered(self, d: DeliveryRow, sent: Sent) -> None:
        at = utcnow()
        with self.db.session() as s:
            s.execute(
                update(DeliveryRow)
                .where(DeliveryRow.id == d.id, DeliveryRow.state == DeliveryState.PENDING)
                .values(
                    state=DeliveryState.DELIVERED,
                    delivered_at=at,
                    pacs_status=sent.status,
                    delivered_sha256=sent.sha256,
                    evidence=sent.evidence,
                    next_attempt_at=None,
                    claimed_at=None,
                    last_error=None,
                )
            )
        if self._audit is not None:
            self._audit.record(
                "instances-transferred",
                agreement_id=d.agreement_id,
                study_uid=sent.study_uid,
                details={
                    "kind": d.kind,
                    "version": d.version,
                    "center_object_id": d.center_object_id,
                    "pacs_status": sent.status,
                    "source": self._audit.node,
                    "destination": sent.destination,
                },
            )
        priority = safe_label(sent.priority)
        self._metrics.delivery.labels(d.agreement_id, priority).observe(
            max((at - d.result_ready_at).total_seconds(), 0.0)
        )
        self._metrics.turnaround.labels(d.agreement_id, priority).observe(
            max((at - sent.first_received_at).total_seconds(), 0.0)
        )
        log.info(
            "delivery %d (agreement %s, result object %d, %s v%d) stored at the PACS: 0x%04X",
            d.id,
            d.agreement_id,
            d.center_object_id,
            d.kind,
            d.version,
            sent.status,
        )

    def _retry(
        self, d: DeliveryRow, attempts: int, message: str, reason: str, now: datetime
    ) -> None:
        delay = backoff_s(attempts, self._retry_base_s, self._retry_max_s)
        log.warning(
            "delivery %d (agreement %s) failed (%s); retry %d in %.0fs",
            d.id,
            d.agreement_id,
            message,
            attempts,
            delay,
        )
        self._metrics.delivery_failures.labels(d.agreement_id, reason).inc()
        with self.db.session() as s:
            s.execute(
                update(DeliveryRow)
                .where(DeliveryRow.id == d.id, DeliveryRow.state == DeliveryState.PENDING)
                .values(
                    next_attempt_at=max(now, utcnow()) + timedelta(seconds=delay),
                    claimed_at=None,
                    last_error=message,
                )
            )

    def _dead(self, d: DeliveryRow, message: str, reason: str) -> None:
        log.warning("delivery %d (agreement %s) is dead: %s", d.id, d.agreement_id, message)
        self._metrics.delivery_failures.labels(d.agreement_id, reason).inc()
        with self.db.session() as s:
            s.execute(
                update(DeliveryRow)
                .where(DeliveryRow.id == d.id, DeliveryRow.state == DeliveryState.PENDING)
                .values(
                    state=DeliveryState.DEAD,
                    next_attempt_at=None,
                    claimed_at=None,
                    last_error=message,
                )
            )

    def _expire_unclaimed(self, d: DeliveryRow, now: datetime) -> bool:
        """A retrying delivery past the maximum age: dead without another attempt."""
        message = _too_old(self._max_age, d.attempts)
        if d.last_error:
            message += f"; last error: {d.last_error}"
        with self.db.session() as s:
            res = s.execute(
                update(DeliveryRow)
                .where(
                    DeliveryRow.id == d.id,
                    DeliveryRow.state == DeliveryState.PENDING,
                    DeliveryRow.attempts == d.attempts,
                    _due(now),
                )
                .values(
                    state=DeliveryState.DEAD,
                    next_attempt_at=None,
                    claimed_at=None,
                    last_error=message,
                )
            )
        if not res.rowcount:  # type: ignore[attr-defined]
            return False  # another replica claimed it meanwhile
        log.warning("delivery %d (agreement %s) is dead: %s", d.id, d.agreement_id, message)
        self._metrics.delivery_failures.labels(d.agreement_id, "expired").inc()
        return True

    def _update_counts(self) -> None:
        with self.db.session() as s:
            counts = dict(
                s.execute(select(DeliveryRow.state, func.count()).group_by(DeliveryRow.state)).all()
            )
        for state in DeliveryState:
            self._metrics.deliveries.labels(state.value).set(int(counts.get(state.value, 0)))


def resend_delivery(db: Database, delivery_id: int) -> str:
    """Put a dead or delivered delivery back to pending, due now; returns its former state.

    A pending one is left as it is (it is queued already; it may be in flight right now).
    Raises ``NotFoundError`` for an unknown id.
    """
    with db.session() as s:
        row = s.get(DeliveryRow, delivery_id)
        if row is None:
            raise NotFoundError(f"no delivery with id {delivery_id}")
        former = str(row.state)
        if row.state != DeliveryState.PENDING:
            row.state = DeliveryState.PENDING
            row.attempts = 0
            row.next_attempt_at = None
            row.claimed_at = None
            row.last_error = None
            row.delivered_at = None
            row.pacs_status = None
            row.delivered_sha256 = None
    log.info("delivery %d re-queued by hand (was %s)", delivery_id, former)
    return former


def _due(now: datetime) -> ColumnElement[bool]:
    return DeliveryRow.next_attempt_at.is_(None) | (DeliveryRow.next_attempt_at <= now)


def _too_old(max_age: timedelta, attempts: int) -> str:
    return f"not stored at the PACS within {max_age} ({attempts} attempt(s))"
