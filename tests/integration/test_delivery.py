"""Results back to the hospital: center listing -> re-identification -> C-STORE to the PACS.

The center is a loopback FastAPI app (uvicorn) serving the two result-object endpoints from
objects built here the way the center builds them (``dicom_io.result_builders`` on de-identified
datasets). The PACS is either a pynetdicom Storage SCP started in the test (fast cases: it can
be down, refuse, or answer warnings on demand) or a real Orthanc (``slow``). Every test runs on
SQLite and PostgreSQL (``edge_db``).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from io import BytesIO
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
import uvicorn
import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi import FastAPI, Response
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt
from pynetdicom.presentation import AllStoragePresentationContexts
from sqlalchemy import select, update

from dicom_io.deid import deidentify
from dicom_io.delivery import Deliverer
from dicom_io.gateway_status import gateway_status
from dicom_io.header import parse_header
from dicom_io.identity_map import record_pseudonyms
from dicom_io.ingest import Ingestor
from dicom_io.pseudonyms import Pseudonymizer
from dicom_io.reidentify import reidentify
from dicom_io.result_builders import (
    AlgorithmInfo,
    ImageFinding,
    Nodule,
    classification_sr,
    nodule_seg_and_sr,
)
from dicom_io.sr_parts import Coded
from dicom_io.store import DurableStore
from radbridge.agreements import AgreementSet, parse_agreements
from radbridge.contract import AGREEMENT_RESULT_OBJECTS, RESULT_OBJECT, CenterClient
from radbridge.db import Database
from radbridge.db.tables import DeliveryRow, StudyRow, utcnow
from radbridge.errors import NotFoundError
from radbridge.metrics import EdgeMetrics
from radbridge.signing import ResultSigner, ResultVerifier
from tests.conftest import PATIENT, REPO, free_port, identity_needles, make_instance
from tests.peers import OrthancPeer

AGREEMENT = "demo-hospital-to-center"
ALGO = AlgorithmInfo("cxr-demo", "0.3.1", "radbridge", "ab" * 32, "demo model — not for diagnosis")
PNEUMONIA = Coded("233604007", "SCT", "Pneumonia")
OK = 0x0000
EDGE_ID = "local-edge"
SIGNER = ResultSigner(Ed25519PrivateKey.generate())  # the fake center's result-signing key


# -- peers ------------------------------------------------------------------------------------


class FakeCenter:
    """The center's result-object API on loopback, serving objects the test adds."""

    def __init__(self) -> None:
        self.objects: dict[int, tuple[str, dict[str, Any], bytes]] = {}
        self.fail_listing: int | None = None  # answer this HTTP status instead
        self.fail_download: int | None = None
        self.corrupt_download = False
        self.downloads = 0
        self.listings = 0
        self.honours_wait = True  # False: a center that answers at once (before wait_s)
        self._added = threading.Condition()
        # Signs as the Serve center does (radbridge.signing); edges verify with SIGNER.jwk.
        self.signer = SIGNER
        self.port = free_port()
        app = FastAPI()

        @app.get(AGREEMENT_RESULT_OBJECTS)
        def listing(
            agreement_id: str, after: int = 0, limit: int = 100, wait_s: float = 0.0
        ) -> Any:
            self.listings += 1
            if self.fail_listing:
                return Response("listing unavailable", status_code=self.fail_listing)

            def objects() -> list[dict[str, Any]]:
                return [
                    meta
                    for oid, (aid, meta, _) in sorted(self.objects.items())
                    if aid == agreement_id and oid > after
                ][:limit]

            if self.honours_wait:  # as the center's Api: answer with the first new object
                with self._added:
                    self._added.wait_for(objects, timeout=wait_s)
            return {"objects": objects()}

        @app.get(RESULT_OBJECT)
        def download(object_id: int) -> Response:
            self.downloads += 1
            if self.fail_download:
                return Response("store unavailable", status_code=self.fail_download)
            if object_id not in self.objects:
                return Response(status_code=404)
            data = self.objects[object_id][2]
            if self.corrupt_download:
                data = data[:-1] + bytes([data[-1] ^ 0xFF])
            return Response(data, media_type="application/dicom")

        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def add(
        self,
        ds: Dataset,
        *,
        version: int = 1,
        kind: str = "sr",
        created_at: datetime | None = None,
        agreement_id: str = AGREEMENT,
    ) -> int:
        data = _part10(ds)
        oid = len(self.objects) + 1
        signature = self.signer.sign(
            agreement_id=agreement_id,
            edges=[EDGE_ID],
            sha256=hashlib.sha256(data).hexdigest(),
            sop_instance_uid=str(ds.SOPInstanceUID),
            sop_class_uid=str(ds.SOPClassUID),
            study_uid=str(ds.StudyInstanceUID),
            kind=kind,
            version=version,
        )
        self.objects[oid] = (
            agreement_id,
            {
                "signature": signature,
                "id": oid,
                "study_uid": str(ds.StudyInstanceUID),
                "version": version,
                "kind": kind,
                "sop_class_uid": str(ds.SOPClassUID),
                "sop_instance_uid": str(ds.SOPInstanceUID),
                "series_instance_uid": str(ds.SeriesInstanceUID),
                "sha256": hashlib.sha256(data).hexdigest(),
                "size": len(data),
                "created_at": (created_at or utcnow()).isoformat().replace("+00:00", "Z"),
            },
            data,
        )
        with self._added:
            self._added.notify_all()
        return oid

    def start(self) -> None:
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(5)


