"""The reading room's Prometheus metrics: turnaround per agreement and priority (the clock
stops at the final signature; every agreement's SLA is a bucket bound), signatures, and the
age of the oldest unread study per agreement (read from the database at each scrape, so every
replica reports the same, whole figure)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from radbridge.agreements import AgreementSet
from radbridge.db.engine import Database
from radbridge.db.tables import JobRow, ReadRow, StudyRow, utcnow
from radbridge.lifecycle import JobState
from radbridge.metrics import with_sla_bounds

__all__ = ["ReviewMetrics", "turnaround_buckets"]

_DEFAULT_BUCKETS = (300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0, 43200.0, 86400.0, 172800.0)


def turnaround_buckets(agreements: AgreementSet) -> tuple[float, ...]:
    """Default bounds plus every agreement's SLA (seconds), so "within SLA" is one bucket."""
    return with_sla_bounds(_DEFAULT_BUCKETS, agreements)


class _OldestUnread(Collector):
    def __init__(self, db: Database) -> None:
        self.db = db

    def collect(self) -> Iterator[GaugeMetricFamily]:
        gauge = GaugeMetricFamily(
            "radbridge_review_oldest_unread_seconds",
            "Age of the oldest study awaiting its final report (AI done or failed), per agreement.",
            labels=["agreement"],
        )
        now = utcnow()
        with self.db.session() as s:
            rows = s.execute(
                select(StudyRow.agreement_id, func.min(StudyRow.first_received_at))
                .join(JobRow, JobRow.study_id == StudyRow.id)
                .outerjoin(ReadRow, ReadRow.study_id == StudyRow.id)
                .where(
                    JobRow.state.in_((JobState.DONE.value, JobState.FAILED.value)),
                    ReadRow.final_at.is_(None),
                )
                .group_by(StudyRow.agreement_id)
            ).all()
        for agreement_id, oldest in rows:
            if isinstance(oldest, datetime):
                oldest = oldest if oldest.tzinfo else oldest.replace(tzinfo=now.tzinfo)
                gauge.add_metric([agreement_id], max(0.0, (now - oldest).total_seconds()))
        yield gauge


class ReviewMetrics:
    def __init__(self, db: Database, agreements: AgreementSet) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.turnaround = Histogram(
            "radbridge_review_turnaround_seconds",
            "First instance received at the edge -> final report signed, per agreement/priority.",
            ["agreement", "priority"],
            buckets=turnaround_buckets(agreements),
            registry=r,
        )
        self.signed = Counter(
            "radbridge_review_reports_signed_total",
            "Reports signed, by agreement and status (preliminary, final).",
            ["agreement", "status"],
            registry=r,
        )
        r.register(_OldestUnread(db))
