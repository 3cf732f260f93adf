"""A gateway with several receiving processes on one DICOM port (``edge.receivers``, Linux
SO_REUSEPORT): every process stores into the same database and folder, the association limits
hold across them, and their metrics reach the gateway's registry."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import DigitalXRayImageStorageForPresentation
from sqlalchemy import select

from dicom_io.gateway import Gateway
from dicom_io.scu import associate
from radbridge.db import upgrade
from radbridge.db.tables import InstanceRow, StudyRow
from radbridge.settings import load_settings
from tests.conftest import REPO, free_port, make_instance, write_instance


def _gateway(tmp_path: Path, *, hospital_limit: int, edge_limit: int = 16) -> Gateway:
    raw = yaml.safe_load((REPO / "radbridge/defaults/agreements.yaml").read_text())
    raw["agreements"][0]["hospital"]["max_associations"] = hospital_limit
    agreements = tmp_path / "agreements.yaml"
    agreements.write_text(yaml.safe_dump(raw))
    settings = load_settings(
        data_dir=tmp_path / "data",
        agreements_file=agreements,
        edge={
            "port": free_port(),
            "metrics_port": 0,
            "center_url": f"http://127.0.0.1:{free_port()}",
            "receivers": 3,
            "max_associations": edge_limit,
        },
    )
    upgrade(settings.edge_db_url, "edge")
    gw = Gateway(settings)
    gw.start()
    return gw


@pytest.fixture
def make_gateway(tmp_path: Path) -> Iterator[Any]:
    started: list[Gateway] = []

    def make(**kw: int) -> Gateway:
        gw = _gateway(tmp_path, **kw)
        started.append(gw)
        return gw

    yield make
    for gw in started:
        gw.stop()


def _assoc(port: int) -> Any:
    ae = AE(ae_title="DEMO_PACS")
    ae.add_requested_context(DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian)
    return associate(ae, "127.0.0.1", port, ae_title="RADBRIDGE")


def _stored_metric(gw: Gateway) -> float:
    value = gw.metrics.registry.get_sample_value(
        "radbridge_edge_instances_total",
        {"agreement": "demo-hospital-to-center", "outcome": "stored"},
    )
    return value or 0.0


def test_the_receiving_processes_store_what_they_acknowledge(
    make_gateway: Any, tmp_path: Path
) -> None:
    """The gateway's own listener is closed first: every association then lands on one of
    the two receiving processes, which store, index and count into the gateway's metrics."""
    gw = make_gateway(hospital_limit=8)
    assert gw.receivers is not None and gw.receivers.alive == 2
    gw.scp.stop()  # from here only the receiving processes listen on the port
    study = make_instance().StudyInstanceUID
    files = [write_instance(make_instance(study, seed=i), tmp_path / f"{i}.dcm") for i in range(24)]
    statuses: list[int] = []

    def push(share: list[Path]) -> None:
        assoc = _assoc(gw.settings.edge.port)
        assert assoc.is_established
        statuses.extend(int(assoc.send_c_store(f).Status) for f in share)
        assoc.release()

    threads = [threading.Thread(target=push, args=(files[i::6],)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert statuses == [0] * 24
    with gw.db.session() as s:
        assert s.scalars(select(StudyRow)).one().instance_count == 24
        paths = s.scalars(select(InstanceRow.path)).all()
    assert len(paths) == 24 and all(gw.store.path(p).exists() for p in paths)
    deadline = time.monotonic() + 10
    while _stored_metric(gw) < 24 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _stored_metric(gw) == 24


def test_a_hospitals_association_limit_holds_across_the_processes(make_gateway: Any) -> None:
    """Limit 1: while one association is open, every other attempt is refused, whichever
    process the kernel hands it to; once released, the next is accepted."""
    gw = make_gateway(hospital_limit=1)
    first = _assoc(gw.settings.edge.port)
    assert first.is_established
    for _ in range(8):
        other = _assoc(gw.settings.edge.port)
        assert other.is_rejected
        rj = other.acceptor.primitive
        assert (rj.result, rj.result_source, rj.diagnostic) == (2, 3, 2)
    first.release()
    again = _assoc(gw.settings.edge.port)
    assert again.is_established
    again.release()
    deadline = time.monotonic() + 10
    while gw.scp.active_associations and time.monotonic() < deadline:
        time.sleep(0.05)
    assert gw.scp.active_associations == 0


def test_the_edge_association_limit_holds_across_the_processes(make_gateway: Any) -> None:
    gw = make_gateway(hospital_limit=8, edge_limit=2)
    held = [_assoc(gw.settings.edge.port) for _ in range(2)]
    assert all(a.is_established for a in held)
    assert gw.scp.active_associations == 2
    for _ in range(6):
        refused = _assoc(gw.settings.edge.port)
        assert refused.is_rejected and refused.acceptor.primitive.diagnostic == 2
    for a in held:
        a.release()