class Pacs:
    """A pynetdicom Storage SCP standing in for the hospital PACS; ``status`` is its answer."""

    def __init__(self, status: int = OK) -> None:
        self.port = free_port()
        self.status = status
        self.received: list[Dataset] = []
        self.calling: list[str] = []
        self.ae = AE(ae_title="DEMO_PACS")
        for cx in AllStoragePresentationContexts:
            assert cx.abstract_syntax is not None
            self.ae.add_supported_context(
                cx.abstract_syntax, [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
            )
        self._server: Any = None

    def start(self) -> None:
        self._server = self.ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, self._on_store)],
        )

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def _on_store(self, event: evt.Event) -> int:
        if self.status in (OK, 0xB000, 0xB006, 0xB007):
            ds = event.dataset
            ds.file_meta = event.file_meta
            self.received.append(ds)
            self.calling.append(str(event.assoc.requestor.ae_title).strip())
        return self.status

    def uids(self) -> list[str]:
        return [str(ds.SOPInstanceUID) for ds in self.received]


# -- the edge and its data --------------------------------------------------------------------


@dataclass
class SentStudy:
    """A study the edge holds (originals ingested) and forwarded (pseudonyms recorded)."""

    originals: list[Dataset]
    deid: list[Dataset]

    @property
    def pseudo_study_uid(self) -> str:
        return str(self.deid[0].StudyInstanceUID)


def _part10(ds: Dataset) -> bytes:
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _send_study(
    db: Database, store: DurableStore, originals: list[Dataset] | None = None
) -> SentStudy:
    if originals is None:
        first = make_instance()
        originals = [first] + [
            make_instance(first.StudyInstanceUID, first.SeriesInstanceUID, seed=i) for i in (1, 2)
        ]
    ingestor = Ingestor(db, store)
    for ds in originals:
        raw = _part10(ds)
        ingestor.ingest(AGREEMENT, parse_header(raw), raw)
    pseudo = Pseudonymizer(b"k" * 32)
    deid = [deidentify(ds, pseudo).dataset for ds in originals]
    record_pseudonyms(db, AGREEMENT, pseudo.issued)
    return SentStudy(originals, deid)


def _sr(study: SentStudy, version: int = 1, previous: Dataset | None = None) -> Dataset:
    finding = ImageFinding(
        str(study.deid[min(1, len(study.deid) - 1)].SOPInstanceUID),
        PNEUMONIA,
        probability=0.91,
        threshold=0.5,
        present=True,
        display={"en": "Pneumonia", "zh": "肺炎"},
    )
    return classification_sr(study.deid, [finding], ALGO, version=version, previous=previous)


def _agreements(pacs_port: int) -> AgreementSet:
    raw = yaml.safe_load((REPO / "radbridge/defaults/agreements.yaml").read_text())
    raw["agreements"][0]["hospital"]["return_destination"] = {
        "ae_title": "DEMO_PACS",
        "host": "127.0.0.1",
        "port": pacs_port,
    }
    return parse_agreements(raw)


def _deliverer(
    db: Database,
    store: DurableStore,
    center: FakeCenter,
    pacs_port: int,
    metrics: EdgeMetrics | None = None,
    **kwargs: float,
) -> Deliverer:
    aset = _agreements(pacs_port)
    options: dict[str, float] = {"timeout_s": 5, "retry_base_s": 1, "retry_max_s": 4}
    options.update(kwargs)
    return Deliverer(
        db,
        store,
        lambda: aset,
        CenterClient(center.url, timeout_s=options["timeout_s"]),
        "RADBRIDGE",
        metrics or EdgeMetrics(),
        results=ResultVerifier([SIGNER.jwk]),
        edge_id=EDGE_ID,
        **options,  # type: ignore[arg-type]
    )


def _rows(db: Database) -> list[DeliveryRow]:
    with db.session() as s:
        return list(s.scalars(select(DeliveryRow).order_by(DeliveryRow.center_object_id)))


def _uids(ds: Dataset, keyword: str) -> set[str]:
    return {str(e.value) for e in ds.iterall() if e.keyword == keyword}


def _assert_no_identity(text: str, study: SentStudy) -> None:
    for ds in study.originals:
        for needle in identity_needles(ds):
            assert needle.decode() not in text
    assert study.pseudo_study_uid not in text


@pytest.fixture
def edge(edge_db: Database, tmp_path: Path) -> tuple[Database, DurableStore]:
    return edge_db, DurableStore(tmp_path / "edge-store")


@pytest.fixture
def center() -> Iterator[FakeCenter]:
    c = FakeCenter()
    c.start()
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture
def pacs() -> Iterator[Pacs]:
    p = Pacs()
    p.start()
    try:
        yield p
    finally:
        p.stop()


# -- fast cases: pynetdicom PACS ----------------------------------------------------------------


