"""What a study passes before and while it leaves the edge, whoever sends it (the forward at
the end of its quiet period, or early sending during it): the patient's consent, the PIPL
person ledger's ceiling, de-identification instance by instance (an instance whose pixels may
show identity stays at the edge), and the audit's Begin Transferring and Export records.

The outbox's state machine (claim, retry, block, quarantine) is ``dicom_io.forwarder``'s.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from io import BytesIO

import pydicom
from sqlalchemy import Row

from dicom_io.consent import ConsentRegister, patient_of
from dicom_io.deid import BurnedInAnnotationError, deidentify
from dicom_io.part10 import to_part10
from dicom_io.person_ledger import PersonLedger
from dicom_io.pseudonyms import Pseudonymizer
from dicom_io.store import DurableStore
from dicom_io.stow_sender import StudySender
from radbridge.agreements import Agreement
from radbridge.audit import AuditTrail
from radbridge.db.tables import StudyRow, utcnow
from radbridge.metrics import EdgeMetrics

__all__ = ["AtCeiling", "ExportGate", "Interrupted", "NoConsent"]

log = logging.getLogger("radbridge.edge.forwarder")


class ExportGate:
    """The checks and steps of a study leaving the edge (module docstring); ``audit``,
    ``ledger`` and ``consent`` are each optional (none: that check or record is skipped)."""

    def __init__(
        self,
        store: DurableStore,
        metrics: EdgeMetrics,
        audit: AuditTrail | None = None,
        ledger: PersonLedger | None = None,
        consent: ConsentRegister | None = None,
    ) -> None:
        self.store, self.metrics = store, metrics
        self.audit, self.ledger, self.consent = audit, ledger, consent

    def check_consent(self, agreement: Agreement, rows: Sequence[Row[int, str]]) -> None:
        """Raise ``NoConsent`` when the patient's consent holds the study at the edge."""
        if self.consent is None or not rows:
            return
        patient = patient_of(self.store.path(rows[0][1]), agreement)
        hold = self.consent.hold_reason(agreement, patient)
        if hold is not None:
            raise NoConsent(hold.reason, hold.final)

    def count_person(
        self, study: StudyRow, agreement: Agreement, rows: Sequence[Row[int, str]]
    ) -> None:
        """Admit the study's patient in the person ledger, or raise ``AtCeiling``."""
        if self.ledger is None or not rows:
            return
        header = pydicom.dcmread(
            BytesIO(self.store.read(rows[0][1])),
            stop_before_pixels=True,
            specific_tags=["PatientID", "IssuerOfPatientID"],
        )
        person = self.ledger.person(
            agreement.hospital.name,
            str(header.get("IssuerOfPatientID", "")),
            str(header.get("PatientID", "")),
            study.study_uid,
        )
        admission = self.ledger.admit(agreement, person, utcnow())
        if not admission.admitted:
            raise AtCeiling(admission.refusal(agreement))

    def record_transfer(
        self, event: str, agreement: Agreement, study_uid: str, sent: int = 0, nbytes: int = 0
    ) -> None:
        """Begin Transferring (DICOM 110102: the study's first request is about to leave, early
        or not) or Export (110106: the study completed at the center, with what left), under
        which legal basis. A study interrupted part-way has the first without the second."""
        if self.audit is None:
            return
        basis = agreement.transfer_basis
        details: dict[str, object] = {
            "mechanism": str(basis.mechanism),
            "reference": basis.reference,
            "source": self.audit.node,
            "destination": "center",
            "deidentification": agreement.deidentification.profile,
        }
        if event == "export":
            details.update(instances=sent, bytes=nbytes)
        self.audit.record(event, agreement_id=agreement.id, study_uid=study_uid, details=details)

    def deidentify_study(
        self,
        study: StudyRow,
        rows: Sequence[Row[int, str]],
        pseudo: Pseudonymizer,
        agreement: Agreement,
        stop: threading.Event,
        sender: StudySender,
    ) -> list[str]:
        """De-identify every instance into ``sender``; one whose pixels may show identity stays
        at the edge (returns why). Raise ``Interrupted`` when ``stop`` is set: a study of a
        thousand slices with OCR takes minutes, and a gateway asked to stop must not wait for
        it (what was sent already is sent again, harmlessly, when the study is retried)."""
        held: list[str] = []
        for instance_id, path in rows:
            if stop.is_set():
                raise Interrupted
            try:
                sender.add(self.deidentify(path, pseudo, agreement))
            except BurnedInAnnotationError as exc:
                held.append(exc.reason)
                self.metrics.forward_failures.labels(agreement.id, exc.reason).inc()
                log.warning(
                    "study %s instance %s quarantined at the edge (%s)",
                    study.id,
                    instance_id,
                    exc.reason,
                )
        return held

    def deidentify(self, relpath: str, pseudo: Pseudonymizer, agreement: Agreement) -> bytes:
        t0 = utcnow()
        ds = pydicom.dcmread(BytesIO(self.store.read(relpath)))
        d = agreement.deidentification
        out = deidentify(
            ds,
            pseudo,
            d.options,
            burned_in=d.burned_in,
            top_band_rows=d.burned_in_top_band_rows,
            text_in_pixels=d.text_in_pixels,
        ).dataset
        data = to_part10(out)
        self.metrics.deidentify.labels(agreement.id).observe((utcnow() - t0).total_seconds())
        return data


class NoConsent(Exception):
    """The patient's consent holds the study at the edge (``final``: withdrawn, not missing)."""

    def __init__(self, reason: str, final: bool) -> None:
        super().__init__(reason)
        self.reason, self.final = reason, final


class Interrupted(Exception):
    """The gateway is stopping while a study is being de-identified."""


class AtCeiling(Exception):
    """The agreement's yearly ceiling of persons is reached: the study waits at the edge."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
