"""What a PACS admin asks first: is it up, how much is waiting, what is stuck, is the disk ok.

Results returning to the PACS are part of it: deliveries by state and every dead one (each
needs a person: ``radbridge gateway resend ID``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

import httpx
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select

from dicom_io.store import DurableStore
from radbridge.db.engine import Database
from radbridge.db.tables import DeliveryRow, PersonYearRow, PurgeRequestRow, StudyRow, utcnow
from radbridge.lifecycle import DeliveryState, EdgeStudyState

__all__ = ["DeadDelivery", "GatewayStatus", "StuckStudy", "gateway_status"]


@dataclass(frozen=True)
class StuckStudy:
    """A study waiting on a retry or blocked; row id and agreement only, never identifiers."""

    row_id: int
    agreement_id: str
    state: str
    attempts: int
    next_attempt_at: datetime | None
    last_error: str | None


@dataclass(frozen=True)
class DeadDelivery:
    """A result that will not reach the PACS without a person; ids only, never identifiers."""

    row_id: int
    agreement_id: str
    version: int
    kind: str
    attempts: int
    last_error: str | None


@dataclass
class GatewayStatus:
    running: bool
    active_associations: int | None
    studies_by_state: dict[str, int]
    stuck: list[StuckStudy] = field(default_factory=list)
    free_bytes: int = 0
    min_free_bytes: int = 0
    deliveries_by_state: dict[str, int] = field(default_factory=dict)  # pending/delivered/dead
    dead_deliveries: list[DeadDelivery] = field(default_factory=list)
    persons_this_year: dict[str, int] = field(default_factory=dict)  # hospital -> PIPL ledger
    # Purge requests (withdrawn consents) the center has not confirmed yet, and the oldest's
    # last error: a request that keeps failing needs a person.
    purges_pending: int = 0
    purge_last_error: str | None = None


def gateway_status(
    db: Database, store: DurableStore, metrics_url: str | None, limit: int = 20
) -> GatewayStatus:
    with db.session() as s:
        counts = dict(
            s.execute(select(StudyRow.state, func.count()).group_by(StudyRow.state)).all()
        )
        rows = s.scalars(
            select(StudyRow)
            .where(
                (StudyRow.state == EdgeStudyState.BLOCKED)
                | ((StudyRow.state == EdgeStudyState.RECEIVING) & (StudyRow.attempts > 0))
            )
            .order_by(StudyRow.id)
            .limit(limit)
        ).all()
        stuck = [
            StuckStudy(r.id, r.agreement_id, r.state, r.attempts, r.next_attempt_at, r.last_error)
            for r in rows
        ]
        delivery_counts = dict(
            s.execute(select(DeliveryRow.state, func.count()).group_by(DeliveryRow.state)).all()
        )
        dead = [
            DeadDelivery(d.id, d.agreement_id, d.version, d.kind, d.attempts, d.last_error)
            for d in s.scalars(
                select(DeliveryRow)
                .where(DeliveryRow.state == DeliveryState.DEAD)
                .order_by(DeliveryRow.id)
                .limit(limit)
            )
        ]
        year = utcnow().year
        persons = {
            r.hospital: r.persons
            for r in s.scalars(select(PersonYearRow).where(PersonYearRow.year == year))
        }
        pending = s.scalars(
            select(PurgeRequestRow)
            .where(PurgeRequestRow.state == "pending")
            .order_by(PurgeRequestRow.id)
        ).all()
    associations = _scrape_associations(metrics_url) if metrics_url else None
    return GatewayStatus(
        running=associations is not None,
        active_associations=associations,
        studies_by_state={str(k): int(v) for k, v in counts.items()},
        stuck=stuck,
        free_bytes=store.free_bytes(),
        min_free_bytes=store.min_free_bytes,
        deliveries_by_state={
            state.value: int(delivery_counts.get(state.value, 0)) for state in DeliveryState
        },
        dead_deliveries=dead,
        persons_this_year=persons,
        purges_pending=len(pending),
        purge_last_error=next((p.last_error for p in pending if p.last_error), None),
    )


def _scrape_associations(url: str) -> int | None:
    try:
        text = httpx.get(url, timeout=2).text
    except httpx.HTTPError:
        return None
    for family in text_string_to_metric_families(text):
        if family.name == "radbridge_edge_active_associations":
            return int(family.samples[0].value)
    return None