def test_delivered_reidentified_once_with_status_and_sha256(
    edge: tuple[Database, DurableStore],
    center: FakeCenter,
    pacs: Pacs,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="radbridge")
    db, store = edge
    study = _send_study(db, store)
    sr = _sr(study)
    center_bytes = _part10(sr)
    center.add(sr)
    d = _deliverer(db, store, center, pacs.port)
    try:
        assert d.poll() == 1
        assert d.poll() == 0  # idempotent: nothing new
        assert d.tick() == 1
        assert d.poll() == 0 and d.tick() == 0  # delivered: never sent again
    finally:
        d.close()

    assert len(pacs.received) == 1 and pacs.calling == ["RADBRIDGE"]
    got = pacs.received[0]
    orig = study.originals[0]
    assert (got.PatientID, str(got.PatientName)) == (orig.PatientID, str(orig.PatientName))
    assert got.StudyInstanceUID == orig.StudyInstanceUID
    assert got.SOPInstanceUID == sr.SOPInstanceUID  # the result's own UID, as minted
    assert "PatientIdentityRemoved" not in got
    refs = _uids(got, "ReferencedSOPInstanceUID")
    assert str(study.originals[1].SOPInstanceUID) in refs
    assert refs <= {str(o.SOPInstanceUID) for o in study.originals}

    (row,) = _rows(db)
    assert row.state == "delivered" and row.pacs_status == 0 and row.attempts == 1
    # The center's verified signature is kept as the evidence of what was delivered.
    assert row.evidence == center.objects[1][1]["signature"]
    assert row.delivered_at is not None and row.last_error is None
    with db.session() as s:
        assert row.study_id == s.scalars(select(StudyRow.id)).one()
    # delivered_sha256 is the digest of the re-identified Part 10 object that was sent.
    again = reidentify(
        pydicom.dcmread(BytesIO(center_bytes)),
        AGREEMENT,
        db,
        pydicom.dcmread(BytesIO(_part10(orig))),
    ).dataset
    assert row.delivered_sha256 == hashlib.sha256(_part10(again)).hexdigest()
    assert row.delivered_sha256 != hashlib.sha256(center_bytes).hexdigest()
    _assert_no_identity(caplog.text, study)


@contextmanager
def _running(d: Deliverer, interval_s: float) -> Iterator[threading.Event]:
    """``d.run`` in its own thread, as the gateway runs it; stopped and joined after."""
    stop = threading.Event()
    thread = threading.Thread(target=d.run, args=(stop, interval_s), daemon=True)
    thread.start()
    try:
        yield stop
    finally:
        stop.set()
        thread.join(5)
        assert not thread.is_alive()


def _wait_until(check: Callable[[], bool], timeout_s: float) -> float:
    t0 = time.monotonic()
    while not check():
        assert time.monotonic() - t0 < timeout_s, "not in time"
        time.sleep(0.01)
    return time.monotonic() - t0


def test_a_listener_delivers_a_new_result_when_built_not_at_the_next_poll(
    edge: tuple[Database, DurableStore], center: FakeCenter, pacs: Pacs
) -> None:
    db, store = edge
    study = _send_study(db, store)
    d = _deliverer(db, store, center, pacs.port, wait_s=10)
    try:
        with _running(d, interval_s=60):  # no poll interval would find it in this test
            _wait_until(lambda: center.listings >= 1, 5)  # the listener waits at the center
            time.sleep(0.2)
            center.add(_sr(study))
            took = _wait_until(lambda: len(pacs.received) == 1, 5)
        assert took < 5
        assert center.listings <= 3  # one waiting listing, the answer, the next one waiting
        assert [r.state for r in _rows(db)] == ["delivered"]
    finally:
        d.close()


def test_a_center_that_answers_at_once_is_not_listed_in_a_loop(
    edge: tuple[Database, DurableStore], center: FakeCenter, pacs: Pacs
) -> None:
    db, store = edge
    study = _send_study(db, store)
    center.honours_wait = False  # an older center, or a proxy that does not hold requests
    d = _deliverer(db, store, center, pacs.port, wait_s=10)
    try:
        with _running(d, interval_s=0.5):
            time.sleep(1.6)
            assert center.listings <= 6  # one per interval, not a busy loop
            center.add(_sr(study))
            _wait_until(lambda: len(pacs.received) == 1, 5)  # still found, by interval
    finally:
        d.close()


def test_pacs_down_backs_off_then_delivers_exactly_once(
    edge: tuple[Database, DurableStore], center: FakeCenter
) -> None:
    db, store = edge
    study = _send_study(db, store)
    center.add(_sr(study))
    pacs = Pacs()  # not started: connection refused
    metrics = EdgeMetrics()
    d = _deliverer(db, store, center, pacs.port, metrics)
    # Ticks in the future: the outbox schedules from max(now, wall clock), so the measured
    # delays do not depend on how long this (possibly loaded) machine takes per attempt.
    t0 = utcnow() + timedelta(seconds=30)
    try:
        assert d.poll() == 1
        delays = []
        for i in range(4):
            now = t0 + timedelta(seconds=60 * i)
            assert d.tick(now) == 0
            (row,) = _rows(db)
            assert row.state == "pending" and row.attempts == i + 1
            assert "unreachable" in (row.last_error or "")
            assert row.next_attempt_at is not None
            delays.append((row.next_attempt_at - now).total_seconds())
            assert d.tick(now) == 0 and _rows(db)[0].attempts == i + 1  # not due: untouched
        # Exponential (1, 2, 4 s), capped at retry_max_s (4), less up to half at random.
        for delay, full in zip(delays, [1, 2, 4, 4], strict=True):
            assert full / 2 - 0.01 <= delay <= full + 0.01, delays
        _assert_no_identity(row.last_error or "", study)
        pacs.start()
        try:
            assert d.tick(t0 + timedelta(seconds=600)) == 1
            for _ in range(3):
                d.poll()
                assert d.tick(t0 + timedelta(seconds=900)) == 0
        finally:
            pacs.stop()
    finally:
        d.close()
    assert len(pacs.received) == 1
    (row,) = _rows(db)
    assert row.state == "delivered" and row.attempts == 5 and row.last_error is None
    failures = metrics.registry.get_sample_value(
        "radbridge_edge_delivery_failures_total",
        {"agreement": AGREEMENT, "reason": "pacs_unreachable"},
    )
    assert failures == 4


