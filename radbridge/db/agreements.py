"""Keep the database's agreement rows in step with the agreements file."""

from __future__ import annotations

import hashlib
from datetime import UTC, date, datetime, time

from radbridge.agreements import AgreementSet
from radbridge.db.engine import Database
from radbridge.db.tables import AgreementRow, utcnow

__all__ = ["sync_agreements"]


def _at(d: date) -> datetime:
    return datetime.combine(d, time.min, tzinfo=UTC)


def sync_agreements(db: Database, agreements: AgreementSet) -> list[tuple[str, str]]:
    """Insert or update one row per agreement (rows are never deleted: studies reference them).

    Returns the (id, sha256 of its configuration) of every agreement that is new or changed,
    for the audit trail."""
    changed: list[tuple[str, str]] = []
    with db.session() as s:
        for a in agreements.agreements:
            digest = hashlib.sha256(a.model_dump_json().encode()).hexdigest()
            row = s.get(AgreementRow, a.id) or AgreementRow(id=a.id)
            if row.config_sha256 != digest:
                changed.append((a.id, digest))
            row.hospital_name = a.hospital.name
            row.center_name = a.reading_center.name
            row.active_from = _at(a.active_from)
            row.active_until = _at(a.active_until)
            row.config_sha256 = digest
            row.updated_at = utcnow()
            s.add(row)
    return changed
