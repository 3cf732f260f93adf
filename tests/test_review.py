"""The reading room's modules on a real center database (SQLite and PostgreSQL) and store:
readers and sessions, the worklist and claims, reports and sign-off, DICOMweb scoping, i18n."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pydicom
import pytest

from dicom_io.store import DurableStore
from radbridge.agreements import AgreementSet, load_agreements
from radbridge.db import Database
from radbridge.db.tables import StudyRow, utcnow
from radbridge.errors import AuthError, ConfigError, NotFoundError, PolicyError
from review import dicomweb, reports, worklist
from review.i18n import messages, plural, templates
from review.readers import add_reader, check_password, set_active
from review.sessions import IDLE, end_session, resolve_session, start_session
from review.study import study_detail
from serving import result_objects
from serving.intake import receive_instances
from tests.conftest import REPO
from tests.test_intake_jobs import AGREEMENT, _deid_study
from tests.test_result_objects import _run_job
from tests.test_serving_units import _manifest

PASSWORD = "correct horse battery"
OTHER = "other-hospital-to-center"


@pytest.fixture
def agreements() -> AgreementSet:
    """The demo agreement plus a second hospital served by another reading center."""
    base = load_agreements(REPO / "radbridge/defaults/agreements.yaml")
    demo = base.agreements[0]
    other = demo.model_copy(
        update={
            "id": OTHER,
            "hospital": demo.hospital.model_copy(
                update={"name": "Other Hospital", "calling_ae_titles": ["OTHER_PACS"]}
            ),
            "reading_center": demo.reading_center.model_copy(update={"name": "Other Center"}),
        }
    )
    return AgreementSet(agreements=[demo, other])


@pytest.fixture
def room(center_db: Database, tmp_path: Path, agreements: AgreementSet):  # type: ignore[no-untyped-def]
    from radbridge.db.agreements import sync_agreements

    sync_agreements(center_db, agreements)
    store = DurableStore(tmp_path / "store")
    center = agreements.agreements[0].reading_center.name
    alice = add_reader(center_db, "alice", PASSWORD, center=center, observer_id="RB-0001")
    bob = add_reader(center_db, "bob", PASSWORD, center=center, observer_id="RB-0002")
    olga = add_reader(
        center_db, "olga", PASSWORD, center="Other Center", observer_id="RB-0003", locale="zh"
    )
    return center_db, store, alice, bob, olga


def _study(
    db: Database, store: DurableStore, agreement: str = AGREEMENT, priority: str = "routine"
) -> int:
    parts = _deid_study(2)
    uid = receive_instances(db, store, agreement, parts).stored[0].study_uid
    job_id = _run_job_for(db, uid, agreement)
    result_objects.build_for_job(db, store, job_id, {"chest-xray-demo:1": _manifest()})
    with db.session() as s:
        row = s.query(StudyRow).filter_by(study_uid=uid).one()
        row.priority = priority
        return row.id


def _run_job_for(db: Database, uid: str, agreement: str) -> int:
    import tests.test_result_objects as tro

    saved = tro.AGREEMENT
    tro.AGREEMENT = agreement
    try:
        return _run_job(db, uid, 2)
    finally:
        tro.AGREEMENT = saved


def test_passwords_are_argon2_and_checked(room) -> None:  # type: ignore[no-untyped-def]
    db, *_ = room
    assert check_password(db, "alice", PASSWORD).observer_id == "RB-0001"
    with pytest.raises(AuthError):
        check_password(db, "alice", "wrong password!")
    with pytest.raises(AuthError):
        check_password(db, "nobody", PASSWORD)
    with db.session() as s:
        from radbridge.db.tables import ReaderRow

        assert (
            s.query(ReaderRow)
            .filter_by(username="alice")
            .one()
            .password_hash.startswith("$argon2id$")
        )
    with pytest.raises(ConfigError, match="password"):
        add_reader(db, "carol", "short", center="x", observer_id="RB-9")
    with pytest.raises(ConfigError, match="username: alice exists"):
        add_reader(db, "alice", PASSWORD, center="x", observer_id="RB-9")


def test_sessions_expire_when_idle_and_end_at_sign_out(room) -> None:  # type: ignore[no-untyped-def]
    db, _, alice, *_ = room
    now = utcnow()
    token = start_session(db, alice, now)
    assert resolve_session(db, token, now + timedelta(minutes=5)).username == "alice"
    assert resolve_session(db, token, now + timedelta(minutes=5) + IDLE) is None
    token = start_session(db, alice)
    end_session(db, token)
    assert resolve_session(db, token) is None
    token = start_session(db, alice)
    set_active(db, "alice", False)
    assert resolve_session(db, token) is None
    assert resolve_session(db, "x" * 500) is None


def test_worklist_order_scoping_and_claims(room, agreements) -> None:  # type: ignore[no-untyped-def]
    db, store, alice, bob, olga = room
    routine = _study(db, store)
    stat = _study(db, store, priority="stat")
    theirs = _study(db, store, agreement=OTHER)
    rows = worklist.worklist(db, agreements, alice)
    assert [r.study_id for r in rows] == [stat, routine]  # STAT first; the other center's unseen
    assert rows[0].ai_positive and rows[0].ai_summary[0]["label"] == "cardiomegaly"
    deadline = rows[0].deadline
    assert deadline > rows[0].received_at
    assert [r.study_id for r in worklist.worklist(db, agreements, olga)] == [theirs]
    assert (
        worklist.worklist(db, agreements, alice, worklist.WorklistFilter(priority="stat"))[
            0
        ].study_id
        == stat
    )

    assert worklist.claim(db, stat, alice, agreements) is True
    assert worklist.claim(db, stat, alice, agreements) is False  # refreshed, opened before
    with pytest.raises(PolicyError, match="being read by alice"):
        worklist.claim(db, stat, bob, agreements)
    later = utcnow() + worklist.CLAIM_TTL
    assert worklist.claim(db, stat, bob, agreements, now=later) is False  # a lapsed claim
    with pytest.raises(NotFoundError):
        worklist.claim(db, theirs, alice, agreements)  # another agreement: as missing
    assert worklist.etag(rows) != worklist.etag(worklist.worklist(db, agreements, alice))


def test_sign_off_builds_report_objects_the_edge_lists(room, agreements) -> None:  # type: ignore[no-untyped-def]
    db, store, alice, bob, _ = room
    study = _study(db, store, priority="stat")
    worklist.claim(db, study, alice, agreements)
    [ai] = reports.ai_findings(db, study)
    with pytest.raises(PolicyError, match="claim the study"):
        reports.save_draft(db, study, bob, agreements, {})
    reports.save_draft(db, study, alice, agreements, {"impression": "Кардиомегалия."})
    with pytest.raises(PolicyError, match="accept or reject"):
        reports.sign_report(
            db, store, study, alice, agreements, final=True, organization="C", sign=None
        )
    body = {
        "decisions": {ai.key: {"decision": "accepted"}},
        "added": [{"scheme": "SCT", "code": "36118008"}],  # pneumothorax: critical
        "impression": "Кардиомегалия.",
        "impression_language": "ru",
    }
    reports.save_draft(db, study, alice, agreements, body)
    with pytest.raises(PolicyError, match="critical finding"):
        reports.sign_report(
            db, store, study, alice, agreements, final=True, organization="C", sign=None
        )
    now = utcnow().isoformat()
    body["communications"] = [
        {
            "finding": "SCT:36118008",
            "recipient": "ward 3 doctor on duty",
            "method": "phone",
            "communicated_at": now,
            "received_at": now,
        }
    ]
    reports.save_draft(db, study, alice, agreements, body)
    pre = reports.sign_report(
        db, store, study, alice, agreements, final=False, organization="C", sign=None
    )
    final = reports.sign_report(
        db, store, study, alice, agreements, final=True, organization="C", sign=lambda r: "sig"
    )
    assert pre.status == "preliminary" and final.first_final and final.turnaround_s > 0
    languages = agreements.agreements[0].report_languages
    assert len(final.object_ids) == len(languages)
    listed = {o.id: o for o in result_objects.list_objects(db, AGREEMENT, 0, 100)}
    assert set(final.object_ids) <= set(listed) and listed[final.object_ids[0]].kind == "report"
    assert listed[final.object_ids[0]].signature == "sig"
    sr = pydicom.dcmread(store.path(result_objects.object_path(db, final.object_ids[0])))
    assert (sr.VerificationFlag, sr.PreliminaryFlag) == ("VERIFIED", "FINAL")
    # the final SR follows the preliminary one of its language
    prev = sr.PredecessorDocumentsSequence[0].ReferencedSeriesSequence
    referenced = {r.ReferencedSOPInstanceUID for s in prev for r in s.ReferencedSOPSequence}
    pre_sr = pydicom.dcmread(store.path(result_objects.object_path(db, pre.object_ids[0])))
    assert pre_sr.SOPInstanceUID in referenced
    assert worklist.worklist(db, agreements, alice) == []  # read: off the worklist
    # an addendum is version 2
    worklist.claim(db, study, alice, agreements)
    row = reports.save_draft(db, study, alice, agreements, {**body, "impression": "Дополнение."})
    assert row.version == 2 and row.status == "draft"


def test_dicomweb_is_scoped_to_the_readers_agreements(room, agreements) -> None:  # type: ignore[no-untyped-def]
    db, store, alice, _, olga = room
    mine = _study(db, store)
    with db.session() as s:
        uid = s.get(StudyRow, mine).study_uid
    visible = alice.visible(agreements)
    studies = dicomweb.search_studies(db, store, visible, includefield=["00100020"])
    assert [s["0020000D"]["Value"][0] for s in studies] == [uid]
    series = dicomweb.search_series(db, store, visible, uid)
    series_uid = next(
        s["0020000E"]["Value"][0] for s in series if s["00080060"]["Value"][0] != "SR"
    )
    located = dicomweb.locate(db, visible, uid, series_uid)
    [frame] = dicomweb.frame_bytes(store, located[0], [1])
    ds = pydicom.dcmread(store.path(located[0].path))
    assert len(frame) == ds.Rows * ds.Columns * ds.BitsAllocated // 8
    meta = dicomweb.metadata(store, located)
    assert "7FE00010" not in meta[0] and meta[0]["00020010"]["Value"] == [dicomweb.EXPLICIT_LE]
    assert dicomweb.rendered_png(store, located[0], 1).startswith(b"\x89PNG")
    with pytest.raises(NotFoundError):
        dicomweb.locate(db, olga.visible(agreements), uid)
    assert dicomweb.search_studies(db, store, olga.visible(agreements)) == []
    detail = study_detail(db, store, mine, alice, agreements)
    assert detail["study_uid"] == uid and detail["ai_findings"][0]["label"] == "cardiomegaly"
    with pytest.raises(NotFoundError):
        study_detail(db, store, mine, olga, agreements)


def test_priors_are_the_same_patients_earlier_studies_of_the_agreement(room, agreements) -> None:  # type: ignore[no-untyped-def]
    db, store, alice, *_ = room
    earlier = _study(db, store)  # _deid_study: one patient (tests.conftest.PATIENT)
    later = _study(db, store)
    other_agreement = _study(db, store, agreement=OTHER)
    with db.session() as s:  # a third study of another patient
        stranger = _study(db, store)
        s.query(StudyRow).filter_by(id=stranger).update({"patient_key": "0" * 64})
    with db.session() as s:  # later's first slices came first (sent during a quiet period)
        first = s.get(StudyRow, earlier).first_received_at  # type: ignore[union-attr]
        s.query(StudyRow).filter_by(id=later).update({"first_received_at": first - timedelta(1)})
    detail = study_detail(db, store, later, alice, agreements)
    assert [p["study_id"] for p in detail["priors"]] == [earlier]
    prior = detail["priors"][0]
    assert prior["series_uid"] and prior["modality"] == "DX"
    assert study_detail(db, store, earlier, alice, agreements)["priors"] == []  # not a later one
    with db.session() as s:
        keys = {r.id: r.patient_key for r in s.query(StudyRow).all()}
    assert keys[earlier] == keys[later] and keys[earlier] != keys[other_agreement]
    assert len(keys[earlier] or "") == 64  # a hash, not the pseudonymous Patient ID itself


def test_interface_strings_and_plurals() -> None:
    assert plural("ru", "studies", 1) == "1 исследование"
    assert plural("ru", "studies", 3) == "3 исследования"
    assert plural("ru", "studies", 11) == "11 исследований"
    assert plural("zh", "studies", 5) == "5 项检查"
    assert set(messages("en")) == set(messages("ru")) == set(messages("zh"))
    for t in templates().values():
        assert all(f.terms["ru"] and f.terms["zh"] for f in t.findings)


def test_a_nodule_marker_falls_on_its_slice_and_pixel() -> None:
    from review.study import _marker
    from tests.test_result_builders import _ct_series

    series = _ct_series()
    target = series[3]
    iop = [float(v) for v in target.ImageOrientationPatient]
    row_mm, col_mm = (float(v) for v in target.PixelSpacing)
    centre = [
        float(target.ImagePositionPatient[i]) + 10 * col_mm * iop[i] + 20 * row_mm * iop[3 + i]
        for i in range(3)
    ]
    marker = _marker([("1.2.3", ds) for ds in series], {"centre_mm": centre, "diameter_mm": 6})
    assert marker is not None
    assert marker["sopInstanceUID"] == str(target.SOPInstanceUID)
    assert (marker["x"], marker["y"]) == (10.0, 20.0)
    assert _marker([], {"centre_mm": centre}) is None