def test_a_clock_stepped_back_an_hour_does_not_hold_a_retry_and_keeps_a_lease(
    edge: tuple[Database, DurableStore], center: FakeCenter, pacs: Pacs
) -> None:
    """Two deliveries wait: one for its retry 3 s ahead, one in flight on a 5-minute lease.
    The wall clock steps back an hour: the retry still falls due 3 s after the old now (on
    the new clock); the lease is left alone (its attempt may still be running)."""
    db, store = edge
    first, second = _send_study(db, store), _send_study(db, store)
    center.add(_sr(first))
    center.add(_sr(second))
    d = _deliverer(db, store, center, pacs.port)
    t = utcnow()
    try:
        assert d.poll() == 2
        retrying, in_flight = _rows(db)
        with db.session() as s:
            s.execute(
                update(DeliveryRow)
                .where(DeliveryRow.id == retrying.id)
                .values(attempts=1, next_attempt_at=t + timedelta(seconds=3))
            )
            s.execute(
                update(DeliveryRow)
                .where(DeliveryRow.id == in_flight.id)
                .values(attempts=1, next_attempt_at=t + timedelta(minutes=5), claimed_at=t)
            )
        assert d.tick(t + timedelta(seconds=1)) == 0
        back = t - timedelta(hours=1)
        assert d.tick(back) == 0
        assert d.tick(back + timedelta(seconds=3)) == 1
    finally:
        d.close()
    retried, leased = _rows(db)
    assert retried.state == "delivered"
    assert leased.state == "pending" and leased.next_attempt_at == t + timedelta(minutes=5)
    assert len(pacs.received) == 1
    assert pacs.received[0].StudyInstanceUID == first.originals[0].StudyInstanceUID


def test_a_delivery_in_flight_when_the_gateway_died_is_due_at_its_next_start(
    edge: tuple[Database, DurableStore], center: FakeCenter, pacs: Pacs
) -> None:
    """A claim is a lease (minutes: as long as an attempt may take); a gateway killed during
    the attempt would leave the hospital waiting that long after the restart without
    ``recover``, which the gateway runs at start (found by tests/e2e/test_faults.py)."""
    db, store = edge
    center.add(_sr(_send_study(db, store)))
    crashed = _deliverer(db, store, center, pacs.port)
    assert crashed.poll() == 1
    (row,) = _rows(db)
    assert crashed._claim(row, utcnow())  # the attempt began; then the process was killed
    crashed.close()
    restarted = _deliverer(db, store, center, pacs.port)
    try:
        assert restarted.tick() == 0  # still leased
        assert restarted.recover() == 1
        assert restarted.tick() == 1
        assert restarted.recover() == 0  # a finished attempt leaves no claim behind
    finally:
        restarted.close()
    assert len(pacs.received) == 1
    (row,) = _rows(db)
    assert row.state == "delivered" and row.attempts == 2 and row.claimed_at is None


def test_refusal_status_retries_and_a_warning_status_counts_as_stored(
    edge: tuple[Database, DurableStore], center: FakeCenter
) -> None:
    db, store = edge
    study = _send_study(db, store)
    center.add(_sr(study))
    pacs = Pacs(status=0xA700)  # Refused: out of resources
    pacs.start()
    d = _deliverer(db, store, center, pacs.port)
    try:
        d.poll()
        assert d.tick() == 0
        (row,) = _rows(db)
        assert row.state == "pending" and "0xA700" in (row.last_error or "")
        pacs.status = 0xB000  # Warning: coercion of data elements
        assert d.tick(utcnow() + timedelta(seconds=10)) == 1
    finally:
        d.close()
        pacs.stop()
    (row,) = _rows(db)
    assert row.state == "delivered" and row.pacs_status == 0xB000 and len(pacs.received) == 1


def test_center_failures_retry_and_a_corrupt_download_is_never_stored(
    edge: tuple[Database, DurableStore], center: FakeCenter, pacs: Pacs
) -> None:
    db, store = edge
    study = _send_study(db, store)
    center.add(_sr(study))
    metrics = EdgeMetrics()
    d = _deliverer(db, store, center, pacs.port, metrics)
    now = utcnow()
    try:
        center.fail_listing = 503
        assert d.poll() == 0  # center down: nothing queued, nothing lost
        center.fail_listing = None
        assert d.poll() == 1
        center.fail_download = 502
        assert d.tick(now) == 0
        assert "center answered 502" in (_rows(db)[0].last_error or "")
        center.fail_download = None
        center.corrupt_download = True
        assert d.tick(now + timedelta(seconds=10)) == 0
        assert "sha256" in (_rows(db)[0].last_error or "")
        assert pacs.received == []
        center.corrupt_download = False
        assert d.tick(now + timedelta(seconds=20)) == 1
    finally:
        d.close()
    (row,) = _rows(db)
    assert row.state == "delivered" and row.attempts == 3
    assert (
        metrics.registry.get_sample_value(
            "radbridge_edge_delivery_failures_total", {"agreement": AGREEMENT, "reason": "center"}
        )
        == 3
    )


