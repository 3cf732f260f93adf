"""The edge outbox against a real HTTP center built on the center's own intake and job code.

The Ray Serve ingress itself is exercised end to end in tests/e2e; here the peer is a plain
FastAPI app (uvicorn on loopback) so outages and restarts can be staged precisely.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
import uvicorn
import yaml
from fastapi import FastAPI, Header, Request, Response
from pydicom.dataset import Dataset
from sqlalchemy import select, update

from dicom_io.forwarder import Forwarder
from dicom_io.gateway_status import gateway_status
from dicom_io.header import parse_header
from dicom_io.identity_map import lookup_pseudonym
from dicom_io.ingest import Ingestor
from dicom_io.store import DurableStore
from dicom_io.stow import decode_multipart, store_status
from radbridge.agreements import load_agreements, parse_agreements
from radbridge.audit import AuditTrail
from radbridge.contract import (
    AGREEMENT_HEADER,
    PRIORITY_HEADER,
    STUDIES,
    STUDY_COMPLETE,
    STUDY_PREPARE,
    STUDY_PURGE,
    CenterClient,
    CompleteStudy,
    PrepareOut,
    PrepareStudy,
    PurgeOut,
    PurgeStudy,
)
from radbridge.db import Database, upgrade
from radbridge.db.agreements import sync_agreements
from radbridge.db.tables import JobRow, StudyRow, utcnow
from radbridge.errors import RadbridgeError
from radbridge.http_errors import radbridge_error_handler
from serving import jobs, retention
from serving.intake import receive_instances, stow_response
from tests.conftest import REPO, free_port, identity_needles, make_instance

AGREEMENTS = REPO / "radbridge/defaults/agreements.yaml"


class Center:
    """A loopback HTTP center that stores with serving.intake and completes with serving.jobs."""

    def __init__(self, tmp: Path) -> None:
        self.db_url = f"sqlite:///{tmp / 'center.db'}"
        upgrade(self.db_url, "center")
        self.db = Database(self.db_url)
        sync_agreements(self.db, load_agreements(AGREEMENTS))
        self.audit = AuditTrail(self.db, "center")
        self.store_dir = tmp / "center-store"
        self.store = DurableStore(self.store_dir)
        self.port = free_port()
        self.overloaded = False  # answer STOW-RS like the Serve center over its backlog bound
        self.priorities: list[str] = []
        self.hints: list[tuple[str, int, bool]] = []  # (study, count, the center held it)
        app = FastAPI()
        app.add_exception_handler(RadbridgeError, radbridge_error_handler)

        @app.post(STUDIES)
        async def stow(
            request: Request,
            x_radbridge_agreement: str = Header(..., alias=AGREEMENT_HEADER),
            x_radbridge_priority: str = Header("routine", alias=PRIORITY_HEADER),
        ) -> Response:
            self.priorities.append(x_radbridge_priority)
            if self.overloaded:
                return Response(status_code=503, headers={"Retry-After": "60"})
            parts = decode_multipart(await request.body(), request.headers["content-type"])
            out = receive_instances(self.db, self.store, x_radbridge_agreement, parts)
            # The Serve center's answer: the STOW-RS response body and its status.
            return Response(
                json.dumps(stow_response(out)),
                status_code=store_status(len(out.stored), len(out.failed)),
                media_type="application/dicom+json",
            )

        @app.post(STUDY_COMPLETE, status_code=202)
        async def complete(study_uid: str, body: CompleteStudy) -> dict[str, int]:
            job, _ = jobs.complete_study(self.db, study_uid, body)
            return {"job_id": job.id}

        @app.post(STUDY_PREPARE, status_code=202)
        async def prepare(study_uid: str, body: PrepareStudy) -> PrepareOut:
            held = jobs.study_instances(self.db, body.agreement_id, study_uid, body.instance_count)
            self.hints.append((study_uid, body.instance_count, held is not None))
            return PrepareOut(preparing=held is not None)

        @app.post(STUDY_PURGE)
        async def purge(study_uid: str, body: PurgeStudy) -> PurgeOut:
            item = retention.purge_now(
                self.db, self.store, self.audit, body.agreement_id, study_uid, body.reason
            )
            return PurgeOut(purged=item is not None, files=item.files if item else 0)

        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self) -> None:
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(5)


@pytest.fixture
def edge(edge_db: Database, tmp_path: Path) -> Iterator[tuple[Database, DurableStore]]:
    yield edge_db, DurableStore(tmp_path / "edge-store")


def _forwarder(
    db: Database,
    store: DurableStore,
    port: int,
    agreements=None,
    retry_max_s: float = 4,
    **extra: object,
) -> Forwarder:  # type: ignore[no-untyped-def]
    aset = agreements or load_agreements(AGREEMENTS)
    from radbridge.metrics import EdgeMetrics

    return Forwarder(  # type: ignore[arg-type]
        db,
        store,
        lambda: aset,
        "test-secret",
        CenterClient(f"http://127.0.0.1:{port}", timeout_s=5),
        EdgeMetrics(),
        retry_base_s=1,
        retry_max_s=retry_max_s,
        **extra,
    )


def _ingest(  # type: ignore[no-untyped-def]
    db: Database,
    store: DurableStore,
    n: int = 2,
    *,
    expected: int | None = None,
    first=None,
    on_stored=None,
) -> list:  # type: ignore[type-arg]
    first = first or make_instance()
    instances = [first] + [
        make_instance(first.StudyInstanceUID, first.SeriesInstanceUID, seed=i) for i in range(1, n)
    ]
    ing = Ingestor(db, store)
    ing.on_stored = on_stored
    for ds in instances:
        if expected is not None:
            ds.NumberOfStudyRelatedInstances = expected
        buf = BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        ing.ingest("demo-hospital-to-center", parse_header(buf.getvalue()), buf.getvalue())
    return instances


def _state(db: Database) -> StudyRow:
    with db.session() as s:
        return s.scalars(select(StudyRow)).one()


def test_center_down_then_up_forwards_once_without_identity(
    edge: tuple[Database, DurableStore], tmp_path: Path
) -> None:
    db, store = edge
    instances = _ingest(db, store)
    center = Center(tmp_path)
    fwd = _forwarder(db, store, center.port)
    later = utcnow() + timedelta(seconds=5)  # past the agreement's 2 s quiet period

    assert fwd.tick(utcnow()) == 0  # still inside the quiet period: nothing happens
    assert fwd.tick(later) == 0  # center is down: retry scheduled, nothing lost
    st = _state(db)
    assert st.state == "receiving" and st.attempts == 1 and "unreachable" in (st.last_error or "")
    assert st.next_attempt_at is not None and st.next_attempt_at > later - timedelta(seconds=5)
    assert fwd.tick(later) == 0  # backoff: not due yet

    center.start()
    try:
        assert fwd.tick(later + timedelta(seconds=10)) == 1
    finally:
        center.stop()
    st = _state(db)
    assert st.state == "forwarded" and st.attempts == 0 and st.last_error is None

    pseudo = lookup_pseudonym(
        db, "demo-hospital-to-center", "uid", str(instances[0].StudyInstanceUID)
    )
    assert pseudo and pseudo.startswith("2.25.")
    with center.db.session() as s:
        cstudy = s.scalars(select(StudyRow)).one()
        assert cstudy.study_uid == pseudo and cstudy.instance_count == 2
        assert len(s.scalars(select(JobRow)).all()) == 1
    # Every byte the center stored (files and database) is free of the hospital's identity.
    needles = [n for ds in instances for n in identity_needles(ds)]
    blobs = [p.read_bytes() for p in center.store_dir.rglob("*") if p.is_file()]
    blobs.append((tmp_path / "center.db").read_bytes())
    for blob in blobs:
        for needle in needles:
            assert needle not in blob


def test_center_over_its_bound_503_retry_after_then_forwarded_without_loss(
    edge: tuple[Database, DurableStore], tmp_path: Path
) -> None:
    db, store = edge
    instances = _ingest(db, store, n=3)
    center = Center(tmp_path)
    center.overloaded = True
    fwd = _forwarder(db, store, center.port, retry_max_s=300)
    later = utcnow() + timedelta(seconds=5)
    center.start()
    try:
        before = utcnow()
        assert fwd.tick(later) == 0  # 503: kept at the edge, retried not before Retry-After
        st = _state(db)
        assert st.state == "receiving" and st.attempts == 1 and "503" in (st.last_error or "")
        assert st.next_attempt_at is not None
        assert st.next_attempt_at >= before + timedelta(seconds=59)  # not the 1 s backoff
        assert fwd.tick(later + timedelta(seconds=30)) == 0  # not due yet
        center.overloaded = False
        assert fwd.tick(later + timedelta(seconds=61)) == 1
    finally:
        center.stop()
    assert _state(db).state == "forwarded"
    assert center.priorities and set(center.priorities) == {"routine"}
    with center.db.session() as s:
        from radbridge.db.tables import InstanceRow

        assert len(s.scalars(select(InstanceRow)).all()) == len(instances)  # none lost


def test_a_center_out_of_room_keeps_the_study_waiting_not_blocked(
    edge: tuple[Database, DurableStore], tmp_path: Path
) -> None:
    """Every instance refused with 0xA700 (the center's disk is full): a retry, not a block
    that needs a person; once the center has room again, the study goes."""
    db, store = edge
    _ingest(db, store, n=2)
    center = Center(tmp_path)
    center.store.min_free_bytes = 1 << 62  # its watermark is always reached
    center.start()
    try:
        fwd = _forwarder(db, store, center.port)
        later = utcnow() + timedelta(seconds=5)
        assert fwd.tick(later) == 0
        st = _state(db)
        assert st.state == "receiving" and st.attempts == 1
        assert "out of resources" in (st.last_error or "")
        center.store.min_free_bytes = 0
        assert fwd.tick(later + timedelta(seconds=10)) == 1
    finally:
        center.stop()
    assert _state(db).state == "forwarded"
    with center.db.session() as s:
        from radbridge.db.tables import InstanceRow

        assert len(s.scalars(select(InstanceRow)).all()) == 2


def test_no_transfer_basis_blocks_the_study(
    edge: tuple[Database, DurableStore], tmp_path: Path
) -> None:
    db, store = edge
    _ingest(db, store, n=1)
    raw = yaml.safe_load(AGREEMENTS.read_text())
    raw["agreements"][0]["transfer_basis"]["suspended"] = True
    fwd = _forwarder(db, store, free_port(), parse_agreements(raw))
    assert fwd.tick(utcnow() + timedelta(seconds=5)) == 0
    st = _state(db)
    assert st.state == "blocked" and "legal transfer basis" in (st.last_error or "")
    # Once the basis is back in force (and the center is up), the study goes.
    center = Center(tmp_path)
    center.start()
    try:
        assert _forwarder(db, store, center.port).tick(utcnow() + timedelta(seconds=5)) == 1
    finally:
        center.stop()
    assert _state(db).state == "forwarded"


def test_restart_returns_claimed_studies(edge: tuple[Database, DurableStore]) -> None:
    db, store = edge
    _ingest(db, store, n=1)
    with db.session() as s:
        s.scalars(select(StudyRow)).one().state = "forwarding"  # a crash mid-forward
    assert _forwarder(db, store, free_port()).recover() == 1
    assert _state(db).state == "receiving"


def test_stop_during_de_identification_returns_the_study_unsent(
    edge: tuple[Database, DurableStore], tmp_path: Path
) -> None:
    """A gateway asked to stop does not de-identify the rest of a long study first (with OCR
    that takes minutes): the study goes back to the queue, nothing sent, and goes later."""
    db, store = edge
    _ingest(db, store, n=5)
    center = Center(tmp_path)
    center.start()
    try:
        fwd = _forwarder(db, store, center.port)
        stop = threading.Event()
        deidentify, calls = fwd.gate.deidentify, []

        def stop_after_first(*args: object) -> bytes:
            calls.append(args)
            stop.set()  # SIGTERM arrives while the first instance is being de-identified
            return deidentify(*args)  # type: ignore[arg-type]

        fwd.gate.deidentify = stop_after_first  # type: ignore[method-assign]
        assert fwd.tick(utcnow() + timedelta(seconds=5), stop=stop) == 0
        assert len(calls) == 1  # the other four were not started
        st = _state(db)
        assert st.state == "receiving" and st.attempts == 0 and st.last_error is None
        with center.db.session() as s:
            assert s.scalars(select(StudyRow)).all() == []  # nothing reached the center
        assert lookup_pseudonym(db, "demo-hospital-to-center", "uid", st.study_uid) is None

        fwd.gate.deidentify = deidentify  # type: ignore[method-assign]
        assert fwd.tick(utcnow() + timedelta(seconds=5)) == 1  # the next start sends it
    finally:
        center.stop()
    assert _state(db).state == "forwarded"


def test_expected_count_completes_early_and_a_late_instance_reopens(
    edge: tuple[Database, DurableStore], tmp_path: Path
) -> None:
    db, store = edge
    instances = _ingest(db, store, n=2, expected=2)
    center = Center(tmp_path)
    center.start()
    try:
        fwd = _forwarder(db, store, center.port)
        assert fwd.tick(utcnow()) == 1  # all 2 of 2 in: no quiet period to wait for
        st = _state(db)
        assert st.state == "forwarded" and st.version == 1
        with center.db.session() as s:
            first_job = s.scalars(select(JobRow)).one().id
        jobs.start_job(center.db, first_job)  # the center is running version 1
        # A late instance re-opens the study; it waits for the quiet period again (its
        # stated count is already met), then goes as version 2 and the center re-runs the job.
        late = make_instance(instances[0].StudyInstanceUID, instances[0].SeriesInstanceUID, seed=9)
        _ingest(db, store, n=1, first=late)
        st = _state(db)
        assert st.state == "receiving" and st.instance_count == 3
        assert fwd.tick(utcnow() + timedelta(seconds=5)) == 1
        assert _state(db).version == 2
    finally:
        center.stop()
    with center.db.session() as s:
        versions = [j.version for j in s.scalars(select(JobRow).order_by(JobRow.id))]
        assert versions == [1, 2]


def test_a_clock_stepped_back_an_hour_does_not_hold_the_quiet_period(
    edge: tuple[Database, DurableStore], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The wall clock steps back an hour during a study's quiet period (an NTP step, a VM
    snapshot restored): the study is forwarded when its quiet period ends on the new clock,
    not an hour later."""
    db, store = edge
    _ingest(db, store)
    center = Center(tmp_path)
    center.start()
    fwd = _forwarder(db, store, center.port)
    # From the last instance, not from now: the center's start-up above may take a second.
    t = _state(db).last_received_at
    try:
        assert fwd.tick(t + timedelta(seconds=1)) == 0  # quiet for 1 s more
        back = t - timedelta(hours=1)  # the clock stepped back an hour
        assert fwd.tick(back) == 0  # still quiet
        assert fwd.tick(back + timedelta(seconds=3)) == 1
    finally:
        center.stop()
    assert _state(db).state == "forwarded"
    steps = fwd._metrics.registry.get_sample_value("radbridge_edge_clock_steps_back_total")
    assert steps == 1
    assert "the wall clock stepped back 3601 s: the waits of 1 studies" in caplog.text


def test_a_clock_stepped_back_an_hour_does_not_hold_a_retry(
    edge: tuple[Database, DurableStore], tmp_path: Path
) -> None:
    db, store = edge
    _ingest(db, store)
    t = utcnow()
    with db.session() as s:  # quiet long ago; a retry due 3 s from t
        s.execute(
            update(StudyRow).values(
                last_received_at=t - timedelta(minutes=1),
                attempts=1,
                next_attempt_at=t + timedelta(seconds=3),
            )
        )
    center = Center(tmp_path)
    center.start()
    fwd = _forwarder(db, store, center.port)
    try:
        assert fwd.tick(t + timedelta(seconds=1)) == 0  # not due yet
        back = t - timedelta(hours=1)
        assert fwd.tick(back) == 0  # about 2 s left, on the new clock
        assert fwd.tick(back + timedelta(seconds=3)) == 1
    finally:
        center.stop()


def test_a_study_received_after_now_counts_as_received_at_the_gateways_start(
    edge: tuple[Database, DurableStore], tmp_path: Path
) -> None:
    """The clock stepped back an hour while the gateway was down: at its start the study's
    quiet period runs from now, not from an hour ahead."""
    db, store = edge
    _ingest(db, store)
    with db.session() as s:
        s.execute(update(StudyRow).values(last_received_at=utcnow() + timedelta(hours=1)))
    center = Center(tmp_path)
    center.start()
    fwd = _forwarder(db, store, center.port)
    try:
        fwd.recover()
        assert _state(db).last_received_at <= utcnow()
        assert fwd.tick(utcnow() + timedelta(seconds=3)) == 1
    finally:
        center.stop()


def test_without_a_stated_count_the_quiet_period_decides(
    edge: tuple[Database, DurableStore],
) -> None:
    db, store = edge
    _ingest(db, store, n=2, expected=3)  # 2 of 3 in: not complete
    fwd = _forwarder(db, store, free_port())
    assert fwd.tick(utcnow()) == 0 and _state(db).attempts == 0  # not even tried


def test_run_forwards_when_the_quiet_period_ends_not_at_the_next_interval(
    edge: tuple[Database, DurableStore], tmp_path: Path
) -> None:
    """The forwarder's loop wakes when an instance is stored and sleeps until the earliest
    quiet period ends: with a 60 s interval a study is still forwarded about 2 s (the
    agreement's quiet period) after its last instance."""
    db, store = edge
    center = Center(tmp_path)
    center.start()
    fwd = _forwarder(db, store, center.port)
    stop = threading.Event()
    loop = threading.Thread(target=fwd.run, args=(stop, 60.0), daemon=True)
    try:
        loop.start()
        time.sleep(0.3)  # the loop's first tick found nothing and sleeps
        _ingest(db, store, on_stored=fwd.wake)  # as the gateway wires its receive path
        deadline = time.monotonic() + 20  # far less than the 60 s interval
        while _state(db).state != "forwarded":
            assert time.monotonic() < deadline, _state(db).state
            time.sleep(0.05)
    finally:
        stop.set()
        loop.join(5)
        center.stop()
        fwd.close()


# -- burned-in annotation: quarantine at the edge, or mask --------------------------------


def _ingest_us(db: Database, store: DurableStore, study_uid: str, **kwargs: object) -> Dataset:
    from tests.test_deid_burned_in import make_us

    us = make_us(**kwargs)  # type: ignore[arg-type]
    us.StudyInstanceUID = study_uid
    buf = BytesIO()
    us.save_as(buf, enforce_file_format=True)
    Ingestor(db, store).ingest(
        "demo-hospital-to-center", parse_header(buf.getvalue()), buf.getvalue()
    )
    return us


def _center_files(center: Center) -> list[Dataset]:
    return [pydicom.dcmread(p) for p in center.store_dir.rglob("*.dcm")]


def test_burned_in_instance_is_quarantined_and_the_rest_forwarded(
    edge: tuple[Database, DurableStore], tmp_path: Path
) -> None:
    db, store = edge
    instances = _ingest(db, store, n=2)
    us = _ingest_us(db, store, str(instances[0].StudyInstanceUID))
    center = Center(tmp_path)
    center.start()
    fwd = _forwarder(db, store, center.port)
    try:
        assert fwd.tick(utcnow() + timedelta(seconds=5)) == 1
        assert fwd.tick(utcnow() + timedelta(seconds=60)) == 0  # held: a person, not a retry
    finally:
        center.stop()
    st = _state(db)
    assert st.state == "blocked" and st.forwarded_at is not None and st.version == 1
    reason = st.last_error or ""
    assert reason.startswith("quarantined at the edge: 1 of 3 instance(s) not forwarded")
    assert "burned_in_ultrasound x1" in reason and "2 forwarded" in reason
    for secret in ("PID-7788123", "XiaoDong", str(us.SOPInstanceUID), str(us.StudyInstanceUID)):
        assert secret not in reason
    # The PACS admin sees it in `radbridge gateway status` (blocked, with the reason).
    status = gateway_status(db, store, None)
    assert [(r.state, r.last_error) for r in status.stuck] == [("blocked", reason)]
    # The center got the two DX instances and a completion for two; no ultrasound.
    files = _center_files(center)
    assert sorted(f.Modality for f in files) == ["DX", "DX"]
    with center.db.session() as s:
        assert s.scalars(select(StudyRow)).one().instance_count == 2
    metric = fwd._metrics.registry.get_sample_value(
        "radbridge_edge_forward_failures_total",
        {"agreement": "demo-hospital-to-center", "reason": "burned_in_ultrasound"},
    )
    assert metric == 1.0


def test_a_study_of_only_burned_in_instances_sends_nothing(
    edge: tuple[Database, DurableStore], tmp_path: Path
) -> None:
    db, store = edge
    _ingest_us(db, store, "1.2.826.0.1.3680043.8.498.42")
    center = Center(tmp_path)
    center.start()
    try:
        assert _forwarder(db, store, center.port).tick(utcnow() + timedelta(seconds=5)) == 0
    finally:
        center.stop()
    st = _state(db)
    assert (
        st.state == "blocked" and st.forwarded_at is None and "0 forwarded" in (st.last_error or "")
    )
    assert _center_files(center) == []
    with center.db.session() as s:
        assert s.scalars(select(StudyRow)).all() == []  # no completion either


def test_mask_agreement_forwards_masked_ultrasound(
    edge: tuple[Database, DurableStore], tmp_path: Path
) -> None:
    db, store = edge
    raw = yaml.safe_load(AGREEMENTS.read_text())
    raw["agreements"][0]["deidentification"] = {"burned_in": "mask"}
    instances = _ingest(db, store, n=1)
    _ingest_us(db, store, str(instances[0].StudyInstanceUID))
    center = Center(tmp_path)
    center.start()
    try:
        fwd = _forwarder(db, store, center.port, parse_agreements(raw))
        assert fwd.tick(utcnow() + timedelta(seconds=5)) == 1
    finally:
        center.stop()
    assert _state(db).state == "forwarded"
    (us,) = [f for f in _center_files(center) if f.Modality == "US"]
    assert us.BurnedInAnnotation == "NO"
    assert "113101" in [c.CodeValue for c in us.DeidentificationMethodCodeSequence]
    assert (us.pixel_array[:20] == 0).all()  # above the region (rows 20..59): black


def test_other_bytes_under_a_forwarded_uid_block_the_study_instead_of_vanishing(
    edge: tuple[Database, DurableStore], tmp_path: Path
) -> None:
    """The PACS re-sends an instance with other pixels after the study went out: the center
    keeps what it holds (0x0111 Duplicate SOP Instance, its file untouched, no new job) and the
    edge blocks the study with that reason instead of calling it forwarded."""
    db, store = edge
    instances = _ingest(db, store, n=2)
    center = Center(tmp_path)
    fwd = _forwarder(db, store, center.port)
    later = utcnow() + timedelta(seconds=5)
    center.start()
    try:
        assert fwd.tick(later) == 1
        held = {p: p.read_bytes() for p in center.store_dir.rglob("*.dcm")}
        changed = instances[1]
        changed.PixelData = bytes(len(changed.PixelData))  # other pixels, same SOP UID
        buf = BytesIO()
        changed.save_as(buf, enforce_file_format=True)
        Ingestor(db, store).ingest(
            "demo-hospital-to-center", parse_header(buf.getvalue()), buf.getvalue()
        )
        assert fwd.tick(later + timedelta(seconds=10)) == 0
    finally:
        center.stop()
    st = _state(db)
    assert st.state == "blocked" and "0x0111" in (st.last_error or ""), st.last_error
    assert {p: p.read_bytes() for p in center.store_dir.rglob("*.dcm")} == held
    with center.db.session() as s:
        assert len(s.scalars(select(JobRow)).all()) == 1


def test_a_new_person_past_the_pipl_ceiling_is_held_while_a_counted_one_goes(
    edge: tuple[Database, DurableStore], tmp_path: Path
) -> None:
    """max_persons_per_year 2 (fewer than 2 persons a year): patient A's study goes, patient
    B's is blocked at the edge with the reason and audited once, A's next study still goes."""
    from dicom_io.person_ledger import PersonLedger
    from radbridge.audit import AuditTrail, records, verify

    db, store = edge
    raw = yaml.safe_load(AGREEMENTS.read_text())
    raw["agreements"][0]["transfer_basis"]["max_persons_per_year"] = 2
    audit = AuditTrail(db, "edge:test")
    ledger = PersonLedger(db, "test-secret", audit=audit)
    patient_b = {"name": "Li^Mei=李^梅", "id": "PID-B-0002", "birth": "19800101"}
    a1 = _ingest(db, store, n=1)[0]
    b1 = _ingest(db, store, n=1, first=make_instance(patient=patient_b))[0]
    a2 = _ingest(db, store, n=1, first=make_instance(seed=7))[0]  # A's second study
    center = Center(tmp_path)
    center.start()
    later = utcnow() + timedelta(seconds=5)
    try:
        fwd = _forwarder(db, store, center.port, parse_agreements(raw), audit=audit, ledger=ledger)
        assert fwd.tick(later) == 2
        assert fwd.tick(later + timedelta(seconds=1)) == 0  # B held: not every tick audited
    finally:
        center.stop()
    with db.session() as s:
        states = {r.study_uid: (r.state, r.last_error) for r in s.scalars(select(StudyRow))}
    assert states[str(a1.StudyInstanceUID)][0] == "forwarded"
    assert states[str(a2.StudyInstanceUID)][0] == "forwarded"
    state, reason = states[str(b1.StudyInstanceUID)]
    assert state == "blocked" and "PIPL person ceiling" in (reason or ""), reason
    assert "PID-B" not in (reason or "")
    events = [json.loads(r.details)["event"] for r in records(db)]
    assert events.count("transfer-ceiling") == 1 and events.count("export") == 2, events
    assert verify(db)[1] is None


def test_consent_required_then_recorded_then_withdrawn_purges_the_center_copy(
    edge: tuple[Database, DurableStore], tmp_path: Path
) -> None:
    """An agreement that requires consent: a patient's study waits at the edge without a
    reference, leaves once one is recorded; a withdrawal holds the patient's next study for
    good and has the center delete what it holds (the purge outbox, against the center's own
    retention code), audited at both ends."""
    from dicom_io.consent import NO_REFERENCE, WITHDRAWN, ConsentRegister, withdraw
    from dicom_io.purge_requests import PurgeOutbox, pending_purges

    db, store = edge
    raw = yaml.safe_load(AGREEMENTS.read_text())
    raw["agreements"][0]["consent"] = {"required": True}
    aset = parse_agreements(raw)
    agreement = aset.agreements[0]
    audit = AuditTrail(db, "edge:test")
    register = ConsentRegister(db, "test-secret", audit)
    instances = _ingest(db, store)
    center = Center(tmp_path)
    center.start()
    fwd = _forwarder(db, store, center.port, agreements=aset, consent=register)
    outbox = PurgeOutbox(db, CenterClient(f"http://127.0.0.1:{center.port}", timeout_s=5))
    later = utcnow() + timedelta(seconds=5)
    try:
        assert fwd.tick(later) == 0
        st = _state(db)
        assert (st.state, st.last_error) == ("blocked", NO_REFERENCE)
        assert st.next_attempt_at is not None  # looked at again: a reference may come
        patient = str(instances[0].PatientID)
        register.record(agreement.id, "", patient, "CONSENT-2026-0042", "cli")
        assert fwd.tick(later + timedelta(hours=2)) == 1
        assert _state(db).state == "forwarded"
        pseudo = lookup_pseudonym(db, agreement.id, "uid", str(instances[0].StudyInstanceUID))
        with center.db.session() as s:
            assert s.scalars(select(StudyRow.study_uid)).all() == [pseudo]

        held, purges = withdraw(db, store, register, agreement, "", patient, audit)
        assert (held, purges) == (0, 1)
        assert withdraw(db, store, register, agreement, "", patient, audit)[1] == 0  # once
        assert pending_purges(db) == 1
        assert outbox.tick() == 0 and pending_purges(db) == 1  # 409: its job still runs
        with center.db.session() as s:
            job_id = s.scalars(select(JobRow.id)).one()
        jobs.start_job(center.db, job_id)
        jobs.finish_job(center.db, job_id)
        assert outbox.tick(utcnow() + timedelta(minutes=5)) == 1 and pending_purges(db) == 0
        with center.db.session() as s:
            assert s.scalars(select(StudyRow)).all() == []  # the center copy is gone
        assert not list(center.store_dir.rglob("*.dcm"))

        # The same patient's next study stays at the edge, for good.
        second = make_instance(patient={"name": "X^Y", "id": patient, "birth": "19700101"})
        buf = BytesIO()
        second.save_as(buf, enforce_file_format=True)
        Ingestor(db, store).ingest(agreement.id, parse_header(buf.getvalue()), buf.getvalue())
        assert fwd.tick(later + timedelta(hours=3)) == 0
        with db.session() as s:
            new = s.scalars(
                select(StudyRow).where(StudyRow.study_uid == str(second.StudyInstanceUID))
            ).one()
        assert (new.state, new.last_error, new.next_attempt_at) == ("blocked", WITHDRAWN, None)
    finally:
        outbox.close()
        center.stop()


def test_a_radiograph_with_the_name_in_its_pixels_reaches_the_center_masked(
    edge: tuple[Database, DurableStore], tmp_path: Path
) -> None:
    """The demo agreement reads text in unflagged projection images (text_in_pixels: mask):
    the patient's name, ID and birth date drawn into a CR's pixels never reach the center."""
    from dicom_io.deid.ocr import _display, _identifier_tokens, read_words
    from dicom_io.deid.ocr import _spells_identifier as spells
    from tests.test_deid_ocr import _radiograph

    db, store = edge
    cr = _radiograph()
    buf = BytesIO()
    cr.save_as(buf, enforce_file_format=True)
    Ingestor(db, store).ingest(
        "demo-hospital-to-center", parse_header(buf.getvalue()), buf.getvalue()
    )
    center = Center(tmp_path)
    center.start()
    try:
        assert _forwarder(db, store, center.port).tick(utcnow() + timedelta(seconds=5)) == 1
    finally:
        center.stop()
    [stored] = list(center.store_dir.rglob("*.dcm"))
    out = pydicom.dcmread(stored)
    assert out.BurnedInAnnotation == "NO"
    assert "113101" in {str(i.CodeValue) for i in out.DeidentificationMethodCodeSequence}
    tokens = _identifier_tokens(cr)
    assert not [w.text for w in read_words(_display(out)) if spells(w.text, tokens)]


def test_the_outbox_reports_the_age_of_its_oldest_waiting_study(
    edge: tuple[Database, DurableStore], tmp_path: Path
) -> None:
    from radbridge.metrics import EdgeMetrics

    db, store = edge
    _ingest(db, store)
    metrics = EdgeMetrics()
    fwd = Forwarder(
        db,
        store,
        lambda: load_agreements(AGREEMENTS),
        "test-secret",
        CenterClient(f"http://127.0.0.1:{free_port()}", timeout_s=2),  # nobody listens
        metrics,
        retry_base_s=1,
        retry_max_s=4,
    )
    with db.session() as s:  # the study came in 90 minutes ago
        study = s.scalars(select(StudyRow)).one()
        study.first_received_at = utcnow() - timedelta(minutes=90)
        study.last_received_at = study.first_received_at
    assert fwd.tick() == 0  # the center is down: the study waits
    age = metrics.registry.get_sample_value("radbridge_edge_outbox_oldest_seconds")
    assert age is not None and 5390 <= age <= 5460
    with db.session() as s:
        s.scalars(select(StudyRow)).one().state = "forwarded"
    fwd.tick()
    assert metrics.registry.get_sample_value("radbridge_edge_outbox_oldest_seconds") == 0.0


def _center_instances(center: Center, wanted: int, timeout_s: float = 10) -> int:
    """The instances the center holds, once it holds ``wanted`` (or after ``timeout_s``): an
    early request is still in flight when ``tick`` returns."""
    from radbridge.db.tables import InstanceRow

    deadline = time.monotonic() + timeout_s
    while True:
        with center.db.session() as s:
            n = len(s.scalars(select(InstanceRow.id)).all())
        if n >= wanted or time.monotonic() > deadline:
            return n
        time.sleep(0.02)


def _wait_for(check: Callable[[], bool], timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "not in time"
        time.sleep(0.02)


def _quiet_minute(**agreement: object):  # type: ignore[no-untyped-def]
    """The demo agreement with a 60 s quiet period (a test's own steps take seconds).

    Its radiographs are not read for text (``deidentification.text_in_pixels: off``): these
    tests send up to 38 of them, and Tesseract's 0.4 s each is not what they check. The scan
    on the forward path has its own tests here (``test_a_radiograph_with_the_name_in_...``)."""
    raw = yaml.safe_load(AGREEMENTS.read_text())
    raw["agreements"][0].update(quiet_period_s=60, **agreement)
    raw["agreements"][0].setdefault("deidentification", {})["text_in_pixels"] = "off"
    return parse_agreements(raw)


STABLE = timedelta(seconds=61)


def test_full_requests_go_during_the_quiet_period_and_the_rest_when_stable(
    edge: tuple[Database, DurableStore], tmp_path: Path
) -> None:
    """37 instances in their quiet period: two full requests (32) go at once, the center
    starts nothing; stable, the last 5 go on the same sender and the study completes with
    all 37, one job, one Export record of 37, nothing sent twice."""
    from radbridge.audit import records

    db, store = edge
    instances = _ingest(db, store, n=37)
    audit = AuditTrail(db, "edge:test")
    center = Center(tmp_path)
    center.start()
    try:
        fwd = _forwarder(db, store, center.port, _quiet_minute(), audit=audit)
        assert fwd.tick(utcnow()) == 0  # quiet period running: not forwarded
        assert _center_instances(center, 32) == 32
        assert len(center.priorities) == 2  # two requests of 16
        with center.db.session() as s:
            assert s.scalars(select(JobRow)).all() == []  # no job before complete
        assert _state(db).state == "receiving"
        assert fwd.tick(utcnow()) == 0  # nothing new: nothing sent again
        assert len(center.priorities) == 2
        assert fwd.tick(utcnow() + STABLE) == 1
    finally:
        center.stop()
    assert len(center.priorities) == 3  # the last request: 5 instances
    assert _center_instances(center, 37) == 37
    with center.db.session() as s:
        assert len(s.scalars(select(JobRow)).all()) == 1
        assert s.scalars(select(StudyRow)).one().instance_count == len(instances)
    details = [json.loads(r.details) for r in records(db)]
    assert [d["event"] for d in details] == ["begin-transferring", "export"], details
    assert details[0]["mechanism"] and "instances" not in details[0]  # before the first request
    assert details[1]["instances"] == 37


def test_the_rest_goes_once_the_study_is_idle_and_stable_needs_only_complete(
    edge: tuple[Database, DurableStore], tmp_path: Path
) -> None:
    """37 instances: two full requests at once; idle for a quarter of the quiet period, the
    last 5 go too and the center still starts nothing; an instance arriving then goes at
    its own idle time; stable, the forward sends nothing more and completes with all 38."""
    from dicom_io.early_sending import EARLY_REST_FRACTION

    db, store = edge
    instances = _ingest(db, store, n=37)
    center = Center(tmp_path)
    center.start()
    idle = timedelta(seconds=60 * EARLY_REST_FRACTION + 1)
    try:
        fwd = _forwarder(db, store, center.port, _quiet_minute())
        assert fwd.tick(utcnow()) == 0
        assert _center_instances(center, 32) == 32
        assert fwd.tick(utcnow() + idle - timedelta(seconds=2)) == 0  # not idle long enough
        assert len(center.priorities) == 2
        assert fwd.tick(utcnow() + idle) == 0
        assert _center_instances(center, 37) == 37
        assert len(center.priorities) == 3  # the rest: one partial request
        _wait_for(lambda: len(center.hints) == 1)
        assert [h[1:] for h in center.hints] == [(37, True)]  # probably whole: all 37 held
        with center.db.session() as s:
            assert s.scalars(select(JobRow)).all() == []  # no job before complete
        assert _state(db).state == "receiving"
        assert fwd.tick(utcnow() + idle) == 0  # still idle, nothing new: no second hint
        late = make_instance(instances[0].StudyInstanceUID, instances[0].SeriesInstanceUID, seed=99)
        _ingest(db, store, n=1, first=late)
        assert fwd.tick(utcnow()) == 0  # it just came: it waits for its own idle time
        assert len(center.priorities) == 3
        assert fwd.tick(utcnow() + idle) == 0
        assert _center_instances(center, 38) == 38
        assert len(center.priorities) == 4
        _wait_for(lambda: len(center.hints) == 2)
        assert fwd.tick(utcnow() + STABLE) == 1
    finally:
        center.stop()
    assert len(center.priorities) == 4  # stable: nothing left to send, only complete
    assert [h[1:] for h in center.hints] == [(37, True), (38, True)]
    assert (
        len({h[0] for h in center.hints}) == 1
        and center.hints[0][0] != instances[0].StudyInstanceUID
    )
    with center.db.session() as s:
        assert len(s.scalars(select(JobRow)).all()) == 1
        assert s.scalars(select(StudyRow)).one().instance_count == 38


def test_a_failed_early_request_leaves_the_study_to_go_whole_when_stable(
    edge: tuple[Database, DurableStore], tmp_path: Path
) -> None:
    """The center refuses the early request (503): no second early try (no storm on every
    arriving instance), the study stays receiving with no attempt counted, and when stable
    it goes whole."""
    db, store = edge
    _ingest(db, store, n=20)
    center = Center(tmp_path)
    center.overloaded = True
    center.start()
    try:
        fwd = _forwarder(db, store, center.port, _quiet_minute())
        assert fwd.tick(utcnow()) == 0
        fwd._sending.submit(lambda: None).result()  # the early request has its answer
        assert fwd.tick(utcnow()) == 0  # the failure surfaces: early sending stops
        assert fwd.tick(utcnow()) == 0
        assert len(center.priorities) == 1  # one early request, refused; none after it
        st = _state(db)
        assert st.state == "receiving" and st.attempts == 0
        center.overloaded = False
        assert fwd.tick(utcnow() + STABLE) == 1
    finally:
        center.stop()
    assert _center_instances(center, 20) == 20
    assert len(center.priorities) == 1 + 2  # the whole study: 16 + 4


def test_forward_early_off_sends_nothing_before_the_quiet_period_ends(
    edge: tuple[Database, DurableStore], tmp_path: Path
) -> None:
    db, store = edge
    _ingest(db, store, n=20)
    center = Center(tmp_path)
    center.start()
    try:
        fwd = _forwarder(db, store, center.port, _quiet_minute(), forward_early=False)
        assert fwd.tick(utcnow()) == 0
        fwd._sending.submit(lambda: None).result()
        assert center.priorities == []
        assert fwd.tick(utcnow() + STABLE) == 1
    finally:
        center.stop()
    assert len(center.priorities) == 2


def test_early_sending_waits_for_consent_like_the_forward(
    edge: tuple[Database, DurableStore], tmp_path: Path
) -> None:
    """An agreement that requires consent, none recorded: nothing leaves early either."""
    from dicom_io.consent import ConsentRegister

    db, store = edge
    _ingest(db, store, n=20)
    center = Center(tmp_path)
    center.start()
    try:
        fwd = _forwarder(
            db,
            store,
            center.port,
            _quiet_minute(consent={"required": True}),
            consent=ConsentRegister(db, "test-secret", AuditTrail(db, "edge:test")),
        )
        assert fwd.tick(utcnow()) == 0
        fwd._sending.submit(lambda: None).result()
        assert center.priorities == []
        assert fwd.tick(utcnow() + STABLE) == 0  # held, as without early sends
    finally:
        center.stop()
    assert center.priorities == []
    assert _state(db).state == "blocked"


def test_a_study_stopped_after_its_early_requests_is_on_the_trail(
    edge: tuple[Database, DurableStore], tmp_path: Path
) -> None:
    """Instances left early, then the gateway stopped before the study was stable: the trail
    has Begin Transferring (DICOM 110102) for what left, and no Export yet; sent whole later,
    Begin Transferring again, then one Export."""
    from radbridge.audit import records

    db, store = edge
    _ingest(db, store, n=16)
    audit = AuditTrail(db, "edge:test")
    center = Center(tmp_path)
    center.start()
    try:
        fwd = _forwarder(db, store, center.port, _quiet_minute(), audit=audit)
        assert fwd.tick(utcnow()) == 0
        assert _center_instances(center, 16) == 16
        fwd.close()  # the gateway stops: what was sent early is forgotten
        events = [json.loads(r.details)["event"] for r in records(db)]
        assert events == ["begin-transferring"], events
        fwd = _forwarder(db, store, center.port, _quiet_minute(), audit=audit)
        assert fwd.tick(utcnow() + STABLE) == 1
    finally:
        center.stop()
    events = [json.loads(r.details)["event"] for r in records(db)]
    assert events == ["begin-transferring", "begin-transferring", "export"], events
