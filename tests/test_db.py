"""Database tests: each runs on SQLite and PostgreSQL (see the db_url fixture)."""

from datetime import UTC, datetime, timedelta

import pytest
from alembic import command
from sqlalchemy import delete, insert, inspect, select
from sqlalchemy.exc import IntegrityError

from dicom_io.identity_map import lookup_original, lookup_pseudonym, record_pseudonyms
from radbridge.agreements import load_agreements
from radbridge.db import Database, upgrade
from radbridge.db.agreements import sync_agreements
from radbridge.db.migrate import alembic_config, node_of
from radbridge.db.tables import (
    CENTER_ONLY,
    EDGE_ONLY,
    IdentityMapRow,
    JobRow,
    StudyRow,
    node_metadata,
    utcnow,
)
from radbridge.errors import ConfigError, redacted
from tests.conftest import REPO

AGREEMENT = "demo-hospital-to-center"


def _study(uid: str) -> StudyRow:
    return StudyRow(
        agreement_id=AGREEMENT,
        study_uid=uid,
        state="receiving",
        instance_count=0,
        first_received_at=utcnow(),
        last_received_at=utcnow(),
        attempts=0,
    )


def test_each_node_has_its_own_tables(edge_db: Database, center_db: Database) -> None:
    edge = set(inspect(edge_db.engine).get_table_names())
    center = set(inspect(center_db.engine).get_table_names())
    shared = {"agreements", "studies", "series", "instances", "audit_records", "audit_head"}
    assert shared | EDGE_ONLY <= edge and not edge & CENTER_ONLY
    assert shared | CENTER_ONLY <= center and not center & EDGE_ONLY  # no identity map there
    assert node_of(edge_db.engine.url.render_as_string(hide_password=False)) == "edge"


def test_a_node_refuses_the_other_nodes_database(edge_db: Database, center_db: Database) -> None:
    for db, node in ((edge_db, "center"), (center_db, "edge")):
        url = db.engine.url.render_as_string(hide_password=False)
        with pytest.raises(ConfigError, match="each node has its own"):
            upgrade(url, node)  # type: ignore[arg-type]
        assert node_of(url) != node


def test_a_database_from_before_the_branches_keeps_its_rows(db_url: str) -> None:
    """A database last upgraded on the shared trunk (0011: every table) goes to its node's
    branch with its rows; the other node's tables go, but only while empty."""
    command.upgrade(alembic_config(db_url), "0011")  # the last shared revision
    db = Database(db_url)
    try:
        sync_agreements(db, load_agreements(REPO / "radbridge/defaults/agreements.yaml"))
        record_pseudonyms(db, AGREEMENT, {("uid", "1.2.3.4"): "2.25.42"})
        with db.session() as s:
            s.add(_study("2.25.77"))
        with db.engine.begin() as conn:  # a center row in an edge's database: served both
            study_id = conn.execute(select(StudyRow.id)).scalar_one()
            conn.execute(
                insert(JobRow).values(
                    study_id=study_id, state="done", priority="routine", created_at=utcnow()
                )
            )
        with pytest.raises(RuntimeError, match=r"holds 1 row\(s\) in jobs"):
            upgrade(db_url, "edge")
        with db.engine.begin() as conn:
            conn.execute(delete(JobRow))
        upgrade(db_url, "edge")
        assert node_of(db_url) == "edge"
        assert lookup_original(db, AGREEMENT, "uid", "2.25.42") == "1.2.3.4"
        with db.session() as s:
            assert [r.study_uid for r in s.scalars(select(StudyRow))] == ["2.25.77"]
        assert not set(inspect(db.engine).get_table_names()) & CENTER_ONLY
    finally:
        db.dispose()


def test_a_node_branch_downgrades_to_the_shared_trunk(db_url: str) -> None:
    upgrade(db_url, "center")
    command.downgrade(alembic_config(db_url), "0011")
    engine = Database(db_url).engine
    try:
        assert set(inspect(engine).get_table_names()) >= EDGE_ONLY | CENTER_ONLY
        assert node_of(db_url) is None
        upgrade(db_url, "center")
        assert not set(inspect(engine).get_table_names()) & EDGE_ONLY
    finally:
        engine.dispose()


def test_datetimes_come_back_as_utc(edge_db: Database) -> None:
    moscow = datetime(2026, 11, 23, 15, 0, tzinfo=UTC) + timedelta(hours=0)
    with edge_db.session() as s:
        s.add(
            StudyRow(
                agreement_id="demo-hospital-to-center",
                study_uid="2.25.1",
                state="receiving",
                instance_count=0,
                first_received_at=moscow,
                last_received_at=utcnow(),
                attempts=0,
            )
        )
    with edge_db.session() as s:
        row = s.scalars(select(StudyRow)).one()
        assert row.first_received_at == moscow and row.first_received_at.tzinfo is not None


def test_study_uid_unique_per_agreement(edge_db: Database) -> None:
    def add() -> None:
        with edge_db.session() as s:
            s.add(
                StudyRow(
                    agreement_id="demo-hospital-to-center",
                    study_uid="2.25.9",
                    state="receiving",
                    instance_count=0,
                    first_received_at=utcnow(),
                    last_received_at=utcnow(),
                    attempts=0,
                )
            )

    add()
    with pytest.raises(IntegrityError) as err:
        add()
    # SQLAlchemy's part of the error names no bound value (hide_parameters); PostgreSQL's own
    # DETAIL still names the colliding key, which is why the edge's loops log such errors
    # through radbridge.errors.redacted (type and place only).
    assert "hidden due to hide_parameters" in str(err.value)
    if edge_db.engine.dialect.name == "sqlite":
        assert "2.25.9" not in str(err.value)
    else:
        assert "2.25.9" in str(err.value)
        assert "2.25.9" not in redacted(err.value) and "IntegrityError at " in redacted(err.value)


def test_identity_map_is_idempotent_and_reversible(edge_db: Database) -> None:
    issued = {("uid", "1.2.3.4"): "2.25.42", ("patient_id", "PID-1"): "RBABC"}
    record_pseudonyms(edge_db, "demo-hospital-to-center", issued)
    record_pseudonyms(edge_db, "demo-hospital-to-center", issued)  # no duplicate, no error
    with edge_db.session() as s:
        assert len(s.scalars(select(IdentityMapRow)).all()) == 2
    assert lookup_original(edge_db, "demo-hospital-to-center", "uid", "2.25.42") == "1.2.3.4"
    assert lookup_pseudonym(edge_db, "demo-hospital-to-center", "patient_id", "PID-1") == "RBABC"


def test_foreign_keys_are_enforced(edge_db: Database) -> None:
    with pytest.raises(IntegrityError), edge_db.session() as s:
        s.add(
            StudyRow(
                agreement_id="no-such-agreement",
                study_uid="2.25.5",
                state="receiving",
                instance_count=0,
                first_received_at=utcnow(),
                last_received_at=utcnow(),
                attempts=0,
            )
        )


def test_migrations_match_the_table_definitions(edge_db: Database, center_db: Database) -> None:
    """Alembic's autogenerate diff between each node's migrated schema and its tables in
    tables.py is empty."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    for db, node in ((edge_db, "edge"), (center_db, "center")):
        with db.engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"compare_type": False})
            diff = compare_metadata(ctx, node_metadata(node))  # type: ignore[arg-type]
        assert diff == [], node