@pytest.mark.parametrize(
    "forgery",
    ["unsigned", "bytes and listing altered", "altered after it was listed", "other agreement"],
)
def test_a_result_without_the_centers_signature_never_reaches_the_pacs(
    edge: tuple[Database, DurableStore], center: FakeCenter, pacs: Pacs, forgery: str
) -> None:
    """Whoever changes a result object at the center — its file and its listed sha256 both,
    as someone with the center's disk and database could — or lists one unsigned or signed for
    another agreement, gets nothing to the PACS: the delivery is dead with the reason."""
    db, store = edge
    study = _send_study(db, store)
    oid = center.add(_sr(study))
    aid, meta, data = center.objects[oid]
    metrics = EdgeMetrics()
    d = _deliverer(db, store, center, pacs.port, metrics)
    late = forgery == "altered after it was listed"  # the edge remembers the first listing
    if late:
        assert d.poll() == 1
    if forgery == "unsigned":
        meta = {**meta, "signature": None}
    elif forgery in ("bytes and listing altered", "altered after it was listed"):
        forged = _sr(study)
        forged.ContentDate = "19990101"  # another finding under the listed UIDs
        forged.SOPInstanceUID = meta["sop_instance_uid"]
        data = _part10(forged)
        meta = {**meta, "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    else:
        other = ResultSigner(SIGNER.key)  # the center's own key, for another agreement
        meta = {
            **meta,
            "signature": other.sign(
                agreement_id="another-agreement",
                edges=[EDGE_ID],
                sha256=meta["sha256"],
                sop_instance_uid=meta["sop_instance_uid"],
                sop_class_uid=meta["sop_class_uid"],
                study_uid=meta["study_uid"],
                kind="sr",
                version=1,
            ),
        }
    center.objects[oid] = (aid, meta, data)
    try:
        assert d.poll() == (0 if late else 1)
        assert d.tick() == 0
        assert d.tick(utcnow() + timedelta(hours=1)) == 0  # dead: never tried again
    finally:
        d.close()
    assert pacs.received == []
    (row,) = _rows(db)
    why = {
        "unsigned": "unsigned",
        "bytes and listing altered": "altered",
        "altered after it was listed": "altered",  # not a retried corrupt download
    }
    assert row.state == "dead", row.last_error
    assert f"({why.get(forgery, 'not_ours')})" in (row.last_error or ""), row.last_error
    assert row.evidence is None
    assert (
        metrics.registry.get_sample_value(
            "radbridge_edge_delivery_failures_total",
            {"agreement": AGREEMENT, "reason": "signature"},
        )
        == 1
    )


def test_max_age_makes_it_dead_visible_in_status_then_resend_delivers(
    edge: tuple[Database, DurableStore], center: FakeCenter, tmp_path: Path
) -> None:
    db, store = edge
    study = _send_study(db, store)
    center.add(_sr(study), created_at=utcnow() - timedelta(days=8))  # older than 7 days
    pacs = Pacs()
    d = _deliverer(db, store, center, pacs.port, max_age_s=7 * 86400)
    try:
        d.poll()
        assert d.tick() == 0  # one attempt (PACS down), then no more: too old
        (row,) = _rows(db)
        assert row.state == "dead" and row.attempts == 1
        assert "not stored at the PACS within 7 days" in (row.last_error or "")
        assert "unreachable" in (row.last_error or "")

        st = gateway_status(db, DurableStore(tmp_path / "status"), None)
        assert st.deliveries_by_state == {"pending": 0, "delivered": 0, "dead": 1}
        (dead,) = st.dead_deliveries
        assert (dead.row_id, dead.agreement_id, dead.version, dead.kind) == (
            row.id,
            AGREEMENT,
            1,
            "sr",
        )
        _assert_no_identity(repr(st), study)

        assert d.tick(utcnow() + timedelta(hours=1)) == 0  # dead stays dead
        with pytest.raises(NotFoundError):
            d.resend(row.id + 1000)
        d.resend(row.id)
        (row,) = _rows(db)
        assert row.state == "pending" and row.attempts == 0 and row.last_error is None
        pacs.start()
        assert d.tick() == 1  # a manual resend gets its attempt despite the age
    finally:
        d.close()
        pacs.stop()
    assert _rows(db)[0].state == "delivered" and len(pacs.received) == 1
    # A delivered one can be resent by hand too: it goes to the PACS once more.
    d = _deliverer(db, store, center, pacs.port)
    pacs.start()
    try:
        d.resend(row.id)
        assert d.tick() == 1
    finally:
        d.close()
        pacs.stop()
    assert pacs.uids() == [pacs.uids()[0]] * 2


def test_a_retrying_delivery_past_max_age_dies_without_another_attempt(
    edge: tuple[Database, DurableStore], center: FakeCenter
) -> None:
    db, store = edge
    study = _send_study(db, store)
    center.add(_sr(study))
    pacs = Pacs()
    metrics = EdgeMetrics()
    d = _deliverer(db, store, center, pacs.port, metrics, max_age_s=3600)
    try:
        d.poll()
        assert d.tick() == 0 and _rows(db)[0].state == "pending"  # PACS down: retrying
        pacs.start()  # up again, but too late
        assert d.tick(utcnow() + timedelta(hours=2)) == 0
    finally:
        d.close()
        pacs.stop()
    (row,) = _rows(db)
    assert row.state == "dead" and row.attempts == 1 and pacs.received == []
    assert (
        metrics.registry.get_sample_value(
            "radbridge_edge_delivery_failures_total", {"agreement": AGREEMENT, "reason": "expired"}
        )
        == 1
    )


def test_result_for_a_study_never_sent_is_dead_and_others_still_go(
    edge: tuple[Database, DurableStore], center: FakeCenter, pacs: Pacs
) -> None:
    db, store = edge
    study = _send_study(db, store)
    stranger = deidentify(make_instance(), Pseudonymizer(b"another-edge" * 3)).dataset
    stray_id = center.add(_sr(SentStudy([make_instance()], [stranger])))
    good_id = center.add(_sr(study))
    metrics = EdgeMetrics()
    d = _deliverer(db, store, center, pacs.port, metrics)
    try:
        assert d.poll() == 2
        assert d.tick() == 1
        assert d.tick(utcnow() + timedelta(hours=1)) == 0
    finally:
        d.close()
    rows = {r.center_object_id: r for r in _rows(db)}
    stray = rows[stray_id]
    assert stray.state == "dead" and stray.study_id is None and stray.attempts == 0
    assert "did not send" in (stray.last_error or "")
    assert str(stranger.StudyInstanceUID) not in (stray.last_error or "")
    assert rows[good_id].state == "delivered" and len(pacs.received) == 1
    assert (
        metrics.registry.get_sample_value(
            "radbridge_edge_delivery_failures_total",
            {"agreement": AGREEMENT, "reason": "reidentification"},
        )
        == 1
    )
    # A resend of it is refused again by re-identification, without a crash.
    d = _deliverer(db, store, center, pacs.port)
    try:
        d.resend(stray.id)
        assert d.tick() == 0
    finally:
        d.close()
    stray = {r.center_object_id: r for r in _rows(db)}[stray_id]
    assert stray.state == "dead" and "re-identification refused" in (stray.last_error or "")


def test_second_version_is_delivered_as_its_own_object_and_the_first_not_again(
    edge: tuple[Database, DurableStore], center: FakeCenter, pacs: Pacs
) -> None:
    db, store = edge
    study = _send_study(db, store)
    first = _sr(study)
    center.add(first)
    d = _deliverer(db, store, center, pacs.port)
    try:
        d.poll()
        assert d.tick() == 1
        # Late instances re-opened the study; the center built version 2 on its predecessor.
        second = _sr(study, version=2, previous=first)
        center.add(second, version=2)
        assert d.poll() == 1
        assert d.tick() == 1
        assert d.tick(utcnow() + timedelta(hours=1)) == 0
    finally:
        d.close()
    assert pacs.uids() == [str(first.SOPInstanceUID), str(second.SOPInstanceUID)]
    got = pacs.received[1]
    pred = got.PredecessorDocumentsSequence[0]
    assert pred.StudyInstanceUID == study.originals[0].StudyInstanceUID
    ref = pred.ReferencedSeriesSequence[0]
    assert ref.SeriesInstanceUID == first.SeriesInstanceUID  # a companion: kept as minted
    assert ref.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == first.SOPInstanceUID
    assert got.PatientID == study.originals[0].PatientID
    assert [(r.version, r.state) for r in _rows(db)] == [(1, "delivered"), (2, "delivered")]


def _ct_study_with_seg_and_sr(
    db: Database, store: DurableStore, center: FakeCenter
) -> tuple[SentStudy, Dataset]:
    """A CT study the edge sent, and its nodule SEG and SR listed at the center (the SEG
    returned: the SR references it)."""
    study = _send_study(db, store, _ct_series())
    seg, sr = nodule_seg_and_sr(
        study.deid,
        _nodule_mask(),
        [Nodule((-3.5, -2.8, -115.0), diameter_mm=4.2, volume_mm3=44.1, segment_number=1)],
        ALGO,
    )
    center.add(seg, kind="seg")
    center.add(sr, kind="sr")
    return study, seg


def test_seg_and_its_sr_are_delivered_with_references_between_them(
    edge: tuple[Database, DurableStore], center: FakeCenter, pacs: Pacs
) -> None:
    db, store = edge
    study, seg = _ct_study_with_seg_and_sr(db, store, center)
    d = _deliverer(db, store, center, pacs.port)
    try:
        assert d.poll() == 2
        listed = center.listings
        assert d.tick() == 2
        assert center.listings == listed  # the companions were in the listing it queued from
    finally:
        d.close()
    _assert_seg_and_sr_reference_each_other(db, study, seg, pacs)


def test_a_gateway_that_did_not_queue_the_objects_lists_them_again_for_the_companions(
    edge: tuple[Database, DurableStore], center: FakeCenter, pacs: Pacs
) -> None:
    db, store = edge
    study, seg = _ct_study_with_seg_and_sr(db, store, center)
    queued_by = _deliverer(db, store, center, pacs.port)
    try:
        assert queued_by.poll() == 2
    finally:
        queued_by.close()
    d = _deliverer(db, store, center, pacs.port)  # a restart: nothing remembered
    try:
        listed = center.listings
        assert d.tick() == 2
        assert center.listings > listed
    finally:
        d.close()
    _assert_seg_and_sr_reference_each_other(db, study, seg, pacs)


def _assert_seg_and_sr_reference_each_other(
    db: Database, study: SentStudy, seg: Dataset, pacs: Pacs
) -> None:
    assert [r.state for r in _rows(db)] == ["delivered", "delivered"]
    got_seg, got_sr = sorted(pacs.received, key=lambda ds: ds.Modality != "SEG")
    originals = {str(o.SOPInstanceUID) for o in study.originals}
    assert got_seg.PatientID == got_sr.PatientID == PATIENT["id"]
    assert (
        got_seg.StudyInstanceUID == got_sr.StudyInstanceUID == study.originals[0].StudyInstanceUID
    )
    assert got_seg.FrameOfReferenceUID == study.originals[0].FrameOfReferenceUID
    assert _uids(got_seg, "ReferencedSOPInstanceUID") <= originals
    # The SR references the SEG (a companion, as minted) and the original images.
    assert _uids(got_sr, "ReferencedSOPInstanceUID") <= originals | {str(seg.SOPInstanceUID)}
    assert str(seg.SOPInstanceUID) in _uids(got_sr, "ReferencedSOPInstanceUID")


def test_a_studys_objects_are_stored_side_by_side(
    edge: tuple[Database, DurableStore], center: FakeCenter
) -> None:
    """The SEG and the SR are on two associations at once: the PACS holds the first C-STORE
    until the second arrives (a deliverer storing one object after the other would leave it
    waiting until the bound)."""
    db, store = edge
    _ct_study_with_seg_and_sr(db, store, center)
    pacs = Pacs()
    arrived: list[int] = []
    both = threading.Event()
    together: list[bool] = []
    store_one = pacs._on_store

    def hold_until_both(event: evt.Event) -> int:
        arrived.append(1)
        if len(arrived) == 2:
            both.set()
        together.append(both.wait(10))
        return store_one(event)

    pacs._on_store = hold_until_both  # type: ignore[method-assign]
    pacs.start()
    d = _deliverer(db, store, center, pacs.port)
    try:
        assert d.poll() == 2
        assert d.tick() == 2
    finally:
        d.close()
        pacs.stop()
    assert together == [True, True]
    assert sorted(ds.Modality for ds in pacs.received) == ["SEG", "SR"]


def test_two_replicas_deliver_each_object_once(
    edge: tuple[Database, DurableStore], center: FakeCenter, pacs: Pacs, tmp_path: Path
) -> None:
    db, store = edge
    expected = []
    for _ in range(3):
        study = _send_study(db, store)
        first = _sr(study)
        expected += [str(first.SOPInstanceUID)]
        center.add(first)
        second = _sr(study, version=2, previous=first)
        expected += [str(second.SOPInstanceUID)]
        center.add(second, version=2)
    replicas = []
    for _ in range(2):
        rdb = Database(db.url)  # each replica: its own engine and pool, one database
        replicas.append((rdb, _deliverer(rdb, DurableStore(store.root), center, pacs.port)))
    barrier = threading.Barrier(2)
    errors: list[BaseException] = []

    def run(deliverer: Deliverer) -> None:
        try:
            barrier.wait()
            for _ in range(3):
                deliverer.poll()
                deliverer.tick()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(dl,)) for _, dl in replicas]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    finally:
        for rdb, dl in replicas:
            dl.close()
            rdb.dispose()
    assert errors == []
    assert sorted(pacs.uids()) == sorted(expected)  # each exactly once
    rows = _rows(db)
    assert len(rows) == 6 and {r.state for r in rows} == {"delivered"}
    assert all(r.attempts == 1 for r in rows)


