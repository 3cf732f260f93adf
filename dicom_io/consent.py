"""The edge's consent register: a patient's consent to the cross-border read, per agreement.

A patient is named by a keyed hash of agreement, issuer and Patient ID (the key is derived from
the edge's master secret), so the register cannot be read back into identities. Before a
study's first byte leaves (dicom_io/forwarder.py), :meth:`ConsentRegister.hold_reason` says
whether it must stay:

- a withdrawn consent always holds the study, for good;
- an agreement with ``consent.required`` holds a study without a reference (neither in the
  study's ``consent.attribute`` nor recorded here) until one is recorded (looked at hourly).

:func:`withdraw` records a withdrawal, holds the patient's studies still at the edge, and asks
the center (dicom_io/purge_requests.py) to delete those that already left.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import pydicom
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from dicom_io.identity_map import lookup_pseudonym
from dicom_io.purge_requests import enqueue_purge
from dicom_io.store import DurableStore
from radbridge.agreements import Agreement
from radbridge.audit import AuditTrail
from radbridge.db.engine import Database
from radbridge.db.tables import ConsentRow, InstanceRow, SeriesRow, StudyRow, utcnow
from radbridge.errors import ConfigError
from radbridge.lifecycle import EdgeStudyState

__all__ = [
    "NO_REFERENCE",
    "WITHDRAWN",
    "ConsentRegister",
    "Hold",
    "Patient",
    "patient_of",
    "withdraw",
]

log = logging.getLogger(__name__)

WITHDRAWN = "consent withdrawn: nothing of this patient leaves the hospital"
NO_REFERENCE = "no consent reference for this patient (the agreement requires one)"


@dataclass(frozen=True)
class Patient:
    """Who a study is about, as the consent register asks it (never logged)."""

    issuer: str
    patient_id: str
    reference: str | None  # the consent attribute's value, when the agreement names one

    def __repr__(self) -> str:
        return "Patient(<identifying>)"


@dataclass(frozen=True)
class Hold:
    reason: str
    final: bool  # withdrawn: held for good; missing reference: looked at again later


def patient_of(source: bytes | Path, agreement: Agreement) -> Patient:
    """The patient of one instance (encoded bytes or a file; its header only)."""
    attribute = agreement.consent.attribute
    tags = ["PatientID", "IssuerOfPatientID", *([attribute] if attribute else [])]
    stream = BytesIO(source) if isinstance(source, bytes) else source
    ds = pydicom.dcmread(stream, stop_before_pixels=True, specific_tags=tags)
    value = str(ds.get(attribute, "") or "").strip() if attribute else ""
    return Patient(
        str(ds.get("IssuerOfPatientID", "") or "").strip(),
        str(ds.get("PatientID", "") or "").strip(),
        value or None,
    )


class ConsentRegister:
    def __init__(self, db: Database, secret: str, audit: AuditTrail | None = None) -> None:
        self.db = db
        self._key = hmac.new(secret.encode("utf-8"), b"radbridge consent", "sha256").digest()
        self._audit = audit

    def person(self, agreement_id: str, issuer: str, patient_id: str) -> str:
        if not patient_id.strip():
            raise ConfigError("a consent names a patient: Patient ID is empty")
        message = "\0".join((agreement_id, issuer.strip(), patient_id.strip())).encode("utf-8")
        return hmac.new(self._key, message, hashlib.sha256).hexdigest()

    def record(
        self, agreement_id: str, issuer: str, patient_id: str, reference: str, source: str
    ) -> None:
        """Record (or renew, after a withdrawal) the patient's consent with its reference."""
        person = self.person(agreement_id, issuer, patient_id)
        reference = reference.strip()[:200]
        if not reference:
            raise ConfigError("a consent needs its reference (the hospital's record of it)")
        self._ensure(agreement_id, person, source)
        with self.db.session() as s:
            s.execute(
                update(ConsentRow)
                .where(ConsentRow.agreement_id == agreement_id, ConsentRow.person == person)
                .values(reference=reference, source=source, recorded_at=utcnow(), withdrawn_at=None)
            )
        if self._audit is not None:
            self._audit.record(
                "consent-recorded", agreement_id=agreement_id, details={"source": source}
            )

    def withdraw_person(self, agreement_id: str, issuer: str, patient_id: str) -> None:
        person = self.person(agreement_id, issuer, patient_id)
        self._ensure(agreement_id, person, "cli")
        with self.db.session() as s:
            s.execute(
                update(ConsentRow)
                .where(ConsentRow.agreement_id == agreement_id, ConsentRow.person == person)
                .values(withdrawn_at=utcnow())
            )

    def _ensure(self, agreement_id: str, person: str, source: str) -> None:
        """The person's row exists (another process may create it at the same moment)."""
        with self.db.session() as s:
            found = s.scalar(
                select(ConsentRow.id).where(
                    ConsentRow.agreement_id == agreement_id, ConsentRow.person == person
                )
            )
        if found is not None:
            return
        try:
            with self.db.session() as s:
                s.add(ConsentRow(agreement_id=agreement_id, person=person, source=source))
        except IntegrityError:
            pass

    def hold_reason(self, agreement: Agreement, patient: Patient) -> Hold | None:
        """Why the study of ``patient`` must stay at the edge now, or None when it may go.
        A reference carried by the study itself is recorded (source "attribute")."""
        if not patient.patient_id:
            return Hold(NO_REFERENCE, final=False) if agreement.consent.required else None
        person = self.person(agreement.id, patient.issuer, patient.patient_id)
        with self.db.session() as s:
            row = s.scalars(
                select(ConsentRow).where(
                    ConsentRow.agreement_id == agreement.id, ConsentRow.person == person
                )
            ).first()
        if row is not None and row.withdrawn_at is not None:
            return Hold(WITHDRAWN, final=True)
        if patient.reference and (row is None or row.reference != patient.reference):
            self.record(
                agreement.id, patient.issuer, patient.patient_id, patient.reference, "attribute"
            )
            return None
        if agreement.consent.required and (row is None or not row.reference):
            return Hold(NO_REFERENCE, final=False)
        return None


