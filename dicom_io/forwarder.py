"""The edge's outbox: forward stable studies, de-identified, to the center over STOW-RS.

The database is the outbox. A study in state ``receiving`` whose agreement's quiet period has
passed is claimed (``forwarding``), de-identified instance by instance, its pseudonyms committed
to the identity map, its instances POSTed to the center (``dicom_io.stow_sender``: one request
in flight while the next is de-identified), and the study completed there. Any
failure puts it back with exponential backoff; a restart resets claimed studies. The center
de-duplicates, so a re-sent study is harmless. What a study passes as it leaves (consent, the
person ceiling, de-identification, the audit's records) is ``dicom_io.export_gate``'s.

Sending early (``forward_early``, ``dicom_io.early_sending``): while a study's quiet period
runs, its full requests go at once; the forward then sends only the rest on the same sender.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

from sqlalchemy import Row, func, select, update

from dicom_io.consent import NO_REFERENCE, ConsentRegister
from dicom_io.early_sending import EarlySending
from dicom_io.export_gate import AtCeiling, ExportGate, Interrupted, NoConsent
from dicom_io.person_ledger import CEILING_REASON, PersonLedger
from dicom_io.store import DurableStore
from radbridge.agreements import Agreement, AgreementSet
from radbridge.audit import AuditTrail
from radbridge.clock import WallClock
from radbridge.contract import CenterClient, CompleteStudy, backoff_s
from radbridge.db.engine import Database
from radbridge.db.tables import InstanceRow, SeriesRow, StudyRow, utcnow
from radbridge.errors import CenterError, DeidentificationError, PolicyError, redacted
from radbridge.lifecycle import EdgeStudyState
from radbridge.metrics import EdgeMetrics, safe_label

__all__ = ["Forwarder"]

log = logging.getLogger("radbridge.edge.forwarder")
_NO_BASIS = "no legal transfer basis in force for this agreement"
_MIN_WAIT_S = 0.005  # a quiet period ending now: tick again almost at once, never spin
_STOP_CHECK_S = 0.25  # run() notices stop this soon


class Forwarder:
    """The edge's outbox to the center: each stable study de-identified, sent, completed."""

    def __init__(
        self,
        db: Database,
        store: DurableStore,
        agreements: Callable[[], AgreementSet],
        master_secret: str,
        center: CenterClient,
        metrics: EdgeMetrics,
        *,
        retry_base_s: float = 2.0,
        retry_max_s: float = 300.0,
        audit: AuditTrail | None = None,
        ledger: PersonLedger | None = None,
        consent: ConsentRegister | None = None,
        forward_early: bool = True,
    ) -> None:
        """``audit``: the edge's trail, which gets an Export record (DICOM 110106) for every
        study that left, with the agreement's legal mechanism and reference. ``ledger``: the
        PIPL person ledger, and ``consent``: the consent register, both asked before a study's
        first byte leaves. ``forward_early``: send full requests while the quiet period runs
        (module docstring)."""
        self.db, self.store, self._agreements = db, store, agreements
        self._secret = master_secret
        self._metrics = metrics
        self._retry_base_s, self._retry_max_s = retry_base_s, retry_max_s
        self._center = center
        self._audit = audit
        self.gate = ExportGate(store, metrics, audit, ledger, consent)
        self._next_due: datetime | None = None  # the earliest quiet period end or rest due
        self._wake = threading.Event()
        self._clock = WallClock()
        # Sends a study's STOW-RS requests while the forwarder de-identifies the next part.
        self._sending = ThreadPoolExecutor(1, thread_name_prefix="radbridge-stow")
        self._forward_early = forward_early
        self._early = EarlySending(
            db, center, self.gate, master_secret, self._sending, self._instance_rows
        )

    def recover(self) -> int:
        """Return studies a crashed process had claimed to the queue. A study last received
        after now (the clock stepped back while the gateway was down) counts as received now:
        its quiet period is not stretched by the step."""
        now = utcnow()
        with self.db.session() as s:
            s.execute(
                update(StudyRow).where(StudyRow.last_received_at > now).values(last_received_at=now)
            )
            res = s.execute(
                update(StudyRow)
                .where(StudyRow.state == EdgeStudyState.FORWARDING)
                .values(state=EdgeStudyState.RECEIVING)
            )
            return int(res.rowcount or 0)  # type: ignore[attr-defined]

    def run(self, stop: threading.Event, interval_s: float) -> None:
        """Forward due studies every ``interval_s``, and when a study's quiet period ends
        (not up to ``interval_s`` later: that wait is on every study's turnaround)."""
        while not stop.is_set():
            try:
                self.tick(stop=stop)
            except Exception as exc:  # the loop must survive anything; the study stays queued
                log.error("forwarder tick failed: %s", redacted(exc))
            wait = interval_s
            if self._next_due is not None:
                until = (self._next_due - utcnow()).total_seconds()
                wait = min(wait, max(until, _MIN_WAIT_S))
            self._sleep(stop, wait)

    def wake(self) -> None:
        """An instance was stored: look at the due times again (thread-safe, never blocks)."""
        self._wake.set()

    def _sleep(self, stop: threading.Event, seconds: float) -> None:
        """Until ``seconds`` passed, ``wake()`` was called, or ``stop`` was set."""
        end = time.monotonic() + seconds
        while not stop.is_set():
            left = end - time.monotonic()
            if left <= 0 or self._wake.wait(min(left, _STOP_CHECK_S)):
                break
        self._wake.clear()

    def close(self) -> None:
        self._early.close()
        self._sending.shutdown(wait=True)
        self._center.close()

    def tick(self, now: datetime | None = None, *, stop: threading.Event | None = None) -> int:
        """Forward every study that is due; returns how many were forwarded. A ``stop`` set
        while a study is being de-identified returns it to the queue at once, uncompleted at
        the center (the requests already sent go again with the rest, harmlessly)."""
        now = now or utcnow()
        stop = stop or threading.Event()
        step = self._clock.stepped_back(now)
        if step is not None:
            self._shift_waits(step, now)
        agreements = self._agreements()
        with self.db.session() as s:
            due = s.scalars(
                select(StudyRow).where(
                    StudyRow.state.in_([EdgeStudyState.RECEIVING, EdgeStudyState.BLOCKED]),
                    (StudyRow.next_attempt_at.is_(None)) | (StudyRow.next_attempt_at <= now),
                )
            ).all()
        self._update_depth()
        done = 0
        self._next_due = None
        for study in due:
            if stop.is_set():
                break
            agreement = agreements.get(study.agreement_id)
            if agreement is None:
                continue
            if not _complete(study, agreement, now):
                stable = _stable_at(study, agreement)
                if self._next_due is None or stable < self._next_due:
                    self._next_due = stable
                if self._forward_early and study.state == EdgeStudyState.RECEIVING:
                    rest_at = self._early.send(study, agreement, now, stop)
                    if rest_at is not None and rest_at < self._next_due:
                        self._next_due = rest_at  # wake then to send the rest
                continue
            if not agreement.may_transfer(now.date()):
                if study.state != EdgeStudyState.BLOCKED:
                    self._block(study, _NO_BASIS)
                continue
            if study.state == EdgeStudyState.BLOCKED and not _retried_when_due(study):
                continue  # refused by de-identification: needs a person, not a retry
            if self._claim(study, now):
                done += self._forward_claimed(study, agreement, now, stop)
        self._early.keep_only({s.id for s in due if s.state == EdgeStudyState.RECEIVING})
        return done

    # -- steps ----------------------------------------------------------------------------

    def _shift_waits(self, step: timedelta, now: datetime) -> None:
        """The wall clock stepped back by ``step``: every quiet period and retry still running
        ends as far back (``radbridge.clock``). A row that changed meanwhile (an instance
        arrived) keeps its new time."""
        moved = 0
        with self.db.session() as s:
            waiting = s.execute(
                select(StudyRow.id, StudyRow.last_received_at, StudyRow.next_attempt_at).where(
                    StudyRow.state.in_([EdgeStudyState.RECEIVING, EdgeStudyState.BLOCKED]),
                    (StudyRow.last_received_at > now) | (StudyRow.next_attempt_at > now),
                )
            ).all()
            for study_id, last, retry in waiting:
                values: dict[str, datetime] = {}
                if last > now:
                    values["last_received_at"] = last - step
                if retry is not None and retry > now:
                    values["next_attempt_at"] = retry - step
                res = s.execute(
                    update(StudyRow)
                    .where(StudyRow.id == study_id, StudyRow.last_received_at == last)
                    .values(**values)
                )
                moved += int(res.rowcount or 0)  # type: ignore[attr-defined]
        self._metrics.clock_steps_back.inc()
        log.warning(
            "the wall clock stepped back %.0f s: the waits of %d studies end as far back",
            step.total_seconds(),
            moved,
        )

    def _instance_rows(self, study: StudyRow) -> Sequence[Row[int, str]]:
        with self.db.session() as s:
            return s.execute(
                select(InstanceRow.id, InstanceRow.path)
                .join(SeriesRow, InstanceRow.series_id == SeriesRow.id)
                .where(SeriesRow.study_id == study.id)
                .order_by(InstanceRow.id)
            ).all()

    def _unclaim(self, study: StudyRow) -> None:
        """Give a claimed study back to the queue in the state it was claimed from."""
        with self.db.session() as s:
            s.execute(
                update(StudyRow)
                .where(StudyRow.id == study.id, StudyRow.state == EdgeStudyState.FORWARDING)
                .values(state=study.state)
            )
        log.info("study %s returned to the queue: the gateway is stopping", study.id)

    def _claim(self, study: StudyRow, now: datetime) -> bool:
        with self.db.session() as s:
            res = s.execute(
                update(StudyRow)
                .where(
                    StudyRow.id == study.id,
                    StudyRow.state == study.state,
                    StudyRow.instance_count == study.instance_count,
                )
                .values(state=EdgeStudyState.FORWARDING, stable_at=now)
            )
            return bool(res.rowcount)  # type: ignore[attr-defined]

    def _forward_claimed(
        self, study: StudyRow, agreement: Agreement, stable_at: datetime, stop: threading.Event
    ) -> int:
        try:
            sent, held, pseudo_study_uid, nbytes = self._forward(study, agreement, stop)
        except Interrupted:  # the study waits for the next start (and is sent whole again)
            self._unclaim(study)
            return 0
        except DeidentificationError as exc:
            self._block(study, f"de-identification refused: {exc}")
            return 0
        except PolicyError as exc:  # the center refused instances for good: no silent loss
            self._block(study, str(exc))
            return 0
        except CenterError as exc:
            self._retry(study, agreement, str(exc), exc.retry_after_s)
            return 0
        except AtCeiling as exc:
            self._hold_at_ceiling(study, agreement, exc.reason, stable_at)
            return 0
        except NoConsent as exc:  # withdrawn: for good; no reference yet: look again hourly
            log.warning("study %s held at the edge: %s", study.id, exc.reason)
            retry = None if exc.final else max(stable_at, utcnow()) + timedelta(hours=1)
            with self.db.session() as s:
                s.execute(
                    update(StudyRow)
                    .where(StudyRow.id == study.id)
                    .values(
                        state=EdgeStudyState.BLOCKED, last_error=exc.reason, next_attempt_at=retry
                    )
                )
            return 0
        if sent:
            self.gate.record_transfer("export", agreement, pseudo_study_uid, sent, nbytes)
        if held:
            return self._quarantine(study, agreement, sent, held)
        with self.db.session() as s:
            s.execute(
                update(StudyRow)
                .where(StudyRow.id == study.id, StudyRow.state == EdgeStudyState.FORWARDING)
                .values(
                    state=EdgeStudyState.FORWARDED,
                    forwarded_at=utcnow(),
                    version=StudyRow.version + 1,
                    attempts=0,
                    last_error=None,
                    next_attempt_at=None,
                )
            )
        self._metrics.study_forward.labels(agreement.id, safe_label(study.modality)).observe(
            (utcnow() - stable_at).total_seconds()
        )
        log.info("study %s forwarded (agreement %s)", study.id, agreement.id)
        return 1

    def _forward(
        self, study: StudyRow, agreement: Agreement, stop: threading.Event
    ) -> tuple[int, list[str], str, int]:
        """Send the study's instances; returns how many were sent, why others were held, the
        pseudonymous study UID and the bytes sent."""
        rows = self._instance_rows(study)
        early = self._early.take(study.id)
        try:
            self.gate.check_consent(agreement, rows)
            self.gate.count_person(study, agreement, rows)
        except BaseException:
            if early is not None:
                early.sender.abandon()
            raise
        if early is None:
            early = self._early.start(study, agreement)
        pseudo, sender = early.pseudo, early.sender
        rest = [row for row in rows if row[0] not in early.done]
        try:
            held = early.held + self.gate.deidentify_study(
                study, rest, pseudo, agreement, stop, sender
            )
            sender.finish()
        except BaseException:
            sender.abandon()
            raise
        pseudo_study_uid = pseudo.uid(study.study_uid)
        if not sender.sent:
            return 0, held, pseudo_study_uid, 0
        elapsed = (utcnow() - study.first_received_at).total_seconds()
        self._center.complete(
            pseudo_study_uid,
            CompleteStudy(
                agreement_id=agreement.id,
                priority=study.priority,
                instance_count=sender.sent,
                edge_elapsed_s=max(elapsed, 0.0),
            ),
        )
        return sender.sent, held, pseudo_study_uid, sender.sent_bytes

    def _hold_at_ceiling(
        self, study: StudyRow, agreement: Agreement, reason: str, now: datetime
    ) -> None:
        """Block the study with the reason; look again in an hour (the count may not change
        before 1 January, but an agreement file with a higher figure may arrive)."""
        if study.state != EdgeStudyState.BLOCKED and self._audit is not None:
            self._audit.record(
                "transfer-ceiling",
                outcome=4,
                agreement_id=agreement.id,
                details={"reason": reason},
            )
        log.warning("study %s held at the edge: %s", study.id, reason)
        with self.db.session() as s:
            s.execute(
                update(StudyRow)
                .where(StudyRow.id == study.id)
                .values(
                    state=EdgeStudyState.BLOCKED,
                    last_error=reason,
                    next_attempt_at=max(now, utcnow()) + timedelta(hours=1),
                )
            )

    def _retry(
        self, study: StudyRow, agreement: Agreement, reason: str, retry_after_s: float = 0.0
    ) -> None:
        """Back off exponentially, and never sooner than the center's Retry-After."""
        attempts = study.attempts + 1
        delay = backoff_s(attempts, self._retry_base_s, self._retry_max_s, retry_after_s)
        log.warning(
            "study %s forward failed (%s); retry %d in %.0fs", study.id, reason, attempts, delay
        )
        self._metrics.forward_failures.labels(agreement.id, "center").inc()
        with self.db.session() as s:
            s.execute(
                update(StudyRow)
                .where(StudyRow.id == study.id, StudyRow.state == EdgeStudyState.FORWARDING)
                .values(
                    state=EdgeStudyState.RECEIVING,
                    attempts=attempts,
                    next_attempt_at=utcnow() + timedelta(seconds=delay),
                    last_error=reason,
                )
            )

    def _block(self, study: StudyRow, reason: str) -> None:
        log.warning("study %s blocked: %s", study.id, reason)
        with self.db.session() as s:
            s.execute(
                update(StudyRow)
                .where(StudyRow.id == study.id)
                .values(state=EdgeStudyState.BLOCKED, last_error=reason)
            )

    def _quarantine(self, study: StudyRow, agreement: Agreement, sent: int, held: list[str]) -> int:
        """Some instances stay at the edge: block the study with a reason a person can act on.

        What was sent is recorded as forwarded (the center has it); the study stays blocked,
        like any study de-identification refused, until a person deals with the held instances.
        """
        kinds = ", ".join(f"{k} x{n}" for k, n in sorted(Counter(held).items()))
        reason = (
            f"quarantined at the edge: {len(held)} of {sent + len(held)} instance(s) not "
            f"forwarded, pixels may show identity ({kinds}); {sent} forwarded; needs a person"
        )
        log.warning("study %s blocked: %s", study.id, reason)
        values: dict[str, object] = {"state": EdgeStudyState.BLOCKED, "last_error": reason}
        if sent:
            values.update(forwarded_at=utcnow(), version=StudyRow.version + 1, attempts=0)
        with self.db.session() as s:
            s.execute(update(StudyRow).where(StudyRow.id == study.id).values(**values))
        return 1 if sent else 0

    def _update_depth(self) -> None:
        waiting = (EdgeStudyState.RECEIVING, EdgeStudyState.BLOCKED)
        with self.db.session() as s:
            for state in waiting:
                n = s.query(StudyRow).filter(StudyRow.state == state).count()
                self._metrics.outbox_depth.labels(state.value).set(n)
            oldest = s.scalar(
                select(func.min(StudyRow.first_received_at)).where(StudyRow.state.in_(waiting))
            )
        if oldest is not None and oldest.tzinfo is None:  # SQLite's aggregate: naive UTC
            oldest = oldest.replace(tzinfo=UTC)
        age = (utcnow() - oldest).total_seconds() if oldest is not None else 0.0
        self._metrics.outbox_oldest.set(max(age, 0.0))


def _retried_when_due(study: StudyRow) -> bool:
    """Blocked for a reason that time can lift: no transfer basis, or the person ceiling."""
    reason = study.last_error or ""
    return reason in (_NO_BASIS, NO_REFERENCE) or reason.startswith(CEILING_REASON)


def _complete(study: StudyRow, agreement: Agreement, now: datetime) -> bool:
    """Complete once the sender's stated count is in, else after the agreement's quiet period."""
    if study.expected_instances and study.instance_count >= study.expected_instances:
        return True
    return _stable_at(study, agreement) <= now


def _stable_at(study: StudyRow, agreement: Agreement) -> datetime:
    """When the study's quiet period ends, unless another instance arrives before."""
    return study.last_received_at + timedelta(seconds=agreement.quiet_period_s)