def test_of_two_replicas_exactly_one_claims_a_due_delivery(
    edge: tuple[Database, DurableStore], center: FakeCenter
) -> None:
    db, store = edge
    center.add(_sr(_send_study(db, store)))
    replicas = [_deliverer(Database(db.url), store, center, free_port()) for _ in range(2)]
    try:
        assert replicas[0].poll() == 1 and replicas[1].poll() == 0
        (row,) = _rows(db)  # both replicas saw it due, with the same attempt count
        now = utcnow()
        assert sorted(r._claim(row, now) for r in replicas) == [False, True]
        (claimed,) = _rows(db)
        assert claimed.attempts == 1 and claimed.next_attempt_at is not None
        assert claimed.next_attempt_at > now + timedelta(seconds=30)  # leased meanwhile
        assert [r.tick(now) for r in replicas] == [0, 0]  # not due while leased
        assert _rows(db)[0].attempts == 1
    finally:
        for r in replicas:
            r.close()
            r.db.dispose()


def test_metrics_carry_agreement_and_priority_only(
    edge: tuple[Database, DurableStore], center: FakeCenter, pacs: Pacs
) -> None:
    db, store = edge
    study = _send_study(db, store)
    with db.session() as s:
        s.execute(
            update(StudyRow).values(
                priority="stat", first_received_at=utcnow() - timedelta(minutes=30)
            )
        )
    center.add(_sr(study), created_at=utcnow() - timedelta(minutes=5))
    metrics = EdgeMetrics()
    d = _deliverer(db, store, center, pacs.port, metrics)
    try:
        d.poll()
        assert d.tick() == 1
    finally:
        d.close()
    labels = {"agreement": AGREEMENT, "priority": "stat"}
    get = metrics.registry.get_sample_value
    assert get("radbridge_edge_delivery_seconds_count", labels) == 1
    assert get("radbridge_edge_turnaround_seconds_count", labels) == 1
    delivery = get("radbridge_edge_delivery_seconds_sum", labels)
    turnaround = get("radbridge_edge_turnaround_seconds_sum", labels)
    assert delivery is not None and 300 <= delivery < 400
    assert turnaround is not None and 1800 <= turnaround < 1900
    assert get("radbridge_edge_deliveries", {"state": "delivered"}) == 1
    assert get("radbridge_edge_deliveries", {"state": "pending"}) == 0
    assert get("radbridge_edge_deliveries", {"state": "dead"}) == 0
    for family in metrics.registry.collect():
        if family.name.startswith(("radbridge_edge_deliver", "radbridge_edge_turnaround")):
            for sample in family.samples:
                keys = set(sample.labels) - {"le"}
                assert keys <= {"agreement", "priority", "reason", "state"}
                _assert_no_identity(repr(sample.labels), study)


