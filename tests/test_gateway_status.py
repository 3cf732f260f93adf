"""`radbridge gateway status`: queue depths, stuck studies, disk, live associations."""

from __future__ import annotations

from pathlib import Path

from prometheus_client import start_http_server

from dicom_io.status import gateway_status
from dicom_io.store import DurableStore
from radbridge.db import Database
from radbridge.db.tables import StudyRow, utcnow
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
    migrated_db: Database, tmp_path: Path
) -> None:
    _study(migrated_db, "1.2.1", "forwarded")
    _study(migrated_db, "1.2.2", "receiving")
    _study(migrated_db, "1.2.3", "receiving", attempts=3, error="center unreachable: ConnectError")
    _study(migrated_db, "1.2.4", "blocked", error="no legal transfer basis in force")
    store = DurableStore(tmp_path, min_free_bytes=1234)

    offline = gateway_status(migrated_db, store, f"http://127.0.0.1:{free_port()}/metrics")
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
        live = gateway_status(migrated_db, store, f"http://127.0.0.1:{port}/metrics")
    finally:
        server.shutdown()
    assert live.running and live.active_associations == 3