def withdraw(
    db: Database,
    store: DurableStore,
    register: ConsentRegister,
    agreement: Agreement,
    issuer: str,
    patient_id: str,
    audit: AuditTrail | None = None,
) -> tuple[int, int]:
    """Withdraw the patient's consent under ``agreement``: (studies held at the edge, purge
    requests queued for the center). Idempotent: a second call queues nothing new."""
    register.withdraw_person(agreement.id, issuer, patient_id)
    held = purges = 0
    for study in _studies_of(db, store, agreement, issuer, patient_id):
        pseudo = lookup_pseudonym(db, agreement.id, "uid", study.study_uid)
        if pseudo is not None:  # something of it left: the center must delete it
            purges += enqueue_purge(db, agreement.id, pseudo, "consent-withdrawn")
        if study.state != EdgeStudyState.FORWARDED:
            with db.session() as s:
                s.execute(
                    update(StudyRow)
                    .where(StudyRow.id == study.id)
                    .values(state=EdgeStudyState.BLOCKED, last_error=WITHDRAWN)
                )
            held += 1
    if audit is not None:
        audit.record(
            "consent-withdrawn",
            agreement_id=agreement.id,
            details={"studies_held": held, "purges_requested": purges},
        )
    log.info("consent withdrawn under %s: %d held, %d purges queued", agreement.id, held, purges)
    return held, purges


def _studies_of(
    db: Database, store: DurableStore, agreement: Agreement, issuer: str, patient_id: str
) -> list[StudyRow]:
    """The edge's studies of the patient under the agreement (one header read per study)."""
    with db.session() as s:
        studies = s.scalars(select(StudyRow).where(StudyRow.agreement_id == agreement.id)).all()
        first = dict(
            s.execute(
                select(SeriesRow.study_id, InstanceRow.path)
                .join(InstanceRow, InstanceRow.series_id == SeriesRow.id)
                .join(StudyRow, StudyRow.id == SeriesRow.study_id)
                .where(StudyRow.agreement_id == agreement.id)
                .order_by(InstanceRow.id.desc())
            ).all()
        )  # the last row per study wins: its first instance
    out = []
    for study in studies:
        path = first.get(study.id)
        if path is None:
            continue
        patient = patient_of(store.path(path), agreement)
        if patient.patient_id == patient_id.strip() and patient.issuer == issuer.strip():
            out.append(study)
    return out