# -- slow cases: a real Orthanc as the PACS ----------------------------------------------------


@pytest.mark.slow
def test_orthanc_holds_the_reidentified_result(
    edge: tuple[Database, DurableStore], center: FakeCenter
) -> None:
    db, store = edge
    study = _send_study(db, store)
    sr = _sr(study)
    center.add(sr)
    with OrthancPeer(aet="DEMO_PACS") as orthanc:
        d = _deliverer(db, store, center, orthanc.dicom_port)
        try:
            d.poll()
            assert d.tick() == 1
        finally:
            d.close()
        (instance,) = orthanc.client.get("/instances").json()
        tags = orthanc.client.get(f"/instances/{instance}/tags", params={"simplify": ""}).json()
        raw = orthanc.instance_file(instance)
    orig = study.originals[0]
    assert tags["PatientID"] == PATIENT["id"]
    assert tags["PatientName"] == PATIENT["name"]
    assert tags["StudyInstanceUID"] == orig.StudyInstanceUID
    assert tags["SOPInstanceUID"] == sr.SOPInstanceUID
    got = pydicom.dcmread(BytesIO(raw))
    evidence = got.CurrentRequestedProcedureEvidenceSequence[0]
    assert evidence.StudyInstanceUID == orig.StudyInstanceUID
    assert evidence.ReferencedSeriesSequence[0].SeriesInstanceUID == orig.SeriesInstanceUID
    assert _uids(got, "ReferencedSOPInstanceUID") == {
        str(o.SOPInstanceUID) for o in study.originals
    }
    assert hd.sr.srread(BytesIO(raw)).PatientBirthDate == PATIENT["birth"]
    (row,) = _rows(db)
    assert row.state == "delivered" and row.pacs_status == 0
    assert row.delivered_sha256 is not None and len(row.delivered_sha256) == 64


