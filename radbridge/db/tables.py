"""SQLAlchemy 2 tables of the edge's and the center's databases.

Each node has its own database: the edge's holds original identifiers and the identity map and
never leaves the hospital; the center's holds only pseudonymous UIDs. Both hold the shared
tables (agreements, studies, series, instances, the audit trail); each holds its own
(``EDGE_ONLY``, ``CENTER_ONLY``) and never the other's: the migrations share a trunk up to 0011
and then branch per node (``edge@head``, ``center@head``; :func:`radbridge.db.migrate.upgrade`),
each branch dropping the other node's tables.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, ClassVar, Literal

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

__all__ = [
    "AgreementRow",
    "AuditHeadRow",
    "AuditRow",
    "Base",
    "DeliveryRow",
    "IdentityMapRow",
    "InstanceRow",
    "JobRow",
    "PersonRow",
    "PersonYearRow",
    "ReadRow",
    "ReaderRow",
    "ReaderSessionRow",
    "ReportRow",
    "ResultObjectRow",
    "ResultRow",
    "SeriesRow",
    "StudyRow",
    "utcnow",
]


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite stores them naive)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime stored; use radbridge.db.tables.utcnow()")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        datetime: UTCDateTime,
        dict[str, Any]: JSON,
        list[str]: JSON,
    }


class AgreementRow(Base):
    """Snapshot of an agreement as loaded, so rows can reference it."""

    __tablename__ = "agreements"
    id: Mapped[str] = mapped_column(String(63), primary_key=True)
    hospital_name: Mapped[str] = mapped_column(String(200))
    center_name: Mapped[str] = mapped_column(String(200))
    active_from: Mapped[datetime]
    active_until: Mapped[datetime]
    config_sha256: Mapped[str] = mapped_column(String(64))
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class StudyRow(Base):
    """A study as this node holds it. ``state`` values are per node (see lifecycle.py)."""

    __tablename__ = "studies"
    __table_args__ = (
        UniqueConstraint("agreement_id", "study_uid"),
        Index("ix_studies_state_next_attempt", "state", "next_attempt_at"),
        Index("ix_studies_agreement_patient", "agreement_id", "patient_key"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    agreement_id: Mapped[str] = mapped_column(ForeignKey("agreements.id"))
    study_uid: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(20))
    priority: Mapped[str] = mapped_column(String(10), default="routine")
    modality: Mapped[str | None] = mapped_column(String(16))
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    expected_instances: Mapped[int | None] = mapped_column(
        Integer, doc="Number of Study Related Instances as the sender stated it, if it did."
    )
    version: Mapped[int] = mapped_column(
        Integer, default=0, doc="Completions so far: a late instance re-opens the study (+1)."
    )
    first_received_at: Mapped[datetime]
    last_received_at: Mapped[datetime]
    patient_key: Mapped[str | None] = mapped_column(
        String(64),
        doc="Center only: sha256 of the agreement and the pseudonymous Patient ID (priors).",
    )
    stable_at: Mapped[datetime | None]
    forwarded_at: Mapped[datetime | None]
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None]
    last_error: Mapped[str | None] = mapped_column(Text)
    series: Mapped[list[SeriesRow]] = relationship(back_populates="study")


class SeriesRow(Base):
    __tablename__ = "series"
    __table_args__ = (UniqueConstraint("study_id", "series_uid"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"))
    series_uid: Mapped[str] = mapped_column(String(64))
    modality: Mapped[str | None] = mapped_column(String(16))
    body_part: Mapped[str | None] = mapped_column(String(64))
    study: Mapped[StudyRow] = relationship(back_populates="series")
    instances: Mapped[list[InstanceRow]] = relationship(back_populates="series")


class InstanceRow(Base):
    __tablename__ = "instances"
    __table_args__ = (UniqueConstraint("series_id", "sop_instance_uid"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id", ondelete="CASCADE"))
    sop_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(Text, doc="Relative to the node's store root.")
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    received_at: Mapped[datetime] = mapped_column(default=utcnow)
    version: Mapped[int] = mapped_column(
        Integer, default=1, doc="1, then +1 each time new bytes arrive for this SOP Instance UID."
    )
    series: Mapped[SeriesRow] = relationship(back_populates="instances")


class IdentityMapRow(Base):
    """Edge only: original identifier <-> pseudonym, per agreement."""

    __tablename__ = "identity_map"
    __table_args__ = (
        UniqueConstraint("agreement_id", "kind", "original"),
        Index("ix_identity_map_pseudonym", "agreement_id", "kind", "pseudonym"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    agreement_id: Mapped[str] = mapped_column(ForeignKey("agreements.id"))
    kind: Mapped[str] = mapped_column(String(20))
    original: Mapped[str] = mapped_column(String(200))
    pseudonym: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class JobRow(Base):
    """Center only: one inference job per (study, completion)."""

    __tablename__ = "jobs"
    __table_args__ = (Index("ix_jobs_state", "state"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"))
    state: Mapped[str] = mapped_column(String(20))
    priority: Mapped[str] = mapped_column(String(10), default="routine")
    version: Mapped[int] = mapped_column(
        Integer, default=1, doc="1 for the study's first completion; a late instance makes +1."
    )
    first_received_at: Mapped[datetime | None] = mapped_column(
        doc="When the edge received the study's first instance (for end-to-end latency)."
    )
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    error: Mapped[str | None] = mapped_column(Text)
    owner: Mapped[str | None] = mapped_column(
        String(64), doc="The Api replica that runs (or will run) the job; None: any may."
    )
    lease_until: Mapped[datetime | None] = mapped_column(
        doc="Its owner holds the job until then and renews it while alive; past it, another "
        "replica may resume the job."
    )


class ResultRow(Base):
    """Center only: one model's output for one instance."""

    __tablename__ = "results"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    instance_id: Mapped[int] = mapped_column(ForeignKey("instances.id", ondelete="CASCADE"))
    model_name: Mapped[str] = mapped_column(String(100))
    model_version: Mapped[str] = mapped_column(String(20))
    model_sha256: Mapped[str] = mapped_column(String(64))
    input_sha256: Mapped[str] = mapped_column(String(64))
    findings: Mapped[dict[str, Any]] = mapped_column(JSON)
    timings_ms: Mapped[dict[str, Any]] = mapped_column(JSON)
    provider: Mapped[str] = mapped_column(String(40))
    latency_s: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ResultObjectRow(Base):
    """Center only: a DICOM result object (SR, SEG) built from a finished job, for the edge."""

    __tablename__ = "result_objects"
    __table_args__ = (Index("ix_result_objects_agreement_id", "agreement_id", "id"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    agreement_id: Mapped[str] = mapped_column(ForeignKey("agreements.id"))
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    study_uid: Mapped[str] = mapped_column(String(64), doc="Pseudonymous, as the center knows it.")
    version: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(8), doc="sr or seg")
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(Text, doc="Relative to the center's store root.")
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    signature: Mapped[str | None] = mapped_column(
        Text, doc="The center's JWS over sha256, UIDs, agreement and edges (radbridge.signing)."
    )


class DeliveryRow(Base):
    """Edge only: the delivery outbox of result objects to the hospital PACS."""

    __tablename__ = "deliveries"
    __table_args__ = (
        UniqueConstraint("agreement_id", "center_object_id"),
        Index("ix_deliveries_state_next_attempt", "state", "next_attempt_at"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    agreement_id: Mapped[str] = mapped_column(ForeignKey("agreements.id"))
    center_object_id: Mapped[int] = mapped_column(Integer, doc="result_objects.id at the center.")
    study_id: Mapped[int | None] = mapped_column(ForeignKey("studies.id", ondelete="SET NULL"))
    version: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(8))
    sop_instance_uid: Mapped[str] = mapped_column(String(64), doc="Minted by the center.")
    state: Mapped[str] = mapped_column(String(20), doc="pending, delivered or dead")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None]
    claimed_at: Mapped[datetime | None] = mapped_column(
        doc="Set while an attempt is in flight: found set at a start, the attempt died with "
        "the process (Deliverer.recover)."
    )
    last_error: Mapped[str | None] = mapped_column(Text)
    result_ready_at: Mapped[datetime] = mapped_column(doc="When the center stored the object.")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    delivered_at: Mapped[datetime | None]
    pacs_status: Mapped[int | None] = mapped_column(Integer, doc="The C-STORE status answered.")
    evidence: Mapped[str | None] = mapped_column(
        Text, doc="The center's signature, verified before re-identification (radbridge.signing)."
    )
    delivered_sha256: Mapped[str | None] = mapped_column(
        String(64), doc="sha256 of the re-identified bytes the PACS acknowledged."
    )


class AuditRow(Base):
    """Both nodes: one record of the audit trail (radbridge.audit), hash-chained to the one
    before it. Append-only: nothing updates or deletes a row; ``audit verify`` proves it."""

    __tablename__ = "audit_records"
    __table_args__ = (Index("ix_audit_records_agreement_id", "agreement_id", "id"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, doc="The sequence number.")
    at: Mapped[datetime]
    node: Mapped[str] = mapped_column(String(80), doc="edge:<edge id> or center")
    event_id: Mapped[str] = mapped_column(String(16), doc="DICOM CID 400 code, e.g. 110106")
    action: Mapped[str] = mapped_column(String(1), doc="EventActionCode: C R U D E")
    outcome: Mapped[int] = mapped_column(Integer, doc="EventOutcomeIndicator: 0 4 8 12")
    agreement_id: Mapped[str | None] = mapped_column(String(63))
    study_uid: Mapped[str | None] = mapped_column(String(64), doc="Pseudonymous on both nodes.")
    details: Mapped[str] = mapped_column(Text, doc="Canonical JSON of the event's details.")
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))


