"""The PIPL person ledger: how many distinct persons' data left the hospital this year.

PIPL ties the legal mechanism of a cross-border transfer to how many persons' sensitive personal
information leave in a year: a standard contract or a certification covers fewer than 10,000, a
security assessment the figure it was granted (``transfer_basis.max_persons_per_year``). The
edge counts persons, not studies, across all agreements of one hospital (so a transfer cannot be
split across agreements to stay under), by a keyed hash of the patient identifier (issuer +
Patient ID) that no other table holds. The year is the UTC calendar year of the admission.

:meth:`PersonLedger.admit` runs before a study's first byte leaves: a person already counted
this year always goes; a new person goes only while the count stays below the agreement's
ceiling, else the forwarder blocks the study with the reason and retries it when the year turns.
Crossing 80 % of a ceiling is a warning: an audit record (the forwarder records each study it
holds at the ceiling, once), and the metrics
``radbridge_edge_transfer_persons`` / ``…_ceiling`` that alert rules compare.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select, update

from radbridge.agreements import Agreement
from radbridge.audit import AuditTrail
from radbridge.db.engine import Database
from radbridge.db.tables import PersonRow, PersonYearRow
from radbridge.metrics import EdgeMetrics

__all__ = ["CEILING_REASON", "WARN_AT", "Admission", "PersonLedger"]

WARN_AT = 0.8
CEILING_REASON = "PIPL person ceiling"


@dataclass(frozen=True)
class Admission:
    admitted: bool
    new_person: bool
    persons: int  # counted this year after the decision
    ceiling: int  # counted persons stay below it

    def refusal(self, agreement: Agreement) -> str:
        """The blocked study's reason: what a PACS admin or the privacy officer must know."""
        basis = agreement.transfer_basis
        return (
            f"{CEILING_REASON}: {self.persons} distinct persons have left this year; under "
            f"{basis.mechanism} {basis.reference} they must stay below {self.ceiling}. "
            "Persons already counted still go; new ones wait for 1 January or a mechanism "
            "with a higher figure."
        )


class PersonLedger:
    def __init__(
        self,
        db: Database,
        secret: str,
        metrics: EdgeMetrics | None = None,
        audit: AuditTrail | None = None,
    ) -> None:
        self.db = db
        self._key = hmac.new(secret.encode("utf-8"), b"radbridge person ledger", "sha256").digest()
        self._metrics, self._audit = metrics, audit

    def person(self, hospital: str, issuer: str, patient_id: str, study_uid: str) -> str:
        """The ledger's key of one person of one hospital (keyed: not reversible by reading
        the database). Without a Patient ID the study counts as its own person: never fewer
        persons than really left."""
        who = patient_id.strip() or f"study:{study_uid}"
        message = "\0".join((hospital, issuer.strip(), who)).encode("utf-8")
        return hmac.new(self._key, message, hashlib.sha256).hexdigest()

    def admit(self, agreement: Agreement, person: str, now: datetime) -> Admission:
        """Count ``person`` for this year under ``agreement``'s ceiling, or refuse a new one."""
        hospital, year = agreement.hospital.name, now.year
        ceiling = agreement.transfer_basis.max_persons_per_year
        self.db.insert_once(PersonYearRow(hospital=hospital, year=year, persons=0))
        with self.db.session() as s:
            # Lock the year's count first (row lock / SQLite write lock): concurrent edge
            # replicas admit one at a time, so none admits the person past the ceiling.
            s.execute(
                update(PersonYearRow)
                .where(PersonYearRow.hospital == hospital, PersonYearRow.year == year)
                .values(persons=PersonYearRow.persons)
            )
            persons = s.scalars(
                select(PersonYearRow.persons).where(
                    PersonYearRow.hospital == hospital, PersonYearRow.year == year
                )
            ).one()
            known = s.scalars(
                select(func.count()).where(
                    PersonRow.hospital == hospital,
                    PersonRow.year == year,
                    PersonRow.person == person,
                )
            ).one()
            if known:
                decision = Admission(True, False, persons, ceiling)
            elif persons + 1 >= ceiling:
                decision = Admission(False, True, persons, ceiling)
            else:
                s.add(
                    PersonRow(
                        hospital=hospital,
                        year=year,
                        person=person,
                        agreement_id=agreement.id,
                        first_at=now,
                    )
                )
                s.execute(
                    update(PersonYearRow)
                    .where(PersonYearRow.hospital == hospital, PersonYearRow.year == year)
                    .values(persons=persons + 1)
                )
                decision = Admission(True, True, persons + 1, ceiling)
        self._report(agreement, decision, before=persons)
        return decision

    def _report(self, agreement: Agreement, decision: Admission, before: int) -> None:
        if self._metrics is not None:
            self._metrics.transfer_persons.labels(agreement.id).set(decision.persons)
            self._metrics.transfer_persons_ceiling.labels(agreement.id).set(decision.ceiling)
        if self._audit is None:
            return
        warn = WARN_AT * decision.ceiling
        basis = agreement.transfer_basis
        details = {
            "persons": decision.persons,
            "ceiling": decision.ceiling,
            "mechanism": str(basis.mechanism),
            "reference": basis.reference,
        }
        if decision.admitted and decision.new_person and before < warn <= decision.persons:
            self._audit.record(
                "transfer-ceiling",
                outcome=0,
                agreement_id=agreement.id,
                details={**details, "reason": f"{int(WARN_AT * 100)} % of the ceiling reached"},
            )
