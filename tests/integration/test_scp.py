"""The edge SCP over real loopback associations (pynetdicom SCU as the PACS)."""

from __future__ import annotations

import hashlib
import select as io_select
import socket
import threading
import time
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.sop_class import DigitalXRayImageStorageForPresentation, Verification
from sqlalchemy import select

from dicom_io.ingest import Ingestor
from dicom_io.scp import OVER_LIMIT_ANSWERED, StorageSCP
from dicom_io.scu import associate, store_dataset
from dicom_io.store import DurableStore
from loadtests.fuzz_ingest import send_request
from radbridge.agreements import load_agreements
from radbridge.db import Database
from radbridge.db.tables import InstanceRow, StudyRow
from radbridge.errors import PeerError
from radbridge.metrics import EdgeMetrics
from tests.conftest import REPO, free_port, make_instance, write_instance

MR_STORAGE = "1.2.840.10008.5.1.4.1.1.4"


@pytest.fixture
def scp(edge_db: Database, tmp_path: Path) -> Iterator[tuple[int, Database, Path]]:
    agreements = load_agreements(REPO / "radbridge/defaults/agreements.yaml")
    store_dir = tmp_path / "store"
    server = StorageSCP(
        "RADBRIDGE",
        lambda: agreements,
        Ingestor(edge_db, DurableStore(store_dir)),
        EdgeMetrics(),
    )
    port = free_port()
    server.start("127.0.0.1", port)
    yield port, edge_db, store_dir
    server.stop()


def _assoc(port: int, calling: str = "DEMO_PACS", called: str = "RADBRIDGE"):  # type: ignore[no-untyped-def]
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    ae.add_requested_context(DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian)
    ae.add_requested_context(MR_STORAGE, ExplicitVRLittleEndian)
    return associate(ae, "127.0.0.1", port, ae_title=called)


def _dataset_bytes(path: Path) -> bytes:
    """The encoded dataset after the Part 10 preamble and file meta group."""
    raw = path.read_bytes()
    group_length = int.from_bytes(raw[140:144], "little")
    return raw[144 + group_length :]


def _dcm_files(store: Path) -> list[Path]:
    return [p for p in store.rglob("*.dcm")]


def test_unknown_calling_ae_is_rejected_with_reason_3(scp: tuple[int, Database, Path]) -> None:
    port, _, _ = scp
    assoc = _assoc(port, calling="INTRUDER")
    assert assoc.is_rejected
    rj = assoc.acceptor.primitive
    assert (rj.result, rj.result_source, rj.diagnostic) == (0x01, 0x01, 0x03)


def test_a_rejection_that_beats_the_requesting_thread_is_still_a_rejection(
    scp: tuple[int, Database, Path],
) -> None:
    """pynetdicom's requesting thread, held up after sending the A-ASSOCIATE-RQ (as a loaded
    CI machine did), finds the socket already closed on the RJ and would read "aborted";
    dicom_io.scu.associate keeps the RJ the edge sent."""
    port, _, _ = scp
    ae = AE(ae_title="INTRUDER")
    ae.add_requested_context(Verification)
    held_up = [(evt.EVT_REQUESTED, lambda event: time.sleep(0.3))]
    assoc = associate(ae, "127.0.0.1", port, ae_title="RADBRIDGE", evt_handlers=held_up)
    assert assoc.is_rejected and not assoc.is_aborted and not assoc.is_established
    rj = assoc.acceptor.primitive
    assert (rj.result, rj.result_source, rj.diagnostic) == (0x01, 0x01, 0x03)


def test_result_delivery_to_a_pacs_that_rejects_says_refused(
    scp: tuple[int, Database, Path],
) -> None:
    """store_dataset (result delivery's SCU) against a PACS that answers A-ASSOCIATE-RJ: the
    reason is pacs_refused, not pacs_unreachable (the delivery failure metric's label)."""
    port, _, _ = scp
    with pytest.raises(PeerError) as refused:
        store_dataset(make_instance(), "127.0.0.1", port, "RADBRIDGE", "INTRUDER", 10)
    assert refused.value.reason == "pacs_refused"


def test_wrong_called_ae_is_rejected(scp: tuple[int, Database, Path]) -> None:
    port, _, _ = scp
    assoc = _assoc(port, called="SOMEONE_ELSE")
    assert assoc.is_rejected and assoc.acceptor.primitive.diagnostic == 0x07


def test_echo_and_durable_store(scp: tuple[int, Database, Path], tmp_path: Path) -> None:
    port, db, store = scp
    assoc = _assoc(port)
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0x0000
    ds = make_instance()
    path = write_instance(ds, tmp_path / "in.dcm")
    assert assoc.send_c_store(path).Status == 0x0000
    assert assoc.send_c_store(path).Status == 0x0000  # identical re-send: idempotent
    assoc.release()
    with db.session() as s:
        rows = s.scalars(select(InstanceRow)).all()
        study = s.scalars(select(StudyRow)).one()
    assert len(rows) == 1 and study.instance_count == 1 and study.state == "receiving"
    stored = store / rows[0].path
    assert _dataset_bytes(stored) == _dataset_bytes(path)  # stored exactly as received
    assert list((store / ".staging").iterdir()) == []


