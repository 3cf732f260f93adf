"""Two gateway replicas on one database and one store volume assemble one study together.

Study assembly lives in the database, not in a process: instances of one study arriving at
two replicas at the same time (both racing to create the study and series rows) end up in one
study with every instance, and exactly one replica's forwarder claims it.
"""

from __future__ import annotations

import threading
from datetime import timedelta
from pathlib import Path

from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import DigitalXRayImageStorageForPresentation
from sqlalchemy import select, update

from dicom_io.forwarder import Forwarder
from dicom_io.ingest import Ingestor
from dicom_io.scp import StorageSCP
from dicom_io.store import DurableStore
from radbridge.agreements import load_agreements
from radbridge.contract import CenterClient
from radbridge.db import Database
from radbridge.db.tables import InstanceRow, StudyRow, utcnow
from radbridge.metrics import EdgeMetrics
from tests.conftest import REPO, free_port, make_instance, write_instance


def test_two_replicas_one_study(edge_db: Database, tmp_path: Path) -> None:
    agreements = load_agreements(REPO / "radbridge/defaults/agreements.yaml")
    store_dir = tmp_path / "shared-volume"
    replicas, ports = [], []
    for _ in range(2):
        db = Database(edge_db.url)  # each replica has its own engine and pool
        scp = StorageSCP(
            "RADBRIDGE", lambda: agreements, Ingestor(db, DurableStore(store_dir)), EdgeMetrics()
        )
        port = free_port()
        scp.start("127.0.0.1", port)
        replicas.append((db, scp))
        ports.append(port)
    first = make_instance()
    files = [
        write_instance(
            make_instance(first.StudyInstanceUID, first.SeriesInstanceUID, seed=i),
            tmp_path / f"{i}.dcm",
        )
        for i in range(12)
    ]
    statuses: list[int] = []
    barrier = threading.Barrier(2)

    def push(port: int, share: list[Path]) -> None:
        ae = AE(ae_title="DEMO_PACS")
        ae.add_requested_context(DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", port, ae_title="RADBRIDGE")
        barrier.wait()  # both replicas see the new study at the same moment
        statuses.extend(assoc.send_c_store(f).Status for f in share)
        assoc.release()

    threads = [
        threading.Thread(target=push, args=(ports[0], files[0::2])),
        threading.Thread(target=push, args=(ports[1], files[1::2])),
    ]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        for _db, scp in replicas:
            scp.stop()
    assert statuses == [0] * 12
    with edge_db.session() as s:
        study = s.scalars(select(StudyRow)).one()
        assert study.instance_count == 12
        assert len(s.scalars(select(InstanceRow)).all()) == 12

    # Exactly one replica claims the stable study for forwarding.
    forwarders = [
        Forwarder(
            db,
            DurableStore(store_dir),
            lambda: agreements,
            "k",
            CenterClient("http://127.0.0.1:9"),
            EdgeMetrics(),
        )
        for db, _ in replicas
    ]
    later = utcnow() + timedelta(seconds=10)
    with edge_db.session() as s:
        row = s.scalars(select(StudyRow)).one()
    claims = [f._claim(row, later) for f in forwarders]
    assert sorted(claims) == [False, True]
    with edge_db.session() as s:
        s.execute(update(StudyRow).values(state="receiving"))
    for f in forwarders:
        f.close()
    for db, _ in replicas:
        db.dispose()