@pytest.mark.slow
def test_orthanc_down_for_a_while_then_exactly_one_copy(
    edge: tuple[Database, DurableStore], center: FakeCenter
) -> None:
    db, store = edge
    study = _send_study(db, store)
    first = _sr(study)
    center.add(first)
    orthanc = OrthancPeer(aet="DEMO_PACS")  # ports chosen, not started yet
    d = _deliverer(db, store, center, orthanc.dicom_port)
    t0 = utcnow()
    try:
        d.poll()
        for i in range(3):
            assert d.tick(t0 + timedelta(seconds=30 * i)) == 0
        (row,) = _rows(db)
        assert row.state == "pending" and row.attempts == 3
        with orthanc:
            assert d.tick(t0 + timedelta(seconds=120)) == 1
            for i in range(3):  # later loops: nothing is sent again
                d.poll()
                assert d.tick(t0 + timedelta(seconds=300 + 60 * i)) == 0
            center.add(_sr(study, version=2, previous=first), version=2)
            assert d.poll() == 1
            assert d.tick(t0 + timedelta(seconds=600)) == 1
            instances = orthanc.client.get("/instances").json()
            series = orthanc.client.get("/series").json()
    finally:
        d.close()
    assert len(instances) == 2 and len(series) == 2  # v1 once, v2 once, each its own series
    assert [(r.version, r.state) for r in _rows(db)] == [(1, "delivered"), (2, "delivered")]


# -- CT series for the SEG case -------------------------------------------------------------------


def _ct_series(slices: int = 8, size: int = 32) -> list[Dataset]:
    """Original CT slices (identity everywhere), 2.5 mm apart in one frame of reference."""
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    out = []
    for i in range(slices):
        ds = make_instance(study, series, modality="CT", rows=size, seed=i)
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        ds.FrameOfReferenceUID = frame
        ds.PositionReferenceIndicator = ""
        ds.StudyID = "S1"
        ds.SeriesNumber, ds.InstanceNumber = 3, i + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [-11.2, -11.2, -120.0 + 2.5 * i]
        ds.PixelSpacing = [0.7, 0.7]
        ds.SliceThickness = 2.5
        ds.KVP = 120
        ds.AcquisitionNumber = 1
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        del ds.SourceImageSequence
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta = meta
        out.append(ds)
    return out


def _nodule_mask() -> np.ndarray:
    mask = np.zeros((8, 32, 32), dtype=bool)
    mask[2:5, 10:16, 9:15] = True
    return mask