def test_an_instance_in_many_fragments_is_indexed_with_the_hash_of_its_file(
    scp: tuple[int, Database, Path], tmp_path: Path
) -> None:
    """The SCP hashes file meta + data set fragment by fragment as they arrive (a 512x512
    instance crosses several 256 KiB PDUs); the index and the file name carry the sha256 of
    the bytes on disk."""
    port, db, store = scp
    path = write_instance(make_instance(rows=512), tmp_path / "big.dcm")
    assert path.stat().st_size > 2 * 262_144  # three PDUs at least
    assoc = _assoc(port)
    assert assoc.send_c_store(path).Status == 0x0000
    assoc.release()
    with db.session() as s:
        row = s.scalars(select(InstanceRow)).one()
    stored = (store / row.path).read_bytes()
    assert row.sha256 == hashlib.sha256(stored).hexdigest()
    assert row.path.endswith(f".{row.sha256[:12]}.dcm")
    assert _dataset_bytes(store / row.path) == _dataset_bytes(path)


def _send_raw(assoc, dataset_bytes: bytes) -> int:  # type: ignore[no-untyped-def]
    """Send a C-STORE whose data set is arbitrary bytes (a real SCU would refuse to)."""
    req = C_STORE()
    req.MessageID = 7
    req.AffectedSOPClassUID = DigitalXRayImageStorageForPresentation
    req.AffectedSOPInstanceUID = "1.2.826.0.1.3680043.10.1"
    req.Priority = 2
    req.DataSet = BytesIO(dataset_bytes)
    cx = next(c for c in assoc.accepted_contexts if c.abstract_syntax == req.AffectedSOPClassUID)
    status = send_request(assoc, req, cx.context_id)
    assert status is not None, "no C-STORE response"
    return status


def test_malformed_dataset_gets_a_specific_status_and_leaves_nothing(
    scp: tuple[int, Database, Path], tmp_path: Path
) -> None:
    port, db, store = scp
    missing = make_instance()
    del missing.StudyInstanceUID
    missing_path = write_instance(missing, tmp_path / "missing.dcm")
    good = write_instance(make_instance(), tmp_path / "good.dcm")
    encoded = _dataset_bytes(good)
    assoc = _assoc(port)
    assert _send_raw(assoc, b"this is not a DICOM data set" * 4) == 0xC002  # no valid VR
    assert _send_raw(assoc, encoded[:150]) == 0xC001  # truncated mid-dataset
    # Every UID the index needs is there, the pixel data is cut short: parsed in full, refused.
    assert _send_raw(assoc, encoded[:-100]) == 0xC001
    assert assoc.send_c_store(missing_path).Status == 0xC000
    assoc.release()
    with db.session() as s:
        assert s.scalars(select(InstanceRow)).all() == []
        assert s.scalars(select(StudyRow)).all() == []
    assert _dcm_files(store) == [] and list((store / ".staging").iterdir()) == []


def test_pixel_data_shorter_than_its_pixel_module_is_refused(
    scp: tuple[int, Database, Path], tmp_path: Path
) -> None:
    port, db, store = scp
    ds = make_instance()
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]  # well-formed element, half a picture
    path = write_instance(ds, tmp_path / "half.dcm")
    assoc = _assoc(port)
    assert assoc.send_c_store(path).Status == 0xC003
    assoc.release()
    with db.session() as s:
        assert s.scalars(select(InstanceRow)).all() == []
    assert _dcm_files(store) == []


def test_modality_outside_the_agreement_is_refused(
    scp: tuple[int, Database, Path], tmp_path: Path
) -> None:
    port, _db, store = scp
    ds = make_instance(modality="MR")
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = MR_STORAGE
    path = write_instance(ds, tmp_path / "ct.dcm")
    assoc = _assoc(port)
    assert assoc.send_c_store(path).Status == 0x0124
    assoc.release()
    assert _dcm_files(store) == []


def test_disk_watermark_refuses_with_a700_before_writing(edge_db: Database, tmp_path: Path) -> None:
    agreements = load_agreements(REPO / "radbridge/defaults/agreements.yaml")
    full = DurableStore(tmp_path / "store", min_free_bytes=2**62)  # "disk is full"
    server = StorageSCP("RADBRIDGE", lambda: agreements, Ingestor(edge_db, full), EdgeMetrics())
    port = free_port()
    server.start("127.0.0.1", port)
    try:
        assoc = _assoc(port)
        path = write_instance(make_instance(), tmp_path / "in.dcm")
        assert assoc.send_c_store(path).Status == 0xA700
        assoc.release()
    finally:
        server.stop()
    assert _dcm_files(tmp_path / "store") == []
    with edge_db.session() as s:
        assert s.scalars(select(InstanceRow)).all() == []


