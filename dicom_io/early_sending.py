"""Sending a study while its quiet period runs (``edge.forward_early``), for the forwarder.

While a study's quiet period runs, every full request of instances already received
(``REQUEST_INSTANCES``) is de-identified and sent at once, after the same checks a forward
makes first (transfer basis, consent, person ceiling); the study is not claimed and the center
does not start its job before ``complete``. When the quiet period ends, the forward takes the
study's sender (:meth:`EarlySending.take`), sends only the rest on it and completes the study:
the de-identification and most of the upload are off the path from the last instance to the
result. Once no instance has come for ``EARLY_REST_FRACTION`` of the quiet period, the rest (a
partial request) goes too, so that a stable study usually needs only ``complete``; an instance
arriving later goes the same way. With the rest gone, the edge tells the center the study is
probably whole (``prepare``, a hint), and an idle center segments its volumes ahead of the job
that ``complete`` will start.

What was sent early is kept in memory only. After a restart, a failed early request, or a
refusal, the forward sends the whole study as before (the center keeps one copy).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import Row

from dicom_io.export_gate import AtCeiling, ExportGate, Interrupted, NoConsent
from dicom_io.pseudonyms import Pseudonymizer
from dicom_io.stow_sender import REQUEST_INSTANCES, StudySender
from radbridge.agreements import Agreement
from radbridge.contract import CenterClient, PrepareStudy
from radbridge.db.engine import Database
from radbridge.db.tables import StudyRow
from radbridge.errors import redacted

__all__ = ["EARLY_REST_FRACTION", "EarlySending", "Sending"]

log = logging.getLogger("radbridge.edge.forwarder")

# The part of a study's quiet period without a new instance after which its rest (a partial
# request) goes early: the sender has most likely finished, and a later instance still goes.
EARLY_REST_FRACTION = 0.25


@dataclass
class Sending:
    """A study's sender and what it has de-identified into it so far."""

    sender: StudySender
    pseudo: Pseudonymizer
    done: set[int] = field(default_factory=set)  # instance ids de-identified into ``sender``
    held: list[str] = field(default_factory=list)  # reasons of instances quarantined
    hinted: int = 0  # the instance count the center was told is probably whole


class EarlySending:
    """The studies sending while their quiet period runs, by study id."""

    def __init__(
        self,
        db: Database,
        center: CenterClient,
        gate: ExportGate,
        secret: str,
        pool: ThreadPoolExecutor,
        instance_rows: Callable[[StudyRow], Sequence[Row[int, str]]],
    ) -> None:
        """``pool``: the thread that sends a study's requests; ``instance_rows``: a study's
        (instance id, path) rows, in order."""
        self._db, self._center, self._gate = db, center, gate
        self._secret, self._pool, self._instance_rows = secret, pool, instance_rows
        self._studies: dict[int, Sending] = {}
        self._not_early: set[int] = set()  # studies that go whole at the end (a failure, a hold)

    def start(self, study: StudyRow, agreement: Agreement) -> Sending:
        """A sender for the study, which records Begin Transferring before its first request
        (the forward's own, when nothing went early)."""
        pseudo = Pseudonymizer.for_agreement(agreement, self._secret)
        sender = StudySender(
            self._pool,
            self._center,
            self._db,
            agreement.id,
            study.priority,
            pseudo,
            before_first=lambda: self._gate.record_transfer(
                "begin-transferring", agreement, pseudo.uid(study.study_uid)
            ),
        )
        return Sending(sender, pseudo)

    def send(
        self, study: StudyRow, agreement: Agreement, now: datetime, stop: threading.Event
    ) -> datetime | None:
        """Send the study's full requests of instances not sent yet, and its rest once it has
        been idle for ``EARLY_REST_FRACTION`` of its quiet period. Anything unusual (a refusal,
        a failure, a hold, a stop) leaves the study to be sent whole when it is stable, with
        the usual outcome. Returns when its rest is due to go, if some of it waits for that."""
        early = self._studies.get(study.id)
        if study.id in self._not_early or study.attempts:
            return None
        if early is not None and early.sender.failed:
            log.info("study %s: an early request failed; it goes whole when stable", study.id)
            self._give_up(study.id)
            return None
        waiting = study.instance_count - (len(early.done) if early else 0)
        rest_at = study.last_received_at + timedelta(
            seconds=agreement.quiet_period_s * EARLY_REST_FRACTION
        )
        rest = now >= rest_at
        if waiting <= 0 or (waiting < REQUEST_INSTANCES and not rest):
            if waiting <= 0 and rest and early is not None:
                self._hint_whole(study, agreement, early)
            return rest_at if waiting > 0 else None
        rows = self._instance_rows(study)
        try:
            if early is None:
                if not agreement.may_transfer(now.date()):
                    raise _NotEarly
                self._gate.check_consent(agreement, rows)
                self._gate.count_person(study, agreement, rows)
                early = self._studies[study.id] = self.start(study, agreement)
            todo = [row for row in rows if row[0] not in early.done]
            if not rest:
                todo = todo[: len(todo) - len(todo) % REQUEST_INSTANCES]  # full requests only
            early.held += self._gate.deidentify_study(
                study, todo, early.pseudo, agreement, stop, early.sender
            )
            early.done.update(instance_id for instance_id, _ in todo)
            early.sender.flush()
            if rest:
                self._hint_whole(study, agreement, early)
            return None if rest else rest_at
        except Exception as exc:  # incl. Interrupted, NoConsent, AtCeiling, CenterError
            if not isinstance(exc, _NotEarly | Interrupted | NoConsent | AtCeiling):
                log.info(
                    "study %s: early sending stopped (%s); it goes whole when stable",
                    study.id,
                    redacted(exc),
                )
            self._give_up(study.id)
            return None

    def take(self, study_id: int) -> Sending | None:
        """The study's early sending, for its forward; None when nothing usable went early
        (a failed request's sender is abandoned: the study goes whole, not retried later)."""
        early = self._studies.pop(study_id, None)
        self._not_early.discard(study_id)
        if early is not None and early.sender.failed:
            early.sender.abandon()
            return None
        return early

    def keep_only(self, waiting: set[int]) -> None:
        """Forget the studies not waiting any more (forwarded, purged or retried meanwhile)."""
        for study_id in [i for i in self._studies if i not in waiting]:
            self._drop(study_id)
        self._not_early &= waiting

    def close(self) -> None:
        for study_id in list(self._studies):
            self._drop(study_id)

    def _hint_whole(self, study: StudyRow, agreement: Agreement, early: Sending) -> None:
        """Every instance received has gone and the study is idle: tell the center it is
        probably whole (``PrepareStudy``), once per count, after those requests' answers. The
        center may segment ahead during the rest of the quiet period; the forward still
        completes the study when it is stable."""
        count = early.sender.submitted
        if early.held or count == 0 or early.hinted == count:
            return
        early.hinted = count
        pseudo_study_uid = early.pseudo.uid(study.study_uid)
        body = PrepareStudy(
            agreement_id=agreement.id, priority=study.priority, instance_count=count
        )
        early.sender.after_sent(lambda: self._center.prepare(pseudo_study_uid, body))

    def _give_up(self, study_id: int) -> None:
        self._not_early.add(study_id)
        self._drop(study_id)

    def _drop(self, study_id: int) -> None:
        early = self._studies.pop(study_id, None)
        if early is not None:
            early.sender.abandon()


class _NotEarly(Exception):
    """The study may not be sent before it is stable (no transfer basis today)."""
