"""`radbridge gateway status`: queue depths, stuck studies, disk, live associations."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client import start_http_server

from dicom_io.gateway_status import gateway_status
from dicom_io.store import DurableStore
from radbridge.db import Database
from radbridge.db.tables import DeliveryRow, StudyRow, utcnow
from radbridge.metrics import EdgeMetrics
from tests.conftest import free_port


def _study(db: Database, uid: str, state: str, attempts: int = 0, error: str | None = None) -> None:
    with db.session() as s:
        s.add(
            StudyRow(
                agreement_id="demo-hospital-to-center",
                study_uid=uid,
                state=state,
                instance_count=1,
                first_received_at=utcnow(),
                last_received_at=utcnow(),
                attempts=attempts,
                last_error=error,
            )
        )


def test_status_reports_depths_stuck_studies_and_associations(
    edge_db: Database, tmp_path: Path
) -> None:
    _study(edge_db, "1.2.1", "forwarded")
    _study(edge_db, "1.2.2", "receiving")
    _study(edge_db, "1.2.3", "receiving", attempts=3, error="center unreachable: ConnectError")
    _study(edge_db, "1.2.4", "blocked", error="no legal transfer basis in force")
    store = DurableStore(tmp_path, min_free_bytes=1234)

    offline = gateway_status(edge_db, store, f"http://127.0.0.1:{free_port()}/metrics")
    assert not offline.running and offline.active_associations is None
    assert offline.studies_by_state == {"forwarded": 1, "receiving": 2, "blocked": 1}
    assert [(r.state, r.attempts) for r in offline.stuck] == [("receiving", 3), ("blocked", 0)]
    assert offline.free_bytes > 0 and offline.min_free_bytes == 1234
    # The stuck list carries the row id and agreement, never the study's UID.
    assert all("1.2." not in repr(r) for r in offline.stuck)

    metrics = EdgeMetrics()
    metrics.active_associations.set(3)
    port = free_port()
    server, _ = start_http_server(port, addr="127.0.0.1", registry=metrics.registry)
    try:
        live = gateway_status(edge_db, store, f"http://127.0.0.1:{port}/metrics")
    finally:
        server.shutdown()
    assert live.running and live.active_associations == 3


def _delivery(
    db: Database, object_id: int, state: str, error: str | None = None, version: int = 1
) -> int:
    with db.session() as s:
        row = DeliveryRow(
            agreement_id="demo-hospital-to-center",
            center_object_id=object_id,
            version=version,
            kind="sr",
            sop_instance_uid=f"2.25.{object_id}",
            state=state,
            attempts=2 if state == "dead" else 0,
            last_error=error,
            result_ready_at=utcnow(),
        )
        s.add(row)
        s.flush()
        return row.id


def test_status_lists_deliveries_by_state_and_the_dead_ones(
    edge_db: Database, tmp_path: Path
) -> None:
    empty = gateway_status(edge_db, DurableStore(tmp_path), None)
    assert empty.deliveries_by_state == {"pending": 0, "delivered": 0, "dead": 0}
    assert empty.dead_deliveries == []
    _delivery(edge_db, 1, "delivered")
    _delivery(edge_db, 2, "pending")
    dead = _delivery(edge_db, 3, "dead", "result object 3 is for a study this edge did not send")
    st = gateway_status(edge_db, DurableStore(tmp_path), None)
    assert st.deliveries_by_state == {"pending": 1, "delivered": 1, "dead": 1}
    assert [
        (d.row_id, d.agreement_id, d.version, d.kind, d.attempts) for d in st.dead_deliveries
    ] == [(dead, "demo-hospital-to-center", 1, "sr", 2)]
    assert "did not send" in (st.dead_deliveries[0].last_error or "")
    # The studies part is unchanged by deliveries.
    assert st.studies_by_state == {} and st.stuck == []


def test_gateway_resend_command(
    edge_db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from radbridge.cli import app

    monkeypatch.setenv("RADBRIDGE_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("RADBRIDGE_EDGE__DATABASE_URL", edge_db.url)
    dead = _delivery(edge_db, 1, "dead", "not stored at the PACS within 7 days")
    runner = CliRunner()
    out = runner.invoke(app, ["gateway", "resend", str(dead)])
    assert out.exit_code == 0, out.output
    assert "queued again" in out.output and "was dead" in out.output
    with edge_db.session() as s:
        row = s.get(DeliveryRow, dead)
        assert row is not None and row.state == "pending" and row.last_error is None
    assert "already queued" in runner.invoke(app, ["gateway", "resend", str(dead)]).output
    missing = runner.invoke(app, ["gateway", "resend", "9999"])
    assert missing.exit_code == 2 and "no delivery with id 9999" in missing.output


def test_status_counts_purge_requests_the_center_has_not_confirmed(
    edge_db: Database, tmp_path: Path
) -> None:
    from sqlalchemy import update

    from dicom_io.purge_requests import enqueue_purge
    from radbridge.db.tables import PurgeRequestRow

    assert gateway_status(edge_db, DurableStore(tmp_path), None).purges_pending == 0
    enqueue_purge(edge_db, "demo-hospital-to-center", "2.25.1", "consent-withdrawn")
    enqueue_purge(edge_db, "demo-hospital-to-center", "2.25.2", "consent-withdrawn")
    with edge_db.session() as s:
        s.execute(
            update(PurgeRequestRow)
            .where(PurgeRequestRow.study_uid == "2.25.1")
            .values(state="done", done_at=utcnow())
        )
        s.execute(
            update(PurgeRequestRow)
            .where(PurgeRequestRow.study_uid == "2.25.2")
            .values(last_error="center answered 409 to purge")
        )
    st = gateway_status(edge_db, DurableStore(tmp_path), None)
    assert (st.purges_pending, st.purge_last_error) == (1, "center answered 409 to purge")