class AuditHeadRow(Base):
    """Both nodes: the chain's head, rewritten with every append in the same transaction, so a
    removed last record (or a truncated table) shows as a head that matches no record."""

    __tablename__ = "audit_head"
    chain: Mapped[str] = mapped_column(String(16), primary_key=True)
    seq: Mapped[int] = mapped_column(Integer)
    hash: Mapped[str] = mapped_column(String(64))


class PersonRow(Base):
    """Edge only: the PIPL person ledger (dicom_io/person_ledger.py). One row per distinct
    person whose data left the hospital in a calendar year, by a keyed hash of the patient
    identifier that no other table holds."""

    __tablename__ = "person_ledger"
    __table_args__ = (UniqueConstraint("hospital", "year", "person"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    hospital: Mapped[str] = mapped_column(String(200))
    year: Mapped[int] = mapped_column(Integer)
    person: Mapped[str] = mapped_column(String(64), doc="HMAC-SHA256 of the patient identifier.")
    agreement_id: Mapped[str] = mapped_column(String(63), doc="The agreement it first left by.")
    first_at: Mapped[datetime]


class PersonYearRow(Base):
    """Edge only: the ledger's count per hospital and year, locked by every admission so two
    edge replicas cannot both admit the last person below the ceiling."""

    __tablename__ = "person_ledger_years"
    hospital: Mapped[str] = mapped_column(String(200), primary_key=True)
    year: Mapped[int] = mapped_column(Integer, primary_key=True)
    persons: Mapped[int] = mapped_column(Integer)


class ConsentRow(Base):
    """Edge only: a patient's consent under an agreement (the person is a keyed hash)."""

    __tablename__ = "consents"
    __table_args__ = (UniqueConstraint("agreement_id", "person"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    agreement_id: Mapped[str] = mapped_column(ForeignKey("agreements.id"))
    person: Mapped[str] = mapped_column(String(64), doc="HMAC of agreement, issuer, Patient ID.")
    reference: Mapped[str | None] = mapped_column(String(200))
    source: Mapped[str] = mapped_column(String(16), doc="attribute, import or cli")
    recorded_at: Mapped[datetime] = mapped_column(default=utcnow)
    withdrawn_at: Mapped[datetime | None]


class PurgeRequestRow(Base):
    """Edge only: the center must delete a study (a withdrawn consent); retried until done."""

    __tablename__ = "purge_requests"
    __table_args__ = (
        UniqueConstraint("agreement_id", "study_uid"),
        Index("ix_purge_requests_state_next", "state", "next_attempt_at"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    agreement_id: Mapped[str] = mapped_column(ForeignKey("agreements.id"))
    study_uid: Mapped[str] = mapped_column(String(64), doc="Pseudonymous: the center's UID.")
    reason: Mapped[str] = mapped_column(String(32))
    state: Mapped[str] = mapped_column(String(16), doc="pending or done")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None]
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    done_at: Mapped[datetime | None]


class ReaderRow(Base):
    """Center only: a radiologist of a reading center (review/readers.py). ``agreements`` narrows
    what the reader sees among the agreements their center serves (empty: all of them)."""

    __tablename__ = "readers"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    center: Mapped[str] = mapped_column(String(200), doc="reading_center.name of agreements.")
    agreements: Mapped[list[str]] = mapped_column(JSON)
    observer_id: Mapped[str] = mapped_column(
        String(64), doc="What a signed report names: an identifier, not the person's name."
    )
    locale: Mapped[str] = mapped_column(String(8))
    password_hash: Mapped[str] = mapped_column(Text, doc="argon2id (argon2-cffi).")
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ReaderSessionRow(Base):
    """Center only: a signed-in reader's session; the cookie's token is stored as its sha256."""

    __tablename__ = "reader_sessions"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    reader_id: Mapped[int] = mapped_column(ForeignKey("readers.id", ondelete="CASCADE"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_seen_at: Mapped[datetime]
    expires_at: Mapped[datetime] = mapped_column(doc="Absolute end; idle time ends it sooner.")


class ReadRow(Base):
    """Center only: the read of a study — who holds it and its clocks (review/worklist.py)."""

    __tablename__ = "reads"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), unique=True)
    claimed_by: Mapped[int | None] = mapped_column(ForeignKey("readers.id"))
    claimed_at: Mapped[datetime | None]
    opened_at: Mapped[datetime | None]
    preliminary_at: Mapped[datetime | None]
    final_at: Mapped[datetime | None]
    sent_at: Mapped[datetime | None] = mapped_column(
        doc="When the edge fetched the final report (on its way to the PACS)."
    )


class ReportRow(Base):
    """Center only: one version of a study's report (1, then an addendum is 2, ...).
    ``status``: draft, preliminary or final; a final version is never changed again."""

    __tablename__ = "reports"
    __table_args__ = (UniqueConstraint("study_id", "version"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"))
    version: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16))
    reader_id: Mapped[int] = mapped_column(ForeignKey("readers.id"))
    content: Mapped[dict[str, Any]] = mapped_column(JSON, doc="review.reports.ReportContent")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    signed_at: Mapped[datetime | None]


# -- which node holds which table -------------------------------------------------------------

Node = Literal["edge", "center"]
NODES: tuple[Node, ...] = ("edge", "center")
EDGE_ONLY = frozenset(
    {"identity_map", "deliveries", "person_ledger", "person_ledger_years", "consents"}
    | {"purge_requests"}
)
CENTER_ONLY = frozenset(
    {"jobs", "results", "result_objects", "readers", "reader_sessions", "reads", "reports"}
)


def node_tables(node: Node) -> list[Table]:
    """The tables ``node``'s database holds (the shared ones and its own), in the order of
    their foreign keys. Each node's migration branch drops the other node's tables."""
    other = CENTER_ONLY if node == "edge" else EDGE_ONLY
    return [t for t in Base.metadata.sorted_tables if t.name not in other]


def node_metadata(node: Node) -> MetaData:
    """``node``'s schema as its migrations build it (Alembic compares against this)."""
    metadata = MetaData(naming_convention=NAMING)
    for table in node_tables(node):
        table.to_metadata(metadata)
    return metadata