def test_association_limit_rejects_transiently(edge_db: Database, tmp_path: Path) -> None:
    agreements = load_agreements(REPO / "radbridge/defaults/agreements.yaml")
    server = StorageSCP(
        "RADBRIDGE",
        lambda: agreements,
        Ingestor(edge_db, DurableStore(tmp_path / "store")),
        EdgeMetrics(),
        max_associations=1,
    )
    port = free_port()
    server.start("127.0.0.1", port)
    try:
        first = _assoc(port)
        assert first.is_established
        second = _assoc(port)
        assert second.is_rejected
        rj = second.acceptor.primitive
        assert (rj.result, rj.result_source, rj.diagnostic) == (0x02, 0x03, 0x02)
        first.release()
    finally:
        server.stop()


def test_a_connection_flood_past_the_limit_gets_no_thread_and_is_closed_unread(
    edge_db: Database, tmp_path: Path
) -> None:
    """Silent TCP connections past edge.max_associations: a few wait for their request (to be
    refused A-ASSOCIATE-RJ), the rest are closed at once; none of them holds the limit."""
    agreements = load_agreements(REPO / "radbridge/defaults/agreements.yaml")
    metrics = EdgeMetrics()
    server = StorageSCP(
        "RADBRIDGE",
        lambda: agreements,
        Ingestor(edge_db, DurableStore(tmp_path / "store")),
        metrics,
        max_associations=1,
    )
    port = free_port()
    server.start("127.0.0.1", port)
    flood: list[socket.socket] = []
    try:
        first = _assoc(port)
        assert first.is_established
        threads = threading.active_count()
        flood = [socket.create_connection(("127.0.0.1", port)) for _ in range(40)]
        closed: set[socket.socket] = set()
        deadline = time.monotonic() + 10
        while len(closed) < 40 - OVER_LIMIT_ANSWERED and time.monotonic() < deadline:
            readable, _, _ = io_select.select([c for c in flood if c not in closed], [], [], 0.2)
            closed.update(c for c in readable if c.recv(1) == b"")  # closed unread: EOF
        assert len(closed) == 40 - OVER_LIMIT_ANSWERED
        assert threading.active_count() - threads <= OVER_LIMIT_ANSWERED
        refused = metrics.registry.get_sample_value(
            "radbridge_edge_associations_rejected_total", {"reason": "edge_flood"}
        )
        assert refused == 40 - OVER_LIMIT_ANSWERED
        for c in flood:
            c.close()  # the waiting ones end at once (the peer closed), freeing their places
        deadline = time.monotonic() + 10
        while threading.active_count() > threads and time.monotonic() < deadline:
            time.sleep(0.05)
        second = _assoc(port)  # over the limit still, and answered as the standard says
        assert second.is_rejected
        rj = second.acceptor.primitive
        assert (rj.result, rj.result_source, rj.diagnostic) == (0x02, 0x03, 0x02)
        first.release()
        assert _assoc(port).is_established  # the flood held nothing
    finally:
        for c in flood:
            c.close()
        server.stop()


def test_resent_instance_with_new_content_is_kept_beside_the_old(
    scp: tuple[int, Database, Path], tmp_path: Path
) -> None:
    port, db, store = scp
    ds = make_instance()
    first = write_instance(ds, tmp_path / "v1.dcm")
    ds.PixelData = bytes(len(ds.PixelData))  # same SOP Instance UID, different content
    second = write_instance(ds, tmp_path / "v2.dcm")
    assoc = _assoc(port)
    assert assoc.send_c_store(first).Status == 0x0000
    assert assoc.send_c_store(second).Status == 0x0000
    assoc.release()
    with db.session() as s:
        (row,) = s.scalars(select(InstanceRow)).all()
        assert s.scalars(select(StudyRow)).one().instance_count == 1
    assert len(_dcm_files(store)) == 2  # never silently overwritten
    assert _dataset_bytes(store / row.path) == _dataset_bytes(second)


def test_deflate_bomb_over_c_store_is_refused_in_bounded_memory(
    scp: tuple[int, Database, Path],
) -> None:
    """0.5 MiB on the wire that would inflate to 512 MiB: refused 0xA703 while the receiving
    process's Python allocations peak well under 50 MiB (pynetdicom and pydicom would inflate
    it in one call)."""
    import tracemalloc

    from pydicom.uid import DeflatedExplicitVRLittleEndian

    from tests.test_structure import _deflate_bomb

    port, db, store = scp
    bomb = _deflate_bomb(512)
    data = bomb[132 + 12 + int.from_bytes(bomb[140:144], "little") :]
    ae = AE(ae_title="DEMO_PACS")
    ae.add_requested_context(DigitalXRayImageStorageForPresentation, DeflatedExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="RADBRIDGE")
    assert assoc.is_established
    tracemalloc.start()
    try:
        status = _send_raw(assoc, data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assoc.release()
    assert status == 0xA703
    assert peak < 50 << 20, f"peak {peak >> 20} MiB"
    with db.session() as s:
        assert s.scalars(select(InstanceRow)).all() == []
    assert _dcm_files(store) == []
